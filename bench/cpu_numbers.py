"""Every CPU number the README, docs/ and BENCHMARKS.md quote, from one run of this script.

Runs each stage as a user would (its CPU defaults, a subprocess, wall time from start to
exit), stage 05's speedup table --rounds times (the spread of each ratio is the noise to
expect on a rerun), and writes the results to --json. With --write it also rewrites the
generated blocks of README.md (the stage table, one line per stage), docs/stages.md (the
same table with more of each stage's output) and BENCHMARKS.md (the CPU section), between
their `<!-- cpu-numbers:begin -->` / `<!-- cpu-numbers:end -->` markers, so the documents
never quote a number this script did not just measure. --render-only rewrites the blocks
from the run already in --json and measures nothing (after an edit of the tables' layout).

    python bench/cpu_numbers.py --text input.txt --write      # ~8 min on 2 cores
    python bench/cpu_numbers.py --render-only                 # the blocks again, in a second

Inputs it makes itself, offline: token shards of --text (common.data + common.fineweb, as
the README does), a random GPT2LMHeadModel (common.random_model) for 01, and 07's checkpoint
for 08. --text defaults to tiny shakespeare (downloaded once; `python -m common.data
--tiny-shakespeare input.txt`). Run it on a quiet machine: other work on the cores shows up
as noise in the table.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from common import UserError, bench
from common.cli import parse_args
from common.data import load_text

BEGIN, END = "<!-- cpu-numbers:begin -->", "<!-- cpu-numbers:end -->"


@dataclass
class Config:
    text: str = ""  # text for stages 02-07 (tiny shakespeare by default)
    rounds: int = 3  # runs of stage 05's table, for the spread of its ratios
    json: str = "bench/cpu_numbers.json"  # where the results go
    write: bool = False  # rewrite the generated blocks of README.md, docs/stages.md, BENCHMARKS.md
    render_only: bool = False  # rewrite those blocks from --json's run, measuring nothing


# stage: (what it adds, its command as the docs give it, on a GPU at the gpt2 preset)
STAGES = {
    "00_model": (
        "the model: parameters by component, loss at init vs ln(vocab), causality, "
        "an untrained sample",
        "python 00_model.py",
        "124M parameters tied (163M untied), the same checks at full size",
    ),
    "01_hf_eval": (
        "OpenAI's weights via `transformers` into our model; max \\|logit diff\\| vs "
        "`GPT2LMHeadModel`; 5 samples",
        "python 01_hf_eval.py --model gpt2-random",
        "`--model gpt2` (OpenAI's 124M, 500 MB once): fluent samples",
    ),
    "02_overfit_batch": (
        "training: AdamW memorizes one batch; the step line",
        "python 02_overfit_batch.py --input input.txt",
        "gpt2 size, same batch",
    ),
    "03_dataloader": (
        "`TextLoader`, written out: consecutive (B, T) batches, targets shifted "
        "by one, wrap-around",
        "python 03_dataloader.py --input input.txt",
        "gpt2 size, B=16, T=1024",
    ),
    "04_best_practices": (
        "weight tying (`wte.weight = lm_head.weight`) and the GPT-2 init "
        "(`gpt2_init`, residual projections x (2 n_layer)^-0.5), written out",
        "python 04_best_practices.py --input input.txt",
        "124,439,808 parameters, loss at init next to 10.82",
    ),
    "05_speedups": (
        "TF32, bf16 autocast (fp16 + GradScaler without bf16), SDPA flash "
        "attention, vocab 50304, `torch.compile`, written out; a table times each",
        "python 05_speedups.py --input input.txt",
        "the table at B=16, T=1024 with MFU and memory, then training",
    ),
    "06_hyperparams": (
        "GPT-3's recipe, written out: AdamW (0.9, 0.95), decay groups, fused, "
        "clipping, warmup + cosine, accumulation to 524,288 tokens",
        "python 06_hyperparams.py --input input.txt",
        "32 micro-steps of 16x1024 per step",
    ),
    "07_ddp_fineweb": (
        "DDP under `torchrun` (set-up written out), FineWeb-Edu shards, "
        "validation, samples, checkpoints, `--resume`, metrics.jsonl, HellaSwag",
        "python 07_ddp_fineweb.py --data-dir data/tiny",
        "19,073 steps of 524,288 tokens (~10B), bf16, compile",
    ),
    "08_hellaswag": (
        "HellaSwag `acc`/`acc_norm`, batched and distributed; `--ckpt`, `--model`, `--compare-hf`",
        "python 08_hellaswag.py --ckpt out/ --data tests/data/hellaswag_fixture.jsonl",
        "all 10,042 val examples in bf16",
    ),
    "09_modern": (
        "RoPE, RMSNorm, QK-norm, ReLU^2 / SwiGLU, no biases, Muon: each trained "
        "against GPT-2 at equal tokens over seeds, with the noise stated",
        "python 09_modern.py --input input.txt",
        "gpt2 size, 3 seeds per row (`--data-dir` for FineWeb shards)",
    ),
}
# what each stage adds, in a few words: the README's table
SHORT = {
    "00_model": "the GPT-2 model, checked before training",
    "01_hf_eval": "OpenAI's weights loaded into it",
    "02_overfit_batch": "training: memorize one batch",
    "03_dataloader": "a data loader",
    "04_best_practices": "weight tying, GPT-2 init",
    "05_speedups": "TF32, bf16, flash attention, vocab 50304, compile",
    "06_hyperparams": "GPT-3's optimizer and LR schedule",
    "07_ddp_fineweb": "DDP, FineWeb-Edu shards, validation, checkpoints",
    "08_hellaswag": "HellaSwag accuracy",
    "09_modern": "RoPE, RMSNorm, QK-norm, ReLU^2 / SwiGLU, Muon: ablated",
}


def run(args, cwd):
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout, seconds


def key_lines(name, out):
    """What the docs quote of a stage's output: its headline lines."""
    keep = (
        "summary:",
        "parameters:",
        "loaded ",
        "max |logit",
        "hellaswag val:",
        "saved ",
        "causality:",
        "loss at init",
        "row ",
        "fp32 ",
        "tf32 ",
        "bf16 ",
        "fp16 ",
        "flash ",
        "vocab ",
        "compile ",
        "ours / ",
    )
    return [line for line in out.splitlines() if line.startswith(keep)]


