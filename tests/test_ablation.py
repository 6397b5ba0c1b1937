"""common/ablation.py, the harness of stage 09: rows, seeds, paired differences, the noise
line, the table and ablation.json, tested with a small GPT-2 of common/model.py on token
shards of a 97-token vocabulary (fast: the vocabulary is most of a small model's time)."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from common import UserError, ablation
from common.model import GPT, GPTConfig
from common.train import make_optimizer

SMALL = dict(
    block_size=32,
    vocab_size=97,
    n_layer=1,
    n_head=2,
    n_embd=16,
    tie_weights=True,
    gpt2_init=True,
    attn="sdpa",
)


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("t_val_000000.npy", "t_train_000001.npy"):
        np.save(tmp_path / name, rng.integers(0, 97, 2000, dtype=np.uint16))
    return tmp_path


def cfg_for(shards, **kw):
    base = ablation.Config(
        device="cpu",
        data_dir=str(shards),
        batch_size=2,
        seq_len=16,
        steps=3,
        max_lr=1e-2,
        warmup_steps=1,
        seeds=2,
        val_steps=2,
        out=str(shards / "out"),
    )
    return replace(base, **kw)


def build_small(seen):
    """build(switches) for the harness: a small GPT, AdamW at lr * switches["lr_x"]; records
    the autocast dtype each forward ran under."""

    def build(switches):
        model = GPT(GPTConfig(**SMALL))
        forward = model.forward

        def recording(idx, targets=None):
            on = torch.is_autocast_enabled("cpu")
            seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
            return forward(idx, targets)

        model.forward = recording
        lr = 1e-2 * switches.get("lr_x", 1)
        return model, [make_optimizer(model, 0.1, lr, "cpu")]

    return build


def test_runs_are_paired_by_seed_and_the_table_says_so(shards, capsys):
    """A row with the baseline's switches (same seed, same batches) differs from it by exactly
    0; a real change does not. Seeds are cfg.seed + i; the JSON holds the rows and the runs."""
    rows = dict(baseline={}, same={}, faster=dict(lr_x=3))
    seen = []
    cfg = cfg_for(shards, steps=2, val_steps=1, dtype="float32")
    out = ablation.run_ablation(cfg, rows, build_small(seen), "cpu", torch.float32)
    base, same, faster = out["rows"]
    assert [r["seed"] for r in out["runs"]["faster"]] == [cfg.seed, cfg.seed + 1]
    assert same["delta"] == 0.0 and same["delta_spread"] == 0.0
    assert out["runs"]["same"][1]["losses"] == out["runs"]["baseline"][1]["losses"]
    deltas = [
        f["val_loss"] - b["val_loss"]
        for f, b in zip(out["runs"]["faster"], out["runs"]["baseline"])
    ]
    assert faster["delta"] == pytest.approx(sum(deltas) / 2) and faster["delta"] != 0
    assert faster["delta_spread"] == pytest.approx(abs(deltas[0] - deltas[1]) / math.sqrt(2))
    assert base["val_spread"] > 0  # another seed, another init: another loss
    assert base["params"] == GPT(GPTConfig(**SMALL)).num_params()
    assert set(seen) == {torch.float32} and len(seen) == 3 * 2 * (2 + 1)  # train + val batches
    text = capsys.readouterr().out
    assert "--- row faster (lr_x=3), seed 1338" in text and "--- row baseline (GPT-2)" in text
    assert "ablation: 3 rows x 2 seed(s), 2 steps of 32 tokens = 64 tokens per run" in text
    assert "torch.float32" in text
    table = text[text.index("\nrow ") + 1 :].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["baseline", "same", "faster"]
    assert table[2].split()[6] == "-" and "+0.0000 ± 0.0000" in table[3]
    assert "noise: the largest seed spread here is" in text and "CPU scale (64 tokens" in text
    saved = json.loads((shards / "out" / "ablation.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["baseline", "same", "faster"]
    assert saved["tokens"] == 64 and saved["dtype"] == "torch.float32"
    assert saved["runs"]["faster"][0]["losses"] == out["runs"]["faster"][0]["losses"]
    assert saved["config"]["seeds"] == 2


def test_autocast_dtype_and_accumulation(shards):
    """bf16: every forward under autocast; total_batch 2x B*T: two micro-steps per step."""
    seen = []
    cfg = cfg_for(shards, seeds=1, steps=2, total_batch=64, val_steps=1)
    out = ablation.run_ablation(cfg, dict(baseline={}), build_small(seen), "cpu", torch.bfloat16)
    assert seen == [torch.bfloat16] * (2 * 2 + 1)
    assert out["tokens"] == 2 * 64 and math.isfinite(out["rows"][0]["val_loss"])


def test_summaries_and_noise_lines():
    runs = lambda *vals: [dict(val_loss=v, params=10, train_s=1.0, tokens_per_s=5.0) for v in vals]
    base = ablation.summarize("baseline", runs(3.0, 3.2), None)
    assert base["delta"] is None and base["val_spread"] == pytest.approx(math.sqrt(0.02))
    row = ablation.summarize("x", runs(2.9, 3.0), runs(3.0, 3.2))
    assert row["delta"] == pytest.approx(-0.15)  # paired: (2.9-3.0 + 3.0-3.2) / 2
    one = ablation.summarize("x", runs(2.9), runs(3.0))
    assert one["delta"] == pytest.approx(-0.1) and one["delta_spread"] is None
    text = ablation.noise_notice([base, row], 2, "cuda", 100, "gpt2")
    assert text == (
        "noise: the largest seed spread here is 0.1414; a difference smaller than "
        "about twice that (0.2828) is noise, not an effect of the change"
    )
    assert ablation.noise_notice([one], 1, "cuda", 100, "gpt2").startswith("noise: one seed")
    assert "CPU scale (100 tokens per run, preset tiny)" in ablation.noise_notice(
        [base, row], 2, "cpu", 100, "tiny"
    )
    table = ablation.format_table([base, dict(row, name="a_long_row_name")], 100, 2)
    lines = table.splitlines()
    assert lines[2].startswith("baseline        ") and lines[3].startswith("a_long_row_name ")
    assert "-0.1500 ± 0.0707" in lines[3] and "3.1000 ± 0.1414" in lines[2]


def test_parse_rows():
    known = dict(baseline={}, rope=dict(rope=True), swiglu=dict(mlp="swiglu"))
    assert ablation.parse_rows(" baseline, rope+swiglu ,", known) == {
        "baseline": {},
        "rope+swiglu": dict(rope=True, mlp="swiglu"),
    }
    with pytest.raises(UserError, match=r"unknown row 'turbo': choose from baseline, rope, swi"):
        ablation.parse_rows("baseline,rope+turbo", known)
    with pytest.raises(UserError, match="--rows names no row"):
        ablation.parse_rows(" , ", known)


def test_bad_input(shards, shakespeare, tmp_path):
    cfg, build = cfg_for(shards), build_small([])
    with pytest.raises(UserError, match="--seeds 0: need at least 1 run per row"):
        ablation.run_ablation(replace(cfg, seeds=0), {}, build, "cpu", torch.float32)
    with pytest.raises(UserError, match="--total-batch 40 is not a multiple of B\\*T = 32"):
        ablation.run_ablation(replace(cfg, total_batch=40), {}, build, "cpu", torch.float32)
    text = ablation.load_data(replace(cfg, data_dir="", input=str(shakespeare)))
    assert text["train_tokens"] > 10 * text["val_steps"] * 32  # the first 90% of the text
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("to be or not to be " * 20)
    with pytest.raises(UserError, match="smaller than one batch of 2x16"):
        ablation.load_data(replace(cfg, data_dir="", input=str(tiny_text)))


def test_train_batches_are_shuffled_unless_asked_not_to(shards, shakespeare):
    """A text or shards trained on for several epochs: 07's shuffled windows by default, the
    same order for every run (the rows stay paired); `--shuffle false`: in order, as 03."""
    from common.data import TextLoader, WindowLoader

    cfg = replace(cfg_for(shards), data_dir="", input=str(shakespeare))
    on, off = ablation.load_data(cfg), ablation.load_data(replace(cfg, shuffle=False))
    assert isinstance(on["train"](), WindowLoader) and isinstance(off["train"](), TextLoader)
    a, b, in_order = on["train"](), on["train"](), off["train"]()
    firsts = [(a.next_batch()[0], b.next_batch()[0], in_order.next_batch()[0]) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y, _ in firsts)  # every run reads the same batches
    assert not any(torch.equal(x, z) for x, _, z in firsts)
    assert torch.equal(firsts[1][2][0, :4], in_order.tokens[32:36])  # batch 2 follows batch 1
    for val in (on["val"](), off["val"]()):  # the held-out batches stay the same, in order
        assert isinstance(val, TextLoader)
    sh_on, sh_off = (
        ablation.load_data(cfg_for(shards)),
        ablation.load_data(cfg_for(shards, shuffle=False)),
    )
    assert sh_on["train"]().shuffle is not None and sh_off["train"]().shuffle is None
