"""Full-size proof on a GPU, in one call: throughput, the peer comparison, eval and sampling
speed, and every stage at the real size. Writes one JSON file and prints a table.

Parts (--parts, comma separated; all by default):
  train      stage 07's real training step (its own main: shards, forward, backward, clip,
             fused AdamW, accumulation as configured) at each --batch-sizes: median ms/step
             after the compile warm-up, tokens/s, MFU against the datasheet peak and
             against a bf16 matmul peak measured in this run, peak memory allocated and
             reserved, and common.plan's estimate beside it
  auto       stage 07 with --batch-size auto under each --auto-caps (GiB): the B it picks,
             no out of memory after, the peaks and the estimate
  levers     stage 07's step at one B (--levers-batch; 0: the train part's fastest), once as
             it is and once per lever, each put on from outside the stage: SDPA's backend
             (flash, cuDNN), pinned memory with non-blocking copies, a loss in chunks that
             never holds the whole logits, DDP (one process) with and without
             gradient_as_bucket_view, compile's max-autotune; ms/step, speedup over 07 as it
             is, peaks. A lever that fails on this GPU or torch is a row with its error, not
             the end of the run. (07's host syncs, .item() and the finite check, come once
             per optimizer step, after the timing's own synchronize: not a lever here.)
  checkpoint a checkpoint's stall and write, background vs blocking (bench/checkpoint_stall.py)
  speedups   stage 05's table at --table-batch (every row, fp32 ... compile: ms/step,
             tokens/s, speedup, MFU, peak memory), with --compare-hf: ours / transformers
  hellaswag  batched vs one-example-at-a-time scoring (bench/hellaswag_speed.py) of the
             --hellaswag-data rows repeated to 2,000, by both protocols
  generate   KV-cache vs no-cache vs transformers generation (bench/generate_speed.py)
  stages     00 ... 09 as subprocesses at the real size for a few steps: exit code, loss
             finite and falling where the stage trains; 07 also under torchrun (NCCL on a
             GPU) with checkpoints, then --resume to more steps
  faults     07 under torchrun as a cluster treats it: kill -9 of the worker once a
             checkpoint is saved, under --max-restarts=1 (the restarted worker resumes by
             itself, torchrun exits 0, nothing aborts); then SIGTERM to the worker (it exits
             75 with a checkpoint of the step it stopped at)

Data: --data-dir holds token shards, --text a text file for stages 02-06; both are made on a
machine with `datasets` by bench/gpu_data.py (47 MiB, under the device tool's 64 MiB carry).
Weights for 01/08: a random GPT-2-size GPT2LMHeadModel saved here (no hub), so parity is
checked, not quality. The JSON file is rewritten after every row of every part, so a run
cut off by a time limit still leaves what it measured; --minutes N starts no new measurement
after N minutes, so the command ends (and says what it left out) inside the device's limit.
Compiling takes most of a row's time at the real size. If issue 30's call runs out of time
before its levers, the next call measures them alone: --parts levers --levers-batch B (the
train part's fastest B), and --levers to leave out max_autotune, the slowest to compile.

    python bench/gpu_data.py --out bench_data                  # here, once; carry bench_data
    python bench/gpu.py --data-dir bench_data/shards --text bench_data/input.txt \\
        --parts train,auto,levers --minutes 7 --json $OUT/gpu_a.json  # GPU, issue 30
    python bench/gpu.py --data-dir bench_data/shards --text bench_data/input.txt \\
        --parts checkpoint,speedups,hellaswag,generate --minutes 7 --json $OUT/gpu_b.json
    python bench/gpu.py --data-dir bench_data/shards --text bench_data/input.txt \\
        --parts stages,faults --minutes 7 --json $OUT/gpu_c.json      # GPU, issue 31 (2 calls)
    python bench/gpu.py --device cpu --preset tiny --batch-sizes 2,4 --seq-len 64 \\
        --total-batch 512 --steps 4 --data-dir data/tiny --text input.txt   # CPU dry run
"""

import gc
import importlib.util
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from unittest import mock
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import UserError, bench, plan
from common.cli import parse_args
from common.metrics import read_run_header
from common.model import GPT, preset_config
from common.device import pick_device
from common.distributed import torchrun_workers


LEVERS = ("base", "flash", "cudnn", "pinned", "chunked_ce", "ddp", "bucket_view", "max_autotune")
PARTS = (
    "train",
    "auto",
    "levers",
    "checkpoint",
    "speedups",
    "hellaswag",
    "generate",
    "stages",
    "faults",
)


