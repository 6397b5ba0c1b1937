"""Sampling: the KV cache gives the same tokens as recomputing, filters keep what they should,
seeds repeat, eos stops, block_size is enforced, and `python -m common.sample` prints text."""

from dataclasses import replace

import pytest
import torch
from conftest import run_script

from common import UserError
from common.checkpoint import save_checkpoint
from common.cli import parse_args
from common.generate import KVCache, filter_logits, generate, sample_next
from common.hf import from_pretrained
from common.model import GPT, GPTConfig
from common.sample import Config, check_args
from common.sample import main as sample_main

SMALL = dict(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32)


def small_model(attn="manual", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **kw}, attn=attn)).eval()


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_kv_cache_greedy_equals_no_cache(attn):
    model = small_model(attn)
    idx = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, idx, 40, temperature=0)
    fresh = generate(model, idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 45)
    assert cached.tolist() == fresh.tolist()  # token for token
    assert len(set(cached[0, 5:].tolist())) > 3  # a real continuation, not one repeated token


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_kv_cache_sampling_equals_no_cache(attn):
    """Same draws with and without the cache, also when rows share one prompt (read once)."""
    model = small_model(attn)
    idx = torch.randint(0, 97, (1, 6)).repeat(4, 1)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = generate(model, idx, 30, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, idx, 30, generator=torch.Generator().manual_seed(5), use_cache=False, **kw)
    assert a.tolist() == b.tolist()
    assert len({tuple(r) for r in a[:, 6:].tolist()}) == 4  # four different samples


def test_shared_prompt_is_read_once_at_batch_1():
    model = small_model()
    shapes = []
    model.transformer.wte.register_forward_hook(lambda m, inp, out: shapes.append(inp[0].shape))
    generate(model, torch.zeros(5, 7, dtype=torch.long), 3)
    assert shapes == [(1, 7), (5, 1), (5, 1)]  # the prompt once, then one position per token
    shapes.clear()
    generate(model, torch.zeros(5, 7, dtype=torch.long), 3, use_cache=False)
    assert shapes == [(5, 7), (5, 8), (5, 9)]  # without a cache: everything, every time


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_cache_positions_and_chunked_prefill(attn):
    """Several tokens after a cache (shifted causal mask, offset positions) = one full pass."""
    model = small_model(attn)
    x = torch.randint(0, 97, (2, 20))
    full, _ = model(x)
    cache = KVCache(20)
    parts = [model(x[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 20))]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["manual", "sdpa"])
def test_greedy_matches_transformers_generate(hf_tiny_dir, attn):
    from transformers import GPT2LMHeadModel

    ours = from_pretrained(str(hf_tiny_dir), attn=attn).eval()
    hf = GPT2LMHeadModel.from_pretrained(hf_tiny_dir).eval()
    x = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=24,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
    assert generate(ours, x, 24, temperature=0).tolist() == theirs.tolist()


def test_cache_takes_the_dtype_of_k_and_v_under_autocast():
    model = small_model()
    cache = KVCache(10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
        out = generate(model, torch.zeros(2, 4, dtype=torch.long), 6)
    assert {k.dtype for kv in cache.kv.values() for k in kv} == {torch.bfloat16}
    assert len(cache.kv) == 2 and logits.dtype == torch.bfloat16 and out.shape == (2, 10)


def test_padded_vocab_rows_are_never_sampled():
    model = small_model(vocab_size=50304)
    x = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        best = model(x)[0][0, -1].argmax()
        model.lm_head.weight[50257:] = 10 * model.lm_head.weight[best]  # padding: far likelier
        logits, _ = model(x)
    assert logits[0, -1].argmax() >= 50257  # the raw model would pick padding
    out = generate(model, torch.zeros(3, 3, dtype=torch.long), 10, temperature=2.0)
    assert out.max() < 50257


def kept(logits):
    """The token ids a filter left drawable (finite logits) in row 0."""
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


def hand_made():
    """Five tokens with probabilities 0.1, 0.5, 0.05, 0.3, 0.05 (as logits)."""
    return torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]]).log()


@pytest.mark.parametrize(
    "p,expected",
    [
        (0.3, {1}),
        (0.75, {1, 3}),
        (0.85, {0, 1, 3}),
        (0.97, {0, 1, 2, 3, 4}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(filter_logits(hand_made(), top_p=p)) == expected


def test_top_k_temperature_and_greedy():
    logits = hand_made()
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=2, top_p=0.3)) == {1}  # both filters apply
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2.0)
    entropy = lambda t: torch.distributions.Categorical(logits=logits / t).entropy().item()
    assert entropy(0.5) < entropy(1.0) < entropy(2.0)  # higher temperature, flatter
    assert sample_next(logits, temperature=0).item() == 1  # greedy: the argmax


