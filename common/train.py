"""Training plumbing the stages share: device pick, seeding, the step line, DDP setup,
the LR schedule and optimizer of stage 06, metrics.jsonl."""

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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


def step_line(step, loss, lr=None, norm=None, dt=None, tokens_per_s=None, total=None, eta=None):
    """The one step-line format of every stage (fields appear from the stage that adds them):
    step    12 | loss 6.1234 | lr 6.00e-04 | norm 1.234 | dt 812.3ms | tok/s 20,171
    With `total` (stage 07) the step shows progress and the line ends with the time left:
    step  1200/19073 (6.3%) | loss 3.4567 | ... | tok/s 520,000 | eta 4h12m"""
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


def synchronize(device):
    """Wait for queued GPU work: CUDA runs asynchronously, so read the clock only after this."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device) == "mps":
        torch.mps.synchronize()


@dataclass
class Dist:
    """Who this process is in a (possibly one-process) run."""

    rank: int = 0  # global rank: 0 alone prints and writes
    local_rank: int = 0  # GPU index on this node
    world_size: int = 1
    device: str = "cpu"
    enabled: bool = False  # under torchrun, with a process group

    @property
    def master(self):
        return self.rank == 0


def setup_ddp(device):
    """Stage 07's, as 07_ddp_fineweb.py writes it. torchrun starts one process per GPU and tells each who it is: RANK (0..N-1 over all
    nodes), LOCAL_RANK (its GPU on this node), WORLD_SIZE (N). Without them: one process."""
    if "RANK" not in os.environ:
        return Dist(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl")  # NVIDIA's collectives, over NVLink/network
    else:  # CPU: gloo, so the same code runs (and is tested) without a GPU
        device = pick_device("cpu" if device == "auto" else device)
        dist.init_process_group(backend="gloo")
    return Dist(rank, local_rank, world_size, device, enabled=True)


def print0(*args, **kwargs):
    """print, on rank 0 only (torchrun sets RANK in every process it starts)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


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
    groups = [dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)]  # fmt: skip
    fused = str(device).startswith("cuda")  # one CUDA kernel for all parameters, not a loop
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


class MetricsLog:
    """`{out}/metrics.jsonl`: one JSON object per line (step, split, loss, lr, norm, dt, ...).

    On resume from step s, lines of steps >= s (written after that checkpoint by the run
    that died) are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, out, resume_step=0):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < resume_step:
                        kept.append(line)
                except (ValueError, KeyError):  # a half-written last line of a killed run
                    pass
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def amp_dtype(name, device):
    """--dtype -> the autocast dtype. A GPU without bf16 (T4, V100) gets float16, said once:
    it needs a GradScaler, which the stages switch on for float16."""
    if name not in AMP_DTYPES:
        raise UserError(f"unknown --dtype '{name}': use bfloat16, float16 or float32")
    if name == "bfloat16" and str(device).startswith("cuda") and not torch.cuda.is_bf16_supported():
        print("this GPU has no bf16 (needs sm_80+): using float16 with a GradScaler")
        return torch.float16
    return AMP_DTYPES[name]
