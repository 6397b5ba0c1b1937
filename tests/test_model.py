"""Facts about the model: sizes, attention parity, causality, tying, init, HF parity."""

import math

import pytest
import torch
from conftest import load_stage

from common import UserError
from common.generate import generate
from common.hf import from_pretrained, hf_state_dict
from common.model import GPT, GPTConfig, preset_config

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16)


def meta_params(name, **kw):
    with torch.device("meta"):  # no memory: the xl model would need 6 GB
        return GPT(preset_config(name, **kw)).num_params()


@pytest.mark.parametrize(
    "name,count",
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(name, count):
    assert meta_params(name, tie_weights=True) == count
    c = preset_config(name)
    assert meta_params(name) == count + c.vocab_size * c.n_embd  # untied: lm_head extra


def test_unknown_preset_is_user_error():
    with pytest.raises(UserError, match="unknown preset 'gpt5'"):
        preset_config("gpt5")


def test_sdpa_matches_manual_attention():
    torch.manual_seed(0)
    manual = GPT(GPTConfig(**TINY, attn="manual"))
    sdpa = GPT(GPTConfig(**TINY, attn="sdpa"))
    sdpa.load_state_dict(manual.state_dict())
    x = torch.randint(0, 97, (3, 32))
    a, _ = manual(x)
    b, _ = sdpa(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_causality(attn):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, attn=attn))
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 1) % 97
    lx, _ = model(x)
    ly, _ = model(y)
    assert torch.equal(lx[0, :12], ly[0, :12])  # the past cannot see the future
    assert (lx[0, 12:] - ly[0, 12:]).abs().max() > 1e-3  # while the future does change


def test_tying_shares_storage_and_gradients():
    model = GPT(GPTConfig(**TINY, tie_weights=True))
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()
    untied = GPT(GPTConfig(**TINY))
    assert untied.num_params() - model.num_params() == 97 * 16
    _, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    loss.backward()
    assert model.lm_head.weight.grad is not None  # one tensor gets both gradient paths


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    model = GPT(preset_config("gpt2", n_layer=4, tie_weights=True, gpt2_init=True))
    sd = model.state_dict()
    assert abs(sd["transformer.wte.weight"].std().item() - 0.02) < 5e-4
    assert abs(sd["transformer.wpe.weight"].std().item() - 0.02) < 5e-4
    assert abs(sd["transformer.h.0.attn.c_attn.weight"].std().item() - 0.02) < 5e-4
    scaled = 0.02 / math.sqrt(2 * 4)
    for k in ("attn.c_proj.weight", "mlp.c_proj.weight"):
        assert abs(sd[f"transformer.h.1.{k}"].std().item() - scaled) < 5e-4
    biases = [v for k, v in sd.items() if k.endswith(".bias") and ".ln_" not in k]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    assert torch.all(sd["transformer.h.0.ln_1.weight"] == 1)  # LayerNorm keeps its defaults


def test_default_init_is_pytorch_default():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.1  # nn.Embedding: N(0, 1)


def test_sequence_longer_than_block_size_is_user_error():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(UserError, match="exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_from_pretrained_matches_transformers(hf_tiny_dir):
    from transformers import GPT2LMHeadModel

    ours = from_pretrained(str(hf_tiny_dir)).eval()
    hf = GPT2LMHeadModel.from_pretrained(hf_tiny_dir).eval()
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, _ = ours(x)
        b = hf(x).logits
    assert (a - b).abs().max().item() < 1e-5
    # and greedy text is the same token for token
    with torch.no_grad():
        g_ours = generate(ours, x[:1, :8], 16, top_k=1)
        g_hf = hf.generate(x[:1, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert g_ours.tolist() == g_hf.tolist()


def test_hf_state_dict_round_trip(hf_tiny_dir):
    from transformers import GPT2LMHeadModel

    ours = from_pretrained(str(hf_tiny_dir), vocab_size=50304).eval()  # padded vocab
    hf = GPT2LMHeadModel.from_pretrained(hf_tiny_dir).eval()
    hf.load_state_dict(hf_state_dict(ours))
    x = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert torch.allclose(ours(x)[0][..., :50257], hf(x).logits, atol=1e-5)


def test_from_pretrained_unknown_name_is_user_error():
    with pytest.raises(UserError, match="unknown model 'gpt-9'"):
        from_pretrained("gpt-9")


def test_generate_is_seeded_and_refuses_overflow():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.zeros(2, 4, dtype=torch.long)
    a = generate(model, idx, 8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 12) and torch.equal(a, b)
    with pytest.raises(UserError, match="exceeds block_size"):
        generate(model, idx, 40)


def test_stage00_table_sums_to_total():
    stage = load_stage("00_model")
    model = GPT(GPTConfig(**TINY, tie_weights=True))
    assert sum(stage.param_table(model).values()) == model.num_params()