@dataclass
class Config:
    device: str = "cuda"  # the GPU to measure (cpu for a dry run)
    preset: str = "gpt2"  # model size
    batch_sizes: str = "8,16,32,64"  # micro-batch sizes for the training throughput
    auto_caps: str = "16,24,40"  # GiB: memory caps to run --batch-size auto under
    table_batch: int = 16  # B for stage 05's table (the speedups part)
    levers_batch: int = 0  # B for the levers table (0: the train part's fastest, else the first)
    levers_steps: int = 6  # optimizer steps per lever; the first 2 (compile) are not counted
    levers: str = ",".join(LEVERS)  # which levers, comma separated
    minutes: float = 0  # start no new measurement after this long (0: no limit)
    seq_len: int = 1024  # tokens per sequence
    total_batch: int = 524288  # tokens per optimizer step (stage 07's default)
    steps: int = 12  # optimizer steps per training run; the first 2 (compile) are not counted
    fault_steps: int = 8  # steps of the faults part's runs (a checkpoint every 2)
    data_dir: str = ""  # token shards for stage 07 (train and val)
    text: str = ""  # a text file for stages 02-06 (tiny shakespeare)
    hellaswag_data: str = "tests/data/hellaswag_fixture.jsonl"  # examples for stage 08
    parts: str = ",".join(PARTS)  # what to measure, comma separated
    json: str = ""  # write every result to this file


START = time.monotonic()


def out_of_time(cfg, what):
    """Whether --minutes has passed (then `what` is not started, and that is said)."""
    if cfg.minutes and time.monotonic() - START > cfg.minutes * 60:
        print(f"out of time (--minutes {cfg.minutes}): {what} not measured")
        return True
    return False


def load(path):
    """Import a numbered stage or a bench script by its path."""
    spec = importlib.util.spec_from_file_location(Path(path).stem.replace("-", "_"), ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_07(s07, cfg, device, out, **more):
    """Stage 07's Config for a measurement: this script's model and batch, no evaluation, one
    checkpoint kept; compiled on a GPU (on a CPU dry run compiling only costs time)."""
    return replace(
        s07.Config(),
        device=device,
        preset=cfg.preset,
        data_dir=cfg.data_dir,
        seq_len=cfg.seq_len,
        total_batch=cfg.total_batch,
        val_every=0,
        sample_every=0,
        hellaswag_every=0,
        ckpt_every=0,
        keep_last=1,
        compile=str(device).startswith("cuda"),
        out=str(out),
        **more,
    )


def fresh(device):
    """Before each run of a stage in this process: forget the graphs compiled for the last
    model (a new model recompiles, and after torch._dynamo.config's cache-size limit of them
    torch would quietly run the rest uncompiled), give the GPU memory back to the driver
    (a stage started as a subprocess needs it), and restart the peak counters."""
    torch._dynamo.reset()
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed_07(s07, cfg, device, out, B, steps):
    """Stage 07's main at micro-batch B for `steps` steps: the median seconds per step after
    the first 2 (compile, warm-up), and the peaks of memory."""
    c = config_07(s07, cfg, device, out, batch_size=B, steps=steps, warmup_steps=2)
    fresh(device)
    s07.main(c)
    lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    dt = statistics.median(r["dt"] for r in lines if r["split"] == "train" and r["step"] >= 2)
    return dt, peaks(device)


def measure_train(cfg, device, tmp, on_row=lambda rows: None):
    s07 = load("07_ddp_fineweb.py")
    measured_peak = bench.measure_peak(device)
    _, datasheet = bench.known_peak(device)
    with torch.device("meta"):  # sizes only
        flops = bench.flops_per_token(GPT(preset_config(cfg.preset, vocab_size=50304)), cfg.seq_len)
    rows = []
    for B in [int(b) for b in cfg.batch_sizes.split(",")]:
        if out_of_time(cfg, f"train B={B}"):
            break
        dt, memory = timed_07(s07, cfg, device, Path(tmp) / f"train_b{B}", B, cfg.steps)
        tps = cfg.total_batch / dt
        rows.append(
            dict(
                batch_size=B,
                accum_steps=cfg.total_batch // (B * cfg.seq_len),
                ms=dt * 1000,
                tokens_per_s=tps,
                mfu_datasheet=flops * tps / datasheet if datasheet else None,
                mfu_measured=flops * tps / measured_peak,
                measured_peak_tflops=measured_peak / 1e12,
                **memory,
                plan_mb=plan_mb(cfg, B, compiled=str(device).startswith("cuda")),
            )
        )
        on_row(rows)
        print(
            f"train B={B}: {dt * 1000:.1f} ms/step, {tps:,.0f} tok/s, MFU "
            f"{bench.fmt(rows[-1]['mfu_datasheet'], '.1%')} (datasheet) / "
            f"{rows[-1]['mfu_measured']:.1%} (measured peak {measured_peak / 1e12:.3g} TFLOP/s)"
        )
    return rows


@contextmanager
def one_process_ddp(s07, **ddp_options):
    """Stage 07 as torchrun --nproc_per_node=1 starts it (a process group of one, so DDP
    wraps the model), in this process; `ddp_options` go to every DDP(...) 07 makes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    ddp = partial(s07.DDP, **ddp_options)
    with (
        mock.patch.dict(os.environ, env, MASTER_PORT=str(port)),
        mock.patch.object(s07, "DDP", ddp),
    ):
        yield


class ChunkedLossGPT(GPT):
    """GPT whose training loss never holds the whole (B, T, vocab) logits, nor their fp32
    copy: lm_head and the cross-entropy run on CHUNKS slices of the sequence in turn, each
    recomputed in backward (activation checkpointing). Sampling and evaluation without
    targets take GPT's own forward."""

    CHUNKS = 8

    def forward(self, idx, targets=None, cache=None):
        if targets is None or cache is not None:
            return super().forward(idx, targets, cache)
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, None)
        x = self.transformer.ln_f(x)
        chunks = zip(x.chunk(self.CHUNKS, dim=1), targets.chunk(self.CHUNKS, dim=1))
        loss = sum(checkpoint(self.loss_sum, xc, yc, use_reentrant=False) for xc, yc in chunks)
        return None, loss / targets.numel()

    def loss_sum(self, x, targets):
        logits = self.lm_head(x).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def pinned_loader(s07, device):
    """Stage 07 with batches that reach the GPU from pinned memory without blocking the CPU
    (07's own `x.to(device)` then has nothing left to do)."""

    class PinnedLoader(s07.ShardLoader):
        def next_batch(self):
            x, y = super().next_batch()
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
                device, non_blocking=True
            )

    return mock.patch.object(s07, "ShardLoader", PinnedLoader)


