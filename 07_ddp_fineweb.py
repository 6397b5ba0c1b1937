"""Stage 07: the real run: GPT-2 124M on 10B tokens of FineWeb-Edu, on 1 to N GPUs.

What changes from stage 06:
  data     token shards from `python -m common.fineweb` (shard 0 = val), read by ShardLoader;
           each rank reads its own disjoint window of every step
  DDP      `torchrun --nproc_per_node=N` starts N processes; DistributedDataParallel averages
           gradients across them (NCCL on GPUs, gloo on CPU), only on the last micro-step
           (require_backward_grad_sync), so the same global batch gives the same update on
           1 process x k micro-steps as on k processes x 1; rank 0 alone prints and writes
  val      every --val-every steps: the loss on fixed val batches, averaged over ranks
  sample   every --sample-every steps: 4 samples from the un-compiled model
  ckpt     every --ckpt-every steps and at the end: model, optimizer, step, config, loader
           position, RNG states, written atomically; --resume continues the exact run
  metrics  {out}/metrics.jsonl, one JSON object per line (python -m common.plot out/)
  guard    a non-finite loss stops the run before the weights are touched

Prepare data (real run: ~10B tokens, 20 GB), then train on 8 GPUs (~19,073 steps):
    python -m common.fineweb
    torchrun --standalone --nproc_per_node=8 07_ddp_fineweb.py
One GPU: python 07_ddp_fineweb.py   Resume after a crash: add --resume (newest checkpoint)
On a CPU (tiny preset; shards from any jsonl/parquet of documents, see README):
    python -m common.fineweb --data-files docs.jsonl --shard-size 100000 --out-dir data/tiny
    python 07_ddp_fineweb.py --data-dir data/tiny
    torchrun --standalone --nproc_per_node=2 07_ddp_fineweb.py --data-dir data/tiny
"""

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common import UserError, bench, hellaswag
from common.checkpoint import (
    list_checkpoints, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
    set_rng_state,
)  # fmt: skip
from common.cli import parse_args
from common.data import ShardLoader, get_tokenizer
from common.model import GPT, preset_config
from common.train import (
    MetricsLog, lr_at, make_optimizer, seed_all, setup_dist, step_line, synchronize,
    teardown_dist,
)  # fmt: skip


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    data_dir: str = "data/edu_fineweb10B"  # token shards from `python -m common.fineweb`
    batch_size: int = 64  # sequences per micro-step, per GPU
    seq_len: int = 1024  # tokens per sequence
    steps: int = 19073  # optimizer steps: 19,073 x 524,288 tokens ~ 10B tokens, one epoch
    max_lr: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 6e-5  # learning rate at the end of the cosine (10% of the peak)
    warmup_steps: int = 715  # linear warmup over the first 375M tokens, as GPT-3
    weight_decay: float = 0.1  # AdamW decay on >= 2-D parameters only
    grad_clip: float = 1.0  # clip the global gradient norm to this
    total_batch: int = 524288  # tokens per optimizer step (2**19); a multiple of B*T*GPUs
    seed: int = 1337  # same seed, same weights, same run
    speedups: str = "compile"  # train with every stage-05 speedup up to this one
    out: str = "out"  # checkpoints and metrics.jsonl go here
    val_every: int = 250  # steps between validation losses (0: never)
    val_steps: int = 20  # val batches per evaluation (x B x T x GPUs tokens)
    sample_every: int = 250  # steps between samples (0: never)
    hellaswag_every: int = 250  # steps between HellaSwag evaluations, all ranks share (0: never)
    hellaswag_limit: int = 0  # score only the first N val examples (0: all 10,042)
    hellaswag_data: str = ""  # a local HellaSwag jsonl instead of the downloaded val split
    ckpt_every: int = 5000  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted (0: keep all)
    resume: str = ""  # "latest" (newest in --out; also --resume alone) or a checkpoint path
    consts: ClassVar[dict] = dict(resume="latest")
    cpu: ClassVar[dict] = dict(
        preset="tiny", batch_size=8, seq_len=64, steps=40, max_lr=2e-3, min_lr=2e-4,
        warmup_steps=5, total_batch=1024, speedups="vocab", val_every=10, val_steps=4,
        sample_every=20, ckpt_every=20, hellaswag_every=0,
    )  # fmt: skip


ROWS = ("fp32", "tf32", "bf16", "flash", "vocab", "compile")


def unavailable(row, device):
    """Why a row cannot apply on this device, or None."""
    cuda = device.startswith("cuda")
    if row == "tf32" and not cuda:
        return "TF32 is a CUDA tensor-core mode; CPU fp32 matmuls do not change"
    if row == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 (needs Ampere / sm_80 or newer)"
    if row == "compile" and device == "mps":
        return "torch.compile does not support MPS well yet"
    return None


