"""bench/peer_quality.py's parts that decide its table (the runs themselves take minutes and
nanoGPT's code, so they are not run here): the one evaluator, the summary, the corpora."""

import math

import numpy as np
import pytest
import torch
from conftest import load_stage

from common import UserError
from common.model import GPT, preset_config


@pytest.fixture(scope="module")
def pq():
    return load_stage("bench/peer_quality")


def test_the_evaluator_scores_every_token_of_every_whole_window(pq):
    """Windows of T+1 tokens every T tokens, the loss averaged over all of them; a nanoGPT
    state dict (its `_orig_mod.` prefix, its causal-mask buffers) loads as ours does."""
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", tie_weights=True, vocab_size=50304, attn="sdpa")).eval()
    val = np.random.default_rng(0).integers(0, 50257, 3 * 32 + 5).astype(np.uint16)
    loss, n = pq.val_loss(model.state_dict(), val, T=32, batch=2)
    assert n == 3 * 32  # 3 whole windows; the last 5 tokens are not a window
    x = torch.from_numpy(val.astype(np.int64))
    with torch.no_grad():
        want = [model(x[s : s + 32][None], x[s + 1 : s + 33][None])[1].item() for s in (0, 32, 64)]
    assert loss == pytest.approx(sum(want) / 3, abs=1e-5)
    peer = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    peer["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1)  # nanoGPT's mask buffer
    assert pq.val_loss(peer, val, T=32, batch=2)[0] == pytest.approx(loss, abs=1e-6)
    exact = pq.val_loss(model.state_dict(), val, exact_gelu=True, T=32, batch=2)[0]
    assert exact != loss and abs(exact - loss) < 1e-2  # its own activation, nearly the same
    with pytest.raises(UserError, match="weights do not fit our model"):
        pq.val_loss({"lm_head.weight": torch.zeros(3)}, val, T=32)


def test_the_summary_gives_mean_spread_and_the_difference_to_nanogpt(pq):
    runs = [dict(trainer="nanogpt", val_loss=v) for v in (5.6, 5.8)]
    runs += [dict(trainer="ours", val_loss=v) for v in (5.5, 5.6, 5.7)]
    table = pq.summary(runs, ["nanogpt", "ours", "ours-consecutive"]).splitlines()
    assert len(table) == 4  # head, rule, one row per trainer that ran
    std = f"{math.sqrt(0.02):.4f}"
    assert table[2] == f"| nanogpt | 2 | 5.7000 ± {std} | 5.6000 .. 5.8000 | +0.0000 |"
    assert table[3] == "| ours | 3 | 5.6000 ± 0.1000 | 5.5000 .. 5.7000 | -0.1000 |"


def test_the_python_corpus_is_the_stdlib_in_name_order_up_to_the_size(pq):
    text = pq.python_corpus(target_tokens=5_000)
    names = [line[len("# file: ") :] for line in text.splitlines() if line.startswith("# file: ")]
    assert names == sorted(names) and len(names) >= 1
    assert pq.python_corpus(target_tokens=5_000) == text  # the same corpus every time
    enc_len = len(pq.get_tokenizer().encode_ordinary(text))
    last = text.rindex("# file: ")
    assert enc_len >= 5_000 > len(pq.get_tokenizer().encode_ordinary(text[:last])) - 10


def test_unknown_trainer_and_corpus_are_refused(pq, tmp_path):
    with pytest.raises(UserError, match="unknown trainer"):
        pq.main(pq.Config(trainers="ours,llmc", work=str(tmp_path)))
    with pytest.raises(UserError, match="unknown --corpus 'wiki'"):
        pq.main(pq.Config(corpus="wiki", trainers="ours", work=str(tmp_path)))
