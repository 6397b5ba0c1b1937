"""Who this process is in a run of one or many (torchrun): stage 07's DDP set-up, its
shutdown on every way out (ddp_exit), and printing on rank 0 only. From outside a run (the
fault tests, bench/gpu.py): which worker process holds which rank."""

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common import finish_checkpoint_writes
from common.device import pick_device


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
    """Stage 07's, as 07_ddp_fineweb.py writes it. torchrun starts one process per GPU and
    tells each who it is: RANK (0..N-1 over all nodes), LOCAL_RANK (its GPU on this node),
    WORLD_SIZE (N). Without them: one process."""
    if "RANK" not in os.environ:
        return Dist(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    kw = {}  # init_process_group finds the store at MASTER_ADDR:MASTER_PORT
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, kept over
        # restarts (torch 2.13): a restarted rank must not read the dead attempt's addresses
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = dist.TCPStore(addr, port, is_master=False)
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
    finish_checkpoint_writes()  # one still being written: os._exit would cut it short
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print0(*args, **kwargs):
    """print, on rank 0 only (torchrun sets RANK in every process it starts)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def torchrun_workers(agent):
    """{RANK: pid} of the worker processes a torchrun agent (its pid) started, read from
    /proc (Linux): what a test or a benchmark needs to kill -9 or SIGTERM one rank."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if (
                d.name.isdigit()
                and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent
            ):
                environ = (d / "environ").read_bytes().split(b"\0")
                rank = [e for e in environ if e.startswith(b"RANK=")]
                found[int(rank[0][5:])] = int(d.name)
        except (OSError, ValueError, IndexError):  # exited meanwhile
            pass
    return found
