"""Stage 08: HellaSwag, the benchmark that says whether a model reached GPT-2's quality.

Each of HellaSwag's 10,042 validation examples is a context and four endings, one of them
right. A base model cannot read four options and answer "B", so each ending is scored as a
completion: the cross-entropy of its tokens after the context. acc picks the ending with the
lowest summed loss, acc_norm the lowest loss normalized for length. Two protocols do this
differently and publish different numbers for the same model, so both are scored, each next
to its own published figure (random guessing: 0.25):
    nanogpt  build-nanogpt / llm.c: raw context, loss per ending token. GPT-2 124M: acc_norm 0.2955
    lm-eval  lm-evaluation-harness (the leaderboards): cleaned text, loss per character of the
             ending. GPT-2 124M: acc 0.2892, acc_norm 0.3114
Many examples go through one forward pass, and under torchrun each process scores its share
and the counts are summed. --compare-hf scores the same examples with transformers'
GPT2LMHeadModel on the same weights: the two must pick the same endings, example by example.

On a GPU the model runs in bf16 autocast; on CPU, and with --compare-hf, in fp32.

python 08_hellaswag.py --model path/to/hf_dir     # CPU: first 50 examples, ~20 s at GPT-2 size
python 08_hellaswag.py --model gpt2               # OpenAI's GPT-2 on a GPU: all 10,042
python 08_hellaswag.py --model gpt2 --protocol lm-eval    # only lm-evaluation-harness's number
python 08_hellaswag.py --ckpt out/ckpt_019073.pt  # our checkpoint from stage 07
python 08_hellaswag.py --ckpt out --compare-hf    # the newest one, checked against transformers
torchrun --standalone --nproc_per_node=8 08_hellaswag.py --ckpt out                 # 8 GPUs
torchrun --standalone --nproc_per_node=2 08_hellaswag.py --device cpu --model DIR  # CPU, gloo
"""

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from common.checkpoint import model_from_checkpoint
from common.cli import parse_args
from common.export import to_hf
from common.hellaswag import (
    CHOICES,
    PUBLISHED,
    all_reduce,
    evaluate,
    evaluate_protocols,
    key,
    labelled,
    load_examples,
    protocols,
)
from common.hf import from_pretrained
from common.distributed import ddp_exit, print0, setup_ddp
from common.train import seed_all


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    model: str = "gpt2"  # hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local directory
    ckpt: str = ""  # our checkpoint file, or a directory (its newest); used instead of --model
    split: str = "val"  # val (10,042 examples) or train; test has no labels
    data: str = ""  # a local HellaSwag jsonl file instead of downloading the split
    limit: int = 0  # score only the first N examples (0: all)
    protocol: str = "both"  # nanogpt (build-nanogpt, llm.c), lm-eval (lm-evaluation-harness), both
    batch_size: int = 16  # examples per forward pass (4 rows each); 4-16 is fastest on CPU
    compare_hf: bool = False  # also score with transformers' GPT2LMHeadModel and compare
    json: str = ""  # also write the results to this JSON file
    seed: int = 1337  # the scoring is deterministic; the flag every stage has
    cpu: ClassVar[dict] = dict(limit=50, batch_size=8)
    rules: ClassVar[dict] = dict(protocol=CHOICES)


def hf_twin(cfg, model):
    """transformers' GPT2LMHeadModel with the same weights as `model`."""
    from transformers import GPT2LMHeadModel

    if not cfg.ckpt:
        return GPT2LMHeadModel.from_pretrained(cfg.model)
    return to_hf(model)  # our checkpoint, converted as `python -m common.export` does


