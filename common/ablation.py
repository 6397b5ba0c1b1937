"""The ablation harness of stage 09: rows x seeds of fresh models on the same batches, then
the table (paired differences to the baseline, the seed spread, what is noise) and
{out}/ablation.json. A stage gives the rows and how to build one run; the harness does the rest:

    @dataclass
    class Config(ablation.Config):  # the harness's flags, plus the stage's own
        rows: str = "baseline,rope"
    result = run_ablation(cfg, rows, build, device, dtype)

`rows` maps a row's name to its switches (a dict; "baseline" is the reference row), and
`build(switches)` returns a fresh (model, [optimizers]) for one run; the harness seeds it first
(run i of every row: seed cfg.seed + i, so a row and the baseline differ only in the change).
Every run trains with stage 06's recipe (gradient accumulation to cfg.total_batch, clipping,
warmup + cosine applied to each optimizer group's own peak lr) and is scored by the mean loss
on held-out batches, the same ones for every run. `cfg` fields read: input, data_dir,
batch_size, seq_len, total_batch, steps, max_lr, warmup_steps, grad_clip, seed, seeds,
val_steps, preset, out (the fields of `Config` below).
"""

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from common import UserError, bench
from common.data import (
    ShardLoader,
    TextLoader,
    WindowLoader,
    get_tokenizer,
    load_text,
    shuffled_windows,
)
from common.device import synchronize
from common.train import lr_at, seed_all, step_line


@dataclass
class Config:
    """The harness's fields with their real-run defaults; a stage's Config adds its rows."""

    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    data_dir: str = ""  # token shards from `python -m common.fineweb` instead of --input
    batch_size: int = 8  # sequences per micro-step
    seq_len: int = 1024  # tokens per sequence
    steps: int = 80  # optimizer steps per run: every row sees steps x total_batch tokens
    max_lr: float = 6e-4  # AdamW's peak learning rate, reached at the end of warmup; min is 10%
    warmup_steps: int = 10  # linear warmup from max_lr / warmup_steps
    weight_decay: float = 0.1  # AdamW decay on >= 2-D parameters only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    total_batch: int = 0  # tokens per optimizer step, a multiple of B*T (0: B*T, no accumulation)
    dtype: str = "bfloat16"  # autocast dtype: bfloat16, float16 (+ GradScaler) or float32 (off)
    seed: int = 1337  # seed of each row's first run; run i uses seed + i
    seeds: int = 3  # runs per row, one seed each: their spread shows what is noise
    rows: str = "baseline"  # rows to train, comma-separated
    shuffle: bool = True  # train windows in a fresh seeded order each epoch, as 07; false: in order
    val_steps: int = 20  # held-out batches per evaluation (at most what the val text holds)
    out: str = "out"  # the table and every run's numbers go to {out}/ablation.json
    rules: ClassVar[dict] = dict(total_batch=">= 0")  # --total-batch 0: B*T, no accumulation


def parse_rows(text, known):
    """--rows "baseline,rope+swiglu" -> {name: switches}. A name is a key of `known` (a row's
    name -> its switches) or keys joined with +, whose switches then apply together."""
    rows = {}
    for name in (n.strip() for n in text.split(",") if n.strip()):
        rows[name] = {}
        for part in name.split("+"):
            if part not in known:
                raise UserError(
                    f"unknown row '{part}': choose from {', '.join(known)}, or join them with +"
                )
            rows[name].update(known[part])
    if not rows:
        raise UserError("--rows names no row: give at least one, e.g. --rows baseline")
    return rows