def measure_levers(cfg, device, tmp, B, on_row=lambda rows: None):
    """07's step at micro-batch B, as it is and with each lever on (see the docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s07 = load("07_ddp_fineweb.py")
    levers = {  # name: (label, context manager)
        "base": ("07 as it is", nullcontext()),
        "flash": ("SDPA backend: flash only", sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
        "cudnn": ("SDPA backend: cuDNN only", sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
        "pinned": ("pinned memory, non-blocking copies", pinned_loader(s07, device)),
        "chunked_ce": (
            "loss in 8 chunks, no whole logits",
            mock.patch.object(s07, "GPT", ChunkedLossGPT),
        ),
        "ddp": ("DDP, 1 process", one_process_ddp(s07)),
        "bucket_view": (
            "DDP, gradient_as_bucket_view",
            one_process_ddp(s07, gradient_as_bucket_view=True),
        ),
        # mode="max-autotune-no-cudagraphs" is these two (torch._inductor.list_mode_options)
        "max_autotune": (
            "compile: max-autotune-no-cudagraphs",
            torch._inductor.config.patch(max_autotune=True, coordinate_descent_tuning=True),
        ),
    }
    rows, base_ms = [], None  # speedups are over "base", 07 as it is, where it was measured
    for name in cfg.levers.split(","):  # (names checked in main)
        lever, context = levers[name]
        if out_of_time(cfg, f"lever {lever}"):
            break
        row = dict(lever=lever, batch_size=B, ms=None, tokens_per_s=None, speedup=None, error="")
        try:
            with context:
                dt, memory = timed_07(s07, cfg, device, Path(tmp) / name, B, cfg.levers_steps)
            row.update(ms=dt * 1000, tokens_per_s=cfg.total_batch / dt, **memory)
            base_ms = row["ms"] if name == "base" else base_ms
            row["speedup"] = base_ms / row["ms"] if base_ms else None
        except Exception as e:  # this lever does not run here (a backend, an autotune failure)
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        rows.append(row)
        on_row(rows)
        print(
            f"lever {lever:<38} B={B}: {bench.fmt(row['ms'], '.1f')} ms/step, "
            f"x{bench.fmt(row['speedup'], '.3f')} {row['error']}".rstrip()
        )
    return rows


def peaks(device):
    """max_memory_allocated and max_memory_reserved since the last reset, in MiB (a GPU's)."""
    if not str(device).startswith("cuda"):
        return dict(peak_mb=None, reserved_mb=None)
    return dict(
        peak_mb=torch.cuda.max_memory_allocated(device) / 2**20,
        reserved_mb=torch.cuda.max_memory_reserved(device) / 2**20,
    )


def plan_mb(cfg, B, compiled):
    """What `python -m common.plan` estimates for that step's peak, in MiB."""
    config = plan.model_config(cfg.preset)
    return plan.estimate(config, B, cfg.seq_len, compiled=compiled)["peak"] / 2**20


def measure_auto(cfg, device, tmp, on_row=lambda rows: None):
    """Stage 07 with `--batch-size auto` under each cap in --auto-caps (GiB, a smaller card
    emulated with torch.cuda.set_per_process_memory_fraction): the B it picks, whether a
    few real steps then run without running out of memory, and the peaks. On a CPU dry run:
    once, uncapped (auto is then the CPU default)."""
    s07 = load("07_ddp_fineweb.py")
    cuda = str(device).startswith("cuda")
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 0
    rows = []
    for cap in [float(x) for x in cfg.auto_caps.split(",")] if cuda else [None]:
        if out_of_time(cfg, f"auto under {cap} GiB"):
            break
        out = Path(tmp) / f"auto_{cap}"
        c = config_07(s07, cfg, device, out, batch_size="auto", steps=3, warmup_steps=1)
        fresh(device)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), device)
        row = dict(cap_gib=cap, batch_size=None, error="")
        try:
            s07.main(c)
            row["batch_size"] = read_run_header(out)["config"]["batch_size"]
        except (UserError, torch.OutOfMemoryError) as e:
            row["error"] = str(e).splitlines()[0]
        finally:
            if cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        rows.append({**row, **peaks(device)})
        if row["batch_size"]:
            rows[-1]["plan_mb"] = plan_mb(cfg, row["batch_size"], compiled=c.compile)
        on_row(rows)
        print(f"auto under {cap} GiB: B={row['batch_size']} {row['error']}".rstrip())
    return rows


