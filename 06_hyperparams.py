"""Stage 06: GPT-3's optimization recipe, applied to GPT-2.

GPT-2's paper gives few training details, so we borrow GPT-3 small's (same size):
  AdamW    betas (0.9, 0.95), eps 1e-8; fused into one CUDA kernel on a GPU
  decay    weight decay 0.1 on matmuls and embeddings (>= 2 dims), none on biases/LayerNorms
  clip     the global gradient norm is clipped to 1.0 (printed each step: spikes show trouble)
  lr       linear warmup, then cosine decay from 6e-4 to 6e-5
  batch    524,288 = 2**19 tokens per step (~0.5M, as GPT-3), reached by gradient
           accumulation: several micro-batches, loss scaled by 1/steps, one optimizer step
All of stage 05's speedups stay on (--speedups picks how many).

Run on CPU (tiny preset, 2 micro-steps of 8x64, ~20 s):  python 06_hyperparams.py
Run on a GPU at the real size (32 micro-steps of 16x1024): python 06_hyperparams.py --preset gpt2
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch

from common import UserError
from common.cli import parse_args
from common.data import TextLoader, get_tokenizer, load_text
from common.model import GPT, preset_config
from common.train import lr_at, make_optimizer, pick_device, seed_all, step_line, synchronize


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    batch_size: int = 16  # sequences per step
    seq_len: int = 1024  # tokens per sequence
    steps: int = 50  # optimizer steps
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 6e-5  # learning rate at the end of the cosine (10% of the peak)
    warmup_steps: int = 10  # linear warmup from max_lr / warmup_steps
    weight_decay: float = 0.1  # AdamW decay on >= 2-D parameters only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    total_batch: int = 524288  # tokens per optimizer step (2**19); a multiple of B*T
    seed: int = 1337  # same seed, same weights, same run
    speedups: str = "compile"  # train with every stage-05 speedup up to this one
    cpu: ClassVar[dict] = dict(
        preset="tiny", batch_size=8, seq_len=64, steps=30, max_lr=2e-3, min_lr=2e-4,
        warmup_steps=5, total_batch=1024, speedups="vocab",
    )  # fmt: skip


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
    if cfg.total_batch % (B * T):
        raise UserError(f"--total-batch {cfg.total_batch} is not a multiple of B*T = {B * T}")
    accum_steps = cfg.total_batch // (B * T)  # micro-batches per optimizer step
    print(f"total batch {cfg.total_batch:,} tokens = {accum_steps} micro-steps of {B}x{T}")

    model, compiled, ctx = build(cfg, cfg.speedups, device)
    print(f"training with speedups up to '{cfg.speedups}': {model.num_params():,} parameters")
    optimizer, groups = make_optimizer(model, cfg.weight_decay, cfg.max_lr, device)
    print(f"decayed: {groups['decay'][0]} tensors, {groups['decay'][1]:,} parameters; "
          f"not decayed: {groups['no_decay'][0]} tensors, {groups['no_decay'][1]:,} parameters; "
          f"fused AdamW: {groups['fused']}")  # fmt: skip

    losses, norms = [], []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss_accum = 0.0
        for micro_step in range(accum_steps):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with ctx:
                logits, loss = compiled(x, y)
            loss = loss / accum_steps  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            loss.backward()  # gradients add up across micro-steps
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # pre-clip norm
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(loss_accum.item())
        norms.append(norm.item())
        tokens_per_s = B * T * accum_steps / dt
        print(step_line(step, losses[-1], lr=lr, norm=norms[-1], dt=dt, tokens_per_s=tokens_per_s))

    print(
        f"loss at init {losses[0]:.4f} vs ln(vocab_size) = {math.log(model.config.vocab_size):.4f}"
    )
    print(
        f"summary: {cfg.steps} steps of {cfg.total_batch:,} tokens: loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(
        losses=losses, final_loss=losses[-1], params=model.num_params(), norms=norms, groups=groups
    )


if __name__ == "__main__":
    main(parse_args(Config))
