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

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): every head attends independently
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.impl == "sdpa":  # stage 05: one fused kernel, the TxT matrix never hits memory
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))  # no peeking ahead
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens communicate
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

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise UserError(
                f"sequence length {T} exceeds block_size {self.config.block_size}: lower --seq-len"
            )
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens after idx (B, T); a seeded torch.Generator makes it repeatable."""
        if idx.size(1) + max_new_tokens > self.config.block_size:
            raise UserError(
                f"prompt ({idx.size(1)}) + new tokens ({max_new_tokens}) exceeds "
                f"block_size {self.config.block_size}: ask for fewer tokens"
            )
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)  # (B, vocab) last position
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

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
            n_head=c.n_head, n_embd=c.n_embd, tie_weights=True,
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
