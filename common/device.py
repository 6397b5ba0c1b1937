"""Where a run computes and in what precision: the device pick (cuda > mps > cpu), waiting
for queued GPU work, the CPU's bf16 instructions, and the autocast dtype --dtype asks for."""

import platform
from pathlib import Path

import torch

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


def synchronize(device):
    """Wait for queued GPU work: CUDA runs asynchronously, so read the clock only after this."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device) == "mps":
        torch.mps.synchronize()


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