def build(cfg, row, device):
    """A fresh model with every speedup up to `row` on; returns (model, compiled, autocast)."""
    if row not in ROWS:
        raise UserError(f"unknown speedup row '{row}': choose one of {', '.join(ROWS)}")
    on = [r for r in ROWS[: ROWS.index(row) + 1] if not unavailable(r, device)]
    torch.set_float32_matmul_precision("high" if "tf32" in on else "highest")  # tf32
    ctx = nullcontext()
    if "bf16" in on:  # autocast picks bf16 per op; softmax, norms and the loss stay fp32
        ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    config = preset_config(
        cfg.preset, tie_weights=True, gpt2_init=True,
        attn="sdpa" if "flash" in on else "manual",  # flash
        vocab_size=50304 if "vocab" in on else 50257,  # vocab
    )  # fmt: skip
    seed_all(cfg.seed)
    model = GPT(config).to(device)
    compiled = torch.compile(model) if "compile" in on else model  # compile
    return model, compiled, ctx


def evaluate_val(model, loader, ctx, steps, d):
    """Mean loss over the first `steps` val batches, averaged over all ranks."""
    model.eval()
    loader.reset()  # the same batches every time: comparable numbers
    total = torch.zeros((), device=d.device)
    with torch.no_grad():
        for _ in range(steps):
            x, y = loader.next_batch()
            with ctx:
                _, loss = model(x.to(d.device), y.to(d.device))
            total += loss.detach() / steps
    if d.ddp:
        dist.all_reduce(total)  # gloo has no AVG: sum, then divide
        total /= d.world_size
    model.train()
    return total.item()


