"""Measuring training speed honestly: timing, FLOPs, MFU, peaks, hardware, and the table.

Rules (after modded-nanogpt): warm up (and compile) outside the timed region, synchronize
before reading the clock, take the median of many steps, use the same batch for every
configuration, and print the hardware and torch version next to the numbers.
"""

import json
import re
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from common import UserError
from common.model import GPT, GPT2_VOCAB, preset_config
from common.device import CPU_BF16_FLAGS, cpu_has_bf16, cpu_info, synchronize


@dataclass(frozen=True)
class Card:
    """A GPU as its datasheet gives it: memory, and the dense (no 2:4 sparsity) tensor-core
    peak in FLOP/s for bf16 and fp16 with fp32 accumulation (bf16 None: the card has none)."""

    memory_gib: float
    bf16: float | None
    fp16: float
    match: tuple  # words of torch.cuda.get_device_name() that pick this card, lower case


# The one table of GPUs (common.plan reads it too). MFU is only reported against the peak of
# the GPU actually present, or a measured one. Sources, dense figures:
CARDS = {
    "T4": Card(16, None, 65e12, ("t4",)),  # NVIDIA T4 datasheet: FP16 mixed precision 65 TFLOPS
    "V100": Card(16, None, 125e12, ("v100",)),  # V100 datasheet (SXM2): tensor 125 TFLOPS
    # A10G: AWS publishes no datasheet; NVIDIA A10 datasheet: BF16 125 TFLOPS (250 sparse).
    # The A10G runs lower clocks, so this is its upper bound.
    "A10G": Card(24, 125e12, 125e12, ("a10g",)),
    "L4": Card(24, 121e12, 121e12, ("l4",)),  # L4 datasheet: BF16 242 TFLOPS with sparsity
    "RTX 3090": Card(24, 71e12, 71e12, ("3090",)),  # Ampere GA102 whitepaper, FP32 accumulate
    "RTX 4090": Card(24, 165.2e12, 165.2e12, ("4090",)),  # Ada whitepaper, FP32 accumulate
    "L40S": Card(48, 362e12, 362e12, ("l40s",)),  # L40S datasheet: 733 TFLOPS with sparsity
    "A100 40GB": Card(40, 312e12, 312e12, ("a100", "40gb")),  # A100 datasheet: BF16 312
    "A100 80GB": Card(80, 312e12, 312e12, ("a100", "80gb")),  # (624 with sparsity)
    "H100": Card(80, 989e12, 989e12, ("h100",)),  # H100 SXM datasheet: 1,979 with sparsity
    "H100 PCIe": Card(80, 756e12, 756e12, ("h100", "pcie")),  # H100 PCIe: 1,513 with sparsity
    "H200": Card(141, 989e12, 989e12, ("h200",)),  # H200 datasheet (SXM): as the H100 SXM
}


def card_for(gpu_name):
    """(key, Card) of CARDS for a name such as torch.cuda.get_device_name() gives
    ("NVIDIA A100-SXM4-80GB"), or (None, None). The card naming the most words wins."""
    words = re.sub(r"[^a-z0-9]+", " ", gpu_name.lower()).split()
    found = [(len(c.match), k) for k, c in CARDS.items() if all(w in words for w in c.match)]
    return (max(found)[1], CARDS[max(found)[1]]) if found else (None, None)


