"""A run's records: `{out}/metrics.jsonl` with its run header (versions, hardware, git
commit), an optional experiment tracker (wandb), and the time left, formatted for a step line."""

import json
import math
import os
from pathlib import Path

import torch

from common import UserError


class MetricsLog:
    """`{out}/metrics.jsonl`: one JSON object per line (step, split, loss, lr, norm, dt, ...).

    A fresh run's first line is its run header, {"step": 0, "split": "run", "run": {...}}:
    Python, torch, CUDA and driver versions, GPUs, git commit, host, date and `run_config`
    (see `run_info`). Readers of the metrics skip lines whose split is "run";
    `read_run_header` reads the header back.

    On resume from step s, lines of steps >= s (written after that checkpoint by the run
    that died) are dropped first, so the file reads as one uninterrupted run; the header is
    kept, and the resumed run appends a header of its own, {"step": s, "split": "run",
    "run": {..., "resumed_at": s}}, so the file also says where and on what it went on.

    `tracker` (see `make_tracker`) gets every record written here too; `close()` ends it."""

    def __init__(self, out, resume_step=0, run_config=None, tracker=None):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = tracker
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < resume_step:  # headers carry a step too
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # a killed run's half-written line
                    pass
        header = dict(step=resume_step, split="run", run=run_info(run_config))
        if resume_step:
            header["run"]["resumed_at"] = resume_step
        kept.append(json.dumps(header, default=str))  # default=str: e.g. a Path in the config
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self):
        """End the tracker's run (the file needs nothing: every line is written at once)."""
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def _git_commit():
    """(commit, dirty) of the checkout this code is in, or (None, None) outside git."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a slow disk
        return None, None
    return commit, dirty


def _cuda_driver():
    """The NVIDIA driver version, e.g. '550.54.15', from nvidia-smi; None if it can't tell."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def run_info(config=None):
    """What a run ran on, for the header of metrics.jsonl: enough to tell two runs apart
    and to reproduce one. `config` (a dict or a dataclass) is recorded as given."""
    import datetime
    import platform
    import socket

    commit, dirty = _git_commit()
    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,  # the CUDA torch was built with; None on a CPU build
        cuda_driver=None,
        gpu=None,
        gpu_count=0,
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        git_commit=commit,
        git_dirty=dirty,  # uncommitted changes to tracked files: the commit is not the code
        host=socket.gethostname(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=_as_dict(config) or {},
    )
    if torch.cuda.is_available():
        info.update(
            cuda_driver=_cuda_driver(),
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
        )
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        info.update(gpu="mps", gpu_count=1)
    return info


def read_run_header(path):
    """The run header of a metrics.jsonl (or of the run directory holding it): the `run`
    dict of its first "run" line, None if it has none (e.g. written before headers)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file at {path}")
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("split") == "run":
                return record.get("run")
    return None


class _WandbTracker:
    """make_tracker("wandb", ...): each record -> wandb.log({"split/key": value}, step=step)."""

    def __init__(self, run):
        self.run = run

    def log(self, record):
        record = dict(record)
        step, split = record.pop("step", None), record.pop("split", None)
        data = {f"{split}/{k}" if split else k: v for k, v in record.items()}
        self.run.log(data, step=step)

    def finish(self):
        self.run.finish()


def make_tracker(kind, project="gpt-from-scratch", run_name=None, config=None):
    """An experiment tracker for MetricsLog: None for kind None/""/"none", else an object
    with .log(record: dict) and .finish(). "wandb" needs the optional wandb package (it is
    imported only here); WANDB_MODE=offline and the other WANDB_* variables apply as usual.
    A resumed run starts a new wandb run: the metrics.jsonl stays the one complete record."""
    if kind in (None, "", "none"):
        return None
    if kind != "wandb":
        raise UserError(f"unknown tracker '{kind}': use wandb or none")
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None
    run = wandb.init(project=project, name=run_name or None, config=_as_dict(config) or {})
    return _WandbTracker(run)


def _as_dict(config):
    """A dataclass instance as a dict; anything else as it is."""
    import dataclasses

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def format_eta(seconds):
    """A duration for a step line, to the precision worth reading: "12s", "3m05s", "4h12m"
    (hours go on past 24: "52h03m"); "?" when unknown (None, negative, inf, nan).
    E.g. eta = format_eta((total_steps - step - 1) * mean_dt_of_recent_steps)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    m = round(seconds / 60)  # hours and minutes: round to the minute
    return f"{m // 60}h{m % 60:02d}m"
