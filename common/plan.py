"""`python -m common.plan`: what a training run needs, before anyone rents a GPU.

    python -m common.plan                        # gpt2, T=1024: the breakdown, then every card
    python -m common.plan --gpu 4090             # the largest micro-batch on a 24 GB card
    python -m common.plan --memory 24GiB --batch-size 8,16,32 --compile false
    python -m common.plan --gpu H100 --gpus 8 --from-run out/ --price 2.50

Where the memory of one training step goes, per GPU, as stage 07 trains (AdamW, autocast,
flash attention, vocabulary V = 50304). N parameters, L layers of width h with a heads,
B sequences of T tokens; p bytes per activation (2 under bf16/fp16 autocast, 4 in fp32):

    weights            4N      fp32 master weights
    gradients          4N      fp32; with accumulation alive through every micro-step
    AdamW moments      8N      exp_avg and exp_avg_sq, fp32
    autocast copies    p N_mm  autocast's bf16 copy of each matmul weight, kept for backward
    DDP buckets        4N      with 2+ GPUs: DDP's gradient buckets
    activations        L B T (2*4h + 14ph + 4a)      saved for the backward (per layer below)
    logits and loss    B T V (p + 12)                at the start of the backward

That sum is the peak at the start of the backward. At its end the activations are gone,
but the tied matrix (wte = lm_head, V x h) has two fp32 gradients and their sum beside
the accumulated one, while the logits are still held: weights + gradients + moments +
3 * 4Vh + p B T V. The peak is the larger of the two; the second wins only at small B.

The activations follow the accounting of Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (arXiv:2205.05198, section 4.1): what each op
keeps for its backward. Their layer keeps 34 s b h + 5 a s^2 b bytes (16-bit activations,
dropout); this model has no dropout (no masks), keeps its residual stream in fp32 under
autocast (the LayerNorm inputs: 4 bytes, not 2), and with flash attention it keeps the
attention's output and log-sum-exp instead of the (T, T) scores: no T^2 term at all.
Per token and layer:

    ln_1 input (residual, fp32)           4h     ln_2 input (residual, fp32)      4h
    c_attn input (ln_1 out)               p h    c_fc input (ln_2 out)            p h
    q, k, v (c_attn out)                  3p h   GELU input (c_fc out)            4p h
    attention output + log-sum-exp        p h + 4a     GELU output (c_proj in)    4p h
    manual attention instead of flash: the softmax (fp32) 4aT, and under autocast its
    bf16 copy for att @ v, 2aT, replace the output + log-sum-exp: T^2 per head is back;
    and the heads merged into (B, T, h) for c_proj are a copy, p h (flash writes its
    output in that layout already, so there the merge is free).

The logits and the loss: lm_head gives (B, T, V) logits in p bytes; cross-entropy computes
in fp32 (autocast upcasts it) and keeps its log-probabilities, 4 bytes; its backward then
holds the gradient it receives and the one it returns, 4 + 4, while the logits are still
referenced: p + 12 bytes per token per vocabulary entry. At gpt2's size that is the largest
single item: B=16, T=1024 in bf16 is 16 * 1024 * 50304 * 14 B = 10.7 GiB.

torch.compile (estimates, confirmed on a GPU later): inductor recomputes cheap elementwise
results in the backward instead of keeping them (the GELU output, the head merge, the
autocast weight copies), and fuses the loss so it keeps only the logits, their fp32
gradient and its bf16 copy: B T V (2p + 4).

What fits: the largest B that divides --total-batch / (T * GPUs) (so the tokens of an
optimizer step stay the same) whose peak stays within 92% of the card's memory less 0.5 GiB
(the CUDA context and cuBLAS workspaces; the allocator's cache and fragmentation). It is
sized for the uncompiled model, which keeps more than the compiled one, so the B that
`--batch-size auto` picks (and tries for real, uncompiled: no compilation to wait for
twice) fits either way; the breakdown shows the compiled estimate with --compile.

Time: a training token costs 6N + 12 L h T FLOPs (common.bench.flops_per_token); at a
model FLOPs utilization (MFU) of the dense datasheet peak, tokens/s = MFU * peak / that.
The MFU is a stated assumption (--mfu) unless --from-run gives the one a run measured.
"""

import functools
import json
import re
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common import UserError, bench
from common.cli import parse_args
from common.model import GPT, GPTConfig, preset_config

GiB = 2**30
USABLE, RESERVED = 0.92, 0.5 * GiB  # see the docstring: what of a card's memory a run can use
HALF = {"bfloat16": 2, "float16": 2, "float32": 4}  # bytes per activation (p)