def load_data(cfg):
    """Functions that make fresh train/val loaders: every run reads the same batches."""
    B, T = cfg.batch_size, cfg.seq_len
    if cfg.data_dir:  # FineWeb-Edu shards: shard 0 is validation
        print(f"data: token shards in {cfg.data_dir}")
        step_tokens = cfg.total_batch or B * T  # shards change between optimizer steps only
        order = dict(shuffle=shuffled_windows, seed=cfg.seed) if cfg.shuffle else {}
        return dict(
            train=lambda: ShardLoader(
                cfg.data_dir, "train", B, T, step_tokens=step_tokens, **order
            ),
            val=lambda: ShardLoader(cfg.data_dir, "val", B, T),
            val_steps=cfg.val_steps,
            train_tokens=None,
        )
    tokens = get_tokenizer().encode_ordinary(load_text(cfg.input))
    split = int(0.9 * len(tokens))  # the last 10% is never trained on
    train, val = tokens[:split], tokens[split:]
    val_steps = min(cfg.val_steps, (len(val) - 1) // (B * T))
    if val_steps < 1:
        raise UserError(
            f"the held-out last 10% of the text ({len(val):,} tokens) is smaller "
            f"than one batch of {B}x{T}: lower --batch-size or --seq-len"
        )
    print(
        f"data: {len(train):,} training tokens, {len(val):,} held out "
        f"({val_steps} val batches of {B}x{T})"
    )
    Loader, order = (WindowLoader, dict(seed=cfg.seed)) if cfg.shuffle else (TextLoader, {})
    return dict(
        train=lambda: Loader(train, B, T, **order),
        val=lambda: TextLoader(val, B, T),
        val_steps=val_steps,
        train_tokens=len(train),
    )


def evaluate(model, make_loader, autocast, steps, device):
    """Mean loss over the first `steps` held-out batches: the same ones for every run."""
    model.eval()
    loader, total = make_loader(), 0.0
    with torch.no_grad():
        for _ in range(steps):
            x, y = loader.next_batch()
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item() / steps
    model.train()
    return total


def train_run(cfg, model, optimizers, total_batch, data, dtype, device):
    """One run: stage 06's loop over several optimizers (AdamW and Muon have their own peaks;
    the warmup + cosine shape is shared), then its val loss."""
    kind = device.split(":")[0]
    autocast = torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(kind, enabled=dtype == torch.float16)  # float16 only
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["peak_lr"] = group["lr"]
    loader, accum_steps = data["train"](), total_batch // (cfg.batch_size * cfg.seq_len)
    losses, dts = [], []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad()
        loss_accum = 0.0
        for _ in range(accum_steps):
            x, y = loader.next_batch()
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            loss = loss / accum_steps  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
        for opt in optimizers:
            scaler.unscale_(opt)  # clip the true gradient (a no-op without float16)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = lr_at(step, cfg.max_lr, cfg.warmup_steps, cfg.steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * lr / cfg.max_lr
            scaler.step(opt)
        scaler.update()
        synchronize(device)
        dts.append(time.perf_counter() - t0)
        losses.append(loss_accum.item())
        print(
            step_line(
                step,
                losses[-1],
                lr=lr,
                norm=norm.item(),
                dt=dts[-1],
                tokens_per_s=total_batch / dts[-1],
            )
        )
    val = evaluate(model, data["val"], autocast, data["val_steps"], device)
    return dict(
        losses=losses,
        val_loss=val,
        params=sum(p.numel() for p in model.parameters()),
        train_s=sum(dts),
        tokens_per_s=total_batch / statistics.median(dts),
    )


def spread(values):
    return statistics.stdev(values) if len(values) > 1 else None


def summarize(name, runs, base_runs):
    """One table row: means over the seeds, and the paired difference to the baseline."""
    val = [r["val_loss"] for r in runs]
    row = dict(
        name=name,
        params=runs[0]["params"],
        val_loss=statistics.mean(val),
        val_spread=spread(val),
        train_s=statistics.mean(r["train_s"] for r in runs),
        tokens_per_s=statistics.mean(r["tokens_per_s"] for r in runs),
        delta=None,
        delta_spread=None,
    )
    if base_runs is not None:  # same seed, same batches: only the change differs
        deltas = [r["val_loss"] - b["val_loss"] for r, b in zip(runs, base_runs, strict=True)]
        row["delta"], row["delta_spread"] = statistics.mean(deltas), spread(deltas)
    return row


def format_table(rows, tokens, seeds):
    pm = lambda x: "" if x is None else f" ± {x:.4f}"  # the spread over seeds, when known
    width = max(9, *(len(r["name"]) for r in rows))
    head = (
        f"{'row':<{width}} {'params':>11} {'tokens':>10} {'val loss':>17} "
        f"{'vs baseline':>17} {'time':>7} {'tok/s':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        val = f"{r['val_loss']:.4f}{pm(r['val_spread'])}"
        delta = "-"
        if r["delta"] is not None and r["name"] != "baseline":
            delta = f"{r['delta']:+.4f}{pm(r['delta_spread'])}"
        lines.append(
            f"{r['name']:<{width}} {r['params']:>11,} {tokens:>10,} {val:>17} "
            f"{delta:>17} {r['train_s']:>6.1f}s {r['tokens_per_s']:>9,.0f}"
        )
    lines.append(
        f"(means over {seeds} seed(s), ± their standard deviation; val loss on held-out "
        "text at equal tokens, lower is better; time: training seconds per run, val "
        "excluded; tok/s: median step, eager mode)"
    )
    return "\n".join(lines)


def noise_notice(rows, seeds, device, tokens, preset):
    """Say plainly how much of the table is noise."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    spreads = [r["delta_spread"] for r in rows if r["delta_spread"] is not None]
    if seeds < 2 or base is None:
        text = (
            "noise: one seed per row (or no baseline row): the seed spread is unknown, so no "
            "difference in this table can be told from noise; use --seeds 3"
        )
    else:
        s = max([base["val_spread"], *spreads])
        text = (
            f"noise: the largest seed spread here is {s:.4f}; a difference smaller than about "
            f"twice that ({2 * s:.4f}) is noise, not an effect of the change"
        )
    if not device.startswith("cuda"):
        text += (
            f". CPU scale ({tokens:,} tokens per run, preset {preset}): every run stopped at "
            "the very start of training, so a difference here says which row starts "
            "faster, not which trains better; run on a GPU (gpt2 preset, 3 seeds) or with "
            "--data-dir and more --steps for differences that mean something"
        )
    return text


def run_ablation(cfg, rows, build, device, dtype):
    """Train every row cfg.seeds times, print the table and the noise line, write
    {cfg.out}/ablation.json; returns dict(rows, runs, table, notice, tokens)."""
    B, T = cfg.batch_size, cfg.seq_len
    if cfg.seeds < 1:
        raise UserError(f"--seeds {cfg.seeds}: need at least 1 run per row")
    total_batch = cfg.total_batch or B * T
    if total_batch % (B * T):
        raise UserError(f"--total-batch {total_batch} is not a multiple of B*T = {B * T}")
    data = load_data(cfg)
    tokens = cfg.steps * total_batch  # the same for every row: equal data
    if data["train_tokens"] and tokens > data["train_tokens"]:
        print(
            f"note: {tokens / data['train_tokens']:.1f} passes over the training text per run: "
            "the val loss also measures how fast each row starts to memorize it"
        )
    print(
        f"ablation: {len(rows)} rows x {cfg.seeds} seed(s), {cfg.steps} steps of "
        f"{total_batch:,} tokens = {tokens:,} tokens per run, preset {cfg.preset}, {dtype}, "
        f"{bench.hardware_name(device)}, torch {torch.__version__}"
    )
    runs = {}
    for name, switches in rows.items():
        runs[name] = []
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            on = ", ".join(f"{k}={v}" for k, v in switches.items()) or "GPT-2"
            print(f"--- row {name} ({on}), seed {seed}")
            seed_all(seed)  # another seed: another init; the batches stay the same
            model, optimizers = build(switches)
            run = train_run(cfg, model, optimizers, total_batch, data, dtype, device)
            runs[name].append(dict(seed=seed, **run))
            print(f"val loss {run['val_loss']:.4f}")
    table_rows = [summarize(name, runs[name], runs.get("baseline")) for name in rows]
    table = format_table(table_rows, tokens, cfg.seeds)
    notice = noise_notice(table_rows, cfg.seeds, device, tokens, cfg.preset)
    print(table)
    print(notice)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(
        hardware=bench.hardware_name(device),
        torch=torch.__version__,
        device=device,
        dtype=str(dtype),
        config=asdict(cfg),
        tokens=tokens,
        rows=table_rows,
        notice=notice,
        runs=runs,
    )
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    best = min(table_rows, key=lambda r: r["val_loss"])
    print(
        f"summary: {len(rows)} rows x {cfg.seeds} seed(s) at {tokens:,} tokens each: "
        f"best val loss {best['val_loss']:.4f} ({best['name']}); "
        f"wrote {out / 'ablation.json'}"
    )
    return dict(rows=table_rows, runs=runs, table=table, notice=notice, tokens=tokens)