def measure(cfg, tmp):
    text = Path(cfg.text) if cfg.text else None
    if text is None:
        text = tmp / "input.txt"
        text.write_text(load_text(None))  # tiny shakespeare, downloaded once into the cache
    work = tmp / "work"
    work.mkdir()
    (work / "input.txt").write_text(text.read_text())
    (work / "tests" / "data").mkdir(parents=True)  # 08's examples, at the docs' path
    fixture = "tests/data/hellaswag_fixture.jsonl"
    (work / fixture).write_text((ROOT / fixture).read_text())
    prep = [
        ["-m", "common.data", "--text", "input.txt", "--docs-jsonl", "docs.jsonl"],
        [
            "-m",
            "common.fineweb",
            "--data-files",
            "docs.jsonl",
            "--shard-size",
            "100000",
            "--out-dir",
            "data/tiny",
            "--workers",
            "1",
        ],
        ["-m", "common.random_model", "gpt2-random", "--preset", "tiny"],
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # `-m common.x` from the work directory
    for args in prep:
        subprocess.run([sys.executable, *args], cwd=work, check=True, capture_output=True, env=env)
    stages = {}
    for name, (_, command, _) in STAGES.items():
        args = command.split()[1:]
        args[0] = str(ROOT / args[0])
        out, seconds = run(args, work)
        stages[name] = dict(command=command, seconds=round(seconds, 1), lines=key_lines(name, out))
        print(f"{name}: {seconds:.1f} s")
    tables = []
    for _ in range(cfg.rounds):  # the table alone, --rounds times: how much a rerun moves
        out, _ = run([str(ROOT / "05_speedups.py"), "--steps", "0", "--json", "t.json"], work)
        tables.append(json.loads((work / "t.json").read_text()))
    hf = {}  # ours / transformers, same settings, same batch, timed interleaved
    for row in ("vocab", "compile"):
        run(
            [
                str(ROOT / "05_speedups.py"),
                "--steps",
                "0",
                "--benchmark",
                row,
                "--compare-hf",
                "--json",
                "h.json",
            ],
            work,
        )
        hf[row] = json.loads((work / "h.json").read_text())["rows"]
    return dict(stages=stages, tables=tables, hf=hf)


def ratio_spread(tables):
    """Each row's vs-base ratio over the runs: (median, min, max)."""
    spread = {}
    for row in tables[0]["rows"]:
        vals = [
            r["vs_base"]
            for t in tables
            for r in t["rows"]
            if r["name"] == row["name"] and r["status"] == "ok"
        ]
        if vals:
            spread[row["name"]] = (statistics.median(vals), min(vals), max(vals))
    return spread


def render_front(res):
    """The README's table: each stage's command, its summary line and its wall time."""
    lines = [
        "| stage | adds | command | last line on CPU (tiny preset) | time |",
        "|---|---|---|---|---|",
    ]
    for name, (_, command, _) in STAGES.items():
        s = res["stages"][name]
        summary = next(x for x in s["lines"] if x.startswith("summary:")).replace("|", "\\|")
        lines.append(
            f"| `{name}.py` | {SHORT[name]} | `{command}` | `{summary}` | {s['seconds']:.1f} s |"
        )
    return "\n".join(lines)


def render_stages(res):
    lines = [
        "| stage | adds | command | prints on CPU (tiny preset) | on a GPU (gpt2 preset) |",
        "|---|---|---|---|---|",
    ]
    for name, (adds, command, gpu) in STAGES.items():
        s = res["stages"][name]
        shown = [
            x
            for x in s["lines"]
            if not x.startswith(
                ("row ", "fp32 ", "tf32 ", "bf16 ", "flash ", "vocab ", "compile ", "ours / ")
            )
        ]
        if name == "05_speedups":
            spread = ratio_spread(res["tables"])
            shown.insert(
                0,
                "table (x fp32): " + ", ".join(f"{k} {m:.2f}x" for k, (m, _, _) in spread.items()),
            )
        cpu = "<br>".join(f"`{x.strip()}`" for x in shown[-4:]) + f"<br>{s['seconds']:.1f} s"
        lines.append(
            f"| `{name}.py` | {adds} | `{command}` | {cpu.replace('|', chr(92) + '|')} "
            f"| {gpu} (not measured yet) |"
        )
    return "\n".join(lines)


def render_benchmarks(res, meta):
    spread = ratio_spread(res["tables"])
    t = res["tables"][0]
    out = [
        f"Measured {meta['date']} on {meta['hardware']}, torch {meta['torch']}, by "
        f"`python bench/cpu_numbers.py --write` (stage 05's table run {len(res['tables'])} "
        "times; each ratio is the median of the runs, with min-max).",
        "",
        "| row | tok/s (first run) | vs fp32: median (min-max) |",
        "|---|---|---|",
    ]
    for r in t["rows"]:
        if r["status"] != "ok":
            out.append(f"| {r['name']} | n/a: {r['reason']} | |")
            continue
        m, lo, hi = spread[r["name"]]
        out.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {m:.2f}x ({lo:.2f}-{hi:.2f}) |")
    out += [
        "",
        "Ours vs transformers' GPT2LMHeadModel (`python 05_speedups.py --steps 0 --benchmark "
        "ROW --compare-hf`: the same settings, batch and training step):",
        "",
        "| row | ours tok/s | transformers tok/s | ours / transformers |",
        "|---|---|---|---|",
    ]
    for row, rows in res["hf"].items():
        ours, theirs = rows[0], rows[1]
        out.append(
            f"| {row} | {ours['tokens_per_s']:,.0f} | {theirs['tokens_per_s']:,.0f} | "
            f"{theirs['ours_over_hf']:.2f}x |"
        )
    out += ["", "| stage | command | wall time | headline |", "|---|---|---|---|"]
    for name, s in res["stages"].items():
        head = (s["lines"] or [""])[-1].replace("|", "\\|")
        out.append(f"| {name} | `{s['command']}` | {s['seconds']:.1f} s | `{head}` |")
    return "\n".join(out)


def replace_block(path, block):
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def blocks(result):
    """{document: its generated block} for one run (what --json holds)."""
    return {
        ROOT / "README.md": render_front(result),
        ROOT / "docs" / "stages.md": render_stages(result),
        ROOT / "BENCHMARKS.md": render_benchmarks(result, result),
    }


def main(cfg):
    if cfg.render_only:  # the run already measured, in new tables
        if not Path(cfg.json).is_file():
            raise UserError(f"{cfg.json} not found: run without --render-only to measure")
        result = json.loads(Path(cfg.json).read_text())
    else:
        meta = dict(
            date=time.strftime("%Y-%m-%d"),
            hardware=bench.hardware_name("cpu"),
            torch=torch.__version__,
            python=sys.version.split()[0],
        )
        with tempfile.TemporaryDirectory() as tmp:
            res = measure(cfg, Path(tmp))
        result = dict(meta, config=asdict(cfg), **res)
        Path(cfg.json).write_text(json.dumps(result, indent=1) + "\n")
        print(render_benchmarks(result, result))
    if cfg.write or cfg.render_only:
        for path, block in blocks(result).items():
            replace_block(path, block)
        print("rewrote the generated blocks of README.md, docs/stages.md and BENCHMARKS.md")
    return result


if __name__ == "__main__":
    main(parse_args(Config))
