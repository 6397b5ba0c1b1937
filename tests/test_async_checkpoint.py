"""Issue #28: checkpoints are written in the background, just as safely.

The loop stalls only for a copy of the state in host memory; a kill -9 while the thread
writes leaves every earlier checkpoint intact and --resume auto goes on from the newest one;
an error in the thread stops every rank with one `error:` line and loses nothing. The test
hook GPT_FROM_SCRATCH_TEST_SAVE (common.checkpoint._test_hook) holds or fails one write
after torch.save, before fsync and rename: no sleeps, no races."""

import json
import os
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from common import checkpoint
from common.checkpoint import (
    TMP_RE,
    BackgroundSave,
    checkpoint_state,
    content_hash,
    host_buffers,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    snapshot,
    verify_checkpoint,
)
from common.model import GPT, GPTConfig
from common.run import Run

SMALL = GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=16, tie_weights=True)


def args_07(shards, out, *more):
    """07 at its smallest: 6 steps of 2 x 16 tokens in float32, a checkpoint every 2."""
    args = f"07_ddp_fineweb.py --data-dir {shards} --out {out} --preset tiny --device cpu"
    args += " --batch-size 2 --seq-len 16 --total-batch 32 --steps 6 --warmup-steps 2"
    args += " --val-every 0 --sample-every 0 --ckpt-every 2 --dtype float32"
    return [*args.split(), *more]  # (pytest's tmp paths hold no spaces)


@pytest.fixture
def env(cache_env):
    return {**cache_env, "OMP_NUM_THREADS": "1"}


def rows(out, split):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def temps(out):
    return [p.name for p in Path(out).iterdir() if TMP_RE.match(p.name)]


def test_snapshot_copies_keep_shared_storage_and_reuse_their_buffers():
    model = GPT(SMALL)  # tied weights: wte and lm_head share one storage
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    state = checkpoint_state(1, model, SMALL, optimizer=opt.state_dict())  # the live tensors
    before = content_hash(state)
    copy, buffers, ready = snapshot(state)
    assert ready is None and content_hash(copy) == before
    wte, head = copy["model"]["transformer.wte.weight"], copy["model"]["lm_head.weight"]
    assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
    assert wte.data_ptr() != model.transformer.wte.weight.data_ptr()  # a copy, not a view
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)  # training goes on: the copy does not change
    assert content_hash(copy) == before != content_hash(state)
    again, reused, _ = snapshot(state, buffers)
    assert {id(b) for b in reused.values()} == {id(b) for b in buffers.values()}  # no new memory
    assert torch.equal(again["model"]["lm_head.weight"], model.lm_head.weight)


def trained_small():
    """SMALL after one AdamW step: its moments exist, as after a run's first step."""
    model = GPT(SMALL)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    return model, opt


def test_host_buffers_are_what_the_first_snapshot_copies_into():
    """Allocated ahead, one buffer per storage (tied weights: one), each the storage's size;
    the first snapshot copies into them and allocates nothing more for these tensors."""
    model, opt = trained_small()
    state = checkpoint_state(1, model, SMALL, optimizer=opt.state_dict())
    buffers = host_buffers(dict(model=model.state_dict(), optimizer=opt.state_dict()))
    params = list(model.parameters())  # lm_head.weight is wte's: one storage for both
    assert len(buffers) == 4 * len(params)  # weights, 2 AdamW moments, step counters
    assert all(
        b.numel() == nbytes and b.device.type == "cpu" for (_, _, nbytes), b in buffers.items()
    )
    copy, used, _ = snapshot(state, buffers)
    assert all(used[key] is buf for key, buf in buffers.items())  # no new memory for them
    assert content_hash(copy) == content_hash(state)


@dataclass
class RunConfig:  # what Run reads of a stage's Config
    out: str
    steps: int = 4
    keep_last: int = 0
    total_batch: int = 8
    seq_len: int = 4


class Position:  # a data loader's resumable position, as Run saves it
    def state_dict(self):
        return {"position": 0}


def test_a_run_allocates_the_host_copy_after_its_first_step_for_the_first_save(tmp_path):
    """Run.preempted() after the first step starts a thread that allocates the host copy;
    the first save joins it and copies into those buffers (its stall is the copy), and
    later saves reuse them."""
    model, opt = trained_small()
    run = Run(RunConfig(out=str(tmp_path)), model, opt, Position(), master=True)
    assert run.preparing is None
    assert run.preempted() is False  # after step 0
    thread, prepared = run.preparing
    thread.join()
    assert len(prepared) == 4 * len(list(model.parameters()))
    run.preempted()  # after step 1: nothing new is allocated
    assert run.preparing[1] is prepared
    run.save(2)
    assert all(run.buffers[key] is buf for key, buf in prepared.items())
    run.save(4)  # the last: waits for its write and verifies it
    assert all(run.buffers[key] is buf for key, buf in prepared.items())
    run.close()
    assert [c.name for c in list_checkpoints(tmp_path)] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    assert torch.equal(load_checkpoint(tmp_path)["model"]["lm_head.weight"], model.lm_head.weight)