def hardware_name(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x{torch.get_num_threads()} threads"


def cpu_model():
    """The CPU's name and what it has for bf16 math: bf16 speedups on a CPU hinge on it
    (AMX tiles, AVX-512 BF16 instructions, or neither), so a CPU table without it cannot be
    compared with another machine's."""
    name, flags = cpu_info()
    bf16 = [f for f in CPU_BF16_FLAGS if f in flags] or ["none"]
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({isa}, bf16 ISA: {'+'.join(bf16)})"


def known_peak(device):
    """(name, FLOP/s) of the datasheet peak for this GPU (bf16, or fp16 on a card without
    bf16), or (None, None)."""
    if not str(device).startswith("cuda"):
        return None, None
    name, card = card_for(torch.cuda.get_device_name(device))
    return (name, card.bf16 or card.fp16) if card else (None, None)


def measure_peak(device, n=None, dtype=torch.bfloat16, repeats=10):
    """FLOP/s of a large square matmul on this device: an achievable ceiling for MFU."""
    n = n or (8192 if str(device).startswith("cuda") else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)  # random, never zeros
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def flops_per_token(model, seq_len):
    """Training FLOPs per token: 6N for the matmuls (forward + backward) plus attention
    12 * L * H * Q * T, with N the parameters without the position embeddings."""
    c = model.config
    n = model.num_params(exclude_embeddings=True)
    return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len


# stage 05's table: each speedup switched on in turn, on top of the ones before it
ROWS = ("fp32", "tf32", "bf16", "fp16", "flash", "vocab", "compile")
ROUNDS = 3  # timed rounds; every round times every row once, in turn
WARMUP = 3  # untimed steps per row first (compilation happens here)


def table_rows(device, dtype="bfloat16"):
    """The table's rows here: one half-precision row, fp16 where bf16 is not there (T4, V100)
    or where --dtype float16 asks for it."""
    no_bf16 = str(device).startswith("cuda") and not torch.cuda.is_bf16_supported()
    half = "fp16" if dtype == "float16" or no_bf16 else "bf16"
    return [r for r in ROWS if r not in ("bf16", "fp16") or r == half]


def check_row(name):
    """--benchmark: all, none, or one row's name."""
    if name not in ("all", "none", *ROWS):
        raise UserError(
            f"unknown --benchmark '{name}': choose all, none or one row: {', '.join(ROWS)}"
        )


def unavailable(row, device):
    """Why a row cannot apply on this device, or None."""
    cuda = str(device).startswith("cuda")
    if row == "tf32" and not cuda:
        return "TF32 is a CUDA tensor-core mode; CPU fp32 matmuls do not change"
    if row == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 (needs Ampere / sm_80 or newer): see the fp16 row"
    if row == "bf16" and str(device) == "cpu" and cpu_has_bf16() is False:
        return "this CPU has no bf16 instructions (AVX512_BF16, AMX): autocast would emulate it"
    if row == "compile" and device == "mps":
        return "torch.compile does not support MPS well yet"
    return None


class Row:
    """One configuration of the table: a fresh model with every speedup up to `row` on (the
    same switches stage 05 writes out), its optimizer, and one training step."""

    def __init__(self, name, on, preset, seed, device, lr=3e-4):
        self.name, self.device = name, device
        self.precision = "high" if "tf32" in on else "highest"  # tf32
        half = torch.bfloat16 if "bf16" in on else torch.float16 if "fp16" in on else None
        self.autocast = torch.autocast(  # bf16 / fp16
            str(device).split(":")[0], dtype=half or torch.float32, enabled=half is not None
        )
        self.scaler = torch.amp.GradScaler(str(device).split(":")[0], enabled=half == torch.float16)
        config = preset_config(
            preset,
            tie_weights=True,
            gpt2_init=True,
            attn="sdpa" if "flash" in on else "manual",  # flash
            vocab_size=50304 if "vocab" in on else GPT2_VOCAB,  # vocab
        )
        torch.manual_seed(seed)
        self.raw_model = GPT(config).to(device)
        self.model = torch.compile(self.raw_model) if "compile" in on else self.raw_model
        self.optimizer = torch.optim.AdamW(self.raw_model.parameters(), lr=lr)
        self.times, self.peak_mb = [], None

    def step(self, x, y):
        """One training step, as stage 05's loop takes it; returns the loss (a tensor)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            _, loss = self.model(x, y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def run(self, x, y, n, timed=True):
        """n steps; timed ones append their seconds (synchronized clocks) to self.times."""
        torch.set_float32_matmul_precision(self.precision)  # a global switch: set per row
        cuda = str(self.device).startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        for _ in range(n):
            synchronize(self.device)
            t0 = time.perf_counter()
            self.step(x, y)
            synchronize(self.device)
            if timed:
                self.times.append(time.perf_counter() - t0)
        if cuda and timed:  # this row's own memory: other rows' models are resident too
            own = sum(t.numel() * t.element_size() for t in self.resident())
            peak = torch.cuda.max_memory_allocated(self.device) - before + own
            self.peak_mb = max(self.peak_mb or 0, peak / 2**20)

    def resident(self):
        yield from self.raw_model.parameters()
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def speedup_table(cfg, device):
    """Stage 05's table on one random (B, T) batch. Rows are built once (compilation and
    warm-up untimed), then timed in ROUNDS interleaved rounds of cfg.timed // ROUNDS steps,
    so no row pays a warm-up or a slow moment of the machine that the others do not;
    each row reports the median step. --compare-hf adds transformers' GPT-2 with the last
    row's settings."""
    check_row(cfg.benchmark)
    if cfg.benchmark == "none":
        return None
    only = "" if cfg.benchmark == "all" else cfg.benchmark
    ladder = table_rows(device, getattr(cfg, "dtype", "bfloat16"))
    if only and only not in ladder:  # e.g. fp16 alone where the table has bf16
        ladder = [only if r in ("bf16", "fp16") else r for r in ladder]
    names = [only] if only else ladder
    if only and (reason := unavailable(only, device)):
        raise UserError(f"--benchmark {only} does not apply here: {reason}")
    g = torch.Generator().manual_seed(cfg.seed)
    xy = torch.randint(0, 50000, (cfg.batch_size, cfg.seq_len + 1), generator=g).to(device)
    x, y = xy[:, :-1], xy[:, 1:]
    half = not unavailable("bf16", device)  # bf16 matmuls, unless this CPU would emulate them
    measured = measure_peak(device, dtype=torch.bfloat16 if half else torch.float32)
    peak_name, peak = known_peak(device)  # the datasheet's, for a GPU we know
    if peak is None:
        peak_name, peak = f"measured {'bf16' if half else 'fp32'} matmul", measured
    rows, runs = [], []
    for name in names:
        if reason := unavailable(name, device):
            rows.append(dict(name=name, status="n/a", reason=reason))
            continue
        on = [r for r in ladder[: ladder.index(name) + 1] if not unavailable(r, device)]
        runs.append(Row(name, on, cfg.preset, cfg.seed, device))
        rows.append(dict(name=name, status="ok"))
    if cfg.compare_hf and runs:  # transformers' GPT-2 with the last row's settings
        last = runs[-1]
        hf = Row("hf " + last.name, [], cfg.preset, cfg.seed, device)
        hf.precision, hf.autocast, hf.scaler = last.precision, last.autocast, last.scaler
        hf.raw_model = HFTwin(last.raw_model.config).to(device)
        hf.model = torch.compile(hf.raw_model) if last.model is not last.raw_model else hf.raw_model
        hf.optimizer = torch.optim.AdamW(hf.raw_model.parameters(), lr=3e-4)
        runs.append(hf)
        rows.append(dict(name=hf.name, status="ok"))
    for run in runs:  # compilation and warm-up, untimed
        run.run(x, y, WARMUP, timed=False)
    for _ in range(ROUNDS):
        for run in runs:
            run.run(x, y, max(1, cfg.timed // ROUNDS))
    by_name = {run.name: run for run in runs}
    for r in rows:
        if r["status"] == "ok":
            dt = statistics.median(by_name[r["name"]].times)
            r.update(ms=dt * 1000, tokens_per_s=x.numel() / dt, peak_mb=by_name[r["name"]].peak_mb)
    add_ratios(rows, flops_per_token(runs[0].raw_model, cfg.seq_len) if runs else 0, peak)
    timed = ROUNDS * max(1, cfg.timed // ROUNDS)
    print(
        f"benchmark: {hardware_name(device)}, torch {torch.__version__}, B={cfg.batch_size}, "
        f"T={cfg.seq_len}, preset {cfg.preset}; median of {timed} steps in {ROUNDS} interleaved "
        f"rounds after {WARMUP} warm-up; MFU vs {peak_name} ({peak / 1e12:.3g} TFLOP/s)"
    )
    print(format_table(rows))
    result = dict(
        hardware=hardware_name(device),
        torch=torch.__version__,
        device=str(device),
        peak=peak,
        peak_name=peak_name,
        measured_peak=measured,
        config=asdict(cfg),
        rows=rows,
    )
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def add_ratios(rows, flops_per_token, peak):
    """Speedups vs the first row and the previous row of ours, MFU when a peak is known;
    an `hf ROW` row gets `ours_over_hf` against our row of the same name."""
    ours = {r["name"]: r for r in rows if r["status"] == "ok" and not r["name"].startswith("hf ")}
    base, prev = None, None
    for r in rows:
        if r["status"] != "ok":
            continue
        tps = r["tokens_per_s"]
        r["mfu"] = flops_per_token * tps / peak if peak else None
        if r["name"].startswith("hf "):
            r["vs_base"], r["vs_prev"] = tps / base, None
            r["ours_over_hf"] = ours[r["name"][3:]]["tokens_per_s"] / tps
            continue
        base = base or tps
        r["vs_base"], r["vs_prev"] = tps / base, (tps / prev if prev else None)
        prev = tps


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def format_table(rows):
    """The speedup table: one line per configuration; n/a rows say why."""
    head = f"{'row':<12} {'ms/step':>9} {'tok/s':>11} {'vs base':>8} {'vs prev':>8} "
    head += f"{'MFU':>7} {'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<12} n/a: {r['reason']}")
            continue
        lines.append(
            f"{r['name']:<12} {r['ms']:>9.1f} {r['tokens_per_s']:>11,.0f} "
            f"{fmt(r['vs_base'], '.2f', '-'):>7}x "
            f"{fmt(r['vs_prev'], '.2f', '-'):>7}{'x' if r['vs_prev'] else ' '} "
            f"{fmt(r['mfu'], '.1%'):>7} {fmt(r['peak_mb'], ',.0f'):>9}"
        )
        if "ours_over_hf" in r:
            lines.append(
                f"ours / transformers ({r['name'][3:]}): {r['ours_over_hf']:.2f}x tokens/s"
            )
    return "\n".join(lines)


class HFTwin(torch.nn.Module):
    """transformers' GPT2LMHeadModel built to our config, with our (logits, loss) interface,
    so one timing loop measures both. Its attention is SDPA, its init HF's own."""

    def __init__(self, config):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            tie_word_embeddings=True,
        )
        self.hf = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
        self.config = config

    def forward(self, idx, targets=None):
        logits = self.hf(idx).logits
        loss = None
        if targets is not None:  # the same loss as ours: no shifting, targets given
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
            )
        return logits, loss
