"""Stage 04: weight tying and GPT-2's initialization.

Two details from the GPT-2 paper and code. Weight tying: the token embedding (wte) and the
output layer (lm_head) are one matrix, so a token's input vector is also the direction that
predicts it; it saves vocab_size x n_embd parameters (38.6M of GPT-2's 163M). GPT-2 init:
weights N(0, 0.02), biases zero, and the projections that write into the residual stream
scaled by (2 * n_layer) ** -0.5 so its variance does not grow with depth. The loss at init
then sits right at ln(vocab_size) ~ 10.82, and the first steps are not spent undoing a bad
start.

Run on CPU (tiny preset, ~15 s):   python 04_best_practices.py
Run at the real size on a GPU:     python 04_best_practices.py --preset gpt2
"""

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from common.cli import parse_args
from common.data import TextLoader, get_tokenizer, load_text
from common.model import GPT, preset_config
from common.train import pick_device, seed_all, step_line, synchronize


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

    model = GPT(preset_config(cfg.preset, tie_weights=True, gpt2_init=True)).to(device)
    with torch.device("meta"):  # shapes only, no memory: what the count was without tying
        untied = GPT(preset_config(cfg.preset)).num_params()
    print(f"parameters: {model.num_params():,} tied vs {untied:,} untied "
          f"(saved {untied - model.num_params():,} = vocab_size x n_embd)")  # fmt: skip
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
        f"loss at init {losses[0]:.4f} vs ln(vocab_size) = {math.log(model.config.vocab_size):.4f}"
    )
    print(
        f"summary: {cfg.steps} batches of {B}x{T} tokens: loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(
        losses=losses, final_loss=losses[-1], params=model.num_params(), params_untied=untied
    )


if __name__ == "__main__":
    main(parse_args(Config))
