"""Measuring training speed honestly: timing, FLOPs, MFU, peaks, hardware, and the table.

Rules (after modded-nanogpt): warm up (and compile) outside the timed region, synchronize
before reading the clock, take the median of many steps, use the same batch for every
configuration, and print the hardware and torch version next to the numbers.
"""

import platform
import statistics
import time

import torch

from common.train import synchronize

# bf16 dense tensor-core peaks from the vendors' datasheets (FLOP/s), matched by GPU name.
# MFU is only reported against the peak of the GPU actually present, or a measured one.
PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower, see "H100 PCIe" below (checked first)
    "H100 PCIe": 756e12,
    "A100": 312e12,
}


def hardware_name(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def known_peak(device):
    """(name, FLOP/s) of the datasheet bf16 peak for this GPU, or (None, None)."""
    if not str(device).startswith("cuda"):
        return None, None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # most specific first
        if key in name:
            return key, PEAK_BF16[key]
    return None, None


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


def time_steps(step, device, warmup, timed):
    """Median seconds of `step()` over `timed` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(timed):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_train_step(model, net, autocast, x, y, warmup, timed, lr=3e-4):
    """One AdamW training step of `net` (model, or its compiled form) on the batch (x, y):
    median ms, tokens/s and peak GPU memory (None off CUDA: no per-run counter there)."""
    device = x.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            _, loss = net(x, y)
        loss.backward()
        optimizer.step()

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dt = time_steps(step, str(device), warmup, timed)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return dict(status="ok", ms=dt * 1000, tokens_per_s=x.numel() / dt, peak_mb=peak_mb)


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
    head = f"{'row':<12} {'ms/step':>9} {'tok/s':>11} {'vs base':>8} {'vs prev':>8} {'MFU':>7} {'peak MB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<12} n/a: {r['reason']}")
            continue
        lines.append(
            f"{r['name']:<12} {r['ms']:>9.1f} {r['tokens_per_s']:>11,.0f} "
            f"{fmt(r['vs_base'], '.2f', '-'):>7}x {fmt(r['vs_prev'], '.2f', '-'):>7}{'x' if r['vs_prev'] else ' '} "
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
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, tie_word_embeddings=True,
        )  # fmt: skip
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
