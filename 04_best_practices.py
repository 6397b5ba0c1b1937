"""Stage 04: weight tying and GPT-2's initialization, from the GPT-2 paper and code.

Tying: the token embedding (wte) and the output layer (lm_head) become one matrix, saving
vocab_size x n_embd parameters (38.6M of GPT-2's 163M). Init: N(0, 0.02), residual projections
scaled down; step 0's loss then sits at ln(vocab_size) ~ 10.82, a uniform guess.

Run: python 04_best_practices.py   (no GPU: tiny preset, ~15 s; a GPU or --preset gpt2: real size)
"""

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from common.cli import parse_args
from common.data import TextLoader, get_tokenizer, load_text
from common.model import GPT, preset_config
from common.device import pick_device, synchronize
from common.train import seed_all, step_line


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    batch_size: int = 16  # sequences per step
    seq_len: int = 1024  # tokens per sequence
    steps: int = 50  # optimizer steps
    lr: float = 3e-4  # AdamW learning rate
    seed: int = 1337  # same seed, same weights, same run
    cpu: ClassVar[dict] = dict(preset="tiny", batch_size=8, seq_len=64, steps=50, lr=1e-3)


def gpt2_init(module, n_layer):
    """N(0, 0.02) weights, zero biases; each block adds two projections (RESIDUAL_SCALE) to
    the residual stream, so theirs are scaled by (2 * n_layer) ** -0.5 to keep its variance."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        scale = (2 * n_layer) ** -0.5 if getattr(module, "RESIDUAL_SCALE", False) else 1.0
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02 * scale)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len

    # data: the whole text tokenized once, served as consecutive (B, T) batches
    loader = TextLoader(enc.encode_ordinary(load_text(cfg.input)), B, T)
    print(
        f"loaded {len(loader.tokens):,} tokens: 1 epoch = {len(loader.tokens) // (B * T)} batches"
    )

    model = GPT(preset_config(cfg.preset)).to(device)
    model.transformer.wte.weight = model.lm_head.weight  # tying: one matrix, tokens in and out
    model.apply(lambda module: gpt2_init(module, model.config.n_layer))
    print(f"parameters: {model.num_params():,} (tying saved {model.lm_head.weight.numel():,})")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    losses = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        print(step_line(step, losses[-1], dt=dt, tokens_per_s=B * T / dt))

    print(
        f"summary: {cfg.steps} batches of {B}x{T} tokens: loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(losses=losses, final_loss=losses[-1])


if __name__ == "__main__":
    main(parse_args(Config))
