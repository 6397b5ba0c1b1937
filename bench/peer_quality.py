"""Training quality against a peer: our 07 and nanoGPT's train.py, same data, recipe, tokens.

Both train the same tiny GPT-2 (4 layers, 4 heads, n_embd 128, block 256, biases, tied
embeddings, vocab 50304, GPT-2 init, dropout 0) with one recipe (AdamW 0.9/0.95, weight
decay 0.1 on 2-D parameters, clip 1.0, lr 1e-3, 25 warmup steps, cosine to 1e-4, B=8,
T=256, 250 steps = 512,000 tokens, float32, no compile) on one corpus, GPT-2 BPE, first 90%
of the characters train and the last 10% val (as nanoGPT's data/shakespeare prepares it).
Each trainer runs once per seed, one after the other; then ONE evaluator of ours scores every
final model on every window of the val split (consecutive windows of T+1 tokens, summed loss
over all tokens) and the table gives mean +- sample std and the range per trainer.

nanoGPT runs from a temp folder holding data/<name>/{train,val}.bin, its own train.py
unchanged (`--peer`, default ../shared/peers/nanoGPT). Its seed is fixed in train.py
(torch.manual_seed(1337)); run_nanogpt.py, written next to its data, offsets the seed of that
one call so each of our seeds gives it another init and other batches (nothing else changes).

    python bench/peer_quality.py                                  # tiny shakespeare, 3 seeds
    python bench/peer_quality.py --corpus python --seeds 3        # Python stdlib sources
    python bench/peer_quality.py --trainers ours,ours-consecutive # the before/after of shuffling

Corpora: `shakespeare` (--text, default the cache's tinyshakespeare.txt) or `python`: the
stdlib's top-level *.py files in sorted order, each after a `# file: name` line, until
338,025 tokens (tiny shakespeare's size) are reached. Results go to --json after every run;
a rerun with the same --json skips the runs it already holds. Not in CI: each run takes
minutes on a CPU.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere

from common import UserError
from common.checkpoint import load_checkpoint
from common.cli import parse_args
from common.data import get_tokenizer, load_text
from common.model import GPT, preset_config

TRAINERS = ("nanogpt", "ours", "ours-consecutive")
RECIPE = dict(B=8, T=256, steps=250, lr=1e-3, min_lr=1e-4, warmup=25, weight_decay=0.1, clip=1.0)


@dataclass
class Config:
    corpus: str = "shakespeare"  # shakespeare or python (the stdlib's sources)
    text: str = ""  # the text of --corpus shakespeare (empty: tiny shakespeare, cached)
    seeds: int = 3  # seeds per trainer: 0, 1, 2, ...
    first_seed: int = 0  # start at this seed (to run seeds of one trainer in two processes)
    trainers: str = "nanogpt,ours"  # comma-separated: nanogpt, ours, ours-consecutive
    steps: int = 250  # optimizer steps of B=8 x T=256 tokens for every trainer
    peer: str = str(ROOT.parent / "shared" / "peers" / "nanoGPT")  # nanoGPT's train.py is here
    work: str = ""  # where data and runs go (empty: a temp folder)
    json: str = ""  # results file, written after every run (empty: <work>/peer_quality.json)
    threads: int = 0  # torch threads per run (0: torch's default); 1 lets two runs share 2 cores
    rescore: bool = False  # only score again the final models of the runs --json holds


def python_corpus(target_tokens=338_025):
    """The stdlib's top-level modules, sorted by name, concatenated up to target_tokens."""
    enc, parts, n = get_tokenizer(), [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        part = f"# file: {path.name}\n{path.read_text(encoding='utf-8', errors='replace')}\n"
        parts.append(part)
        n += len(enc.encode_ordinary(part))
        if n >= target_tokens:
            break
    return "".join(parts)


def prepare(cfg, work):
    """Tokens of the corpus split 90/10 by characters, as nanoGPT's bins and as our shards."""
    if cfg.corpus == "shakespeare":
        text = load_text(cfg.text or None)
    elif cfg.corpus == "python":
        text = python_corpus()
    else:
        raise UserError(f"unknown --corpus '{cfg.corpus}': use shakespeare or python")
    enc = get_tokenizer()
    cut = int(len(text) * 0.9)
    train, val = (
        np.array(enc.encode_ordinary(t), dtype=np.uint16) for t in (text[:cut], text[cut:])
    )
    bins, shards = work / "nanogpt" / "data" / cfg.corpus, work / "shards"
    bins.mkdir(parents=True, exist_ok=True)
    shards.mkdir(parents=True, exist_ok=True)
    train.tofile(bins / "train.bin")
    val.tofile(bins / "val.bin")
    np.save(shards / f"{cfg.corpus}_val_000000.npy", val)
    np.save(shards / f"{cfg.corpus}_train_000001.npy", train)
    return dict(chars=len(text), train_tokens=len(train), val_tokens=len(val)), val


# runs nanoGPT's train.py as it is, with the seed of its one torch.manual_seed call offset
NANOGPT_RUNNER = """import runpy, sys, torch
offset = int(sys.argv.pop(1))
seed = torch.manual_seed
torch.manual_seed = lambda s: seed(s + offset)
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def nanogpt_weights(cfg, work, seed):
    ckpt = torch.load(
        work / "nanogpt" / f"out-seed{seed}" / "ckpt.pt", map_location="cpu", weights_only=True
    )
    if ckpt["iter_num"] != cfg.steps:
        raise UserError(f"nanoGPT's checkpoint is of iter {ckpt['iter_num']}, not {cfg.steps}")
    return ckpt["model"]


def ours_out(work, seed, shuffle):
    return work / f"ours{'' if shuffle else '-consecutive'}-seed{seed}"


def run_nanogpt(cfg, work, seed, env):
    """nanoGPT's train.py in its own folder; returns (state dict, seconds)."""
    run = work / "nanogpt"
    for name in ("train.py", "model.py", "configurator.py"):
        (run / name).write_bytes((Path(cfg.peer) / name).read_bytes())
    (run / "run_nanogpt.py").write_text(NANOGPT_RUNNER)
    out = f"out-seed{seed}"
    r = RECIPE
    args = [
        f"--dataset={cfg.corpus}",
        "--device=cpu",
        "--compile=False",
        "--dtype=float32",
        "--n_layer=4",
        "--n_head=4",
        "--n_embd=128",
        f"--block_size={r['T']}",
        f"--batch_size={r['B']}",
        "--gradient_accumulation_steps=1",
        "--dropout=0.0",
        "--bias=True",
        f"--learning_rate={r['lr']}",
        f"--min_lr={r['min_lr']}",
        f"--warmup_iters={r['warmup']}",
        f"--lr_decay_iters={cfg.steps}",
        f"--max_iters={cfg.steps}",
        f"--eval_interval={cfg.steps}",
        "--eval_iters=5",
        f"--weight_decay={r['weight_decay']}",
        f"--grad_clip={r['clip']}",
        "--always_save_checkpoint=True",
        f"--out_dir={out}",
        "--wandb_log=False",
    ]
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "run_nanogpt.py", str(1000 * seed), *args],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise UserError(f"nanoGPT failed (seed {seed}):\n{p.stderr[-2000:]}")
    return nanogpt_weights(cfg, work, seed), time.time() - t0


