"""Issue #19: the real run survives what clusters do to it, tried with the real processes.

Checkpoints from anyone load without running code; a worker killed with kill -9 under
`torchrun --max-restarts` and a SIGTERM on one rank both cost no more than the steps since
the last checkpoint, and the run ends bitwise where an uninterrupted one ends; a full disk
(a real tmpfs, and an injected ENOSPC) loses nothing; two "nodes" on one host train like one
node with two processes, with one writer. One uninterrupted two-node run is the reference
for all of them (module fixture `reference`)."""

import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_stage, run_script

from common import UserError, checkpoint
from common.checkpoint import (
    content_hash,
    list_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from common.distributed import torchrun_workers
from common.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads workers from /proc")
SMALL = GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=16)
STEPS = 10


def args_07(shards, out, *more):
    """07 at its smallest: the tiny model, 2 x 16 tokens per rank, 10 steps in float32,
    a checkpoint every 4 steps, validation every 4 (val losses must match too)."""
    args = f"07_ddp_fineweb.py --data-dir {shards} --out {out} --preset tiny --device cpu"
    args += f" --batch-size 2 --seq-len 16 --total-batch 64 --steps {STEPS} --warmup-steps 2"
    args += " --val-every 4 --val-steps 1 --sample-every 0 --ckpt-every 4 --dtype float32"
    return [*args.split(), *more]  # (pytest's tmp paths hold no spaces)


@pytest.fixture(scope="module")
def env(cache_env):
    return {**cache_env, "OMP_NUM_THREADS": "1"}  # two workers on two cores


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out, splits=("train", "val")):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in rows if r["split"] in splits]