def test_sampling_frequencies_follow_the_filters():
    logits = hand_made().expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, top_p=0.75, generator=g)[:, 0]
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.02  # renormalized 0.5 : 0.3
    assert set(sample_next(logits, top_k=1, generator=g)[:, 0].tolist()) == {1}
    cold = sample_next(logits, temperature=0.1, generator=g)[:, 0]
    assert (cold == 1).float().mean().item() > 0.99  # (0.3/0.5)**10 ~ 0.6%: almost always 1
    plain = sample_next(logits, generator=g)[:, 0]
    assert abs((plain == 0).float().mean().item() - 0.1) < 0.01


def test_same_seed_same_tokens():
    model = small_model()
    idx = torch.zeros(2, 4, dtype=torch.long)
    run = lambda s: generate(model, idx, 20, top_p=0.95, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_eos_stops_a_sample_and_pads_finished_rows():
    model = small_model()
    idx = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(2))
    free = generate(model, idx, 20, temperature=0)
    eos = free[0, 4 + 2].item()  # the third token row 0 produces
    assert eos not in free[0, 4:6].tolist()
    out = generate(model, idx, 20, temperature=0, eos=eos)
    assert out[0, 4:7].tolist() == free[0, 4:7].tolist()  # same tokens up to and with eos
    assert set(out[0, 7:].tolist()) <= {eos}  # then only eos padding
    if eos not in free[1, 4:].tolist():  # row 1 never says it: it runs to the end
        assert out.shape == (2, 24) and out[1].tolist() == free[1].tolist()
    one = generate(model, idx[:1], 20, temperature=0, eos=eos)
    assert one.shape == (1, 7)  # all rows done: generation stops early


def test_block_size_is_enforced():
    model = small_model()  # block_size 64
    assert generate(model, torch.zeros(1, 60, dtype=torch.long), 4).shape == (1, 64)  # fits
    with pytest.raises(UserError, match="exceeds block_size 64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 5)
    with pytest.raises(UserError, match="use --max-new-tokens 54 or less"):
        check_args(Config(max_new_tokens=100), 10, 64)
    with pytest.raises(UserError, match="the prompt is 64 tokens"):
        check_args(Config(), 64, 64)
    with pytest.raises(UserError, match="top-p"):
        check_args(Config(top_p=0.0), 3, 64)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A checkpoint written the way training writes it: tiny, padded vocab, tied."""
    torch.manual_seed(0)
    config = GPTConfig(**{**SMALL, "vocab_size": 50304}, tie_weights=True, gpt2_init=True)
    out = tmp_path_factory.mktemp("run")
    save_checkpoint(out, 3, GPT(config), config)
    return out


def test_sample_main_streams_what_it_returns(ckpt_dir, capsys):
    cfg = Config(ckpt=str(ckpt_dir), device="cpu", prompt="Hello world", max_new_tokens=12)
    out = sample_main(cfg)
    printed = capsys.readouterr().out
    assert printed == out["samples"][0] + "\n"  # the streamed text is the final text
    assert out["samples"][0].startswith("Hello world") and len(out["tokens"][0]) == 12
    again = sample_main(cfg)
    assert again["samples"] == out["samples"]  # same seed, same text
    several = sample_main(replace(cfg, num_samples=3, top_p=0.9))
    printed = capsys.readouterr().out
    assert printed.count("----- sample ") == 3 and len(set(several["samples"])) == 3


def test_sample_cli(ckpt_dir, cache_env, capsys):
    args = [
        "-m",
        "common.sample",
        "--ckpt",
        str(ckpt_dir),
        "--device",
        "cpu",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "8",
    ]
    r = run_script(args, env=cache_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time") + 8
    assert "generated 8 tokens" in r.stderr and "step 3" in r.stderr
    from common import sample  # the same command with 4 + 100 tokens > block_size 64

    with pytest.raises(UserError, match=r"^prompt \(4 tokens\).*use --max-new-tokens 60 or less"):
        sample.main(parse_args(sample.Config, [*args[2:-1], "100"]))
    assert capsys.readouterr().out == ""  # nothing generated
