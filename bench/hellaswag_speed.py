"""HellaSwag scoring speed: batched (many examples per forward pass) vs one example at a time.

The same model and the same synthetic examples (HellaSwag-like lengths: a 20-70 word context,
four 5-25 word endings, seeded) are scored by each method: evaluate() at each batch size
(batch size 1 is the one-example-at-a-time method), and batch size 1 with every logit computed
(a plain idx -> logits callable: no lm_head to limit to the scored positions). One untimed
warm-up pass each, then --repeats timed passes interleaved across the methods, so a busy
machine slows them alike; the median and the best are reported. The predictions must be the
same with every method: the script checks.

With --data, the examples of a HellaSwag jsonl file instead, repeated (in order) to
--examples rows; --protocol picks the scoring (nanogpt, lm-eval, or both: each method timed
once per protocol).

CPU (tiny preset, random init): python bench/hellaswag_speed.py
GPU (GPT-2 124M sizes, bf16):   python bench/hellaswag_speed.py --preset gpt2 --batch-sizes 1,16,64
GPU, real rows, both protocols: python bench/hellaswag_speed.py --preset gpt2 --batch-sizes 1,32 \\
    --data tests/data/hellaswag_fixture.jsonl --examples 2000 --protocol both
"""

import platform
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from common.cli import parse_args
from common.hellaswag import evaluate, protocols, read_examples
from common.model import GPT, preset_config
from common.device import pick_device
from common.train import seed_all

WORDS = (
    "the a man woman child dog ball kitchen table water slowly quickly then after he she they "
    "runs picks up puts down opens closes looks at walks toward holds pours cuts paints large "
    "small red blue old new house car garden window door floor wall chair cup knife bread"
).split()


def synthetic_examples(n, seed):
    """n examples in HellaSwag's schema, random words at HellaSwag-like lengths."""
    rng = random.Random(seed)
    words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return [
        dict(ctx=words(20, 70), endings=[words(5, 25) for _ in range(4)], label=rng.randrange(4))
        for _ in range(n)
    ]


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "tiny"  # model size (random weights): tiny, gpt2, ...
    examples: int = 192  # examples to score
    data: str = ""  # a HellaSwag jsonl, repeated to --examples rows (default: synthetic rows)
    protocol: str = "nanogpt"  # nanogpt, lm-eval, or both
    batch_sizes: str = "1,8,32"  # examples per forward pass, comma separated; 1 = one at a time
    repeats: int = 5  # timed passes per method
    threads: int = 0  # torch CPU threads (0: torch's default)
    seed: int = 1337  # same seed, same model, same examples


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = GPT(preset_config(cfg.preset, tie_weights=True, gpt2_init=True)).to(device)
    if cfg.data:  # real rows, in order, as many times over as it takes
        rows = read_examples(cfg.data)
        examples = [rows[i % len(rows)] for i in range(cfg.examples)]
    else:
        examples = synthetic_examples(cfg.examples, cfg.seed)
    amp = torch.bfloat16 if device.startswith("cuda") else None  # fp32 on CPU
    print(
        f"torch {torch.__version__} | {platform.processor() or platform.machine()} | "
        f"{torch.get_num_threads()} threads | device {device} | preset {cfg.preset} | "
        f"{len(examples)} examples"
    )
    # the methods: one example at a time with every logit computed (a plain callable: no
    # lm_head to hook), then evaluate() as it is at each batch size; each once per protocol
    methods = {"batch size   1, all logits": (lambda idx: model(idx)[0], 1)}
    for bs in [int(s) for s in cfg.batch_sizes.split(",")]:
        methods[f"batch size {bs:3d}"] = (model, bs)
    methods = {f"{k}, {p}": (*m, p) for p in protocols(cfg.protocol) for k, m in methods.items()}
    score = lambda m, bs, protocol: evaluate(
        m, examples, device, batch_size=bs, autocast_dtype=amp, details=True, protocol=protocol
    )
    preds = {k: score(*m)["pred_norm"] for k, m in methods.items()}  # warm-up, untimed
    rates = {k: [] for k in methods}
    for _ in range(cfg.repeats):  # interleaved: a busy machine slows every method alike
        for k, m in methods.items():
            rates[k].append(score(*m)["examples_per_s"])
    results = {k: statistics.median(r) for k, r in rates.items()}
    for k, r in rates.items():
        print(
            f"{k:<36} {results[k]:7.1f} examples/s median, {max(r):7.1f} best "
            f"({', '.join(f'{x:.1f}' for x in r)})"
        )
    same = True
    for p in protocols(cfg.protocol):  # the same predictions with every method of a protocol
        one = preds[f"batch size   1, {p}"]
        same &= all(v == one for k, v in preds.items() if k.endswith(f", {p}"))
        best = max((k for k in results if k.endswith(f", {p}")), key=results.get)
        gain = results[best] / results[f"batch size   1, {p}"]
        method = " ".join(best.rsplit(", ", 1)[0].split())
        print(f"summary ({p}): {method} scores {gain:.2f}x the examples/s of batch size 1")
    print(f"same predictions with every method: {same}")
    return dict(examples_per_s=results, same_predictions=same)


if __name__ == "__main__":
    main(parse_args(Config))
