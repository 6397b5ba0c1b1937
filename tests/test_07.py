"""Stage 07: shards -> training with validation, samples, checkpoints, exact resume, DDP."""

import json
import re
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, load_stage

from common import UserError
from common.checkpoint import list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def s07():
    return load_stage("07_ddp_fineweb")


def small(stage, shards, out, **kw):
    """CPU settings small enough for a test: B=4, T=32, 2 micro-steps of 128 tokens."""
    cfg = replace(stage.Config(device="cpu"), **stage.Config.cpu)
    base = dict(
        data_dir=str(shards),
        out=str(out),
        batch_size=4,
        seq_len=32,
        total_batch=256,
        steps=6,
        warmup_steps=2,
        val_every=3,
        val_steps=2,
        sample_every=3,
        ckpt_every=3,
    )
    return replace(cfg, **{**base, **kw})


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


HELLASWAG = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"


def test_07_trains_validates_samples_and_saves(s07, shards, tmp_path, capsys):
    out = tmp_path / "run"
    res = s07.main(small(s07, shards, out, hellaswag_every=3, hellaswag_data=str(HELLASWAG)))
    text = capsys.readouterr().out
    assert res["accum_steps"] == 2 and sorted(res["losses"]) == list(range(6))
    assert res["losses"][5] < res["losses"][0]
    assert sorted(res["val_losses"]) == [0, 3, 5]  # every 3 steps and at the end
    assert (
        text.count("sample: \"Hello, I'm a language model,")
        + text.count("sample: 'Hello, I'm a language model,")
        == 8
    )  # 4 samples at step 3 and 4 at the end
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_000003.pt", "ckpt_000006.pt"]
    ckpt = load_checkpoint(out / "ckpt_000006.pt")
    assert ckpt["step"] == 6 and ckpt["config"]["steps"] == 6
    assert {"optimizer", "loader", "rng", "model_config"} <= set(ckpt)
    assert not any(k.startswith(("_orig_mod", "module")) for k in ckpt["model"])  # clean names
    rows = read_metrics(out)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(6))
    assert {"loss", "lr", "norm", "dt", "tokens_per_s", "mfu", "tokens"} <= set(train[0])
    assert train[-1]["tokens"] == 6 * 256
    assert [r["step"] for r in rows if r["split"] == "val"] == [0, 3, 5]
    hs = [r for r in rows if r["split"] == "hellaswag"]
    n = sum(1 for line in HELLASWAG.read_text().splitlines() if line.strip())
    assert [r["step"] for r in hs] == [0, 3, 5] and all(r["n"] == n for r in hs)
    for r in hs:  # both protocols, each labelled, beside its published figure
        for key in ("nanogpt_acc", "nanogpt_acc_norm", "lm_eval_acc", "lm_eval_acc_norm"):
            assert 0 <= r[key] <= 1 and r["published"][key] > 0.28
    assert f"hellaswag acc_norm {hs[-1]['nanogpt_acc_norm']:.4f} nanogpt, " in text

    # the plot of this very run (train, val and HellaSwag lines): a real PNG
    from common import plot

    plot.main(plot.Config(run=str(out)))
    png = (out / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_07_keep_last_prunes(s07, shards, tmp_path, capsys):
    out = tmp_path / "run"
    s07.main(
        small(s07, shards, out, steps=5, ckpt_every=1, keep_last=2, val_every=0, sample_every=0)
    )
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_000004.pt", "ckpt_000005.pt"]
    assert "val loss n/a (not evaluated)" in capsys.readouterr().out  # no made-up number


def test_07_refuses_to_overwrite_and_bad_data(s07, shards, tmp_path):
    out = tmp_path / "run"
    s07.main(small(s07, shards, out, steps=1, val_every=0, sample_every=0))
    with pytest.raises(UserError, match="already holds checkpoints"):
        s07.main(small(s07, shards, out, steps=1))
    with pytest.raises(UserError, match="no checkpoint|checkpoint not found"):
        s07.main(small(s07, shards, tmp_path / "empty", resume="latest"))
    with pytest.raises(UserError):
        s07.main(small(s07, tmp_path / "nowhere", tmp_path / "x"))
    with pytest.raises(UserError, match="not a multiple of B\\*T\\*GPUs = 128"):
        s07.main(small(s07, shards, tmp_path / "y", total_batch=200))


def test_07_non_finite_loss_stops_and_keeps_good_checkpoint(s07, shards, tmp_path):
    out = tmp_path / "run"
    cfg = small(
        s07,
        shards,
        out,
        steps=30,
        max_lr=1e6,
        warmup_steps=1,
        ckpt_every=1,
        keep_last=0,
        val_every=0,
        sample_every=0,
        dtype="float32",
    )
    with pytest.raises(UserError, match=r"step \d+: loss \S+, gradient norm \S+: stopped before"):
        s07.main(cfg)
    newest = load_checkpoint(out)
    assert all(torch.isfinite(v).all() for v in newest["model"].values())


def start_07(args, env, out):
    cmd = [sys.executable, "07_ddp_fineweb.py", *args, "--out", str(out)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_07(args, env, out, kill_after=None):
    """07 as a subprocess; optionally SIGKILL it as soon as it prints `saved ...kill_after`."""
    p, lines = start_07(args, env, out), []
    for line in p.stdout:
        lines.append(line)
        if kill_after and line.startswith("saved") and kill_after in line:
            os.kill(p.pid, signal.SIGKILL)  # no cleanup, like a pre-empted node
            break
    p.wait(timeout=300)
    return p.returncode, "".join(lines), p.stderr.read()


def test_07_kill_and_resume_continues_exactly(s07, shards, tmp_path, cache_env):
    """Killed with SIGKILL right after its step-4 checkpoint, then `--resume`: the same lines
    and numbers as a run never interrupted (which runs meanwhile, one thread each)."""
    args = [
        "--data-dir",
        str(shards),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--total-batch",
        "256",
        "--steps",
        "8",
        "--warmup-steps",
        "2",
        "--val-every",
        "4",
        "--val-steps",
        "2",
        "--sample-every",
        "0",
        "--ckpt-every",
        "4",
        "--dtype",
        "float32",
    ]
    env = {**cache_env, "OMP_NUM_THREADS": "1"}
    full_run = start_07(args, env, tmp_path / "full")
    rc, _, _ = run_07(args, env, tmp_path / "cut", kill_after="ckpt_000004.pt")
    assert rc == -signal.SIGKILL
    rc, text, err = run_07([*args, "--resume"], env, tmp_path / "cut")
    assert rc == 0, err
    assert "resumed from step 4" in text
    assert full_run.wait(timeout=300) == 0, full_run.stderr.read()
    full_run.stdout.close(), full_run.stderr.close()
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")

    def losses(rows, split):  # {step: loss}: pytest.approx compares a flat dict, not pairs
        return {r["step"]: r["loss"] for r in rows if r["split"] == split}

    # one line per step, as if never interrupted, and the very same numbers (CPU, fp32)
    assert [r["step"] for r in resumed if r["split"] == "train"] == list(range(8))
    assert losses(resumed, "train") == pytest.approx(losses(full, "train"), abs=1e-6)
    assert losses(resumed, "val") == pytest.approx(losses(full, "val"), abs=1e-6)
    assert list(losses(resumed, "val")) == [0, 4, 7]
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    again = small(
        s07,
        shards,
        tmp_path / "cut",
        steps=8,
        val_every=4,
        ckpt_every=4,
        sample_every=0,
        dtype="float32",
        resume="latest",
    )
    with pytest.raises(UserError, match="already at step 8"):  # nothing left to do
        s07.main(again)


def test_07_torchrun_two_processes_match_one_with_accumulation(shards, tmp_path, cache_env):
    """2 processes x 1 micro-step == 1 process x 2 micro-steps, over several steps, with the
    shuffled order (07's default); and the same val loss: one fixed set of val windows."""
    common_args = [
        "07_ddp_fineweb.py",
        "--data-dir",
        str(shards),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--total-batch",
        "256",
        "--steps",
        "4",
        "--val-every",
        "2",
        "--sample-every",
        "0",
        "--dtype",
        "float32",
        "--hellaswag-every",
        "3",
        "--hellaswag-data",
        str(HELLASWAG),
    ]
    env = {**cache_env, "OMP_NUM_THREADS": "1"}
    one = subprocess.Popen(
        [sys.executable, *common_args, "--out", str(tmp_path / "one")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            *common_args,
            "--out",
            str(tmp_path / "two"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    one_out, one_err = one.communicate(timeout=300)  # ran meanwhile
    assert one.returncode == 0, one_err
    assert two.returncode == 0, two.stderr
    assert "2 processes x 1 micro-steps" in two.stdout and "1 processes x 2 micro-steps" in one_out
    assert two.stdout.count("summary:") == 1  # rank 0 alone prints
    a = [r["loss"] for r in read_metrics(tmp_path / "one") if r["split"] == "train"]
    b = [r["loss"] for r in read_metrics(tmp_path / "two") if r["split"] == "train"]
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=1e-5)
    va, vb = (
        {r["step"]: r["loss"] for r in read_metrics(tmp_path / run) if r["split"] == "val"}
        for run in ("one", "two")
    )
    assert list(va) == [0, 2, 3] and va == pytest.approx(vb, abs=1e-5)  # step 0: same weights
    # HellaSwag split across 2 ranks and all-reduced: the same counts as one process
    ha = [
        (r["step"], r["n"], r["nanogpt_correct"], r["lm_eval_correct_norm"])
        for r in read_metrics(tmp_path / "one")
        if r["split"] == "hellaswag"
    ]
    hb = [
        (r["step"], r["n"], r["nanogpt_correct"], r["lm_eval_correct_norm"])
        for r in read_metrics(tmp_path / "two")
        if r["split"] == "hellaswag"
    ]
    assert [h[0] for h in ha] == [0, 3] and ha == hb


# ---- what protects a run (issue 12) and what a run records (issue 11) ---------------------


def test_07_second_writer_into_the_same_out_is_refused(s07, shards, tmp_path, cache_env):
    """While run A (a real process) trains, run B into A's --out (here, in this process) is
    refused at once, naming A's pid, and A's files are untouched; nor is A's --out resumed;
    after A is killed the directory is free again."""
    out = tmp_path / "run"
    args = [
        sys.executable,
        "07_ddp_fineweb.py",
        "--data-dir",
        str(shards),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--total-batch",
        "128",
        "--steps",
        "100000",
        "--val-every",
        "0",
        "--sample-every",
        "0",
        "--ckpt-every",
        "0",
        "--out",
        str(out),
    ]
    env = {**cache_env, "OMP_NUM_THREADS": "1"}  # A leaves B a core
    a = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    b = small(s07, shards, out, total_batch=128, steps=2, val_every=0, sample_every=0, ckpt_every=0)
    try:
        for line in a.stdout:  # A is training
            if line.startswith("step"):
                break
        before = (out / "metrics.jsonl").read_text()
        with pytest.raises(UserError, match=rf"is in use by another run \(.*pid {a.pid}"):
            s07.main(b)
        assert (out / "metrics.jsonl").read_text().startswith(before)  # A's log not truncated
        with pytest.raises(UserError, match="is in use by another run"):
            s07.main(replace(b, resume="latest"))  # nor resumed while it lives
    finally:
        a.kill()
        a.wait()
    assert sorted(s07.main(b)["losses"]) == [0, 1]  # the lock died with A (no checkpoint)


def test_07_nan_gradient_stops_before_the_update_and_keeps_the_good_checkpoint(
    s07, shards, tmp_path
):
    """A huge learning rate: the loss can stay finite while the gradient norm is nan. The
    step is refused before optimizer.step(); no checkpoint holds nan; --keep-last 1 never
    pruned the last good one; the error names it."""
    out = tmp_path / "run"
    cfg = small(
        s07,
        shards,
        out,
        steps=40,
        max_lr=1e4,
        warmup_steps=1,
        ckpt_every=1,
        keep_last=1,
        val_every=0,
        sample_every=0,
        dtype="float32",
    )
    with pytest.raises(UserError) as e:
        s07.main(cfg)
    found = list_checkpoints(out)
    assert found and str(found[-1]) in str(e.value)  # named: the newest good checkpoint
    for p in found:
        ckpt = load_checkpoint(p)  # verifies its checksum too
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    step = int(re.search(r"step (\d+):", str(e.value)).group(1))
    assert load_checkpoint(out)["step"] == step  # the checkpoint just before the bad step


def test_07_resume_with_other_settings_is_refused_unless_allowed(s07, shards, tmp_path, capsys):
    out = tmp_path / "run"
    s07.main(small(s07, shards, out, steps=4, ckpt_every=2, val_every=0, sample_every=0))
    for change, flag in (
        (dict(total_batch=512), "--total-batch 256 -> 512"),
        (dict(steps=8), "--steps 4 -> 8"),
        (dict(max_lr=1e-3), "--max-lr"),
    ):
        with pytest.raises(UserError, match=re.escape(flag) + ".*--allow-config-change"):
            s07.main(small(s07, shards, out, resume="latest", **change))
    res = s07.main(
        small(
            s07,
            shards,
            out,
            steps=8,
            total_batch=512,
            resume="latest",
            allow_config_change=True,
            ckpt_every=2,
            val_every=0,
            sample_every=0,
        )
    )
    assert sorted(res["losses"]) == [4, 5, 6, 7]
    rows = read_metrics(out)
    changes = [r for r in rows if r["split"] == "config_change"]
    assert (
        changes and changes[0]["step"] == 4 and "--total-batch 256 -> 512" in changes[0]["changes"]
    )
    tokens = {r["step"]: r["tokens"] for r in rows if r["split"] == "train"}
    assert tokens[3] == 4 * 256 and tokens[4] == 4 * 256 + 512  # no jump: counted as trained
    assert load_checkpoint(out)["tokens"] == 4 * 256 + 4 * 512


def test_07_removes_stale_temp_files_of_a_killed_save(s07, shards, tmp_path):
    out = tmp_path / "run"
    s07.main(small(s07, shards, out, steps=2, ckpt_every=2, val_every=0, sample_every=0))
    stale = out / ".ckpt_000004.pt.tmp99999"
    stale.write_bytes(b"half a checkpoint")
    keep = out / "notes.txt"
    keep.write_text("mine")
    s07.main(
        small(
            s07,
            shards,
            out,
            steps=4,
            resume="latest",
            allow_config_change=True,
            ckpt_every=2,
            val_every=0,
            sample_every=0,
        )
    )
    assert not stale.exists() and keep.read_text() == "mine"


def test_07_records_the_run_shows_eta_and_mirrors_metrics_to_a_tracker(
    s07, shards, tmp_path, monkeypatch, capsys
):
    from common import run as run_module
    from common.metrics import read_run_header

    seen = []

    class Tracker:  # stands in for wandb: every record must reach it
        def log(self, record):
            seen.append(dict(record))

        def finish(self):
            seen.append("finished")

    asked = {}

    def make_tracker(kind, **kw):
        asked.update(kind=kind, **kw)
        return Tracker() if kind else None

    monkeypatch.setattr(run_module, "make_tracker", make_tracker)
    out = tmp_path / "run"
    s07.main(small(s07, shards, out, steps=4, wandb="my-project"))
    assert asked["kind"] == "wandb" and asked["project"] == "my-project"
    records = [r for r in read_metrics(out) if r["split"] != "run"]
    assert seen[:-1] == records and seen[-1] == "finished"
    header = read_run_header(out)
    assert header["torch"] == torch.__version__ and header["config"]["steps"] == 4
    assert read_metrics(out)[0]["split"] == "run"  # the first line
    text = capsys.readouterr().out
    assert re.search(r"^step +3/4 \(100\.0%\) \| loss .* \| eta 0s$", text, flags=re.M)
    assert re.search(r"^step +1/4 \(50\.0%\) \| .* \| eta \d+s$", text, flags=re.M)
