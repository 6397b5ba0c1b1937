"""Checkpoints: `{out}/ckpt_{step:06d}.pt`, written to a temp file then renamed.

One file holds everything a run needs to continue exactly: the model (unwrapped, uncompiled
parameter names), its GPTConfig, the optimizer, the step, the stage's Config, the data
loader's position and every RNG state. A kill mid-save leaves at worst a stray temp file,
never a broken newest checkpoint.
"""

import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from common import UserError
from common.model import GPT, GPTConfig

CKPT_RE = re.compile(r"^ckpt_(\d{6,})\.pt$")


def save_checkpoint(out, step, model, model_config, **extra):
    """Write {out}/ckpt_{step:06d}.pt atomically; `extra` holds optimizer, config, loader, rng."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ckpt_{step:06d}.pt"
    tmp = out / f".{path.name}.tmp{os.getpid()}"
    state = dict(step=step, model=model.state_dict(), model_config=asdict(model_config), **extra)
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX and Windows
    return path


def list_checkpoints(out):
    """Checkpoints in `out`, oldest first (by step)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(out, keep_last):
    """Delete all but the newest `keep_last` checkpoints (0 or less keeps everything)."""
    if keep_last > 0:
        for p in list_checkpoints(out)[:-keep_last]:
            p.unlink(missing_ok=True)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint file, or the newest one when `path` is a directory."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"no checkpoint (ckpt_NNNNNN.pt) in {path}: train first or give a file")
        path = found[-1]
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): is it complete?")
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a checkpoint of this project (no model/model_config)")
    state["path"] = str(path)
    return state


def model_from_checkpoint(path, device="cpu"):
    """Rebuild our GPT from a checkpoint; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def rng_state():
    """Every random number generator a run touches: python, numpy, torch (CPU and CUDA)."""
    import random

    import numpy as np

    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