def run_ours(cfg, work, seed, env, shuffle=True):
    """Our 07_ddp_fineweb.py with the same recipe; returns (state dict, seconds)."""
    r = RECIPE
    out = ours_out(work, seed, shuffle)
    shutil.rmtree(out, ignore_errors=True)  # a run cut short before it was recorded: again
    args = [
        "--data-dir",
        str(work / "shards"),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--batch-size",
        str(r["B"]),
        "--seq-len",
        str(r["T"]),
        "--total-batch",
        str(r["B"] * r["T"]),
        "--steps",
        str(cfg.steps),
        "--max-lr",
        str(r["lr"]),
        "--warmup-steps",
        str(r["warmup"]),
        "--weight-decay",
        str(r["weight_decay"]),
        "--grad-clip",
        str(r["clip"]),
        "--dtype",
        "float32",
        "--compile",
        "false",
        "--seed",
        str(seed),
        "--shuffle",
        str(shuffle).lower(),
        "--val-every",
        "0",
        "--sample-every",
        "0",
        "--hellaswag-every",
        "0",
        "--ckpt-every",
        "0",
        "--out",
        str(out),
    ]
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, str(ROOT / "07_ddp_fineweb.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise UserError(f"07 failed (seed {seed}):\n{p.stderr[-2000:]}")
    return load_checkpoint(out / f"ckpt_{cfg.steps:06d}.pt")["model"], time.time() - t0


@torch.no_grad()
def val_loss(state, val, exact_gelu=False, T=256, batch=16):
    """The one evaluator: mean loss over every token of every window of the val split
    (windows of T+1 tokens starting every T tokens), for any trainer's weights. nanoGPT's MLP
    uses the exact GELU, ours GPT-2's tanh approximation: each model is scored with its own."""
    model = GPT(preset_config("tiny", tie_weights=True, vocab_size=50304, attn="sdpa"))
    if exact_gelu:
        for block in model.transformer.h:
            block.mlp.gelu = torch.nn.GELU()
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another model
        raise UserError(
            f"weights do not fit our model: {str(e).splitlines()[-1].strip()}"
        ) from None
    if missing or [k for k in unexpected if not k.endswith(".attn.bias")]:  # a causal mask
        raise UserError(f"weights do not fit our model: missing {missing}, extra {unexpected}")
    model.eval()
    tokens = torch.from_numpy(val.astype(np.int64))
    starts = list(range(0, len(tokens) - T, T))  # every window with all T+1 tokens
    total = 0.0
    for i in range(0, len(starts), batch):
        rows = torch.stack([tokens[s : s + T + 1] for s in starts[i : i + batch]])
        _, loss = model(rows[:, :-1], rows[:, 1:])
        total += loss.item() * len(rows)
    return total / len(starts), len(starts) * T


def summary(results, trainers):
    """Markdown rows: trainer, seeds, mean +- std, min..max, difference to nanoGPT's mean."""
    rows, means = [], {}
    for t in trainers:
        losses = [r["val_loss"] for r in results if r["trainer"] == t]
        if not losses:
            continue
        means[t] = statistics.mean(losses)
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        diff = f"{means[t] - means['nanogpt']:+.4f}" if "nanogpt" in means else "n/a"
        rows.append(
            f"| {t} | {len(losses)} | {means[t]:.4f} ± {std:.4f} | "
            f"{min(losses):.4f} .. {max(losses):.4f} | {diff} |"
        )
    head = "| trainer | seeds | val loss (mean ± std) | min .. max | vs nanoGPT |\n" + "|---" * 5
    head += "|"
    return "\n".join([head, *rows])


def main(cfg):
    trainers = [t.strip() for t in cfg.trainers.split(",") if t.strip()]
    if bad := [t for t in trainers if t not in TRAINERS]:
        raise UserError(f"unknown trainer(s) {bad}: use {', '.join(TRAINERS)}")
    if "nanogpt" in trainers and not (Path(cfg.peer) / "train.py").is_file():
        raise UserError(f"no nanoGPT train.py in {cfg.peer}: give --peer DIR")
    work = Path(cfg.work or tempfile.mkdtemp(prefix="peer_quality_"))
    out_json = Path(cfg.json or work / "peer_quality.json")
    info, val = prepare(cfg, work)
    print(
        f"{cfg.corpus}: {info['chars']:,} characters, {info['train_tokens']:,} train and "
        f"{info['val_tokens']:,} val tokens; {cfg.steps} steps x {RECIPE['B'] * RECIPE['T']:,} "
        f"tokens = {cfg.steps * RECIPE['B'] * RECIPE['T'] / info['train_tokens']:.2f} epochs"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    done = json.loads(out_json.read_text()) if out_json.exists() else {}
    results = [r for r in done.get("runs", []) if r.get("corpus") == cfg.corpus]
    for seed in range(cfg.first_seed, cfg.seeds):  # seeds outermost: a cut-short run compares all
        for t in trainers:
            old = [r for r in results if r["trainer"] == t and r["seed"] == seed]
            if old and not cfg.rescore:
                continue
            if cfg.rescore:
                if not old:
                    continue
                results.remove(old[0])
                secs = old[0]["seconds"]
                if t == "nanogpt":
                    state = nanogpt_weights(cfg, work, seed)
                else:
                    state = load_checkpoint(ours_out(work, seed, t == "ours"))["model"]
            elif t == "nanogpt":
                state, secs = run_nanogpt(cfg, work, seed, env)
            else:
                state, secs = run_ours(cfg, work, seed, env, shuffle=t == "ours")
            loss, n = val_loss(state, val, exact_gelu=t == "nanogpt")
            results.append(
                dict(
                    corpus=cfg.corpus,
                    trainer=t,
                    seed=seed,
                    val_loss=loss,
                    val_tokens=n,
                    seconds=round(secs, 1),
                    threads=cfg.threads or torch.get_num_threads(),
                )
            )
            print(f"{t:>16} seed {seed}: val loss {loss:.4f} over {n:,} tokens ({secs:.0f} s)")
            others = [r for r in done.get("runs", []) if r.get("corpus") != cfg.corpus]
            record = dict(
                runs=others + results,
                recipe=RECIPE,
                steps=cfg.steps,
                torch=torch.__version__,
                python=platform.python_version(),
                machine=platform.processor() or platform.machine(),
            )
            record.setdefault("data", {}).update(done.get("data", {}))
            record["data"][cfg.corpus] = info
            out_json.write_text(json.dumps(record, indent=1))
    table = summary(results, trainers)
    print(table)
    print(f"wrote {out_json}")
    return dict(results=results, table=table, data=info)


if __name__ == "__main__":
    main(parse_args(Config))
