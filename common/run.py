"""A training run's bookkeeping (stage 07 and later): one writer per --out, checkpoints and an
exact --resume, metrics.jsonl (and an optional tracker), the non-finite guard, MFU and ETA.

    run = start_run(cfg, raw_model, optimizer, train_loader, master)   # before the loop
    for step in range(run.start_step, cfg.steps):
        ...
        run.check_finite(step, loss, norm, scaler)   # before optimizer.step()
        run.log(step=step, split="train", loss=...)  # rank 0 writes; other ranks do nothing
        run.save(step + 1)                           # rank 0 writes the checkpoint
    run.close()

`cfg` is stage 07's Config (out, resume, allow_config_change, keep_last, total_batch,
seq_len, steps, wandb). What a resume must match, and what it may change when
--allow-config-change says so, is common.checkpoint.check_resume's list.
"""

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common import UserError, bench
from common.checkpoint import (
    RunLock, check_resume, list_checkpoints, load_checkpoint, newest_good_checkpoint,
    prune_checkpoints, remove_stale_temps, rng_state, save_checkpoint, set_rng_state,
)  # fmt: skip
from common.train import MetricsLog, make_tracker, print0


class Run:
    def __init__(self, cfg, model, optimizer, loader, master):
        self.cfg, self.model, self.optimizer, self.loader = cfg, model, optimizer, loader
        self.master, self.lock, self.metrics = master, None, None
        self.start_step, self.start_tokens, self.newest = 0, 0, None
        device = next(model.parameters()).device
        self.world_size = torch.distributed.get_world_size() if _distributed() else 1
        self.flops = bench.flops_per_token(model, cfg.seq_len)  # per token, forward + backward
        self.peak = bench.known_peak(device)[1]  # the GPU's datasheet bf16 FLOP/s, or None
        self._eta_from = None  # (time, step) after the first step: compilation is not typical

    def tokens_at(self, step):
        """Tokens trained on before `step`, across a resume that changed --total-batch."""
        return self.start_tokens + (step - self.start_step) * self.cfg.total_batch

    def log(self, **record):
        if self.metrics:
            self.metrics.write(**record)

    def check_finite(self, step, loss, norm, scaler=None):
        """Stop before optimizer.step() when the loss or the gradient norm is nan/inf, so the
        weights are never touched. With float16's GradScaler an inf norm is an overflow the
        scaler skips (it lowers its scale), not a failure."""
        scaling = scaler is not None and scaler.is_enabled()
        if math.isfinite(float(loss)) and (scaling or math.isfinite(float(norm))):
            return
        good = newest_good_checkpoint(self.cfg.out) if self.master else None
        raise UserError(
            f"step {step}: loss {float(loss):.4g}, gradient norm {float(norm):.4g}: stopped "
            f"before the update; newest good checkpoint: {good or 'none'}; resume from it "
            "with a lower --max-lr (and --allow-config-change)"
        )

    def save(self, step):
        """Rank 0: checkpoint after `step` steps, then prune to --keep-last."""
        if not self.master:
            return None
        self.newest = save_checkpoint(
            self.cfg.out, step, self.model, self.model.config, optimizer=self.optimizer.state_dict(),
            config=asdict(self.cfg), loader=self.loader.state_dict(), rng=rng_state(),
            tokens=self.tokens_at(step),
        )  # fmt: skip
        prune_checkpoints(self.cfg.out, self.cfg.keep_last)
        print(f"saved {self.newest}")
        return self.newest

    def mfu(self, dt):
        """Model FLOPs utilization of one optimizer step of dt seconds, per GPU."""
        if not self.peak:
            return None
        return self.flops * self.cfg.total_batch / dt / self.world_size / self.peak

    def eta(self, step):
        """Seconds left after `step`, from the steps since the first one (None at first)."""
        now = time.perf_counter()
        if self._eta_from is None:
            self._eta_from = (now, step)
            return None
        t, s = self._eta_from
        return (now - t) / (step - s) * (self.cfg.steps - step - 1)

    def close(self):
        if self.metrics:
            self.metrics.close()
        if self.lock:
            self.lock.release()


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def start_run(cfg, model, optimizer, loader, master):
    """Take --out (rank 0 holds its lock for the run's life), clear what killed saves left,
    then start fresh (refused if --out holds another run's checkpoints) or --resume: weights,
    optimizer moments, step, data position and RNG states as saved. Returns the Run."""
    run = Run(cfg, model, optimizer, loader, master)
    if master:
        run.lock = RunLock(cfg.out).acquire()  # a second run into this --out is refused here
        files, size = remove_stale_temps(cfg.out)
        if files:
            print(f"removed {files} unfinished checkpoint temp file(s), {size / 2**20:,.1f} MB")
    changes = []
    if cfg.resume:
        ckpt = load_checkpoint(cfg.out if cfg.resume == "latest" else cfg.resume)  # verified
        if ckpt["model_config"] != asdict(model.config):
            raise UserError(f"{ckpt['path']} holds another model ({ckpt['model_config']}): "
                            "resume with the same --preset")  # fmt: skip
        changes = check_resume(ckpt["config"], asdict(cfg), allow_change=cfg.allow_config_change)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        run.start_step, run.newest = ckpt["step"], ckpt["path"]
        run.start_tokens = ckpt.get("tokens", ckpt["step"] * ckpt["config"]["total_batch"])
        if run.start_step >= cfg.steps:
            raise UserError(f"{ckpt['path']} is already at step {run.start_step} of --steps "
                            f"{cfg.steps}: nothing to train; raise --steps (with "
                            "--allow-config-change) to go on")  # fmt: skip
        print0(f"resumed from step {run.start_step} ({ckpt['path']})")
    elif found := list_checkpoints(cfg.out):  # never overwrite another run's checkpoints
        raise UserError(f"{cfg.out} already holds checkpoints (newest {found[-1].name}): "
                        "add --resume to continue that run, or choose another --out")  # fmt: skip
    if master:
        tracker = make_tracker("wandb" if cfg.wandb else None, project=cfg.wandb,
                               run_name=Path(cfg.out).name, config=asdict(cfg))  # fmt: skip
        run.metrics = MetricsLog(cfg.out, run.start_step, asdict(cfg), tracker)
        if changes:  # --allow-config-change: the file says what changed, and where
            run.log(step=run.start_step, split="config_change", changes=changes)
            print(f"resuming with changed settings: {'; '.join(changes)}")
    return run