def measure_speedups(cfg, device):
    """Stage 05's benchmark table with --compare-hf (on a CPU dry run: one row)."""
    s05 = load("05_speedups.py")
    c = replace(
        s05.Config(),
        device=device,
        preset=cfg.preset,
        input=cfg.text,
        batch_size=cfg.table_batch,
        seq_len=cfg.seq_len,
        steps=0,
        benchmark="all" if device != "cpu" else "vocab",
        compare_hf=True,
        timed=12,
    )
    return s05.main(c)["benchmark"]


def run_stage(label, args, timeout=600):
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    summary = next((x for x in r.stdout.splitlines() if x.startswith("summary:")), "")
    m = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+)", summary)
    falling = bool(m) and float(m.group(2)) < float(m.group(1))
    err = r.stderr.strip().splitlines()
    return dict(
        stage=label,
        rc=r.returncode,
        seconds=time.perf_counter() - t0,
        summary=summary,
        falling=falling if m else None,
        error=err[-1] if r.returncode and err else "",
    )


def measure_stages(cfg, device, tmp, on_row=lambda rows: None):
    from transformers import GPT2Config, GPT2LMHeadModel

    if any(" " in str(path) for path in (cfg.text, cfg.data_dir, cfg.hellaswag_data, tmp)):
        raise UserError("the stages part splits its command lines on spaces: give paths without")
    p = preset_config(cfg.preset)
    hf_dir = Path(tmp) / "hf_random"
    GPT2LMHeadModel(
        GPT2Config(n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd, n_positions=p.block_size)
    ).save_pretrained(hf_dir)
    size = f"--device {device} --preset {cfg.preset}"
    T, text, B = min(cfg.seq_len, p.block_size), cfg.text, cfg.total_batch
    h = f"--hellaswag-data {cfg.hellaswag_data}"
    lines = [  # one stage a line, at its GPU defaults but for a few steps
        f"00_model.py {size}",
        f"01_hf_eval.py --device {device} --model {hf_dir}",
        f"02_overfit_batch.py {size} --input {text} --steps 20",
        f"03_dataloader.py {size} --input {text} --steps 10 --seq-len {T}",
        f"04_best_practices.py {size} --input {text} --steps 10 --seq-len {T}",
        f"05_speedups.py {size} --input {text} --steps 10 --seq-len {T} --timed 6",
        f"06_hyperparams.py {size} --input {text} --steps 4 --seq-len {T} --warmup-steps 2"
        f" --total-batch {B}",
        f"07_ddp_fineweb.py {size} --data-dir {cfg.data_dir} --steps 6 --seq-len {T}"
        f" --warmup-steps 2 --total-batch {B} --val-every 3 --sample-every 5"
        f" --hellaswag-every 5 {h} --out {Path(tmp) / 'stage07'}",
        f"08_hellaswag.py --device {device} --model {hf_dir} --data {cfg.hellaswag_data}"
        " --compare-hf",
        f"09_modern.py {size} --input {text} --steps 4 --seq-len {T} --warmup-steps 2"
        f" --seeds 1 --val-steps 2 --out {Path(tmp) / 'stage09'}",
    ]
    # 07 as the real run starts it: torchrun (NCCL on a GPU), a checkpoint every 2 steps,
    # then --resume to 6 steps with --allow-config-change (steps is a resume key)
    ddp = (
        "-m torch.distributed.run --standalone --nproc_per_node=1 07_ddp_fineweb.py"
        f" {size} --data-dir {cfg.data_dir} --seq-len {T} --warmup-steps 2 --total-batch {B}"
        f" --val-every 2 --sample-every 0 --ckpt-every 2 --hellaswag-every 3 {h}"
        f" --out {Path(tmp) / 'stage07_ddp'}"
    )
    runs = [(line.split()[0], line.split()) for line in lines] + [  # (paths hold no spaces)
        ("07 torchrun", f"{ddp} --steps 4".split()),
        ("07 torchrun --resume", f"{ddp} --steps 6 --resume --allow-config-change".split()),
    ]
    rows = []
    for label, args in runs:
        if out_of_time(cfg, label):
            break
        rows.append(run_stage(label, args))
        on_row(rows)
        r = rows[-1]
        print(
            f"{r['stage']:<22} rc {r['rc']}  {r['seconds']:6.1f}s  falling {r['falling']}  "
            f"{r['summary'][:110] or r['error']}"
        )
    return rows