@pytest.mark.skipif(
    not hasattr(torch.serialization, "set_crc32_options"), reason="torch < 2.6 writes CRCs"
)
def test_checkpoints_skip_the_zip_crc_and_still_load_and_verify(tmp_path):
    """The zip's CRC-32s are not computed (our sha256 covers the same bytes); torch.load reads
    the file as before, and torch.save elsewhere in the process still writes them."""
    model = GPT(SMALL)
    path = save_checkpoint(tmp_path, 1, model, SMALL)
    with zipfile.ZipFile(path) as z:
        records = [i for i in z.infolist() if i.file_size]
    assert records and all(i.CRC == 0 for i in records)
    assert torch.serialization.get_crc32_options()  # the process-wide setting was put back
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as z:
        assert z.testzip() is None  # every CRC present and right
    assert verify_checkpoint(path) is None
    assert torch.equal(load_checkpoint(path)["model"]["lm_head.weight"], model.lm_head.weight)


def test_verify_reads_a_file_torch_cannot_map_as_torch_load_does(tmp_path):
    """verify_checkpoint maps the file (no copy of its size); a file in torch's legacy
    (non-zip) format cannot be mapped, and is judged by a plain load instead."""
    state = checkpoint_state(1, GPT(SMALL), SMALL)
    state["sha256"] = content_hash(state)
    path = tmp_path / "ckpt_000001.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert verify_checkpoint(path) is None
    state["step"] = 2  # content no longer matches its checksum
    torch.save(state, path, _use_new_zipfile_serialization=False)
    assert verify_checkpoint(path).startswith("fails its checksum")


@pytest.mark.skipif(
    not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").is_dir(), reason="not Linux"
)
def test_a_written_checkpoint_leaves_the_page_cache(tmp_path, monkeypatch):
    """After the write, fsync, rename (and verify), the thread tells the kernel to drop the
    file's cached pages: the next write reuses them, and the data shards keep the cache."""
    calls, fadvise = [], os.posix_fadvise

    def record(fd, offset, length, advice):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        fadvise(fd, offset, length, advice)

    monkeypatch.setattr(checkpoint.os, "posix_fadvise", record)
    job, _ = BackgroundSave.begin(tmp_path, 3, GPT(SMALL), SMALL, verify=True)
    path = job.wait()
    assert calls == [(str(path.resolve()), 0, 0, os.POSIX_FADV_DONTNEED)]
    assert verify_checkpoint(path) is None