def same_weights(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    moments = [
        (x["exp_avg"], y["exp_avg"])
        for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
    ]
    return (
        a["step"] == b["step"]
        and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        and all(torch.equal(x, y) for x, y in moments)
    )


@pytest.fixture(scope="module")
def reference(shards, env, tmp_path_factory):
    """Two "nodes" on this host (`torchrun --nnodes=2 --nproc_per_node=1 --node_rank=0/1`,
    sharing one --out), never interrupted: (out, node 0's output, node 1's, worker pids)."""
    out = tmp_path_factory.mktemp("two_nodes") / "run"
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={r}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                *args_07(shards, out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    lines, pids = [], {}
    for line in nodes[0].stdout:
        lines.append(line)
        if line.startswith("parameters:"):  # both workers are up: who is who
            pids = {node: torchrun_workers(p.pid) for node, p in enumerate(nodes)}
    text = ["".join(lines), nodes[1].communicate(timeout=300)[0]]
    assert [p.wait(timeout=300) for p in nodes] == [0, 0], text
    return out, text, pids


def test_two_nodes_on_one_host_have_one_writer(reference):
    out, (node0, node1), pids = reference
    assert (set(pids[0]), set(pids[1])) == ({0}, {1})  # --node_rank 0 runs RANK 0
    lock = json.loads((out / ".lock").read_text())
    assert lock["pid"] == pids[0][0]  # rank 0 (node 0's worker) holds the one lock
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "ckpt_000004.pt",
        "ckpt_000008.pt",
        "ckpt_000010.pt",
        "metrics.jsonl",
    ]
    assert "2 processes x 1 micro-steps" in node0 and node0.count("summary:") == 1
    assert "step " not in node1 and "saved" not in node1  # node 1 trains, writes and says nothing
    train = [s for s, split, _ in metrics(out) if split == "train"]
    assert train == list(range(STEPS))  # one line per step: one writer


def torchrun_07(shards, out, env, restarts, act, limit=300):
    """`torchrun --max-restarts=N 07 ...` (no --resume); `act(line, workers)` sees each line
    of rank 0's output with the current {RANK: pid}. Returns (exit code, output)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        *args_07(shards, out),
    ]
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(limit, os.killpg, (p.pid, signal.SIGKILL))  # a hang fails
    watchdog.start()
    lines = []
    for line in p.stdout:
        lines.append(line)
        act(line, lambda: torchrun_workers(p.pid))
    watchdog.cancel()
    return p.wait(timeout=300), "".join(lines)


def test_sigterm_to_one_rank_stops_all_after_one_step_and_a_rerun_continues_exactly(
    shards, env, tmp_path, reference
):
    """SIGTERM to rank 1 alone after step 5: both ranks stop after the same step, rank 0
    writes one checkpoint, every worker exits 75. The same command with `--resume auto` (a
    requeue) ends with the weights, moments and every loss of the uninterrupted two-node
    reference, bitwise (so two nodes also train like one node with two processes)."""
    out, sent = tmp_path / "run", []

    def act(line, pids):
        if not sent and line.startswith("step     5/"):
            os.kill(pids()[1], signal.SIGTERM)  # what SLURM/Kubernetes send, to one rank
            sent.append(1)

    rc, text = torchrun_07(shards, out, env, 0, act)
    assert rc != 0 and sent, text  # the workers exit 75: no restarts left, torchrun fails
    assert "SIGTERM: stopping after this step" in text and "exitcode: 75" in text
    assert re.findall(r"exitcode\s+: (-?\d+) \(pid", text) == ["75", "75"], text  # every rank
    stop = int(text.split("stopped by a signal to another rank at step ")[1].split(",")[0])
    assert 6 <= stop < 8  # the step after the signal, on rank 0 too
    assert [c.name for c in list_checkpoints(out)] == ["ckpt_000004.pt", f"ckpt_{stop:06d}.pt"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *args_07(shards, out, "--resume", "auto"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {stop}" in r.stdout
    assert metrics(out) == metrics(reference[0])  # one line per step, the very same numbers
    assert same_weights(out, reference[0])


def test_dead_worker_is_restarted_and_resumes_by_itself(shards, env, tmp_path, reference):
    """kill -9 of rank 1 after step 5 under `torchrun --max-restarts=1`: torchrun restarts
    both workers, which resume from ckpt 4 by themselves and end as the reference, bitwise.
    The restarted workers connect through torchrun's store, which still holds the dead
    attempt's addresses: setup_ddp's per-attempt prefix keeps them from reading those.
    torchrun exits 0 only if every rank of the last attempt exited 0 (the one restart is
    used up), so no rank of the finished run aborted at exit (issue #26: it did, now and then,
    with `terminate called without an active exception`; common.train.ddp_exit)."""
    out, killed = tmp_path / "run", []

    def act(line, pids):
        if not killed and line.startswith("step     5/"):
            os.kill(pids()[1], signal.SIGKILL)  # no cleanup: a dead GPU, an OOM kill
            killed.append(1)

    rc, text = torchrun_07(shards, out, env, 1, act, limit=120)  # one restart must do
    assert rc == 0 and killed and "resumed from step 4" in text, text
    assert "terminate called" not in text and "SIGABRT" not in text, text
    assert metrics(out) == metrics(reference[0])
    assert same_weights(out, reference[0])


# ---- preemption of one process, in this process -------------------------------------------


def small_07(s07, shards, out, **kw):
    """07 in this process, one rank: 3 steps of 32 tokens, one checkpoint at the end."""
    cfg = dataclasses.replace(s07.Config(device="cpu"), **s07.Config.cpu)
    small = dict(
        data_dir=str(shards),
        out=str(out),
        batch_size=2,
        seq_len=16,
        total_batch=32,
        steps=3,
        warmup_steps=2,
        val_every=2,
        val_steps=1,
        sample_every=0,
        ckpt_every=0,
        dtype="float32",
    )
    return dataclasses.replace(cfg, **{**small, **kw})


def sigusr1_during_step_1(monkeypatch):
    """From now on Run.log sends this process SIGUSR1 once it has logged step 1's training
    line (a signal during step 1). Returns the real Run.log, to put back."""
    from common import run as run_module

    log = run_module.Run.log

    def log_and_signal(self, **record):
        log(self, **record)
        if record.get("split") == "train" and record["step"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(run_module.Run, "log", log_and_signal)
    return log


def test_sigusr1_checkpoints_exits_75_and_resume_auto_continues_exactly(
    shards, tmp_path, monkeypatch, capsys
):
    from common import run as run_module

    s07 = load_stage("07_ddp_fineweb")
    s07.main(small_07(s07, shards, tmp_path / "full"))
    log = sigusr1_during_step_1(monkeypatch)
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as e:
        s07.main(small_07(s07, shards, tmp_path / "cut", resume="auto"))  # nothing yet: fresh
    assert e.value.code == run_module.PREEMPTED == 75
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers put back
    text = capsys.readouterr().out
    assert "no checkpoint in" in text and "stopped by SIGUSR1 at step 2" in text
    assert [c.name for c in list_checkpoints(tmp_path / "cut")] == ["ckpt_000002.pt"]
    monkeypatch.setattr(run_module.Run, "log", log)
    res = s07.main(small_07(s07, shards, tmp_path / "cut", resume="auto"))
    assert sorted(res["losses"]) == [2]
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")
    assert same_weights(tmp_path / "cut", tmp_path / "full")


# ---- a full disk ---------------------------------------------------------------------------


def test_injected_enospc_keeps_everything_and_says_what_is_needed(shards, tmp_path, monkeypatch):
    s07 = load_stage("07_ddp_fineweb")
    out = tmp_path / "run"
    save, calls = torch.save, []

    def save_then_fill_the_disk(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: partly written, then the disk is full
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
    with pytest.raises(UserError) as e:
        s07.main(small_07(s07, shards, out, ckpt_every=1))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"could not write {out / 'ckpt_000002.pt'} (No space")
    assert "a checkpoint needs about 83." in msg and "MiB" in msg and "--resume auto" in msg
    assert [c.name for c in list_checkpoints(out)] == ["ckpt_000001.pt"]
    assert verify_checkpoint(out / "ckpt_000001.pt") is None
    assert sorted(os.listdir(out)) == [".lock", "ckpt_000001.pt", "metrics.jsonl"]  # no temp
    # written in the background (issue 28): step 2 ran while the write failed; the run stopped
    # at the first check after it (here the last save), not after --steps
    assert [s for s, split, _ in metrics(out, ("train",))] == [0, 1, 2]


MOUNT = """mount -t tmpfs -o size=40m tmpfs "$1" || exit 99
shift; "$@" 2>"$COPY/err"; echo $? >"$COPY/rc"; cp -a "$MNT/run" "$COPY/run"
"""


def test_a_real_full_disk_loses_nothing(shards, tmp_path, cache_env):
    """A 40 MiB tmpfs in a private mount namespace: the metrics fit, a checkpoint (83 MiB)
    does not. The real write fails with ENOSPC (torch.save wraps it in a RuntimeError)."""
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1) to make a private mount namespace")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {tmp_path}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        pytest.skip(f"mounting a tmpfs is not allowed here: {probe.stderr.strip()}")
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir(), copy.mkdir()
    run = [
        sys.executable,
        *args_07(shards, mnt / "run"),
        "--steps",
        "2",
        "--ckpt-every",
        "1",
        "--total-batch",
        "32",
        "--val-every",
        "0",
    ]
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", MOUNT, "sh", mnt, *run],
        cwd=ROOT,
        env={**cache_env, "MNT": str(mnt), "COPY": str(copy)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    err = (copy / "err").read_text().strip().splitlines()
    assert (copy / "rc").read_text().strip() == "1" and len(err) == 1, err  # no traceback
    assert err[0].startswith(
        f"error: could not write {mnt / 'run/ckpt_000001.pt'} (No space "
        "left on device): a checkpoint needs about 83."
    )
    assert sorted(os.listdir(copy / "run")) == [".lock", "metrics.jsonl"]  # no temp file
    assert [s for s, split, _ in metrics(copy / "run", ("train",))] == [0]


def test_a_save_the_disk_has_no_room_for_is_not_started(tmp_path, monkeypatch):
    model = GPT(SMALL)
    first = save_checkpoint(tmp_path, 1, model, SMALL)
    size = first.stat().st_size
    usage = shutil.disk_usage(tmp_path)._replace(free=size - 1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    with pytest.raises(UserError) as e:
        save_checkpoint(tmp_path, 2, model, SMALL)
    assert str(e.value) == (
        f"not saving {tmp_path / 'ckpt_000002.pt'}: {(size - 1) / 2**20:,.1f} MiB free in "
        f"{tmp_path}, a checkpoint needs {size / 2**20:,.1f} MiB; earlier checkpoints are "
        "intact: free space, then run again with --resume auto"
    )
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000001.pt"]  # nothing started
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size))
    assert save_checkpoint(tmp_path, 2, model, SMALL).name == "ckpt_000002.pt"


# ---- checkpoints load without running code -------------------------------------------------


class Payload:
    """What a malicious .pt holds: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(tmp_path, shakespeare):
    from common import export, sample

    marker = tmp_path / "code-ran"
    bad = tmp_path / "run" / "ckpt_000001.pt"
    bad.parent.mkdir()
    model = GPT(SMALL)
    state = dict(
        step=1,
        model=model.state_dict(),
        model_config=dataclasses.asdict(SMALL),
        rng=dict(x=Payload(str(marker))),
    )
    torch.save(state, bad)
    want = (
        f"checkpoint {bad} is not a plain checkpoint: it needs posix.mkdir, which only unpickling"
    )
    s08 = load_stage("08_hellaswag")
    loaders = [
        lambda: load_checkpoint(bad),
        lambda: load_checkpoint(bad.parent),
        lambda: model_from_checkpoint(bad),
        lambda: sample.main(sample.Config(ckpt=str(bad), device="cpu")),
        lambda: export.main(export.Config(ckpt=str(bad.parent), out=str(tmp_path / "hf"))),
        lambda: s08.main(
            s08.Config(
                ckpt=str(bad), device="cpu", data=str(ROOT / "tests/data/hellaswag_fixture.jsonl")
            )
        ),
    ]
    for load in loaders:
        with pytest.raises(UserError, match="^" + want):
            load()
    with pytest.raises(UserError, match=f"^{bad} is not a plain checkpoint: it needs posix"):
        checkpoint.main(checkpoint.Config(adopt=str(bad)))  # --adopt does not unpickle it either
    assert not marker.exists()  # never unpickled
    assert not (tmp_path / "hf").exists()


def old_format_rng():
    """RNG states as checkpoints held them before: python's tuple, numpy's (with an array)."""
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())


