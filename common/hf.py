"""Hugging Face interchange: OpenAI's GPT-2 weights into our GPT, and ours back out.

Our parameter names are GPT2LMHeadModel's, so the only work is layout: HF's Conv1D stores a
matmul weight as (in, out) where nn.Linear stores (out, in), and stage 05's padded vocab
(50304 rows) has 47 extra rows that HF's 50257 lack.

    from common.hf import from_pretrained
    model = from_pretrained("gpt2")          # OpenAI's 124M (downloaded once by transformers)
    model = from_pretrained("path/to/dir")   # any GPT2LMHeadModel.save_pretrained directory
"""

import os
from dataclasses import replace

import torch

from common import UserError
from common.model import GPT, GPT2_VOCAB, GPTConfig

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's weights on the HF hub
CONV1D_WEIGHTS = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
EMBEDDINGS = ("transformer.wte.weight", "lm_head.weight")  # the rows stage 05 pads

# GPT2Config fields that change the computation, with the only value our model implements:
# a checkpoint with another value would load without error and give different logits
SUPPORTED = dict(
    layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
    scale_attn_weights=True,  # scores / sqrt(head size)
    scale_attn_by_inverse_layer_idx=False,
    add_cross_attention=False,
)
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, as ours


def check_hf_config(c, name):
    """Refuse a GPT2Config whose computation our model would not reproduce, naming the field."""
    wrong = [(k, getattr(c, k)) for k, v in SUPPORTED.items() if getattr(c, k, v) != v]
    if getattr(c, "activation_function", "gelu_new") not in ACTIVATIONS:
        wrong.append(("activation_function", c.activation_function))
    if getattr(c, "n_inner", None) not in (None, 4 * c.n_embd):
        wrong.append(("n_inner", c.n_inner))
    if wrong:
        field, value = wrong[0]
        raise UserError(
            f"{name}: config field {field}={value!r} is not what our GPT-2 implements "
            f"({SUPPORTED.get(field, 'gelu_new' if field == 'activation_function' else 'None')}): "
            "it would load with different logits, so it is refused"
        )


def from_pretrained(name_or_dir, **overrides):
    """OpenAI's GPT-2 (hub name gpt2 ... gpt2-xl) or a local GPT2LMHeadModel directory -> GPT.
    `overrides` change our GPTConfig (e.g. vocab_size=50304, attn="sdpa")."""
    if name_or_dir.removeprefix("openai-community/") not in HUB_MODELS:
        if not os.path.isdir(name_or_dir):
            raise UserError(
                f"unknown model '{name_or_dir}': use gpt2, gpt2-medium, gpt2-large, "
                "gpt2-xl or a directory saved by GPT2LMHeadModel.save_pretrained"
            )
    from transformers import GPT2LMHeadModel  # imported here (slow): only this path needs it

    try:
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
    except OSError as e:
        raise UserError(
            f"could not load '{name_or_dir}' ({str(e).splitlines()[0]}); offline? pass "
            "--model DIR with a saved GPT2LMHeadModel (python -m common.random_model DIR)"
        ) from None
    c = hf.config
    check_hf_config(c, name_or_dir)
    config = GPTConfig(
        block_size=c.n_positions,
        vocab_size=c.vocab_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        tie_weights=getattr(c, "tie_word_embeddings", True),
    )
    model = GPT(replace(config, **overrides))
    load_hf_state_dict(model, hf.state_dict())
    return model


def load_hf_state_dict(model, sd_hf):
    """Copy HF GPT-2 tensors into `model`: transpose Conv1D weights, pad the vocab if ours is
    larger (the padded rows are zero: they are never targets)."""
    sd = model.state_dict()
    sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if set(sd_hf) != set(sd):
        raise UserError(f"state dict mismatch: {sorted(set(sd_hf) ^ set(sd))[:4]} ...")
    with torch.no_grad():
        for k, v in sd_hf.items():
            if k.endswith(CONV1D_WEIGHTS):
                v = v.t()  # HF's Conv1D stores (in, out); nn.Linear stores (out, in)
            if k in EMBEDDINGS and v.size(0) < sd[k].size(0):
                sd[k][v.size(0) :].zero_()
                sd[k][: v.size(0)].copy_(v)
                continue
            if v.shape != sd[k].shape:
                raise UserError(f"shape mismatch for {k}: {tuple(v.shape)} vs {tuple(sd[k].shape)}")
            sd[k].copy_(v)


def hf_state_dict(model, vocab_size=GPT2_VOCAB):
    """Our weights under HF's layout: Conv1D transposes, vocab padding trimmed."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()
        if k in EMBEDDINGS:
            v = v[:vocab_size]
        out[k] = v.contiguous().clone()
    return out
