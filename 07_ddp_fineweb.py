"""Stage 07: the real run: GPT-2 124M on 10B tokens of FineWeb-Edu, on 1 to N GPUs.

New, written out below: DDP (torchrun starts one process per GPU; each reads its own share of
the token shards, and gradients are averaged across processes on the last micro-step only),
training windows in a fresh seeded order every epoch, and validation (the same windows for any
number of processes). Samples, checkpoints with an exact --resume, metrics.jsonl and HellaSwag
come from common/. Shards come from `python -m common.fineweb` (shard 0 is validation).

Run: torchrun --standalone --nproc_per_node=8 07_ddp_fineweb.py
One GPU: python 07_ddp_fineweb.py
No GPU: python 07_ddp_fineweb.py --data-dir data/tiny   (the README makes data/tiny in a minute)
"""

import os
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, hellaswag
from common.cli import parse_args
from common.data import ShardLoader, get_tokenizer
from common.generate import generate
from common.model import GPT, preset_config
from common.plan import fit_batch_size
from common.run import start_run
from common.device import amp_dtype, pick_device, synchronize
from common.distributed import Dist, ddp_exit, print0
from common.train import lr_at, make_optimizer, seed_all, step_line


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    data_dir: str = "data/edu_fineweb10B"  # token shards from `python -m common.fineweb`
    batch_size: int | str = "auto"  # sequences per micro-step, per GPU; auto: the most it fits
    seq_len: int = 1024  # tokens per sequence
    steps: int = 19073  # optimizer steps: 19,073 x 524,288 tokens ~ 10B tokens, one epoch
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup; min_lr is 10%
    warmup_steps: int = 715  # linear warmup over the first 375M tokens, as GPT-3
    weight_decay: float = 0.1  # AdamW decay on >= 2-D parameters only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    total_batch: int = 524288  # tokens per optimizer step (2**19, as GPT-3); a multiple of B*T*GPUs
    seed: int = 1337  # same seed, same weights, same batches, same run
    shuffle: bool = True  # training windows and shards in a fresh seeded order every epoch
    dtype: str = "bfloat16"  # autocast dtype: bfloat16, float16 (+ GradScaler) or float32 (off)
    compile: bool = True  # torch.compile the model (off on a CPU: compiling outlasts 40 steps)
    out: str = "out"  # checkpoints and metrics.jsonl go here (one run at a time)
    val_every: int = 250  # steps between validation losses (0: never)
    val_steps: int = 20  # val batches of --total-batch tokens per evaluation, for any GPU count
    sample_every: int = 250  # steps between samples (0: never)
    hellaswag_every: int = 250  # steps between HellaSwag evaluations, all ranks share (0: never)
    hellaswag_limit: int = 0  # score only the first N val examples (0: all 10,042)
    hellaswag_data: str = ""  # a local HellaSwag jsonl instead of the downloaded val split
    hellaswag_protocol: str = "both"  # nanogpt, lm-eval or both (see 08_hellaswag.py)
    ckpt_every: int = 5000  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted (0: keep all)
    resume: str = ""  # "latest" (newest in --out; also --resume alone), "auto" (it, if any), a path
    allow_config_change: bool = False  # let --resume change steps, batch, lr ... (logged)
    wandb: str = ""  # also log every metric to this Weights & Biases project (pip install wandb)
    consts: ClassVar[dict] = dict(resume="latest")
    cpu: ClassVar[dict] = dict(
        preset="tiny",
        batch_size=8,
        seq_len=64,
        steps=40,
        max_lr=2e-3,
        warmup_steps=5,
        total_batch=1024,
        compile=False,
        val_every=10,
        val_steps=2,
        sample_every=20,
        ckpt_every=20,
        hellaswag_every=0,
    )
    rules: ClassVar[dict] = dict(hellaswag_protocol=hellaswag.CHOICES)


def setup_ddp(device):
    """torchrun starts one process per GPU and tells each who it is: RANK (0..N-1 over all
    nodes), LOCAL_RANK (its GPU on this node), WORLD_SIZE (N). Without them: one process."""
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


