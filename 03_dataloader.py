"""Stage 03: a data loader: every step sees the next batch of tiny shakespeare.

Stage 02 memorized one batch. Now the text (downloaded once, sha256-checked, or --input PATH)
is tokenized once and cut into consecutive (B, T) batches, targets shifted by one token.
The loss falls more slowly and stays well above zero: the model must generalize.

Run: python 03_dataloader.py   (no GPU: tiny preset, ~15 s; a GPU or --preset gpt2: real size)
"""

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from common import UserError
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
    batch_size: int = 16  # sequences per step
    seq_len: int = 1024  # tokens per sequence
    steps: int = 50  # optimizer steps
    lr: float = 3e-4  # AdamW learning rate
    seed: int = 1337  # same seed, same weights, same run
    cpu: ClassVar[dict] = dict(preset="tiny", batch_size=8, seq_len=64, steps=50, lr=1e-3)


class TextLoader:
    """(B, T) batches of a token list in order, wrapping at the end; y[b, t] follows x[b, t]."""

    def __init__(self, tokens, batch_size, seq_len):
        self.tokens, self.B, self.T, self.pos = torch.tensor(tokens), batch_size, seq_len, 0
        if len(self.tokens) < batch_size * seq_len + 1:
            raise UserError("the text is shorter than one batch: lower --batch-size or --seq-len")

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.pos : self.pos + B * T + 1]  # one extra token: the last target
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)  # inputs, targets
        self.pos += B * T
        if self.pos + B * T + 1 > len(self.tokens):  # the next batch would run off the end: wrap
            self.pos = 0
        return x, y


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
