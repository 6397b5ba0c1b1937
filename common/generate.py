"""Sampling from our GPT: a KV cache, temperature / top-k / top-p, streaming, eos.

    from common.generate import generate
    out = generate(model, prompt, 32, top_k=50, generator=torch.Generator().manual_seed(42))

The model's forward takes an optional `cache` (see CausalSelfAttention): with one, a call
feeds only the new positions and attends over the cached keys and values, so a new token
costs one position instead of the whole sequence. Training never passes a cache.
"""

import torch
import torch.nn.functional as F

from common import UserError
from common.model import GPT2_VOCAB


class KVCache:
    """Every layer's keys and values so far, so a new token costs one position.

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
        self.kv = {
            m: (k.repeat(batch_size, 1, 1, 1), v.repeat(batch_size, 1, 1, 1))
            for m, (k, v) in self.kv.items()
        }


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits / temperature, -inf for every token top_k or top_p rules out."""
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
    """One token per row, (B, V) logits -> (B, 1); temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model,
    idx,
    max_new_tokens,
    temperature=1.0,
    top_k=None,
    generator=None,
    top_p=None,
    eos=None,
    use_cache=True,
):
    """Sample up to max_new_tokens after idx (B, T) -> (B, T + n); a seeded torch.Generator
    makes it repeatable. Arguments as in `stream`; rows that ended with `eos` are padded
    with it, and the result is shorter when every row ended early."""
    args = (temperature, top_k, generator, top_p, eos, use_cache)
    return torch.cat([idx, *stream(model, idx, max_new_tokens, *args)], dim=1)


@torch.no_grad()
def stream(
    model,
    idx,
    max_new_tokens,
    temperature=1.0,
    top_k=None,
    generator=None,
    top_p=None,
    eos=None,
    use_cache=True,
):
    """Yield the next token of every row, (B, 1), as soon as it is drawn.

    temperature 0 is greedy; top_k / top_p keep the k most likely tokens / the smallest
    set holding probability p. With use_cache the prompt is read once and each new token
    costs one position; rows that share one prompt (several samples) read it once, at
    batch 1. A row that emits `eos` emits it again until every row has, then it stops."""
    B, T = idx.size()
    if T + max_new_tokens > model.config.block_size:
        raise UserError(
            f"prompt ({T}) + new tokens ({max_new_tokens}) exceeds "
            f"block_size {model.config.block_size}: ask for fewer tokens"
        )
    cache = KVCache(T + max_new_tokens) if use_cache else None
    shared = use_cache and B > 1 and bool((idx == idx[:1]).all())
    logits, _ = model(idx[:1] if shared else idx, cache=cache)  # the prompt, once
    if shared:
        cache.expand(B)  # every row continues from the same keys/values
    x, done = idx, torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if step > 0:  # one position with a cache; the whole sequence again without one
            logits, _ = model(x, cache=cache)
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
