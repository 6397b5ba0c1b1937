"""A training run's bookkeeping (stage 07 and later): one writer per --out, checkpoints and an
exact --resume, metrics.jsonl (and an optional tracker), the non-finite guard, MFU and ETA,
and what clusters do to a run: restarts, preemption, a full disk.

    run = start_run(cfg, raw_model, optimizer, train_loader, master)   # before the loop
    for step in range(run.start_step, cfg.steps):
        ...
        run.check_finite(step, loss, norm, scaler)   # before optimizer.step()
        run.log(step=step, split="train", loss=...)  # rank 0 writes; other ranks do nothing
        if (preempted := run.preempted()) or ...:    # every rank, after every step
            run.save(step + 1)                       # rank 0 writes the checkpoint
        if preempted:
            run.stop(step + 1)                       # exits with PREEMPTED (75)
    run.close()

`cfg` is stage 07's Config (out, resume, allow_config_change, keep_last, total_batch,
seq_len, steps, wandb). What a resume must match, and what it may change when
--allow-config-change says so, is common.checkpoint.check_resume's list.

Faults, and what the run does:
  a worker dies   under `torchrun --max-restarts=N` the workers are started again with
                  TORCHELASTIC_RESTART_COUNT > 0: start_run then resumes from the newest
                  checkpoint in --out that verifies, whatever --resume says (nothing there:
                  a fresh start). `--resume auto` does the same for schedulers that re-run
                  the command (SLURM --requeue, spot instances).
  preemption      SIGTERM or SIGUSR1 on any rank is noted, not fatal; preempted(), after each
                  step, all-reduces the flags, so every rank stops after the same step: rank 0
                  writes one checkpoint, all exit with PREEMPTED (75, EX_TEMPFAIL).
  a full disk     save() refuses to start a checkpoint the disk has no room for (less free
                  than the newest checkpoint, or its size cannot be reserved), and a save that
                  fails (ENOSPC, I/O error) leaves no temp file; either way every rank stops,
                  rank 0 with one line naming the path and the space a checkpoint needs.

Checkpoints are written in the background (common.checkpoint.BackgroundSave): save() blocks
the loop only while it copies the state into host memory. That memory (about one
checkpoint's size in RAM) is allocated by a thread after the first step, while training
goes on, and kept for every save; one save at a time. What a background write did
is reported at the first check after it ends (save(), preempted(), check_finite(), close()):
`saved PATH`, and a "checkpoint" line in metrics.jsonl with stall_s (the loop blocked, waiting
for the previous save included) and write_s (the thread's time). Its error stops every rank
at that check; under DDP it rides on preempted()'s all-reduce, so no step pays an extra sync.
The save before a stop, and the last one, wait until the file is written and verifies.
"""

import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from common import UserError, bench
from common.checkpoint import (
    BackgroundSave,
    RunLock,
    check_plain,
    check_resume,
    host_buffers,
    list_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    remove_stale_temps,
    rng_state,
    set_rng_state,
)
from common.distributed import print0
from common.metrics import MetricsLog, make_tracker

PREEMPTED = 75  # exit code after a SIGTERM/SIGUSR1 checkpoint: EX_TEMPFAIL, "run it again"
STOP_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGUSR1") if hasattr(signal, s))


