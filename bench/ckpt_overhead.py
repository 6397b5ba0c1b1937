"""What checkpoints cost a training run, end to end (issue 28's measurement, in one command).

Stage 07 runs as a user runs it, as a subprocess, once with `--ckpt-every 0` (one save, the
last) and once with `--ckpt-every N` (a save every N steps), in turn, for several rounds; the
difference of each pair is what the extra saves cost the run. Both runs end with the same last
save, so the difference holds only the extra ones. From each run's metrics.jsonl: every save's
stall (the loop blocked, waiting for the save before it included), waited (that wait alone)
and write (the background thread's time), and the slowest step (a step that shares the CPU
with a background write takes longer).

    python bench/ckpt_overhead.py --preset gpt2 --rounds 5 --json ckpt.json
    python bench/ckpt_overhead.py --preset gpt2 --rounds 5 --threads 1   # a core left free
    python bench/ckpt_overhead.py --checkouts .,../before                # two versions, in turn

The issue's run: `--preset gpt2` on the CPU, fp32, B=1, T=64, 6 steps, `--ckpt-every 2`.
The shards are made from tests/data/shakespeare_sample.txt by the real prep code (common.data,
then common.fineweb), unless --data-dir names others. Each run's --out is deleted after it is
read: at gpt2's size a checkpoint is 1.4 GiB.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import UserError, fineweb
from common.bench import cpu_model
from common.cli import parse_args
from common.data import split_documents
from common.metrics import run_info


@dataclass
class Config:
    preset: str = "gpt2"  # model size; the is gpt2 (a checkpoint of 1.4 GiB)
    steps: int = 6  # optimizer steps per run
    every: int = 2  # --ckpt-every of the run with extra saves (the other has 0)
    rounds: int = 3  # pairs of runs per checkout
    threads: int = 0  # OMP_NUM_THREADS for the runs (0: torch's default, every core)
    checkouts: str = "."  # checkouts of this repository to run, comma separated, in turn
    data_dir: str = ""  # token shards; empty: made from the test sample into --scratch
    scratch: str = "/tmp/ckpt_overhead"  # new or empty: the runs' --out, shards; deleted after
    json: str = ""  # write every run and the summary here, rewritten after each run


def make_shards(scratch):
    """Token shards of the test sample, by the real prep code (as the test fixtures make them)."""
    text = (ROOT / "tests" / "data" / "shakespeare_sample.txt").read_text()
    docs = scratch / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in split_documents(text)))
    out = scratch / "shards"
    fineweb.main(
        fineweb.Config(data_files=str(docs), out_dir=str(out), shard_size=4_000, workers=1)
    )
    return out


def run_07(checkout, cfg, data_dir, every, out):
    """One run of stage 07 -> its wall time, its saves and its step times (from metrics.jsonl)."""
    args = ["--data-dir", str(data_dir), "--preset", cfg.preset, "--device", "cpu"]
    args += ["--batch-size", "1", "--seq-len", "64", "--total-batch", "64", "--dtype", "float32"]
    args += ["--steps", str(cfg.steps), "--ckpt-every", str(every), "--out", str(out)]
    args += ["--val-every", "0", "--sample-every", "0", "--hellaswag-every", "0"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(cfg.threads)} if cfg.threads else {}))
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "07_ddp_fineweb.py", *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        last = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"07 in {checkout} exited {r.returncode}: {last}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    saves = [
        {k: rec[k] for k in ("step", "stall_s", "waited_s", "write_s")}
        for rec in records
        if rec.get("split") == "checkpoint"
    ]
    dts = [rec["dt"] for rec in records if rec.get("split") == "train"]
    return dict(every=every, wall_s=round(wall, 2), saves=saves, dt=dts)


def describe(run):
    saves = ", ".join(
        f"{s['step']} (stall {s['stall_s']:.2f} s, waited {s['waited_s']:.2f} s, "
        f"write {s['write_s']:.2f} s)"
        for s in run["saves"]
    )
    return (
        f"--ckpt-every {run['every']}: {run['wall_s']:.1f} s; saves after step {saves}; "
        f"steps {min(run['dt']):.2f}-{max(run['dt']):.2f} s"
    )


def main(cfg):
    if cfg.every <= 0 or cfg.every >= cfg.steps:
        raise UserError(f"--every must be between 1 and --steps - 1 (got {cfg.every})")
    if cfg.rounds <= 0 or cfg.threads < 0:
        raise UserError("--rounds must be positive and --threads 0 or more")
    checkouts = [Path(c).resolve() for c in cfg.checkouts.split(",")]
    for c in checkouts:
        if not (c / "07_ddp_fineweb.py").is_file():
            raise UserError(f"{c} is not a checkout of this repository (no 07_ddp_fineweb.py)")
    scratch = Path(cfg.scratch)
    if scratch.exists() and any(scratch.iterdir()):  # it is deleted at the end: never a user's
        raise UserError(f"--scratch {scratch} is not empty: give a new or empty folder")
    scratch.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else make_shards(scratch)
    machine = dict(run_info(cfg), cpu=cpu_model())  # versions, cores, date, commit; the CPU
    result = dict(machine=machine, runs=[], summary={})
    extra_saves = len(range(cfg.every, cfg.steps, cfg.every))
    for r in range(1, cfg.rounds + 1):
        for c in checkouts:
            pair = {}
            for every in (0, cfg.every):
                run = run_07(c, cfg, data_dir, every, scratch / "out")
                pair[every] = run
                result["runs"].append(dict(round=r, checkout=str(c), **run))
                print(f"round {r}, {c.name}, {describe(run)}", flush=True)
            extra = pair[cfg.every]["wall_s"] - pair[0]["wall_s"]
            result["summary"].setdefault(str(c), []).append(round(extra, 2))
            print(f"round {r}, {c.name}: {extra_saves} extra checkpoints cost {extra:+.1f} s")
            if cfg.json:
                Path(cfg.json).write_text(json.dumps(result, indent=1) + "\n")
    for c, extras in result["summary"].items():
        print(
            f"summary: {Path(c).name}: {extra_saves} extra checkpoints ({cfg.preset}, "
            f"{cfg.steps} steps, --ckpt-every {cfg.every} vs 0) cost "
            f"{statistics.median(extras):+.1f} s, the median of {len(extras)} rounds "
            f"({min(extras):+.1f} .. {max(extras):+.1f})"
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config))
