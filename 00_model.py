"""Stage 00: the GPT-2 model, taken apart before any training.

What it shows:
  1. where GPT-2's parameters live (a table by component; 124M for the real preset),
  2. the loss at initialization next to ln(vocab_size), the loss of a uniform guess,
  3. causality: changing a later token leaves every earlier position's logits unchanged,
  4. what an untrained model writes (noise: sampling works, knowledge comes from training).

Run on CPU (tiny preset, a few seconds):   python 00_model.py
Run at the real size (GPU or patient CPU): python 00_model.py --preset gpt2
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from common.cli import parse_args
from common.data import get_tokenizer
from common.generate import generate
from common.model import GPT, preset_config
from common.device import pick_device
from common.train import seed_all


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    batch_size: int = 4  # random sequences used to measure the loss at init
    seq_len: int = 64  # tokens per sequence
    new_tokens: int = 12  # tokens to sample from the untrained model
    seed: int = 1337  # same seed, same weights, same samples
    cpu: ClassVar[dict] = dict(preset="tiny")


def param_table(model):
    """Parameters by component: embeddings, one row per kind of layer summed over blocks."""
    rows = {}
    for name, p in model.named_parameters():  # a tied matrix appears once
        key = name.replace("transformer.", "")
        if key.startswith("h."):
            key = "blocks." + key.split(".", 2)[2].rsplit(".", 1)[0]  # h.3.attn.c_attn.weight
        else:
            key = key.rsplit(".", 1)[0]
        rows[key] = rows.get(key, 0) + p.numel()
    return rows


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    config = preset_config(cfg.preset)
    model = GPT(config).to(device)
    model.eval()

    # 1. where the parameters are
    table = param_table(model)
    total = model.num_params()
    print(
        f"model: preset {cfg.preset}, {config.n_layer} layers, {config.n_head} heads, "
        f"n_embd {config.n_embd}, block_size {config.block_size}, on {device}"
    )
    print(f"{'component':<24} {'parameters':>14} {'share':>7}")
    for name, n in table.items():
        print(f"{name:<24} {n:>14,} {n / total:>7.1%}")
    print(f"{'total':<24} {total:>14,}")

    # 2. loss at init: random weights give near-uniform predictions, loss ~ ln(vocab_size)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(0, config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=g)
    x = x.to(device)
    with torch.no_grad():
        _, loss = model(x[:, :-1], x[:, 1:])
    ln_vocab = math.log(config.vocab_size)
    uniform = f"ln(vocab_size) = ln({config.vocab_size}) = {ln_vocab:.4f}"
    print(f"loss at init {loss.item():.4f} vs {uniform}")

    # 3. causality: change the tokens from position t on; logits before t must not move
    t = cfg.seq_len // 2
    a = x[:1, : cfg.seq_len]
    b = a.clone()
    b[0, t:] = (b[0, t:] + 1) % config.vocab_size
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    before = (la[0, :t] - lb[0, :t]).abs().max().item()
    after = (la[0, t:] - lb[0, t:]).abs().max().item()
    print(
        f"causality: changed tokens {t}..{cfg.seq_len - 1}; max |logit change| at "
        f"positions < {t}: {before:.2e}, at positions >= {t}: {after:.2e}"
    )

    # 4. sampling from an untrained model: valid tokens, no meaning yet
    prompt = torch.tensor([enc.encode("Hello, I'm a language model,")], device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = generate(model, prompt, cfg.new_tokens, top_k=50, generator=gen)
    sample = enc.decode(out[0].tolist())
    print(f"untrained sample: {sample!r}")

    print(
        f"summary: {total:,} parameters; loss at init {loss.item():.3f} "
        f"(uniform guess {ln_vocab:.3f}); causal: {before == 0.0}"
    )
    return dict(
        params=total,
        table=table,
        loss_init=loss.item(),
        ln_vocab=ln_vocab,
        causal_before=before,
        causal_after=after,
        sample=sample,
    )


if __name__ == "__main__":
    main(parse_args(Config))