class Run:
    def __init__(self, cfg, model, optimizer, loader, master):
        self.cfg, self.model, self.optimizer, self.loader = cfg, model, optimizer, loader
        self.master, self.lock, self.metrics = master, None, None
        self.start_step, self.start_tokens, self.newest = 0, 0, None
        self.device = device = next(model.parameters()).device
        self.signal, self._handlers = None, {}  # the stop signal this process got; old handlers
        self.world_size = torch.distributed.get_world_size() if _distributed() else 1
        self.flops = bench.flops_per_token(model, cfg.seq_len)  # per token, forward + backward
        self.peak = bench.known_peak(device)[1]  # the GPU's datasheet bf16 FLOP/s, or None
        self._eta_from = None  # (time, step) after the first step: compilation is not typical
        self.saving, self.buffers, self.stopping = None, None, False  # rank 0's save in flight
        self.preparing = None  # rank 0: (thread, buffers) allocating the first save's host copy

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
        if error := self._saved(wait=True):  # the save in flight first: it is the newest
            raise error
        good = newest_good_checkpoint(self.cfg.out) if self.master else None
        raise UserError(
            f"step {step}: loss {float(loss):.4g}, gradient norm {float(norm):.4g}: stopped "
            f"before the update; newest good checkpoint: {good or 'none'}; resume from it "
            "with a lower --max-lr (and --allow-config-change)"
        )

    def save(self, step):
        """Every rank calls it; rank 0 copies the state after `step` steps into host memory
        and returns, while a thread writes the checkpoint, then prunes to --keep-last. A save
        waits for the one before it; the save before a stop (see preempted) and the last one
        wait until the file is written and verifies. When a save fails (a full disk, nan/inf),
        every rank stops here or at the next preempted(): rank 0 with its one-line UserError,
        the others quietly (exit code 1)."""
        error, t0, wait = None, time.perf_counter(), self.stopping or step >= self.cfg.steps
        if self.master:
            try:
                if error := self._saved(wait=True):  # one save at a time
                    raise error
                if self.preparing:  # the host copy allocated ahead (see preempted): mostly done
                    thread, prepared = self.preparing
                    thread.join()
                    self.buffers, self.preparing = prepared, ()  # the first save: none before
                waited = time.perf_counter() - t0
                self.saving, self.buffers = BackgroundSave.begin(
                    self.cfg.out,
                    step,
                    self.model,
                    self.model.config,
                    self.cfg.keep_last,
                    wait,
                    self.buffers,
                    optimizer=self.optimizer.state_dict(),
                    config=asdict(self.cfg),
                    loader=self.loader.state_dict(),
                    rng=rng_state(),
                    tokens=self.tokens_at(step),
                )
                if wait:  # the save before a stop, and the last: the loop waits for the write
                    self.saving.done(wait=True)
                self.saving.waited_s, self.saving.stall_s = waited, time.perf_counter() - t0
                if wait and (error := self._saved(wait=True)):
                    raise error
            except Exception as e:  # UserError: one line; anything else keeps its traceback
                error = e
        if self.world_size > 1:
            if error is not None:
                _say(error)  # before the others hear of it: torchrun ends all once one exits
            if self._any(error is not None):
                raise SystemExit(1)  # every rank: rank 0 failed to save and has said why
        if error:
            raise error
        return self.newest

    def _saved(self, wait=False):
        """Rank 0: report the background save once it is over (with `wait`, once it is over
        at all): `saved PATH` and its metrics line; return what it raised, or None."""
        job = self.saving
        if job is None or not (wait or job.done()):
            return None
        self.saving = None
        try:
            self.newest = job.wait()
        except Exception as e:  # UserError: one line; anything else keeps its traceback
            return e
        print(f"saved {self.newest}")
        self.log(
            step=job.step,
            split="checkpoint",
            path=str(self.newest),
            stall_s=round(job.stall_s, 4),
            waited_s=round(job.waited_s, 4),
            write_s=round(job.write_s, 4),
        )
        return None

    def _any(self, flag):
        """Whether `flag` is true on any rank (an all-reduce: every rank must call it)."""
        return bool(self._max(flag))

    def _max(self, value):
        """The largest of every rank's `value` (an all-reduce: every rank must call it)."""
        t = torch.tensor(float(value), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def catch_signals(self):
        """SIGTERM (SLURM, Kubernetes, spot instances, torchrun shutting down) and SIGUSR1
        (e.g. `scancel --signal=USR1`) no longer end the process mid-step: they are noted, and
        preempted() stops the run after the step; a second one ends the process at once.
        close() puts the old handlers back."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal is not None:  # the second one: as if nothing caught it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum
        print(
            f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint",
            flush=True,
        )

    def preempted(self):
        """Every rank, after every step: whether a stop signal reached any rank. One flag
        all-reduced, so all ranks agree on the step they stop after. The same all-reduce says
        whether rank 0's background save failed: then every rank stops here, rank 0 with
        its error, the others quietly (exit code 1); a step costs no other sync. After the
        first step, rank 0 also starts allocating the host copy that saves write from."""
        if self.master and self.preparing is None:
            self._prepare_host_copy()
        error = self._saved() if self.master else None  # does not wait: a look at the thread
        flag = 2 if error else int(self.signal is not None)  # 2: a save failed; 1: a signal
        if self.world_size > 1:
            if error is not None:
                _say(error)  # before the others hear of it: torchrun ends all once one exits
            flag = self._max(flag)
        if flag == 2:
            raise SystemExit(1) if self.world_size > 1 else error
        self.stopping = flag == 1
        return self.stopping

    def _prepare_host_copy(self):
        """Allocate, in a thread, the host memory the first save copies the model and the
        optimizer into (common.checkpoint.host_buffers; the optimizer's moments exist after
        the first step), so that no save stops the loop for the allocation, which takes far
        longer than the copy. Should it fail (no memory), the first save allocates and says."""
        state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        buffers = {}

        def allocate():
            try:
                if self.device.type == "cuda":  # pinned for this GPU, as the loop pins it
                    torch.cuda.set_device(self.device)
                buffers.update(host_buffers(state))
            except Exception:  # e.g. out of memory: the first save allocates what it needs
                pass

        thread = threading.Thread(target=allocate, name="checkpoint host copy")
        thread.start()  # not a daemon: the interpreter's teardown never runs beside it
        self.preparing = (thread, buffers)

    def stop(self, step):
        """After preempted() and save(step): wait for rank 0's checkpoint, then exit with
        PREEMPTED (75). The same command (with --resume auto) continues exactly."""
        if self.world_size > 1:
            dist.barrier()  # no rank leaves before the checkpoint is on disk
        # under torchrun, once one rank has left with 75 torchrun sends SIGTERM to the rest:
        # from here on a stop signal would only turn this rank's 75 into -15, so it is ignored
        self.close(leaving=_distributed())
        name = signal.Signals(self.signal).name if self.signal else "a signal to another rank"
        print0(
            f"stopped by {name} at step {step}, checkpoint {self.newest}: exit code "
            f"{PREEMPTED}; run the same command with --resume auto to continue"
        )
        if _distributed():
            dist.destroy_process_group()
        raise SystemExit(PREEMPTED)

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

    def close(self, leaving=False):
        """Wait for the save in flight, close metrics.jsonl, free --out, and put the signal
        handlers back (`leaving`: ignore stop signals instead, as the process is ending)."""
        error = self._saved(wait=True)  # no thread writes into --out once its lock is free
        if self.metrics:
            self.metrics.close()
        if self.lock:
            self.lock.release()
        for sig, handler in self._handlers.items():
            signal.signal(sig, signal.SIG_IGN if leaving else handler)
        self._handlers = {}
        if error:
            raise error


def _say(error):
    """An error as the command line shows it (common.cli): a UserError in one line, anything
    else with its traceback."""
    if isinstance(error, UserError):
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        traceback.print_exception(error)
        sys.stderr.flush()


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def restarted():
    """Whether torchrun started this worker again after a failure (--max-restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _load_newest_good(out):
    """--out's newest checkpoint; when it does not verify, the newest older one that does,
    said aloud: an unattended restart goes on from there rather than end the run."""
    try:
        return load_checkpoint(out)
    except UserError as e:
        good = newest_good_checkpoint(out, before=list_checkpoints(out)[-1])
        if good is None:
            raise
        print0(f"warning: {e}; resuming from {good}")
        return load_checkpoint(good)


def start_run(cfg, model, optimizer, loader, master):
    """Take --out (rank 0 holds its lock for the run's life), clear what killed saves left,
    then start fresh (refused if --out holds another run's checkpoints) or --resume: weights,
    optimizer moments, step, data position and RNG states as saved. A torchrun restart and
    --resume auto resume from --out's newest good checkpoint when there is one, else start
    fresh. Stop signals are caught from here on (see Run.preempted). Returns the Run."""
    run = Run(cfg, model, optimizer, loader, master)
    check_plain(loader.state_dict(), "loader")  # now, not at the first checkpoint hours in
    if master:
        run.lock = RunLock(cfg.out).acquire()  # a second run into this --out is refused here
        files, size = remove_stale_temps(cfg.out)
        if files:
            print(f"removed {files} unfinished checkpoint temp file(s), {size / 2**20:,.1f} MB")
    changes, auto = [], cfg.resume == "auto" or restarted()
    if auto and list_checkpoints(cfg.out):
        ckpt = _load_newest_good(cfg.out)  # verified
    elif cfg.resume not in ("", "auto"):
        ckpt = load_checkpoint(cfg.out if cfg.resume == "latest" else cfg.resume)  # verified
    else:
        ckpt = None
    if ckpt:
        if ckpt["model_config"] != asdict(model.config):
            raise UserError(
                f"{ckpt['path']} holds another model ({ckpt['model_config']}): "
                "resume with the same --preset"
            )
        changes = check_resume(ckpt["config"], asdict(cfg), allow_change=cfg.allow_config_change)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        run.start_step, run.newest = ckpt["step"], ckpt["path"]
        run.start_tokens = ckpt.get("tokens", ckpt["step"] * ckpt["config"]["total_batch"])
        if run.start_step >= cfg.steps:
            raise UserError(
                f"{ckpt['path']} is already at step {run.start_step} of --steps "
                f"{cfg.steps}: nothing to train; raise --steps (with "
                "--allow-config-change) to go on"
            )
        print0(f"resumed from step {run.start_step} ({ckpt['path']})")
    elif found := list_checkpoints(cfg.out):  # never overwrite another run's checkpoints
        raise UserError(
            f"{cfg.out} already holds checkpoints (newest {found[-1].name}): "
            "add --resume (or --resume auto) to continue that run, or choose "
            "another --out"
        )
    elif auto:
        print0(f"no checkpoint in {cfg.out} yet: starting fresh")
    if master:
        tracker = make_tracker(
            "wandb" if cfg.wandb else None,
            project=cfg.wandb,
            run_name=Path(cfg.out).name,
            config=asdict(cfg),
        )
        run.metrics = MetricsLog(cfg.out, run.start_step, asdict(cfg), tracker)
        if changes:  # --allow-config-change: the file says what changed, and where
            run.log(step=run.start_step, split="config_change", changes=changes)
            print(f"resuming with changed settings: {'; '.join(changes)}")
    run.catch_signals()
    return run
