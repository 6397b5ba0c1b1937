"""The planner's memory estimate against a real training step, on this CPU, in fp32.

For each configuration: the model stage 07 trains (tied, vocabulary 50304), AdamW, two
micro-steps per optimizer step (so the gradients are alive through the second forward, as
with any accumulation); one step to create the AdamW moments, then the next step's peak,
measured with the profiler's allocation events (common.plan.profiled_peak), against
common.plan.estimate. Writes a markdown table (and --json).

    python bench/plan_memory.py --json /tmp/plan_memory.json      # ~3 min on 2 cores
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from common import plan
from common.cli import parse_args
from common.model import GPT, GPTConfig
from common.train import make_optimizer

# (name, model, T): the tiny preset at 07's CPU length, and a small 6-layer model
CONFIGS = [
    ("tiny", GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=50304), 64),
    ("small", GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304), 128),
]


@dataclass
class Config:
    batch_sizes: str = "2,8,32"  # micro-batch sizes
    configs: str = "tiny,small"  # which of CONFIGS
    json: str = ""  # also write the rows here


def measure(config, B, T, accum=2):
    """Peak bytes of one optimizer step (accum micro-steps, AdamW) after a first one."""
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = make_optimizer(model, 0.1, 1e-4, "cpu")
    x = torch.randint(0, 50257, (B, T))

    def step():
        for _ in range(accum):
            logits, loss = model(x, x)  # held until the next micro-step, as in the stages
            (loss / accum).backward()
        optimizer.step()

    step()  # the AdamW moments now exist
    # zero_grad (set_to_none) before the profiler starts: it records no free of a block
    # allocated before it, so a free inside would be missed and the gradients counted twice
    optimizer.zero_grad()
    state = [v for s in optimizer.state.values() for v in s.values()]
    resident = plan.live_bytes([*model.parameters(), *state])  # what is live before the step
    return plan.profiled_peak(step, resident)


def main(cfg):
    rows = []
    sizes = [int(b) for b in cfg.batch_sizes.split(",")]
    for name, base, T in CONFIGS:
        if name not in cfg.configs.split(","):
            continue
        for attn in ("manual", "sdpa"):
            config = GPTConfig(**{**base.__dict__, "attn": attn, "tie_weights": True})
            for B in sizes:
                est = plan.estimate(config, B, T, dtype="float32", attn=attn)
                got = measure(config, B, T)
                row = dict(
                    config=name,
                    attn=attn,
                    B=B,
                    T=T,
                    estimate_mib=est["peak"] / 2**20,
                    measured_mib=got / 2**20,
                    error=est["peak"] / got - 1,
                    terms={k: v / 2**20 for k, v in est.items()},
                )
                rows.append(row)
                print(
                    f"| {name} (L={config.n_layer}, h={config.n_embd}), T={T} | {attn} | {B} | "
                    f"{row['estimate_mib']:,.0f} | {row['measured_mib']:,.0f} | "
                    f"{100 * row['error']:+.1f}% |",
                    flush=True,
                )
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    print("| config | attention | B | estimate MiB | measured MiB | estimate error |")
    print("|---|---|---|---|---|---|")
    main(parse_args(Config))
