"""Stage 06: GPT-3's optimization recipe, applied to GPT-2 (whose paper gives few details).

AdamW's betas, decay groups, fused kernel; clipping; warmup + cosine; 2**19-token steps.

Run: python 06_hyperparams.py   (no GPU: tiny preset, 2 micro-steps of 8x64, ~20 s)
"""

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from common import UserError
from common.cli import parse_args
from common.data import TextLoader, get_tokenizer, load_text
from common.model import GPT, preset_config
from common.device import amp_dtype, pick_device, synchronize
from common.plan import fit_batch_size
from common.train import seed_all, step_line


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    batch_size: int | str = "auto"  # sequences per micro-step; auto: the most the GPU fits
    seq_len: int = 1024  # tokens per sequence
    steps: int = 50  # optimizer steps
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup; min_lr is 10%
    warmup_steps: int = 10  # linear warmup from max_lr / warmup_steps
    weight_decay: float = 0.1  # AdamW decay on >= 2-D parameters only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    total_batch: int = 524288  # tokens per optimizer step (2**19, as GPT-3); a multiple of B*T
    seed: int = 1337  # same seed, same weights, same run
    dtype: str = "bfloat16"  # autocast dtype: bfloat16, float16 (+ GradScaler) or float32 (off)
    compile: bool = True  # torch.compile the model (off on a CPU: compiling outlasts 30 steps)
    cpu: ClassVar[dict] = dict(
        preset="tiny",
        batch_size=8,
        seq_len=64,
        steps=30,
        max_lr=2e-3,
        warmup_steps=5,
        total_batch=1024,
        compile=False,
    )


def lr_at(step, max_lr, warmup_steps, max_steps):
    """GPT-3's schedule: linear warmup to max_lr, cosine decay to 10% of it at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))  # 0 -> 1
    return max_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # 1 -> 0.1


def make_optimizer(model, weight_decay, lr, device):
    """AdamW, GPT-3's betas; weight decay on matmuls and embeddings, not biases and norms."""
    groups = [
        dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=weight_decay),
        dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0),
    ]
    fused = str(device).startswith("cuda")  # one CUDA kernel for all parameters, not a loop
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    cfg = fit_batch_size(cfg, device)  # auto: the planner's B, tried for real (common/plan.py)
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
        f"compile {cfg.compile}; {accum_steps} micro-steps of {B}x{T} per step"
    )
    optimizer = make_optimizer(raw_model, cfg.weight_decay, cfg.max_lr, device)

    losses, norms = [], []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss_accum = 0.0
        for micro_step in range(accum_steps):
            x, y = loader.next_batch()
            x, y = x.to(device), y.to(device)
            with autocast:  # bf16: matmuls in bfloat16; softmax, norms and the loss stay fp32
                logits, loss = model(x, y)
            loss = loss / accum_steps  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            scaler.scale(loss).backward()  # gradients add up across micro-steps
        scaler.unscale_(optimizer)  # float16: the true gradients, before clipping them
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # pre-clip norm
        lr = lr_at(step, cfg.max_lr, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)  # (unscales first; skips the step if a gradient overflowed)
        scaler.update()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(loss_accum.item())
        norms.append(norm.item())
        tok_s = cfg.total_batch / dt
        print(step_line(step, losses[-1], lr=lr, norm=norms[-1], dt=dt, tokens_per_s=tok_s))

    print(
        f"summary: {cfg.steps} steps of {cfg.total_batch:,} tokens: "
        f"loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(losses=losses, final_loss=losses[-1], norms=norms)


if __name__ == "__main__":
    main(parse_args(Config))
