"""GPT-2 in one readable file.

Parameter names match Hugging Face's GPT2LMHeadModel (`transformer.h.0.attn.c_attn.weight` ...)
so loading OpenAI's weights is a transpose of the Conv1D matrices and nothing else.
Later stages turn features on through GPTConfig; the defaults are the earliest stage's
behaviour, so old stages keep running unchanged. `grep -n "stage 0"` finds each switch.
"""

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model sees (position embeddings)
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    tie_weights: bool = False  # stage 04: lm_head shares the token embedding matrix
    gpt2_init: bool = False  # stage 04: N(0, 0.02), residual projections scaled down
    attn: str = "manual"  # stage 05: "sdpa" = F.scaled_dot_product_attention (flash)


HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights on the HF hub

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
        if cache is not None:  # sampling: the new keys/values join the cached ones
            k, v = cache.update(self, k, v)  # (B, nh, L, hs), L = cached + T
        L = k.size(2)  # keys to attend over; the T queries are the last T of these positions
        if self.impl == "sdpa":  # stage 05: one fused kernel, the TxT matrix never hits memory
            if T == L or T == 1:  # sampling: one new query may see every cached key, no mask
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T == L)
            else:  # sampling: several queries after a cache: the causal mask, shifted
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=self.mask[:, :, L - T : L, :L]
                )
        else:
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
            self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                # each block adds two outputs to the residual stream; keep its variance flat
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                 top_p=None, eos=None, use_cache=True):  # fmt: skip
        """Sample up to max_new_tokens after idx (B, T) -> (B, T + n); a seeded torch.Generator
        makes it repeatable. Arguments as in `stream`; rows that ended with `eos` are padded
        with it, and the result is shorter when every row ended early."""
        args = (temperature, top_k, generator, top_p, eos, use_cache)
        return torch.cat([idx, *self.stream(idx, max_new_tokens, *args)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
               top_p=None, eos=None, use_cache=True):  # fmt: skip
        """sampling: yield the next token of every row, (B, 1), as soon as it is drawn.

        temperature 0 is greedy; top_k / top_p keep the k most likely tokens / the smallest
        set holding probability p. With use_cache the prompt is read once and each new token
        costs one position; rows that share one prompt (several samples) read it once, at
        batch 1. A row that emits `eos` emits it again until every row has, then it stops."""
        B, T = idx.size()
        if T + max_new_tokens > self.config.block_size:
            raise UserError(
                f"prompt ({T}) + new tokens ({max_new_tokens}) exceeds "
                f"block_size {self.config.block_size}: ask for fewer tokens"
            )
        cache = KVCache(T + max_new_tokens) if use_cache else None
        shared = use_cache and B > 1 and bool((idx == idx[:1]).all())
        logits, _ = self(idx[:1] if shared else idx, cache=cache)  # the prompt, once
        if shared:
            cache.expand(B)  # every row continues from the same keys/values
        x, done = idx, torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            if step > 0:  # one position with a cache; the whole sequence again without one
                logits, _ = self(x, cache=cache)
            # stage 05 pads the vocab to 50304: those rows are no tokens, never draw them
            logits = logits[:, -1, :GPT2_VOCAB].expand(B, -1)  # (B, vocab) last position
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos is not None:
                nxt = nxt.masked_fill(done, eos)  # a finished row stays finished
                done = done | (nxt == eos)
            yield nxt
            if eos is not None and done.all():
                return
            x = nxt if use_cache else torch.cat((x, nxt), dim=1)

    # --- Hugging Face interchange -------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """OpenAI's GPT-2 (hub name gpt2 ... gpt2-xl) or a local GPT2LMHeadModel directory."""
        from transformers import GPT2LMHeadModel  # imported here: only this path needs it

        if name_or_dir.removeprefix("openai-community/") not in HUB_MODELS:
            if not os.path.isdir(name_or_dir):
                raise UserError(
                    f"unknown model '{name_or_dir}': use gpt2, gpt2-medium, gpt2-large, "
                    "gpt2-xl or a directory saved by GPT2LMHeadModel.save_pretrained"
                )
        try:
            hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        except OSError as e:
            raise UserError(
                f"could not load '{name_or_dir}' ({str(e).splitlines()[0]}); offline? pass "
                "--model DIR with a saved GPT2LMHeadModel"
            ) from None
        c = hf.config
        config = GPTConfig(
            block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
            n_head=c.n_head, n_embd=c.n_embd, tie_weights=getattr(c, "tie_word_embeddings", True),
        )  # fmt: skip
        config = replace(config, **overrides)
        model = cls(config)
        model.load_hf_state_dict(hf.state_dict())
        return model

    def load_hf_state_dict(self, sd_hf):
        """Copy HF GPT-2 tensors in: transpose Conv1D weights, pad the vocab if ours is larger."""
        sd = self.state_dict()
        sd_hf = {
            k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))
        }
        if set(sd_hf) != set(sd):
            raise UserError(f"state dict mismatch: {sorted(set(sd_hf) ^ set(sd))[:4]} ...")
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(CONV1D_WEIGHTS):
                    v = v.t()  # HF's Conv1D stores (in, out); nn.Linear stores (out, in)
                if k in ("transformer.wte.weight", "lm_head.weight") and v.size(0) < sd[k].size(0):
                    sd[k][v.size(0) :].zero_()  # padded vocab rows (stage 05) are never targets
                    sd[k][: v.size(0)].copy_(v)
                    continue
                if v.shape != sd[k].shape:
                    raise UserError(
                        f"shape mismatch for {k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}"
                    )
                sd[k].copy_(v)

    def hf_state_dict(self, vocab_size=50257):
        """Our weights under HF's layout: Conv1D transposes, vocab padding trimmed."""
        out = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            if k.endswith(CONV1D_WEIGHTS):
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:vocab_size]
            out[k] = v.contiguous().clone()
        return out


CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


# --- sampling: the KV cache and the token filters behind GPT.stream / GPT.generate ----------

GPT2_VOCAB = 50257  # real tokens; rows past this in a padded vocab (stage 05) are never drawn


class KVCache:
    """sampling: every layer's keys and values so far, so a new token costs one position.

    Buffers (B, nh, max_len, hs) are made on a layer's first write, in the dtype of its k and
    v (bf16 under autocast). `pos` counts the positions filled; GPT.forward advances it."""

    def __init__(self, max_len):
        self.max_len, self.pos, self.kv = max_len, 0, {}  # kv: attention module -> (k, v)

    def update(self, layer, k, v):
        """Write k, v (B, nh, T, hs) after the cached positions; return all of them so far."""
        if layer not in self.kv:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        ck, cv = self.kv[layer]
        end = self.pos + k.size(2)
        ck[:, :, self.pos : end], cv[:, :, self.pos : end] = k, v
        return ck[:, :, :end], cv[:, :, :end]

    def expand(self, batch_size):
        """A batch-1 cache (a prompt read once) -> batch_size independent copies."""
        self.kv = {m: (k.repeat(batch_size, 1, 1, 1), v.repeat(batch_size, 1, 1, 1))
                   for m, (k, v) in self.kv.items()}  # fmt: skip


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """sampling: (B, V) logits / temperature, -inf for every token top_k or top_p rules out."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token once the more likely ones before it already hold p: the smallest set
        # whose mass reaches p is kept (the most likely token always is)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop.scatter(-1, order, drop)  # back from sorted order to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """sampling: one token per row, (B, V) logits -> (B, 1); temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
