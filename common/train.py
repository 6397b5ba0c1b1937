"""Training plumbing the stages share: device pick, seeding, the step line."""

import random

import numpy as np
import torch

from common import UserError


def pick_device(name="auto"):
    """'auto' -> cuda > mps > cpu; an explicit device that is not there is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU visible to torch; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available here; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return name


def seed_all(seed):
    """Same seed -> same init, same batches, same samples."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def step_line(step, loss, lr=None, norm=None, dt=None, tokens_per_s=None):
    """The one step-line format of every stage (fields appear from the stage that adds them):
    step    12 | loss 6.1234 | lr 6.00e-04 | norm 1.234 | dt 812.3ms | tok/s 20,171"""
    parts = [f"step {step:5d}", f"loss {loss:.4f}"]
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    if norm is not None:
        parts.append(f"norm {norm:.3f}")
    if dt is not None:
        parts.append(f"dt {dt * 1000:.1f}ms")
    if tokens_per_s is not None:
        parts.append(f"tok/s {tokens_per_s:,.0f}")
    return " | ".join(parts)


def synchronize(device):
    """Wait for queued GPU work: CUDA runs asynchronously, so read the clock only after this."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device) == "mps":
        torch.mps.synchronize()
