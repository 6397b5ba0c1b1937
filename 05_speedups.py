"""Stage 05: make it fast, and measure what each trick buys on your own hardware.

Five switches, applied cumulatively and timed one by one:
  tf32     fp32 matmuls on tensor cores with a 10-bit mantissa (CUDA, Ampere and newer)
  bf16     autocast: activations in bfloat16 (fp32's range, fewer digits); weights stay fp32
  flash    F.scaled_dot_product_attention: one fused kernel, the T x T matrix never stored
  vocab    50257 -> 50304 = 128 * 393 tokens: a "nicer" shape that kernels tile evenly
  compile  torch.compile: the whole model as a few fused kernels, no Python per op
The benchmark (on by default) times a training step for each row with a fresh model and the
same batch: warm-up and compilation outside the timed region, synchronized clocks, median
of --timed steps. It prints ms/step, tokens/s, speedup vs the fp32 baseline and vs the
previous row, MFU and peak memory, then trains normally with every switch on.
Rows that do not apply here say n/a and why (TF32 on a CPU). --compare-hf times
transformers' GPT2LMHeadModel with the same settings: our standing peer comparison.

Run on CPU (tiny preset, ~1 min):  python 05_speedups.py
Run on a GPU at the real size:     python 05_speedups.py --preset gpt2 --compare-hf
One configuration only:            python 05_speedups.py --only bf16 --benchmark true
"""

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from common import UserError, bench
from common.cli import parse_args
from common.data import TextLoader, get_tokenizer, load_text
from common.model import GPT, preset_config
from common.train import pick_device, seed_all, step_line, synchronize


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    batch_size: int = 16  # sequences per step
    seq_len: int = 1024  # tokens per sequence
    steps: int = 50  # optimizer steps
    lr: float = 3e-4  # AdamW learning rate
    seed: int = 1337  # same seed, same weights, same run
    speedups: str = "compile"  # train with every row up to this one: fp32 ... compile
    benchmark: bool = True  # time each row before training
    only: str = ""  # benchmark this row alone (with the rows before it switched on)
    warmup: int = 5  # untimed steps per row (compilation happens here)
    timed: int = 20  # timed steps per row; the median is reported
    measure_peak: bool = False  # time a large bf16 matmul for an MFU against this device
    compare_hf: bool = False  # also time transformers' GPT2LMHeadModel, same settings
    json: str = ""  # write the benchmark table to this file
    # on a CPU, compiling (~30 s) costs more than it saves in a 30-step run: train without it
    cpu: ClassVar[dict] = dict(
        preset="tiny",
        batch_size=8,
        seq_len=64,
        steps=30,
        lr=1e-3,
        speedups="vocab",
        warmup=2,
        timed=5,
    )


ROWS = ("fp32", "tf32", "bf16", "flash", "vocab", "compile")


def unavailable(row, device):
    """Why a row cannot apply on this device, or None."""
    cuda = device.startswith("cuda")
    if row == "tf32" and not cuda:
        return "TF32 is a CUDA tensor-core mode; CPU fp32 matmuls do not change"
    if row == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 (needs Ampere / sm_80 or newer)"
    if row == "compile" and device == "mps":
        return "torch.compile does not support MPS well yet"
    return None


def build(cfg, row, device):
    """A fresh model with every speedup up to `row` on; returns (model, compiled, autocast)."""
    if row not in ROWS:
        raise UserError(f"unknown speedup row '{row}': choose one of {', '.join(ROWS)}")
    on = [r for r in ROWS[: ROWS.index(row) + 1] if not unavailable(r, device)]
    torch.set_float32_matmul_precision("high" if "tf32" in on else "highest")  # tf32
    ctx = nullcontext()
    if "bf16" in on:  # autocast picks bf16 per op; softmax, norms and the loss stay fp32
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    config = preset_config(
        cfg.preset, tie_weights=True, gpt2_init=True,
        attn="sdpa" if "flash" in on else "manual",  # flash
        vocab_size=50304 if "vocab" in on else 50257,  # vocab
    )  # fmt: skip
    seed_all(cfg.seed)
    model = GPT(config).to(device)
    compiled = torch.compile(model) if "compile" in on else model  # compile
    return model, compiled, ctx


def benchmark(cfg, device, x, y):
    """Time one training step per row: fresh model, same batch, median of cfg.timed steps."""
    peak_name, peak = bench.known_peak(device)
    if cfg.measure_peak:
        peak_name, peak = "measured bf16 matmul", bench.measure_peak(device)
    rows, last = [], None
    for row in [cfg.only] if cfg.only else ROWS:
        if reason := unavailable(row, device):
            rows.append(dict(name=row, status="n/a", reason=reason))
            continue
        model, compiled, ctx = build(cfg, row, device)
        timing = bench.time_train_step(model, compiled, ctx, x, y, cfg.warmup, cfg.timed)
        rows.append(dict(name=row, **timing))
        last = (row, model, compiled is not model, ctx)
    if cfg.compare_hf and last:  # transformers' GPT-2 with the last row's settings
        row, model, compile_on, ctx = last
        hf = bench.HFTwin(model.config).to(device)
        net = torch.compile(hf) if compile_on else hf
        timing = bench.time_train_step(hf, net, ctx, x, y, cfg.warmup, cfg.timed)
        rows.append(dict(name="hf " + row, **timing))
    bench.add_ratios(rows, bench.flops_per_token(model, x.size(1)), peak)
    print(f"benchmark: {bench.hardware_name(device)}, torch {torch.__version__}, B={x.size(0)}, "
          f"T={x.size(1)}, preset {cfg.preset}, median of {cfg.timed} steps after {cfg.warmup} "
          f"warm-up; MFU vs {peak_name or 'no known peak (--measure-peak measures one)'}")  # fmt: skip
    print(bench.format_table(rows))
    result = dict(hardware=bench.hardware_name(device), torch=torch.__version__, device=device,
                  peak=peak, peak_name=peak_name, config=asdict(cfg), rows=rows)  # fmt: skip
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len

    # data: the whole text tokenized once, served as consecutive (B, T) batches
    loader = TextLoader(enc.encode_ordinary(load_text(cfg.input)), B, T)
    print(
        f"loaded {len(loader.tokens):,} tokens: 1 epoch = {len(loader.tokens) // (B * T)} batches"
    )
    table = None
    if cfg.benchmark:  # the same first batch for every row
        x, y = loader.next_batch()
        table = benchmark(cfg, device, x.to(device), y.to(device))
        loader.pos = 0
    if not cfg.steps:  # --steps 0: the benchmark alone
        return dict(benchmark=table)

    model, compiled, ctx = build(cfg, cfg.speedups, device)
    print(f"training with speedups up to '{cfg.speedups}': {model.num_params():,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    losses = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        with ctx:
            logits, loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        print(step_line(step, losses[-1], dt=dt, tokens_per_s=B * T / dt))

    print(
        f"loss at init {losses[0]:.4f} vs ln(vocab_size) = {math.log(model.config.vocab_size):.4f}"
    )
    print(
        f"summary: {cfg.steps} batches of {B}x{T} tokens: loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(losses=losses, final_loss=losses[-1], params=model.num_params(), benchmark=table)


if __name__ == "__main__":
    main(parse_args(Config))
