"""Save a transformers GPT-2 of a preset's sizes with random weights: a stand-in for OpenAI's
weights on a machine that cannot download them (offline, CI), for stages 01 and 08.

    python -m common.random_model gpt2-random --preset tiny      # 4 layers, 128 wide: 7M
    python 01_hf_eval.py --model gpt2-random                      # parity holds, text is noise
    python 08_hellaswag.py --model gpt2-random --data tests/data/hellaswag_fixture.jsonl

The weights are transformers' own init from `--seed`: the same seed writes the same model.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from common.cli import parse_args
from common.model import PRESETS, preset_config


@dataclass
class Config:
    out: str = "gpt2-random"  # directory to write (also the first bare argument)
    preset: str = "tiny"  # sizes: tiny, gpt2, gpt2-medium, gpt2-large or gpt2-xl
    seed: int = 0  # same seed, same weights


def main(cfg):
    c = preset_config(cfg.preset)  # an unknown name: one line listing PRESETS, before imports
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    hf_config = GPT2Config(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        n_positions=c.block_size,
        vocab_size=c.vocab_size,
    )
    model = GPT2LMHeadModel(hf_config)
    model.save_pretrained(cfg.out)
    params = sum(p.numel() for p in model.parameters())  # lm_head is tied to wte: counted once
    print(
        f"wrote {cfg.out}: GPT2LMHeadModel, preset {cfg.preset} ({PRESETS[cfg.preset]}), "
        f"{params:,} parameters, random weights (seed {cfg.seed})"
    )
    return dict(out=str(Path(cfg.out)), params=params, config=hf_config.to_dict())


def cli_argv(argv):
    """Allow `python -m common.random_model DIR`: a leading bare argument means --out."""
    return ["--out", *argv] if argv and not argv[0].startswith("-") else list(argv)


if __name__ == "__main__":
    main(parse_args(Config, cli_argv(sys.argv[1:])))