def shuffled_windows(n_tokens, seq_len, seed):
    """One shard's window starts (T+1 tokens each: inputs and targets) for one epoch, each
    once, in a seeded random order; a random offset 0..T-1 moves the window boundaries. In
    order, every epoch would end, at the lowest learning rate, on the same stretch of text."""
    rng = np.random.default_rng(seed)  # seed: (run seed, epoch, shard): a fresh order each epoch
    offset = int(rng.integers(seq_len))
    return offset + seq_len * rng.permutation((n_tokens - 1 - offset) // seq_len)


@torch.no_grad()
def evaluate_val(model, loader, autocast, steps, ddp):
    """Mean loss over the first `steps` val micro-steps (the same every time), averaged over
    ranks: with steps x B x T x GPUs a fixed total, the same windows on any number of GPUs."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=ddp.device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast:
            _, loss = model(x.to(ddp.device), y.to(ddp.device))
        total += loss.detach() / steps
    if ddp.enabled:
        dist.all_reduce(total)  # gloo has no AVG: sum, then divide
        total /= ddp.world_size
    model.train()
    return total.item()


def main(cfg):
    ddp = setup_ddp(cfg.device)  # one process, or one of torchrun's
    device = ddp.device
    seed_all(cfg.seed)  # the same weights on every rank
    cfg = fit_batch_size(cfg, device, ddp.world_size)  # auto: the planner's B, tried for real
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len

    # data: each rank reads its own (B, T) window of every micro-step from the token shards
    if cfg.total_batch % (B * T * ddp.world_size):
        micro = B * T * ddp.world_size
        raise UserError(f"--total-batch {cfg.total_batch} is not a multiple of B*T*GPUs = {micro}")
    accum_steps = cfg.total_batch // (B * T * ddp.world_size)  # micro-batches per optimizer step
    shuffle = shuffled_windows if cfg.shuffle else None  # None: consecutive, as stage 03
    share = (ddp.rank, ddp.world_size, cfg.total_batch)  # which windows of a step are this rank's
    train_loader = ShardLoader(cfg.data_dir, "train", B, T, *share, shuffle=shuffle, seed=cfg.seed)
    val_loader = ShardLoader(cfg.data_dir, "val", B, T, *share)
    val_steps = cfg.val_steps * accum_steps  # micro-steps: val_steps x total_batch tokens in all

    torch.set_float32_matmul_precision("high")  # tf32: fp32 matmuls on tensor cores (10-bit)
    dtype = amp_dtype(cfg.dtype, device)  # autocast to bfloat16: fp32's range, fewer digits
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)  # T4, V100
    config = preset_config(
        cfg.preset,
        tie_weights=True,
        gpt2_init=True,  # stage 04, in common/
        attn="sdpa",  # flash attention: one fused kernel, no (T, T) matrix
        vocab_size=50304,  # 128 * 393: a shape kernels tile evenly
    )
    raw_model = GPT(config).to(device)
    model = torch.compile(raw_model) if cfg.compile else raw_model  # compile: a few fused kernels
    if ddp.enabled:  # DDP averages the gradients of all processes during backward
        model = DDP(model, device_ids=[ddp.local_rank] if device.startswith("cuda") else None)
    print0(
        f"parameters: {raw_model.num_params():,}; {dtype}, flash attention, vocab 50304, "
        f"compile {cfg.compile}; {ddp.world_size} processes x {accum_steps} micro-steps of "
        f"{B}x{T} per step"
    )
    optimizer = make_optimizer(raw_model, cfg.weight_decay, cfg.max_lr, device)
    # one writer per --out, metrics.jsonl; --resume: weights, optimizer, step, data position, RNGs
    run = start_run(cfg, raw_model, optimizer, train_loader, ddp.master)
    if cfg.hellaswag_every:  # downloaded once into the cache, or a local file
        examples = hellaswag.load_examples("val", cfg.hellaswag_data or None, cfg.hellaswag_limit)

    losses, norms, val_losses = {}, [], {}
    for step in range(run.start_step, cfg.steps):
        last, tokens = step == cfg.steps - 1, run.tokens_at(step)
        if cfg.val_every and (step % cfg.val_every == 0 or last):
            val_losses[step] = evaluate_val(model, val_loader, autocast, val_steps, ddp)
            print0(f"step {step:5d} | val loss {val_losses[step]:.4f}")
            run.log(step=step, split="val", loss=val_losses[step], tokens=tokens)
        if cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last):
            with autocast:  # each rank scores its share of the examples; the counts are summed
                scores = hellaswag.evaluate_protocols(
                    raw_model, examples, device, cfg.hellaswag_protocol, B, ddp.rank, ddp.world_size
                )
            print0(f"step {step:5d} | hellaswag {hellaswag.acc_norms(scores)}")
            run.log(step=step, split="hellaswag", tokens=tokens, **hellaswag.labelled(scores))
        if cfg.sample_every and ddp.master and step > 0 and (step % cfg.sample_every == 0 or last):
            prompt = torch.tensor([enc.encode("Hello, I'm a language model,")] * 4, device=device)
            gen = torch.Generator(device=device).manual_seed(cfg.seed + step)
            with autocast:  # the raw model: compile and DDP never get in the way of sampling
                for row in generate(raw_model.eval(), prompt, 32, top_k=50, generator=gen).tolist():
                    print0(f"sample: {enc.decode(row)!r}")
            raw_model.train()

        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss_accum = 0.0
        for micro_step in range(accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            if ddp.enabled:  # all-reduce the gradients once, after the last micro-step
                model.require_backward_grad_sync = micro_step == accum_steps - 1
            with autocast:  # bf16: matmuls in bfloat16; softmax, norms and the loss stay fp32
                logits, loss = model(x, y)
            loss = loss / accum_steps  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            scaler.scale(loss).backward()  # gradients add up across micro-steps
        if ddp.enabled:
            dist.all_reduce(loss_accum)  # the loss of the whole global batch, for printing
            loss_accum /= ddp.world_size
        scaler.unscale_(optimizer)  # float16: the true gradients, before clipping them
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # pre-clip norm
        run.check_finite(step, loss_accum, norm, scaler)  # before optimizer.step() touches weights
        lr = lr_at(step, cfg.max_lr, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.step(optimizer)  # (unscales first; skips the step if a gradient overflowed)
        scaler.update()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses[step] = loss_accum.item()
        norms.append(norm.item())
        tok_s, eta = cfg.total_batch / dt, run.eta(step)
        print0(step_line(step, losses[step], lr, norms[-1], dt, tok_s, total=cfg.steps, eta=eta))
        record = dict(loss=losses[step], lr=lr, norm=norms[-1], dt=dt, tokens_per_s=tok_s)
        record.update(mfu=run.mfu(dt), tokens=run.tokens_at(step + 1))  # tokens trained on so far
        run.log(step=step, split="train", **record)
        preempted = run.preempted()  # SIGTERM/SIGUSR1 reached a rank: all stop after this step
        if preempted or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or last:
            run.save(step + 1)  # rank 0 writes; the model, optimizer and loader given above
        if preempted:
            run.stop(step + 1)  # exit code 75: the same command with --resume auto goes on

    val = f"{val_losses[max(val_losses)]:.4f}" if val_losses else "n/a (not evaluated)"
    print0(
        f"summary: steps {run.start_step}..{cfg.steps} of {cfg.total_batch:,} tokens on "
        f"{ddp.world_size} process(es): train loss {losses[min(losses)]:.4f} -> "
        f"{losses[max(losses)]:.4f}, val loss {val}, newest checkpoint {run.newest}"
    )
    run.close()  # releases --out for the next run
    if ddp.enabled:
        dist.destroy_process_group()
    result = dict(losses=losses, norms=norms, val_losses=val_losses, checkpoint=run.newest)
    return dict(result, world_size=ddp.world_size, accum_steps=accum_steps)


if __name__ == "__main__":
    with ddp_exit():  # under torchrun: ends the process group and the process on every path
        main(parse_args(Config))
