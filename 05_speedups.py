"""Stage 05: make it fast, and measure what each trick buys on your own hardware.

Five speedups, first timed one by one in a table (common/bench.py): TF32, autocast and compile
written out in main(); flash attention and vocab 50304 set on the model (common/model.py).

Run: python 05_speedups.py   (no GPU: tiny preset, ~1 min; --preset gpt2 --compare-hf on a GPU)
"""

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from common import bench
from common.cli import parse_args
from common.data import TextLoader, get_tokenizer, load_text
from common.model import GPT, preset_config
from common.device import amp_dtype, pick_device, synchronize
from common.train import seed_all, step_line


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
    dtype: str = "bfloat16"  # autocast dtype: bfloat16, float16 (+ GradScaler) or float32 (off)
    compile: bool = True  # torch.compile the model (off on a CPU: compiling outlasts 30 steps)
    benchmark: str = "all"  # time the speedups first: all, one row (fp32 ... compile), or none
    timed: int = 21  # timed steps per row, in interleaved rounds; the median is reported
    compare_hf: bool = False  # also time transformers' GPT2LMHeadModel, same settings
    json: str = ""  # write the table to this JSON file
    cpu: ClassVar[dict] = dict(
        preset="tiny",
        batch_size=8,
        seq_len=64,
        steps=30,
        lr=1e-3,
        compile=False,
        timed=6,
    )
    rules: ClassVar[dict] = dict(steps=">= 0")  # --steps 0: the table alone


def main(cfg):
    device = pick_device(cfg.device)
    table = bench.speedup_table(cfg, device)  # each speedup, timed on its own (--benchmark)
    if not cfg.steps:  # --steps 0: the table alone
        return dict(benchmark=table)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len

    # data: the whole text tokenized once, served as consecutive (B, T) batches
    loader = TextLoader(enc.encode_ordinary(load_text(cfg.input)), B, T)
    print(
        f"loaded {len(loader.tokens):,} tokens: 1 epoch = {len(loader.tokens) // (B * T)} batches"
    )

    torch.set_float32_matmul_precision("high")  # tf32: fp32 matmuls on tensor cores (10-bit)
    dtype = amp_dtype(cfg.dtype, device)  # autocast to bfloat16: fp32's range, fewer digits
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)  # T4, V100
    config = preset_config(
        cfg.preset,
        tie_weights=True,
        gpt2_init=True,  # stage 04, in common/
        attn="sdpa",  # flash attention: one fused kernel, no (T, T) matrix
        vocab_size=50304,  # 128 * 393: a shape kernels tile evenly
    )
    raw_model = GPT(config).to(device)
    model = torch.compile(raw_model) if cfg.compile else raw_model  # compile: a few fused kernels
    print(
        f"parameters: {raw_model.num_params():,}; {dtype}, flash attention, vocab 50304, "
        f"compile {cfg.compile}"
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    losses = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        with autocast:  # bf16: matmuls in bfloat16; softmax, norms and the loss stay fp32
            logits, loss = model(x, y)
        scaler.scale(loss).backward()  # float16 only: the loss scaled so small gradients survive
        scaler.step(optimizer)  # (unscales first; skips the step if a gradient overflowed)
        scaler.update()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        print(step_line(step, losses[-1], dt=dt, tokens_per_s=B * T / dt))

    print(
        f"summary: {cfg.steps} batches of {B}x{T} tokens: loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(losses=losses, final_loss=losses[-1], benchmark=table)


if __name__ == "__main__":
    main(parse_args(Config))