def test_the_earlier_format_is_refused_until_adopted(tmp_path):
    model = GPT(SMALL)
    old = tmp_path / "ckpt_000003.pt"
    np.random.seed(7)
    state = dict(
        step=3,
        model=model.state_dict(),
        model_config=dataclasses.asdict(SMALL),
        rng=old_format_rng(),
        loader=dict(shard=1, pos=64),
    )
    state["sha256"] = content_hash(state)
    torch.save(state, old)
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path)
    assert str(e.value) == (
        f"{old} is in the earlier checkpoint format (numpy RNG states), which the safe loader "
        f"refuses; if you trust it, convert it: python -m common.checkpoint --adopt {old}"
    )
    r = run_script(["-m", "common.checkpoint", "--adopt", str(old)])
    assert r.returncode == 0 and r.stdout.startswith(f"adopted {old}: added a checksum"), r.stderr
    new = load_checkpoint(old)  # weights_only=True now reads it
    assert all(torch.equal(new["model"][k], v) for k, v in model.state_dict().items())
    set_rng_state(new["rng"])
    assert np.random.rand() == np.random.RandomState(7).rand()  # the same numpy stream
    with pytest.raises(UserError, match="already a verified plain checkpoint"):
        checkpoint.main(checkpoint.Config(adopt=str(old)))


def test_rng_and_any_plain_loader_state_round_trip_with_the_safe_loader(tmp_path):
    model = GPT(SMALL)
    loader = dict(
        shard=2,
        pos=4096,
        file="edufineweb_train_000002.npy",
        epoch=1,
        seed=1337,
        order=[3, 1, 2],
        window=(0, 64),
        done=False,
        frac=0.5,
        note=None,
        perm=torch.arange(5),
    )  # what a shuffled loader may add
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, 1, model, SMALL, loader=loader, rng=rng_state())
    draws = (random.random(), np.random.rand(), torch.rand(1))
    assert torch.load(path, weights_only=True)["loader"]["order"] == [3, 1, 2]
    ckpt = load_checkpoint(path)
    assert {k: v for k, v in ckpt["loader"].items() if k != "perm"} == {
        k: v for k, v in loader.items() if k != "perm"
    } and torch.equal(ckpt["loader"]["perm"], loader["perm"])
    set_rng_state(ckpt["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws
    with pytest.raises(TypeError, match=r"checkpoint value loader\.pos is a int64: store plain"):
        save_checkpoint(tmp_path, 2, model, SMALL, loader=dict(pos=np.int64(5)))
    assert list_checkpoints(tmp_path) == [path]
