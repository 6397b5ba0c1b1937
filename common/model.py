"""GPT-2 in one readable file: the model and nothing else.

Parameter names match Hugging Face's GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight` ...)
so loading OpenAI's weights is a transpose of the Conv1D matrices (common/hf.py). Sampling
(the KV cache, top-k/top-p) lives in common/generate.py. The stages write each idea out
themselves (04: tying and init, 05: the speedups); later stages turn the same code on here
through GPTConfig, whose defaults are the earliest stage's behaviour. `grep -n "stage 0"`
finds each switch.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError

GPT2_VOCAB = 50257  # GPT-2's real tokens: 50,000 BPE merges + 256 bytes + <|endoftext|>


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model sees (position embeddings)
    vocab_size: int = GPT2_VOCAB  # stage 05 pads it to 50304; the extra rows are never targets
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    tie_weights: bool = False  # stage 04: lm_head shares the token embedding matrix
    gpt2_init: bool = False  # stage 04: N(0, 0.02), residual projections scaled down
    attn: str = "manual"  # stage 05: "sdpa" = F.scaled_dot_product_attention (flash)


# Sizes of the four GPT-2 models, plus a tiny one that trains in seconds on a laptop CPU.
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # CPU preset
}


def preset_config(name, **overrides):
    """GPTConfig for a preset name, e.g. preset_config("gpt2", tie_weights=True)."""
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.n_embd, self.impl = config.n_head, config.n_embd, config.attn
        if self.impl not in ("manual", "sdpa"):
            raise UserError(f"unknown attention '{self.impl}': use 'manual' or 'sdpa'")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True  # stage 04: init scaled by (2 * n_layer) ** -0.5
        # lower-triangular mask; not persistent, so it is not part of the state dict
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer(
            "mask", mask.view(1, 1, config.block_size, config.block_size), persistent=False
        )

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): every head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:  # sampling only; training passes no cache and has L == T
            k, v = cache.update(self, k, v)  # (B, nh, L, hs): the cached positions, then these T
        L = k.size(2)  # the T queries are the last T of the L positions
        if self.impl == "sdpa":  # stage 05: flash attention, the (T, L) scores never hit memory
            if T == L:  # training: the plain causal mask, so the fused flash kernel applies
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # sampling after a cache: the causal mask, shifted to the new positions
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=self.mask[:, :, L - T : L, :L]
                )
        else:  # the textbook: scores, mask out the future, softmax, weighted sum of values
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, L)
            att = att.masked_fill(~self.mask[:, :, L - T : L, :L], float("-inf"))  # no peeking
            att = F.softmax(att, dim=-1)
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: a clean residual stream from input to output."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)  # tokens communicate
        x = x + self.mlp(self.ln_2(x))  # each token thinks on its own
        return x


def gpt2_init(module, n_layer):
    """Stage 04's init, as 04_best_practices.py writes it (a test keeps the two the same).
    N(0, 0.02) weights, zero biases; each block adds two projections (RESIDUAL_SCALE) to
    the residual stream, so theirs are scaled by (2 * n_layer) ** -0.5 to keep its variance."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        scale = (2 * n_layer) ** -0.5 if getattr(module, "RESIDUAL_SCALE", False) else 1.0
        torch.nn.init.normal_(module.weight, mean=0.0, std=0.02 * scale)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:  # stage 04: one matrix maps tokens -> vectors and back
            self.transformer.wte.weight = self.lm_head.weight
        if config.gpt2_init:  # stage 04
            self.apply(lambda module: gpt2_init(module, config.n_layer))

    def forward(self, idx, targets=None, cache=None):
        B, T = idx.size()
        start = 0 if cache is None else cache.pos  # sampling: positions go on after the cache
        if start + T > self.config.block_size:
            raise UserError(
                f"sequence length {start + T} exceeds block_size {self.config.block_size}: "
                "lower --seq-len"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, exclude_embeddings=False):
        """Distinct parameters (a tied matrix counts once); optionally without wpe."""
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights
        return n - self.transformer.wpe.weight.numel() if exclude_embeddings else n