def main(cfg):
    d = setup_dist(cfg.device)  # one process, or one of torchrun's
    device = d.device
    print0 = print if d.master else lambda *args, **kwargs: None
    seed_all(cfg.seed)  # the same weights on every rank
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len

    # data: each rank reads its own window of every step from the token shards
    train_loader = ShardLoader(cfg.data_dir, "train", B, T, d.rank, d.world_size)
    val_loader = ShardLoader(cfg.data_dir, "val", B, T, d.rank, d.world_size)
    if cfg.total_batch % (B * T * d.world_size):
        raise UserError(
            f"--total-batch {cfg.total_batch} is not a multiple of B*T*GPUs = {B * T * d.world_size}"
        )
    accum_steps = cfg.total_batch // (B * T * d.world_size)  # micro-batches per optimizer step
    print0(f"total batch {cfg.total_batch:,} tokens = {d.world_size} processes x {accum_steps} "
           f"micro-steps of {B}x{T}")  # fmt: skip

    model, compiled, ctx = build(cfg, cfg.speedups, device)
    print0(f"training with speedups up to '{cfg.speedups}': {model.num_params():,} parameters")
    optimizer, groups = make_optimizer(model, cfg.weight_decay, cfg.max_lr, device)
    print0(f"decayed: {groups['decay'][0]} tensors, {groups['decay'][1]:,} parameters; "
           f"not decayed: {groups['no_decay'][0]} tensors, {groups['no_decay'][1]:,} parameters; "
           f"fused AdamW: {groups['fused']}")  # fmt: skip

    # resume: weights, optimizer moments, step, data position and RNGs, exactly as saved
    start_step, ckpts = 0, list_checkpoints(cfg.out)
    if cfg.resume:
        ckpt = load_checkpoint(cfg.out if cfg.resume == "latest" else cfg.resume)
        if ckpt["model_config"] != asdict(model.config):
            raise UserError(f"checkpoint model {ckpt['model_config']} differs from this run's: "
                            "resume with the same --preset and --speedups")  # fmt: skip
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        start_step = ckpt["step"]
        print0(f"resumed from step {start_step} ({ckpt['path']})")
        if start_step >= cfg.steps:
            raise UserError(f"{ckpt['path']} is already at step {start_step} of --steps {cfg.steps}: "
                            "nothing to train; raise --steps to go on")  # fmt: skip
    elif ckpts:  # never overwrite another run's checkpoints by accident
        raise UserError(f"{cfg.out} already holds checkpoints (newest {ckpts[-1].name}): "
                        "add --resume to continue that run, or choose another --out")  # fmt: skip
    if d.ddp:  # averages gradients across processes during backward
        compiled = DDP(compiled, device_ids=[d.local_rank] if device.startswith("cuda") else None)
    metrics = MetricsLog(cfg.out, start_step) if d.master else None
    if cfg.hellaswag_every:  # downloaded once into the cache, or a local file
        examples = hellaswag.load_examples("val", cfg.hellaswag_data or None, cfg.hellaswag_limit)
    flops = bench.flops_per_token(model, T)
    _, peak = bench.known_peak(device)
    last_ckpt = None

    losses, norms, val_losses = {}, [], {}
    for step in range(start_step, cfg.steps):
        last = step == cfg.steps - 1
        tokens_seen = step * cfg.total_batch
        if cfg.val_every and (step % cfg.val_every == 0 or last):
            val_losses[step] = evaluate_val(compiled, val_loader, ctx, cfg.val_steps, d)
            print0(f"step {step:5d} | val loss {val_losses[step]:.4f}")
            if metrics:
                metrics.write(step=step, split="val", loss=val_losses[step], tokens=tokens_seen)
        if cfg.hellaswag_every and (step % cfg.hellaswag_every == 0 or last):
            with ctx:  # each rank scores its share of the examples; the counts are all-reduced
                hs = hellaswag.evaluate(model, examples, device, B, d.rank, d.world_size)
            print0(f"step {step:5d} | hellaswag acc_norm {hs['acc_norm']:.4f} ({hs['n']} examples)")
            if metrics:
                metrics.write(step=step, split="hellaswag", acc=hs["acc"], acc_norm=hs["acc_norm"],
                              n=hs["n"], tokens=tokens_seen)  # fmt: skip
        if cfg.sample_every and d.master and step > 0 and (step % cfg.sample_every == 0 or last):
            prompt = torch.tensor([enc.encode("Hello, I'm a language model,")] * 4, device=device)
            gen = torch.Generator(device=device).manual_seed(cfg.seed + step)
            model.eval()  # the raw model: compile and DDP never get in the way of sampling
            with ctx:
                out = model.generate(prompt, 32, top_k=50, generator=gen)
            model.train()
            for row in out.tolist():
                print0(f"sample: {enc.decode(row)!r}")

        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            if d.ddp:  # all-reduce gradients only once, after the last micro-step
                compiled.require_backward_grad_sync = micro_step == accum_steps - 1
            with ctx:
                logits, loss = compiled(x, y)
            loss = loss / accum_steps  # the mean over the whole batch, not a sum of means
            loss_accum += loss.detach()
            loss.backward()  # gradients add up across micro-steps
        if d.ddp:
            dist.all_reduce(loss_accum)  # the loss of the whole global batch, for printing
            loss_accum /= d.world_size
        if not math.isfinite(loss_accum.item()):  # before optimizer.step() touches the weights
            raise UserError(f"loss is {loss_accum.item()} at step {step}: stopped; newest good "
                            f"checkpoint: {last_ckpt or 'none'}; resume with a lower --max-lr")  # fmt: skip
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # pre-clip norm
        lr = lr_at(step, cfg.max_lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses[step] = loss_accum.item()
        norms.append(norm.item())
        tokens_per_s = cfg.total_batch / dt
        mfu = flops * tokens_per_s / d.world_size / peak if peak else None
        print0(
            step_line(step, losses[step], lr=lr, norm=norms[-1], dt=dt, tokens_per_s=tokens_per_s)
        )
        if metrics:
            metrics.write(step=step, split="train", loss=losses[step], lr=lr, norm=norms[-1], dt=dt,
                          tokens_per_s=tokens_per_s, mfu=mfu, tokens=tokens_seen + cfg.total_batch)  # fmt: skip
        if d.master and ((cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or last):
            last_ckpt = save_checkpoint(
                cfg.out, step + 1, model, model.config, optimizer=optimizer.state_dict(),
                config=asdict(cfg), loader=train_loader.state_dict(), rng=rng_state(),
            )  # fmt: skip
            prune_checkpoints(cfg.out, cfg.keep_last)
            print0(f"saved {last_ckpt}")

    val = val_losses[max(val_losses)] if val_losses else float("nan")
    print0(f"summary: steps {start_step}..{cfg.steps} of {cfg.total_batch:,} tokens on "
           f"{d.world_size} process(es): train loss {losses[min(losses)]:.4f} -> "
           f"{losses[max(losses)]:.4f}, val loss {val:.4f}, newest checkpoint {last_ckpt}")  # fmt: skip
    teardown_dist(d)
    return dict(losses=losses, norms=norms, val_losses=val_losses, checkpoint=last_ckpt,
                world_size=d.world_size, accum_steps=accum_steps)  # fmt: skip


if __name__ == "__main__":
    main(parse_args(Config))