@dataclass
class Config:
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    seq_len: int = 1024  # tokens per sequence (T)
    batch_size: str = "8,16,32,64"  # micro-batch sizes to break down: one value or a list
    dtype: str = "bfloat16"  # autocast dtype: bfloat16, float16 or float32 (off)
    attn: str = "sdpa"  # sdpa (flash attention, as 05-09 train) or manual (the (T, T) matrix)
    compile: bool = True  # torch.compile the model (07's GPU default)
    gpus: int = 1  # GPUs in the run (DDP): more GPUs, fewer micro-steps each
    gpu: str = ""  # a card of the table (4090, H100, A100 40GB ...): its memory and peak
    memory: str = ""  # or the memory of your card, e.g. 24GiB, 16GB, 8000MiB
    total_batch: int = 524288  # tokens per optimizer step (2**19, as GPT-3)
    steps: int = 19073  # optimizer steps: 19,073 x 524,288 tokens ~ 10B tokens
    mfu: float = 0.4  # assumed model FLOPs utilization of the datasheet peak (an estimate)
    from_run: str = ""  # a run directory (its metrics.jsonl): use the MFU that run measured
    price: float = 0.0  # dollars per GPU-hour: adds a cost


def model_config(preset, attn="sdpa"):
    """The model stages 05-09 train: GPT-2 init, tied weights, vocabulary padded to 50304."""
    return preset_config(preset, tie_weights=True, gpt2_init=True, attn=attn, vocab_size=50304)


def meta_model(config):
    """The model on the meta device: its shapes and parameter count, no memory, no RNG."""
    with torch.device("meta"):
        return GPT(config)


@functools.cache
def _counts(config_items):
    """(all parameters, matmul weights) of a model config (as a tuple of its items)."""
    model = meta_model(GPTConfig(**dict(config_items)))
    linear = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return model.num_params(), sum(linear)


def layer_terms(config, T, p, attn="sdpa", compiled=False):
    """Bytes one layer keeps for the backward, per token: [(what, bytes)], as the docstring."""
    h, a = config.n_embd, config.n_head
    terms = [
        ("ln_1 input (residual, fp32)", 4 * h),
        ("c_attn input (ln_1 out)", p * h),
        ("q, k, v (c_attn out)", 3 * p * h),
    ]
    if attn == "sdpa":  # flash: the output and one fp32 log-sum-exp per head; no (T, T)
        terms.append(("attention output + log-sum-exp", p * h + 4 * a))
    else:  # the softmax output, fp32 (autocast runs softmax in fp32), + its bf16 copy
        terms.append(("softmax (T x T per head)", 4 * a * T + (2 * a * T if p == 2 else 0)))
    if attn == "manual" and not compiled:  # flash lays its output out as (B, T, a, hs) already
        terms.append(("heads merged (c_proj input)", p * h))
    terms += [
        ("ln_2 input (residual, fp32)", 4 * h),
        ("c_fc input (ln_2 out)", p * h),
        ("GELU input (c_fc out)", 4 * p * h),
    ]
    if not compiled:
        terms.append(("GELU output (c_proj input)", 4 * p * h))
    return terms


def estimate(config, B, T, dtype="bfloat16", attn="sdpa", compiled=False, gpus=1):
    """Peak bytes of one training step at micro-batch B, per GPU: {item: bytes}, items in
    the order of the docstring, then the two moments the peak can be (the backward's start
    and end) and the larger under "peak"."""
    p, (N, n_matmul) = HALF[dtype], _counts(tuple(asdict(config).items()))
    tokens, V, h = B * T, config.vocab_size, config.n_embd
    per_layer = sum(b for _, b in layer_terms(config, T, p, attn, compiled))  # per token
    items = {
        "weights (fp32)": 4 * N,
        "gradients (fp32)": 4 * N,
        "AdamW moments (2 x fp32)": 8 * N,
        "autocast weight copies": p * n_matmul if p == 2 and not compiled else 0,
        "DDP gradient buckets": 4 * N if gpus > 1 else 0,
        "activations, all layers": config.n_layer * tokens * per_layer,
        "ln_f input + lm_head input": tokens * (4 + p) * h,
        "logits and loss": tokens * V * ((2 * p + 4) if compiled else (p + 12)),
    }
    start = sum(items.values())  # the moment the backward starts: everything above at once
    # its end: the activations are freed, but the tied matrix (wte = lm_head) has two fp32
    # gradients, lm_head's and the embedding's, then their sum, beside the accumulated one;
    # the logits are still referenced by the training loop. At a small B this is the peak.
    static = sum(list(items.values())[:5])  # weights, gradients, moments, copies, buckets
    end = static + 3 * 4 * V * h + tokens * V * p
    items.update({"at the backward's start": start, "at its end (tied embedding)": end})
    items["peak"] = max(start, end)
    return items


