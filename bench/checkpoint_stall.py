"""How long a checkpoint stops the training loop: the blocking save (save_checkpoint, then
pruning: what Run.save did before issue 28) against the background one (BackgroundSave:
the loop waits for the host copy only, into memory allocated ahead by host_buffers, as Run
does in a thread after the first step; the allocation is timed once, apart), with a plain
torch.save of the same state and a bare memcpy of the same bytes (the floor) side by side,
in one process; then the parts of a write, each timed alone (write_parts).

    python bench/checkpoint_stall.py --preset gpt2 --repeats 4 --out /tmp/stall

The state is stage 07's: the model (vocab 50304, tied weights) and its AdamW moments after
one step, the RNG states; B=1, T=64, on the CPU or with --device cuda on a GPU (the stall
then includes the copy to pinned host memory, synchronized). Prints one line per round,
then medians."""

import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import checkpoint as C
from common.cli import parse_args
from common.device import pick_device, synchronize
from common.model import GPT, preset_config
from common.train import make_optimizer


@dataclass
class Config:
    preset: str = "gpt2"  # model size
    device: str = "cpu"  # where the model trains: cpu, or cuda (the copy goes to pinned memory)
    repeats: int = 4  # rounds
    out: str = "/tmp/checkpoint_stall"  # scratch directory (deleted at the end)


def main(cfg):
    config = preset_config(
        cfg.preset, tie_weights=True, gpt2_init=True, attn="sdpa", vocab_size=50304
    )
    device = pick_device(cfg.device)
    model = GPT(config).to(device)
    optimizer = make_optimizer(model, 0.1, 6e-4, device)
    x = torch.randint(0, 50257, (1, 64), device=device)
    model(x, x)[1].backward()
    optimizer.step()
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def extra():
        return dict(optimizer=optimizer.state_dict(), rng=C.rng_state(), tokens=64)

    # as Run does after the first step, in a thread while training goes on: off the loop
    t0 = time.perf_counter()
    buffers = C.host_buffers(dict(model=model.state_dict(), optimizer=optimizer.state_dict()))
    allocated = time.perf_counter() - t0
    print(f"host copy allocated ahead (off the loop): {allocated:.2f} s", flush=True)
    times = {}
    for r in range(cfg.repeats):
        t0 = time.perf_counter()
        torch.save(dict(model=model.state_dict(), **extra()), out / "plain.pt")
        t1 = time.perf_counter()
        C.save_checkpoint(out / "blocking", r + 1, model, config, **extra())
        C.prune_checkpoints(out / "blocking", 3)
        t2 = time.perf_counter()
        job, buffers = C.BackgroundSave.begin(
            out / "background", r + 1, model, config, 3, False, buffers, **extra()
        )
        synchronize(device)  # on a GPU: the copy is queued before the next step's kernels
        t3 = time.perf_counter()
        job.wait()
        state = C.checkpoint_state(r + 1, model, config, **extra())
        t4 = time.perf_counter()
        for _, v in C._leaves(state):  # the same bytes into the same buffers, nothing else
            if isinstance(v, torch.Tensor) and (s := v.untyped_storage()).nbytes():
                if (buf := buffers.get(C._storage_key(v))) is not None:
                    raw = torch.empty(0, dtype=torch.uint8, device=v.device).set_(s)
                    if v.device.type == "cpu":  # as snapshot copies: a plain memcpy
                        np.copyto(buf.numpy(), raw.numpy())
                    else:
                        buf.copy_(raw, non_blocking=True)
        synchronize(device)
        t5 = time.perf_counter()
        parts = write_parts(job.path, C.snapshot(state, buffers)[0], out / "parts.pt")
        row = {
            "torch.save": t1 - t0,
            "blocking save": t2 - t1,
            "background stall": t3 - t2,
            "background write": job.write_s,
            "memcpy": t5 - t4,
            **parts,
        }
        for k, v in row.items():
            times.setdefault(k, []).append(v)
        print(f"round {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()), flush=True)
    size = C.list_checkpoints(out / "background")[-1].stat().st_size
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(
        f"summary: {cfg.preset}, checkpoint {size / 2**30:.2f} GiB, medians of {cfg.repeats} "
        f"rounds (s): {medians}; host copy allocated ahead {allocated:.2f} s; "
        f"torch {torch.__version__}"
    )
    shutil.rmtree(out, ignore_errors=True)
    return medians


def write_parts(path, state, scratch):
    """What a background write is made of, each timed alone on the same state: the nan/inf
    check, the sha256, torch.save with and without the zip's CRC-32s (the write uses the
    latter), and reading the file back to verify it, as a plain load and through mmap."""
    times = {}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t

    timed("nan/inf check", lambda: C.non_finite(state))
    timed("sha256", lambda: C.content_hash(state))
    with open(scratch, "wb") as f:
        timed("torch.save with CRC", lambda: torch.save(state, f))
    with open(scratch, "wb") as f:
        timed("torch.save no CRC", lambda: C._save(state, f))
    scratch.unlink()
    timed("verify, plain load", lambda: C._read(path))
    timed("verify, mmap", lambda: C.verify_checkpoint(path))
    return times


if __name__ == "__main__":
    main(parse_args(Config))
