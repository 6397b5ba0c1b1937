"""Stage 02: train from scratch, on a single batch, until the loss is near zero.

Before training on real data, prove the model can learn at all: one fixed batch of text,
AdamW, and the loss must fall from ~11 (uniform over 50,257 tokens) towards 0 as the model
memorizes it. If it cannot overfit one batch, nothing bigger will work either.

Run: python 02_overfit_batch.py   (no GPU: tiny preset, ~10 s; a GPU or --preset gpt2: real size)
"""

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from common.cli import parse_args
from common.data import get_tokenizer, load_text
from common.model import GPT, preset_config
from common.device import pick_device, synchronize
from common.train import seed_all, step_line


@dataclass
class Config:
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps
    preset: str = "gpt2"  # model size: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny
    input: str = ""  # text file to train on; empty: tiny shakespeare (downloaded once)
    batch_size: int = 4  # sequences per step
    seq_len: int = 32  # tokens per sequence
    steps: int = 50  # optimizer steps
    lr: float = 3e-4  # AdamW learning rate
    seed: int = 1337  # same seed, same weights, same run
    cpu: ClassVar[dict] = dict(preset="tiny", steps=60, lr=1e-3)


def main(cfg):
    device = pick_device(cfg.device)
    seed_all(cfg.seed)
    enc = get_tokenizer()
    B, T = cfg.batch_size, cfg.seq_len

    # data: the first B*T+1 tokens of the text, one batch used at every step
    text = load_text(cfg.input)
    buf = torch.tensor(enc.encode_ordinary(text[: 20 * B * T]))[: B * T + 1]
    x, y = buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device)  # y: x shifted by one

    model = GPT(preset_config(cfg.preset)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    losses = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        print(step_line(step, losses[-1], dt=dt, tokens_per_s=B * T / dt))

    print(
        f"summary: memorized one batch of {B}x{T} tokens: loss {losses[0]:.3f} -> {losses[-1]:.4f}"
    )
    return dict(losses=losses, final_loss=losses[-1])


if __name__ == "__main__":
    main(parse_args(Config))