def main(cfg):
    ddp = setup_ddp(cfg.device)  # one process, or one of torchrun's (stage 07)
    try:
        seed_all(cfg.seed)
        names = protocols(cfg.protocol)
        examples = load_examples(cfg.split, cfg.data or None, cfg.limit)
        if cfg.ckpt:
            model, ckpt = model_from_checkpoint(cfg.ckpt, ddp.device)
            name = f"{cfg.ckpt} (step {ckpt['step']})"
        else:
            model, name = from_pretrained(cfg.model).to(ddp.device), cfg.model
        # bf16 on a GPU for speed; fp32 on CPU, and for --compare-hf (bf16 rounding flips near-ties)
        cuda = ddp.device.startswith("cuda")
        amp = torch.bfloat16 if cuda and not cfg.compare_hf else None
        source = cfg.data or f"the {cfg.split} split"
        print0(
            f"scoring {len(examples):,} HellaSwag examples from {source} with {name} on "
            f"{ddp.device} ({ddp.world_size} process{'es' if ddp.world_size > 1 else ''})"
        )

        share = dict(batch_size=cfg.batch_size, rank=ddp.rank, world_size=ddp.world_size)
        scores = evaluate_protocols(
            model,
            examples,
            ddp.device,
            cfg.protocol,
            autocast_dtype=amp,
            details=cfg.compare_hf,
            **share,
        )
        for p, res in scores.items():
            _, acc, acc_norm, src = PUBLISHED[p][0]
            print0(
                f"hellaswag {cfg.split}: {p} protocol, {res['n']:,} examples | acc "
                f"{res['acc']:.4f} | acc_norm {res['acc_norm']:.4f} | published for GPT-2 124M: "
                f"acc {acc:.4f}, acc_norm {acc_norm:.4f} ({src})"
            )
        out = labelled(scores)

        if cfg.compare_hf:
            hf = hf_twin(cfg, model).to(ddp.device)
            out.update(disagree=0, max_loss_diff=0.0)  # over all protocols
            for p, res in scores.items():
                ref = evaluate(hf, examples, ddp.device, details=True, protocol=p, **share)
                differ = [
                    (a, b) != (c, e)
                    for a, b, c, e in zip(
                        res["pred"], res["pred_norm"], ref["pred"], ref["pred_norm"]
                    )
                ]
                gap = (res["loss_avg"] - ref["loss_avg"]).abs().max().item() if differ else 0.0
                n_differ = int(all_reduce([sum(differ)], ddp.device)[0])  # over all ranks
                gap = all_reduce([gap], ddp.device, op="max")[0]
                out.update(
                    {
                        key(p, "hf_acc"): ref["acc"],
                        key(p, "hf_acc_norm"): ref["acc_norm"],
                        key(p, "disagree"): n_differ,
                    }
                )
                out["disagree"] += n_differ
                out["max_loss_diff"] = max(out["max_loss_diff"], gap)
                print0(
                    f"transformers GPT2LMHeadModel, {p} protocol: acc {ref['acc']:.4f} | "
                    f"acc_norm {ref['acc_norm']:.4f} | predictions that differ: {n_differ} of "
                    f"{res['n']:,} | max |loss difference| per ending: {gap:.2e}"
                )

        print0("published figures (all 10,042 val examples; measured elsewhere, not here):")
        for p in names:
            print0(f"  {p + ' protocol':<32} acc     acc_norm")
            for model_name, acc, acc_norm, source in PUBLISHED[p]:
                acc = f"{acc:.4f}" if acc is not None else "  -   "
                print0(f"    {model_name:<30} {acc}  {acc_norm:.4f}  ({source})")
        print0(f"  {'random guessing':<32} 0.2500  0.2500")
        got = ", ".join(
            f"{scores[p]['acc_norm']:.4f} ({p} protocol; published for GPT-2 124M: "
            f"{PUBLISHED[p][0][2]:.4f})"
            for p in names
        )
        print0(
            f"summary: HellaSwag {cfg.split} acc_norm {got} over {out['n']:,} examples "
            f"({out['examples_per_s']:.1f} examples/s)"
        )
        if cfg.json and ddp.master:
            with open(cfg.json, "w") as f:
                json.dump(dict(out, config=asdict(cfg), world_size=ddp.world_size), f, indent=1)
        return out
    finally:
        if ddp.enabled:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    with ddp_exit():  # under torchrun: ends the process group and the process on every path
        main(parse_args(Config))