def torchrun_07(cfg, device, out, restarts, act, timeout=600):
    """`torchrun --nproc_per_node=1 --max-restarts=N 07 ...` (a checkpoint every 2 steps);
    `act(line, worker_pid)` sees each line it prints. What a cluster would see: torchrun's
    exit code, each failed worker's exit code, where it resumed, and whether any aborted."""
    p = preset_config(cfg.preset)
    args = (
        f"-m torch.distributed.run --standalone --nproc_per_node=1 --max-restarts={restarts}"
        f" 07_ddp_fineweb.py --device {device} --preset {cfg.preset} --data-dir {cfg.data_dir}"
        f" --seq-len {min(cfg.seq_len, p.block_size)} --total-batch {cfg.total_batch}"
        f" --steps {cfg.fault_steps} --warmup-steps 2 --val-every 0 --sample-every 0"
        f" --hellaswag-every 0 --ckpt-every 2 --out {out}"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args.split()],  # (paths hold no spaces: checked by the caller)
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))  # a hang
    watchdog.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        act(line, lambda: next(iter(torchrun_workers(proc.pid).values()), None))
    watchdog.cancel()
    text = "".join(lines)
    resumed = re.search(r"resumed from step (\d+)", text)
    return dict(
        rc=proc.wait(),
        seconds=time.perf_counter() - t0,
        worker_exitcodes=[int(c) for c in re.findall(r"failed \(exitcode: (-?\d+)\)", text)],
        resumed_from=int(resumed.group(1)) if resumed else None,
        aborted="terminate called" in text or "SIGABRT" in text,
        checkpoints=sorted(f.name for f in Path(out).glob("ckpt_*.pt")),
        tail=text.strip().splitlines()[-3:],
    )


