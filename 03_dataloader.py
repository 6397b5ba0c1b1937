"""Stage 03: a data loader: every step sees the next batch of tiny shakespeare.

Stage 02 memorized one batch. Now the text is tokenized once (338,025 tokens) and cut into
consecutive (B, T) batches; targets are the inputs shifted by one token, and the loader
wraps to the start at the end of the text. The loss now falls more slowly, and stays well
above zero: the model must generalize instead of memorizing. The file is downloaded once
into ~/.cache/gpt-from-scratch (checked against its sha256), or pass --input PATH.

Run on CPU (tiny preset, ~15 s):   python 03_dataloader.py
Run at the real size on a GPU:     python 03_dataloader.py --preset gpt2
"""

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
