"""The training recipe the stages share: seeding, the step line, and stage 06's LR schedule
and optimizer."""

import math
import random

import numpy as np
import torch

from common.metrics import format_eta


def seed_all(seed):
    """Same seed -> same init, same batches, same samples."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def step_line(step, loss, lr=None, norm=None, dt=None, tokens_per_s=None, total=None, eta=None):
    """The one step-line format of every stage (fields appear from the stage that adds them):
    step    12 | loss 7.6641 | lr 1.67e-03 | norm 1.781 | dt 739.1ms | tok/s 1,385
    With `total` (stage 07) the step shows progress and the line ends with the time left:
    step    12/40 (32.5%) | loss 8.0131 | ... | tok/s 1,407 | eta 21s"""
    head = f"step {step:5d}" + (f"/{total} ({100 * (step + 1) / total:.1f}%)" if total else "")
    parts = [head, f"loss {loss:.4f}"]
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if norm is not None:
        parts.append(f"norm {norm:.3f}")
    if dt is not None:
        parts.append(f"dt {dt * 1000:.1f}ms")
    if tokens_per_s is not None:
        parts.append(f"tok/s {tokens_per_s:,.0f}")
    if total:
        parts.append(f"eta {format_eta(eta)}")
    return " | ".join(parts)


def lr_at(step, max_lr, warmup_steps, max_steps):
    """Stage 06's, as 06_hyperparams.py writes it (a test keeps the two the same).
    GPT-3's schedule: linear warmup to max_lr, cosine decay to 10% of it at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))  # 0 -> 1
    return max_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))  # 1 -> 0.1


def make_optimizer(model, weight_decay, lr, device):
    """Stage 06's. AdamW, GPT-3's betas; weight decay on matmuls and embeddings, not biases
    and norms."""
    groups = [
        dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=weight_decay),
        dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0),
    ]
    fused = str(device).startswith("cuda")  # one CUDA kernel for all parameters, not a loop
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