def measure_faults(cfg, device, tmp, on_row=lambda rows: None):
    """07 under torchrun, killed as a cluster kills it: kill -9 (a dead GPU, the OOM killer)
    once a checkpoint is saved, with one restart left; then SIGTERM (preemption)."""
    if " " in f"{cfg.data_dir}{tmp}":
        raise UserError("the faults part splits its command line on spaces: give paths without")
    sent = []

    def kill_after_a_save(line, worker):
        if "saved " in line and "ckpt_" in line and not sent:
            sent.append("saved")
        elif sent == ["saved"] and line.startswith("step "):  # the step after it: kill -9
            os.kill(worker(), signal.SIGKILL)
            sent.append("killed")

    def sigterm_at_step_3(line, worker):
        if line.startswith(f"step {3:5d}/") and not sent:
            os.kill(worker(), signal.SIGTERM)
            sent.append("sigterm")

    rows = []
    for label, restarts, act in [
        ("kill -9, one restart", 1, kill_after_a_save),
        ("SIGTERM", 0, sigterm_at_step_3),
    ]:
        if out_of_time(cfg, f"07 torchrun, {label}"):
            break
        sent.clear()
        row = torchrun_07(cfg, device, Path(tmp) / f"faults_{restarts}", restarts, act)
        rows.append(dict(run=label, sent=list(sent), **row))
        on_row(rows)
        print(
            f"07 torchrun, {label}: sent {sent}, torchrun rc {row['rc']}, workers' exit codes "
            f"{row['worker_exitcodes']}, resumed from {row['resumed_from']}, "
            f"aborted {row['aborted']}, {row['checkpoints']}"
        )
    return rows


def main(cfg):
    parts = set(cfg.parts.split(","))
    if unknown := parts - set(PARTS):
        raise UserError(
            f"unknown --parts {','.join(sorted(unknown))}; choose from {','.join(PARTS)}"
        )
    if unknown := set(cfg.levers.split(",")) - set(LEVERS):
        raise UserError(
            f"unknown --levers {','.join(sorted(unknown))}; choose from {','.join(LEVERS)}"
        )
    global START
    START = time.monotonic()
    device = pick_device(cfg.device)
    result = dict(
        config=asdict(cfg),
        hardware=bench.hardware_name(device),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
    )
    print(f"{result['hardware']}, torch {torch.__version__}, {result['date']}")

    def save(part=None, value=None):  # after every row: a run cut short keeps what it measured
        if part:
            result[part] = value
        if cfg.json:
            Path(cfg.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        fresh(device)  # the next part starts with the GPU's memory free and nothing compiled

    with tempfile.TemporaryDirectory() as tmp:
        if "train" in parts:
            save("train", measure_train(cfg, device, tmp, on_row=lambda rows: save("train", rows)))
        if "auto" in parts:
            save("auto", measure_auto(cfg, device, tmp, on_row=lambda rows: save("auto", rows)))
        if "levers" in parts:
            fastest = max(result.get("train", []), key=lambda r: r["tokens_per_s"], default=None)
            B = (
                cfg.levers_batch
                or (fastest or {}).get("batch_size")
                or int(cfg.batch_sizes.split(",")[0])
            )
            rows = measure_levers(cfg, device, tmp, B, on_row=lambda rows: save("levers", rows))
            save("levers", rows)
        if "checkpoint" in parts:
            stall = load("bench/checkpoint_stall.py")
            c = stall.Config(preset=cfg.preset, device=device, repeats=3, out=f"{tmp}/stall")
            save("checkpoint", stall.main(c))
        if "speedups" in parts:
            save("speedups", measure_speedups(cfg, device))
        if "hellaswag" in parts:
            hs = load("bench/hellaswag_speed.py")
            gpu = device != "cpu"
            c = replace(
                hs.Config(),
                device=device,
                preset=cfg.preset,
                batch_sizes="1,32" if gpu else "1,8",
                data=cfg.hellaswag_data,  # its rows repeated to 2,000 (16 on a CPU dry run)
                examples=2000 if gpu else 16,
                protocol="both",
                repeats=3 if gpu else 1,
            )
            save("hellaswag", hs.main(c))
        if "generate" in parts:
            gen = load("bench/generate_speed.py")
            c = replace(gen.Config(), device=device, preset=cfg.preset, repeats=3)
            if device.startswith("cuda"):
                c = replace(c, dtype="bfloat16")
            save("generate", gen.main(c))
        if "stages" in parts:
            measure_stages(cfg, device, tmp, on_row=lambda rows: save("stages", rows))
        if "faults" in parts:
            save(
                "faults", measure_faults(cfg, device, tmp, on_row=lambda rows: save("faults", rows))
            )
    save()
    if cfg.json:
        print(f"wrote {cfg.json}")
    return result


if __name__ == "__main__":
    main(parse_args(Config))