def usable(memory):
    """Bytes of a card's memory a run can count on (see the docstring)."""
    return USABLE * memory - RESERVED


def divisors_down(n, start=None):
    """Divisors of n, largest first, from `start` down."""
    return [b for b in range(n if start is None else min(n, start), 0, -1) if n % b == 0]


def largest_batch(config, T, memory, total_batch, gpus=1, **kw):
    """The largest micro-batch B dividing total_batch / (T * gpus) whose estimated peak fits
    `memory` bytes, and its accumulation steps; (None, None) when not even B=1 fits."""
    if total_batch % (T * gpus):
        raise UserError(f"--total-batch {total_batch} is not a multiple of T*GPUs = {T * gpus}")
    per_gpu = total_batch // (T * gpus)  # sequences per GPU per optimizer step
    for B in divisors_down(per_gpu):
        if estimate(config, B, T, gpus=gpus, **kw)["peak"] <= usable(memory):
            return B, per_gpu // B
    return None, None


def parse_memory(text):
    """'24GiB', '24 GB', '8000MiB', '24' (GiB) -> bytes. GB is read as GiB, as cards are sold."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?)?\s*", text, flags=re.I)
    if not m:
        raise UserError(f"--memory '{text}': give a size such as 24GiB, 16GB or 8000MiB")
    unit = (m.group(2) or "G")[0].upper()
    return float(m.group(1)) * 2 ** (10 * "KMGT".index(unit) + 10)


def _norm(name):
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_card(name):
    """--gpu NAME -> (key, Card): an exact key, or the one key that contains NAME."""
    exact = [k for k in bench.CARDS if _norm(k) == _norm(name)]
    found = exact or [k for k in bench.CARDS if _norm(name) in _norm(k)]
    if len(found) != 1:
        why = f"matches {', '.join(found)}" if found else "is not in the table"
        raise UserError(
            f"--gpu {name} {why}: choose one of {', '.join(bench.CARDS)}, or give --memory"
        )
    return found[0], bench.CARDS[found[0]]


def measured_mfu(out):
    """The median MFU of a run's train steps (metrics.jsonl), the first 10 left out
    (compilation, warm-up)."""
    path = Path(out) / "metrics.jsonl" if Path(out).is_dir() else Path(out)
    if not path.is_file():
        raise UserError(f"--from-run {out}: no metrics.jsonl there")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    mfus = [r["mfu"] for r in rows if r.get("split") == "train" and r.get("mfu")]
    if not mfus:
        raise UserError(
            f"--from-run {out}: no MFU in its metrics (a CPU run, or a GPU the table lacks)"
        )
    return statistics.median(mfus[10:] or mfus)


def hours(config, T, tokens, peak, mfu, gpus=1):
    """Estimated hours to train on `tokens` tokens: tokens/s = MFU * peak / FLOPs per token."""
    per_token = bench.flops_per_token(meta_model(config), T)
    return tokens / (mfu * peak * gpus / per_token) / 3600


def gib(n):
    return f"{n / GiB:6.2f}"


def breakdown(cfg, config, sizes, kw):
    """The memory table: one column per micro-batch size, one row per item."""
    cols = {B: estimate(config, B, cfg.seq_len, gpus=cfg.gpus, **kw) for B in sizes}
    first = next(iter(cols.values()))
    width = max(map(len, first)) + 2
    lines = ["GiB".ljust(width) + "".join(f"{'B=' + str(B):>9}" for B in sizes)]
    for item in first:
        if item == "at the backward's start":
            lines.append("-" * (width + 9 * len(sizes)))
        if any(c[item] for c in cols.values()):
            lines.append(item.ljust(width) + "".join(f"{gib(c[item]):>9}" for c in cols.values()))
    return lines


def live_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    seen = {}
    for t in tensors:
        if torch.is_tensor(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def profiled_peak(fn, resident):
    """Peak bytes allocated while fn() runs, on any device (the CPU has no allocator
    statistics): `resident` (the bytes already live before it, e.g. live_bytes of the
    weights, gradients and optimizer state) plus the highest point of the running sum of
    every allocation and free the profiler records (profile_memory=True), in time order.
    The profiler records no free of a block allocated before it started: free those
    (e.g. optimizer.zero_grad()) before calling this, and leave them out of `resident`."""
    from torch.profiler import ProfilerActivity, profile
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo += node.children
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return resident + peak


# --- --batch-size auto (stages 06 and 07) -------------------------------------------------


def fit_batch_size(cfg, device, world_size=1):
    """`--batch-size auto` -> cfg with the micro-batch this run trains at; a number is kept.
    On a GPU: the planner's largest B for this card's memory that keeps --total-batch
    (eager: a compiled model needs less), then one real training step at that B, halved on
    out of memory (auto_batch_size); all ranks then take the smallest. Elsewhere: the
    stage's CPU default. The stages call it before they build anything, so the chosen B is
    what the loaders, metrics.jsonl and the checkpoints see."""
    if cfg.batch_size != "auto":
        return cfg
    if not str(device).startswith("cuda"):
        return replace(cfg, batch_size=type(cfg).cpu["batch_size"])
    props = torch.cuda.get_device_properties(device)
    memory, card = props.total_memory, props.name
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch
    if get_fraction and (share := get_fraction(device)) < 1:  # a cap this process was given
        memory, card = memory * share, f"{card} capped at {share:.0%}"
    B = auto_batch_size(cfg, device, memory, world_size, card)
    if world_size > 1:  # every rank must train at the same B
        t = torch.tensor(B, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        B = int(t.item())
    return replace(cfg, batch_size=B)


def auto_batch_size(cfg, device, memory, world_size=1, card="this device"):
    """The planner's largest B for `memory` bytes, tried for real (try_step); after an out
    of memory the next divisor of the sequences per GPU at most half as large. Prints one
    line: B, the micro-steps, estimated vs measured peak, the card's memory."""
    T, dtype = cfg.seq_len, cfg.dtype
    cuda = str(device).startswith("cuda")
    if dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        dtype = "float16"  # T4, V100: as amp_dtype will say
    config = model_config(cfg.preset)
    per_gpu = cfg.total_batch // (T * world_size)
    B = largest_batch(config, T, memory, cfg.total_batch, world_size, dtype=dtype)[0] or 1
    while True:
        try:
            measured = try_step(config, B, T, device, dtype)
            break
        except torch.OutOfMemoryError:
            smaller = divisors_down(per_gpu, B // 2)
            if not smaller:
                raise UserError(
                    f"--batch-size auto: out of memory even at B=1 on {card}: "
                    "use a smaller --preset or --seq-len"
                ) from None
            print(f"--batch-size auto: B={B} ran out of memory; trying B={smaller[0]}")
            B = smaller[0]
    est = estimate(config, B, T, dtype, gpus=world_size)["peak"]
    print(
        f"--batch-size auto: B={B}, {per_gpu // B} micro-step(s) of {B}x{T} per GPU per "
        f"optimizer step; peak memory {est / GiB:.2f} GiB estimated, {measured / GiB:.2f} "
        f"GiB measured, of {memory / GiB:.1f} GiB on {card}",
        flush=True,
    )
    return B


def try_step(config, B, T, device, dtype="bfloat16"):
    """One training step of the stages' model at micro-batch B (two micro-steps, so the
    gradients are alive through the second, then AdamW), eager, on random tokens; returns
    its peak allocated bytes. Out of memory raises torch.OutOfMemoryError, with everything
    freed. The global RNGs are left as they were: the run's weights stay the seed's."""
    from common.train import make_optimizer

    cuda = str(device).startswith("cuda")
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    autocast = torch.autocast(
        str(device).split(":")[0], dtype=half or torch.float32, enabled=half is not None
    )
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            model = GPT(config).to(device)
            optimizer = make_optimizer(model, 0.1, 1e-4, device)
            x = torch.randint(0, 50257, (B, T), device=device)

            def step():
                for _ in range(2):
                    with autocast:
                        _, loss = model(x, x)
                    loss.backward()
                optimizer.step()

            if cuda:
                step()
                return torch.cuda.max_memory_allocated(device) - before
            return profiled_peak(step, live_bytes(model.parameters()))
        finally:
            model = optimizer = x = None
            if cuda:
                torch.cuda.empty_cache()


def main(cfg):
    if cfg.dtype not in HALF:
        raise UserError(f"--dtype {cfg.dtype}: use bfloat16, float16 or float32")
    if cfg.gpus < 1:
        raise UserError(f"--gpus must be a positive integer (got {cfg.gpus})")
    config = model_config(cfg.preset, cfg.attn)  # an unknown preset or attention: one line
    T = cfg.seq_len
    try:
        sizes = [int(b) for b in str(cfg.batch_size).split(",")]
    except ValueError:
        raise UserError(
            f"--batch-size {cfg.batch_size}: give sizes such as 16 or 8,16,32"
        ) from None
    kw = dict(dtype=cfg.dtype, attn=cfg.attn, compiled=cfg.compile)
    N = meta_model(config).num_params()
    print(
        f"{cfg.preset}: {N:,} parameters, T={T}, {cfg.dtype}, {cfg.attn} attention, "
        f"compile {cfg.compile}, {cfg.gpus} GPU(s); estimated peak memory per GPU:"
    )
    print("\n".join(breakdown(cfg, config, sizes, kw)))
    mfu = measured_mfu(cfg.from_run) if cfg.from_run else cfg.mfu
    how = f"MFU {mfu:.0%} {'measured in ' + cfg.from_run if cfg.from_run else 'assumed (--mfu)'}"
    tokens = cfg.steps * cfg.total_batch
    estimates = {B: estimate(config, B, T, gpus=cfg.gpus, **kw) for B in sizes}
    result = dict(estimates=estimates, mfu=mfu)
    if cfg.gpu or cfg.memory:
        name, card = find_card(cfg.gpu) if cfg.gpu else (None, None)
        memory = parse_memory(cfg.memory) if cfg.memory else card.memory_gib * GiB
        auto = dict(kw, compiled=False)  # as --batch-size auto sizes it: see fit_batch_size
        B, accum = largest_batch(config, T, memory, cfg.total_batch, cfg.gpus, **auto)
        where = (
            f"{name or 'a card'} ({memory / GiB:.0f} GiB; a run may use {usable(memory) / GiB:.1f})"
        )
        if B is None:
            print(
                f"{where}: not even B=1 fits; use a smaller --preset or --seq-len, or more memory"
            )
            return dict(result, batch_size=None)
        peak = estimate(config, B, T, gpus=cfg.gpus, **auto)["peak"]
        compiled = estimate(config, B, T, gpus=cfg.gpus, **dict(kw, compiled=True))["peak"]
        print(
            f"{where}: --batch-size auto: B = {B} "
            f"(estimated peak {peak / GiB:.1f} GiB uncompiled, "
            f"{compiled / GiB:.1f} compiled), "
            f"{accum} micro-step(s) x {cfg.gpus} GPU(s) x {B} x {T} "
            f"= {cfg.total_batch:,} tokens per step"
        )
        result.update(batch_size=B, accum_steps=accum, peak=peak)
        if card:
            flops = card.bf16 if cfg.dtype == "bfloat16" and card.bf16 else card.fp16
            t = hours(config, T, tokens, flops, mfu, cfg.gpus)
            cost = (
                f", ${t * cfg.gpus * cfg.price:,.0f} at ${cfg.price:.2f}/GPU-hour"
                if cfg.price
                else ""
            )
            print(
                f"time (estimate): {tokens / 1e9:.1f}B tokens in {t:.1f} h on {cfg.gpus} x "
                f"{name} at {flops / 1e12:.0f} TFLOPS dense, {how}{cost}"
            )
            result.update(hours=t)
        return result
    print(f"\nevery card (estimates: {cfg.gpus} GPU(s), {tokens / 1e9:.1f}B tokens, {how}):")
    print(f"{'card':<11}{'memory':>7}{'peak TFLOPS':>13}{'auto B':>8}{'accum':>7}{'hours':>8}")
    rows = {}
    for name, card in bench.CARDS.items():
        half = "bfloat16" if card.bf16 else "float16"  # T4, V100: --dtype float16
        ckw = dict(kw, dtype=half if cfg.dtype != "float32" else "float32", compiled=False)
        B, accum = largest_batch(config, T, card.memory_gib * GiB, cfg.total_batch, cfg.gpus, **ckw)
        flops = card.bf16 or card.fp16
        t = hours(config, T, tokens, flops, mfu, cfg.gpus)
        rows[name] = dict(batch_size=B, accum_steps=accum, hours=t)
        shown = f"{B:>8}{accum:>7}" if B else f"{'none':>8}{'':>7}"
        print(f"{name:<11}{card.memory_gib:>5} GB{flops / 1e12:>13.0f}{shown}{t:>8.1f}")
    return dict(result, cards=rows)


if __name__ == "__main__":
    main(parse_args(Config))
