"""Who this process is in a run of one or many (torchrun): stage 07's DDP set-up, and
printing on rank 0 only."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


def print0(*args, **kwargs):
    """print, on rank 0 only (torchrun sets RANK in every process it starts)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)
