"""Training plumbing the stages share: device pick, seeding, the step line, DDP setup,
the LR schedule and optimizer of stage 06, metrics.jsonl."""

import json
import math
import os
import platform
import random
import sys
from contextlib import contextmanager
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
    kw = {}  # init_process_group finds the store at MASTER_ADDR:MASTER_PORT
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, kept over
        # restarts (torch 2.13): a restarted rank must not read the dead attempt's addresses
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)  # fmt: skip
        prefix = f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}/"  # each attempt its own keys
        kw = dict(store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", **kw)  # NVIDIA's collectives, over NVLink/network
    else:  # CPU: gloo, so the same code runs (and is tested) without a GPU
        device = pick_device("cpu" if device == "auto" else device)
        dist.init_process_group(backend="gloo", **kw)
    return Dist(rank, local_rank, world_size, device, enabled=True)


@contextmanager
def ddp_exit():
    """Around a stage's main under torchrun: every way out ends the process group, then the
    process, with a meaningful exit code (without torchrun, i.e. no RANK: nothing changes).

        if __name__ == "__main__":
            with ddp_exit():
                main(parse_args(Config))

    - main returns: destroy_process_group() (torch's shutdown for the success path), exit 0;
    - SystemExit(code), which every rank raises at the same step (preemption's 75 after
      Run.stop's barrier; 1 after a failed save): destroy_process_group(), exit `code`;
    - any other exception (a UserError on one rank, a dead peer's gloo error): printed as
      usual (sys.excepthook: a UserError is one line), then exit 1 (130 for Ctrl-C) with no
      collective call, as the peers may be gone: the process's connections close with it,
      so the peers' pending collectives fail at once and they leave the same way.

    The process then ends with os._exit, after flushing stdout and stderr, not through the
    interpreter's teardown. Once DDP has wrapped a model, torch (2.13, gloo) keeps the
    backend and its threads alive after destroy_process_group until the process ends; a
    teardown racing those threads aborted a finished run now and then (`terminate called
    without an active exception`, SIGABRT), which torchrun reports as a failed run.
    Everything a run writes is on disk by then (Run.close; checkpoints and metrics.jsonl
    are written whole), so there is nothing left for the teardown to do."""
    if "RANK" not in os.environ:  # one process, no torchrun: exits as Python does
        yield
        return
    collective = True  # whether every rank is here together
    try:
        yield
        code = 0
    except SystemExit as e:  # every rank, at the same step
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # maybe this rank alone: no collective call
        sys.excepthook(type(e), e, e.__traceback__)
        code, collective = 130 if isinstance(e, KeyboardInterrupt) else 1, False
    if collective and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip

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
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
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
        info.update(cuda_driver=_cuda_driver(), gpu=torch.cuda.get_device_name(0),
                    gpu_count=torch.cuda.device_count())  # fmt: skip
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


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cpu_info():
    """(model name, set of flags) from /proc/cpuinfo: x86 'flags', Arm 'Features'; the
    platform's name and no flags where there is no such file (macOS, Windows)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # Intel AMX, AVX-512 BF16, Arm BF16


def cpu_has_bf16(flags=None):
    """False where the CPU's flags are known and none does bf16 math: there autocast emulates
    bf16 (measured 50-65x slower than fp32 on an AVX2-only EPYC, BENCHMARKS.md). None: unknown."""
    flags = cpu_info()[1] if flags is None else flags
    if not flags:
        return None
    return any(f in flags for f in CPU_BF16_FLAGS)


def amp_dtype(name, device):
    """--dtype -> the autocast dtype. A GPU without bf16 (T4, V100) gets float16, said once:
    it needs a GradScaler, which the stages switch on for float16. A CPU without bf16
    instructions gets float32 (autocast off), said once: emulated bf16 crawls."""
    if name not in AMP_DTYPES:
        raise UserError(f"unknown --dtype '{name}': use bfloat16, float16 or float32")
    if name == "bfloat16" and str(device).startswith("cuda") and not torch.cuda.is_bf16_supported():
        print("this GPU has no bf16 (needs sm_80+): using float16 with a GradScaler")
        return torch.float16
    if name == "bfloat16" and str(device) == "cpu" and cpu_has_bf16() is False:
        print("this CPU has no bf16 instructions (AVX512_BF16, AMX): using float32, autocast off")
        return torch.float32
    return AMP_DTYPES[name]
