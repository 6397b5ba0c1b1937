"""Generation speed: our KV cache vs no cache vs transformers' generate, on the same weights.

A random model (no download) of a preset's size; batch B, a short prompt, N new tokens,
greedy so that all three produce the same tokens (checked and printed). Each variant warms
up on 8 tokens, then runs --repeats times; the median wall time gives tokens/s (B * N / t).
On a busy machine use --threads 1: idle OpenMP threads that wait for a core cost
milliseconds per op.

    python bench/generate_speed.py                                   # tiny preset, CPU
    python bench/generate_speed.py --preset gpt2 --repeats 1         # 124M on CPU (minutes)
    python bench/generate_speed.py --device cuda --preset gpt2 --dtype bfloat16 --json gen.json
"""

import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from common.cli import parse_args
from common.export import to_hf
from common.generate import generate
from common.model import GPT, GPT2_VOCAB, preset_config
from common.device import pick_device, synchronize


@dataclass
class Config:
    device: str = "cpu"  # cpu, cuda, cuda:N, mps, auto
    preset: str = "tiny"  # model size: tiny, gpt2, ... (random weights)
    block_size: int = 512  # context length of the model (prompt + new tokens must fit)
    batch_size: int = 1  # sequences generated together
    prompt_len: int = 16  # prompt tokens
    new_tokens: int = 256  # tokens generated per sequence
    repeats: int = 3  # timed runs per variant (median reported)
    dtype: str = "float32"  # float32, or bfloat16 (autocast, as the sampling CLI on CUDA)
    attn: str = "sdpa"  # attention implementation: manual or sdpa
    uncached: bool = True  # also time our generate without the KV cache
    hf: bool = True  # also time transformers' generate (use_cache=True)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    seed: int = 0  # weights and prompt
    json: str = ""  # write the results to this JSON file


def timed(fn, n, device, repeats):
    """Warm up with a short run, then the median of `repeats` timed calls of fn(n) (n new
    tokens); returns (seconds, last output)."""
    fn(min(n, 8))
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn(n)
        synchronize(device)  # queued GPU work counts: wait before reading the clock
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(cfg):
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    config = preset_config(
        cfg.preset, block_size=cfg.block_size, tie_weights=True, gpt2_init=True, attn=cfg.attn
    )
    model = GPT(config).to(device).eval()
    hf = to_hf(model).to(device) if cfg.hf else None
    B, N = cfg.batch_size, cfg.new_tokens
    prompt = torch.randint(0, GPT2_VOCAB, (B, cfg.prompt_len), device=device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    amp = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else None
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else platform.processor()
    env = f"torch {torch.__version__}, {device} ({name or platform.machine()}), "
    env += f"{torch.get_num_threads()} threads, {cfg.dtype}"
    print(
        f"{cfg.preset} ({model.num_params():,} params, block {cfg.block_size}, {cfg.attn}); "
        f"batch {B}, prompt {cfg.prompt_len}, {N} new tokens, greedy; {env}"
    )

    variants = {"ours, KV cache": lambda n: generate(model, prompt, n, temperature=0)}
    if cfg.uncached:
        variants["ours, no cache"] = lambda n: generate(
            model, prompt, n, temperature=0, use_cache=False
        )
    if hf is not None:  # min_new_tokens: a random model may say <|endoftext|>; never stop early
        variants["transformers generate"] = lambda n: hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    results, outputs = {}, {}
    with torch.no_grad(), amp or nullcontext():
        for name, fn in variants.items():
            t, outputs[name] = timed(fn, N, device, cfg.repeats)
            results[name] = dict(seconds=t, tokens_per_s=B * N / t, ms_per_token=1000 * t / N)
    ref = outputs["ours, KV cache"]
    for name, r in results.items():
        same = torch.equal(outputs[name].cpu(), ref.cpu())
        r["same_tokens_as_kv_cache"] = same
        print(
            f"{name:24s} {r['tokens_per_s']:10,.1f} tok/s  {r['ms_per_token']:8.2f} ms/token"
            f"  {r['seconds']:7.2f}s  same tokens: {same}"
        )
    fast = results["ours, KV cache"]["tokens_per_s"]
    for name in results:
        if name != "ours, KV cache":
            print(f"KV cache vs {name}: {fast / results[name]['tokens_per_s']:.2f}x")
    if cfg.json:
        record = dict(config=asdict(cfg), env=env, params=model.num_params(), results=results)
        Path(cfg.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {cfg.json}")
    return results


if __name__ == "__main__":
    main(parse_args(Config))