def test_kill_during_the_background_write_keeps_earlier_checkpoints_and_resumes(
    shards, env, tmp_path
):
    """The write of ckpt_000004.pt is held before its fsync and rename; meanwhile the loop
    trains steps 4 and 5 (it was not blocked), then waits for it at the last save, where it
    is killed with SIGKILL. --resume auto removes the temp file and goes on from step 2."""
    out = tmp_path / "run"
    held = {**env, "GPT_FROM_SCRATCH_TEST_SAVE": "hold:ckpt_000004.pt"}
    p = subprocess.Popen(
        [sys.executable, *args_07(shards, out)],
        cwd=ROOT,
        env=held,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, holding = [], False
    for line in p.stdout:
        lines.append(line)
        holding = holding or line.startswith("holding the write of")
        if holding and any(s.startswith("step     5/6") for s in lines):
            break  # steps 4 and 5 ran while the write was held; now the loop waits for it
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=300)
    p.stdout.close(), p.stderr.close()
    text = "".join(lines)
    assert p.returncode == -signal.SIGKILL, text
    assert text.index("step     4/6") < text.index("step     5/6")
    assert [c.name for c in list_checkpoints(out)] == ["ckpt_000002.pt"]
    assert verify_checkpoint(out / "ckpt_000002.pt") is None
    assert [t.split(".tmp")[0] for t in temps(out)] == [".ckpt_000004.pt"]  # cut off mid-write
    (ckpt,) = rows(out, "checkpoint")  # the save that finished: its stall and write time
    assert ckpt["step"] == 2 and ckpt["stall_s"] >= 0 and ckpt["write_s"] > 0
    killed = {r["step"]: r["loss"] for r in rows(out, "train")}
    assert sorted(killed)[:5] == list(range(5))  # step 5's line may be printed, not yet logged

    r = subprocess.run(
        [sys.executable, *args_07(shards, out, "--resume", "auto")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "removed 1 unfinished checkpoint temp file(s)" in r.stdout
    assert "resumed from step 2" in r.stdout and not temps(out)
    resumed = {r["step"]: r["loss"] for r in rows(out, "train")}
    assert sorted(resumed) == list(range(6))
    assert {s: resumed[s] for s in killed} == pytest.approx(killed, abs=1e-6)  # the same numbers
    assert [c.name for c in list_checkpoints(out)] == [
        "ckpt_000002.pt",
        "ckpt_000004.pt",
        "ckpt_000006.pt",
    ]
    assert load_checkpoint(out)["step"] == 6  # verified
    final = rows(out, "checkpoint")[-1]  # the last save waited for its write
    assert final["step"] == 6 and final["stall_s"] >= final["write_s"] > 0


def failed_run_checks(out):
    """What a failed background write of ckpt_000004.pt leaves: the earlier checkpoint
    intact, no temp file, and a run stopped at the first check after the failure."""
    assert [c.name for c in list_checkpoints(out)] == ["ckpt_000002.pt"]
    assert verify_checkpoint(out / "ckpt_000002.pt") is None and not temps(out)
    steps = [r["step"] for r in rows(out, "train")]
    assert steps[:5] == [0, 1, 2, 3, 4] and steps[-1] <= 5  # steps 4 (and 5) ran meanwhile


def test_an_error_in_the_background_write_stops_with_one_line(shards, env, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, *args_07(shards, out)],
        cwd=ROOT,
        capture_output=True,
        env={**env, "GPT_FROM_SCRATCH_TEST_SAVE": "fail:ckpt_000004.pt"},
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr  # no traceback
    assert err[0].startswith(
        f"error: could not write {out / 'ckpt_000004.pt'} (Input/output "
        "error): a checkpoint needs about "
    )
    assert "earlier checkpoints are intact" in err[0] and "--resume auto" in err[0]
    failed_run_checks(out)
    assert "summary:" not in r.stdout and f"saved {out / 'ckpt_000002.pt'}" in r.stdout


def test_an_error_in_the_background_write_stops_every_rank(shards, env, tmp_path):
    """Two processes: rank 0's thread fails; both ranks agree (on preempted()'s all-reduce,
    or the next save's) and stop, rank 1 quietly; nothing hangs, nothing is lost."""
    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *args_07(shards, out, "--total-batch", "64"),
        ],
        cwd=ROOT,
        env={**env, "GPT_FROM_SCRATCH_TEST_SAVE": "fail:ckpt_000004.pt"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "summary:" not in r.stdout  # every rank exited 1
    # rank 0 says why before the others hear of it (torchrun ends all once one exits)
    assert r.stderr.count("error: could not write") == 1
    assert "terminate called" not in r.stderr and "SIGABRT" not in r.stderr
    failed_run_checks(out)


def test_the_overhead_bench_times_07_with_and_without_extra_saves(tmp_path):
    """bench/ckpt_overhead.py at the tiny size: one round of 07 with --ckpt-every 0 (one save,
    the last) and --ckpt-every 2 (saves after steps 2 and 4), each save's stall and write read
    from metrics.jsonl, the difference of the pair in the summary and the JSON; the runs' out
    and shards are deleted after. Bad settings are refused before any run."""
    from conftest import load_stage

    bench = load_stage("bench/ckpt_overhead")
    scratch, out = tmp_path / "scratch", tmp_path / "ckpt.json"
    cfg = bench.Config(preset="tiny", steps=4, every=2, rounds=1, threads=1, scratch=str(scratch))
    result = bench.main(bench.Config(**{**vars(cfg), "json": str(out)}))
    assert json.loads(out.read_text()) == result and not scratch.exists()
    none, two = result["runs"]
    assert (none["every"], two["every"]) == (0, 2) and len(none["dt"]) == len(two["dt"]) == 4
    assert [s["step"] for s in none["saves"]] == [4] and [s["step"] for s in two["saves"]] == [2, 4]
    assert all(s["write_s"] > 0 and 0 <= s["waited_s"] <= s["stall_s"] for s in two["saves"])
    extra = round(two["wall_s"] - none["wall_s"], 2)
    assert result["summary"] == {str(ROOT): [extra]}
    assert result["machine"]["cpu"] and result["machine"]["torch"] == torch.__version__
    with pytest.raises(bench.UserError, match=r"^--every must be between 1 and --steps - 1"):
        bench.main(bench.Config(steps=4, every=4))
    with pytest.raises(bench.UserError, match="is not a checkout of this repository"):
        bench.main(bench.Config(checkouts=str(tmp_path)))
    (scratch / "mine.txt").parent.mkdir()
    (scratch / "mine.txt").write_text("a user's file")
    with pytest.raises(bench.UserError, match="is not empty: give a new or empty folder"):
        bench.main(bench.Config(scratch=str(scratch)))
    assert (scratch / "mine.txt").read_text() == "a user's file"
