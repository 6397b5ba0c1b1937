"""Stage 09: the modern switches, each checked for what it claims, and the ablation table."""

import json
import math
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT, load_stage
from test_stages import STEP_RE, tiny

import common.device
from common import UserError, ablation
from common.model import GPT, PRESETS, GPTConfig, preset_config

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16)
SWITCHES = ("--rows", "--seeds", "--dtype", "--muon-lr", "--data-dir", "--total-batch")
HEADINGS = ("RMSNorm", "no bias", "RoPE", "QK-norm", "ReLU^2 and SwiGLU", "Muon")


@pytest.fixture(scope="module")
def s09():
    return load_stage("09_modern")


@pytest.fixture
def micro(monkeypatch):
    """A preset smaller than tiny for the training tests: most of a CPU step is the
    vocabulary (50304 x n_embd), so n_embd 32 is ~4x faster than tiny's 128."""
    monkeypatch.setitem(PRESETS, "micro", dict(n_layer=2, n_head=2, n_embd=32, block_size=64))
    return "micro"


def test_the_stage_reads_top_to_bottom():
    """<= 280 lines (250 before ruff's own line breaks replaced the formatter markers), each
    modern change under its own heading, in the order the docstring names them; the harness
    (table, noise line, JSON) is common/ablation.py's."""
    src = (ROOT / "09_modern.py").read_text()
    assert len(src.splitlines()) <= 280
    at = [src.index(f"\n# --- {h}") for h in HEADINGS]
    assert at == sorted(at)
    assert (
        "def format_table" not in src
        and "import json" not in src
        and "ablation.run_ablation(" in src
    )


def built(s09, preset, switches):
    """The model of one run, shapes only (on the meta device)."""
    with torch.device("meta"):
        return s09.build(s09.Config(preset=preset), switches, "meta")[0]


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def small(s09, **switches):
    torch.manual_seed(0)
    config = GPTConfig(**TINY, tie_weights=True, gpt2_init=True, attn="sdpa")
    return s09.ModernGPT(s09.ModernConfig(**{**asdict(config), **switches}))


def test_baseline_is_gpt2(s09):
    """All switches off: the same parameter names as common.model.GPT and the same logits."""
    ours = small(s09)
    gpt = GPT(GPTConfig(**TINY, tie_weights=True, gpt2_init=True, attn="manual"))
    gpt.load_state_dict(ours.state_dict())  # strict: every name and shape matches
    idx = torch.randint(0, TINY["vocab_size"], (3, TINY["block_size"]))
    assert (ours(idx)[0] - gpt(idx)[0]).abs().max().item() < 1e-5
    assert num_params(ours) == gpt.num_params()
    # and the stage's real baseline (tiny preset) has GPT-2's names, HF's spelling
    base = built(s09, "tiny", {})
    with torch.device("meta"):
        ref = GPT(preset_config("tiny", tie_weights=True, gpt2_init=True, vocab_size=50304))
    assert list(base.state_dict()) == list(ref.state_dict())
    assert "transformer.h.0.attn.c_attn.weight" in base.state_dict()


def test_rope_has_no_wpe_and_sees_relative_positions(s09):
    model = small(s09, rope=True)
    assert not any("wpe" in name for name, _ in model.named_parameters())
    assert set(small(s09).state_dict()) - set(model.state_dict()) == {"transformer.wpe.weight"}
    T, hs, shift = 12, 16, 5
    cos, sin = s09.rope_tables(T + shift, hs)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hs, generator=g), torch.randn(hs, generator=g)
    xq, xk = q.expand(1, 1, T, hs), k.expand(1, 1, T, hs)  # the same q and k at every position
    rq, rk = s09.rotate(xq, cos[:T], sin[:T]), s09.rotate(xk, cos[:T], sin[:T])
    scores = (rq @ rk.transpose(-2, -1))[0, 0]  # (T, T): q at position m . k at position n
    for d in range(-T + 1, T):  # every diagonal (fixed m - n) holds one value
        diag = torch.diagonal(scores, offset=d)
        assert (diag - diag[0]).abs().max() < 1e-5
    assert (torch.diagonal(scores, 1)[0] - torch.diagonal(scores, -1)[0]).abs() > 1e-3
    # the whole sequence at positions shift..shift+T-1: the same scores
    sq, sk = s09.rotate(xq, cos[shift:], sin[shift:]), s09.rotate(xk, cos[shift:], sin[shift:])
    assert torch.allclose(sq @ sk.transpose(-2, -1), rq @ rk.transpose(-2, -1), atol=1e-5)
    assert torch.allclose(rq.norm(dim=-1), xq.norm(dim=-1), atol=1e-5)  # a rotation: same length


def test_rmsnorm_gives_unit_rms(s09):
    x = torch.randn(4, 7, 32) * 5 + 3  # far from unit scale, non-zero mean
    y = s09.RMSNorm(32)(x)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), torch.ones(4, 7), atol=1e-3)
    assert torch.allclose(y * x.pow(2).mean(-1, keepdim=True).sqrt(), x, atol=1e-3)  # a scale only
    model = small(s09, rmsnorm=True, bias=False)
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.ln_f.weight" in names and not any(n.endswith(".bias") for n in names)


@pytest.mark.parametrize("preset", ["tiny", "gpt2"])
def test_swiglu_keeps_the_parameter_count(s09, preset):
    gelu, swiglu = built(s09, preset, dict(mlp="gelu")), built(s09, preset, dict(mlp="swiglu"))
    mlp = lambda m: sum(p.numel() for p in m.transformer.h[0].mlp.parameters())
    assert abs(mlp(swiglu) / mlp(gelu) - 1) < 0.01
    assert abs(num_params(swiglu) / num_params(gelu) - 1) < 0.01


def test_newton_schulz_orthogonalizes(s09):
    """Newton-Schulz with the quintic coefficients, 5 steps, bf16: not exact. The singular
    values of a random gradient (spread ~6x) land in ~[0.68, 1.14]; the tolerance below is
    [0.6, 1.25]. Its direction is close to the exact U V^T of the SVD."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(64, 128, generator=g)
    s = torch.linalg.svdvals(G)
    assert s.max() / s.min() > 4
    for M in (G, G.T):  # wide and tall
        sv = torch.linalg.svdvals(s09.newton_schulz(M).float())
        assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    X = s09.newton_schulz(G).float()
    assert torch.nn.functional.cosine_similarity(X.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


def test_muon_update_is_near_orthogonal(s09):
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(96, 32, generator=g))  # tall, like c_fc's (4n, n)
    before = w.detach().clone()
    w.grad = torch.randn(96, 32, generator=g)
    lr = 0.1
    s09.Muon([w], lr=lr).step()
    update = (before - w.detach()) / (lr * math.sqrt(96 / 32))  # undo the lr and shape scale
    sv = torch.linalg.svdvals(update)
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min(), sv.max())


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
def test_muon_matches_torch_muon(s09):
    """Ours keeps the momentum as a sum, torch's as an average: a scale that Newton-Schulz
    divides out, so the steps agree up to bf16 rounding."""
    g = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(48, 24, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    ours = s09.Muon([a], lr=0.02, momentum=0.95)
    theirs = torch.optim.Muon([b], lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True)
    for _ in range(3):
        grad = torch.randn(48, 24, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert (a - b).abs().max().item() < 2e-3  # 3 steps of size ~0.02 * 1.4 per entry-rms


def test_muon_orthogonalizes_q_k_v_one_by_one(s09):
    """Split (the kept way): each of q, k, v gets its own near-orthogonal step. Fused: the
    stacked (3n, n) matrix is orthogonal as a whole, but a part with a small gradient (v
    here, 10x smaller) gets a step ~7x smaller than the others: their directions set it."""
    g = torch.Generator().manual_seed(3)
    n = 32
    grad = torch.cat(
        [
            torch.randn(n, n, generator=g),
            torch.randn(n, n, generator=g),
            0.1 * torch.randn(n, n, generator=g),
        ]
    )
    steps = {}
    for parts in (3, 1):
        w = torch.nn.Parameter(torch.zeros(3 * n, n))
        w.grad = grad.clone()
        s09.Muon([dict(params=[w], parts=parts)], lr=1.0, momentum=0.0).step()
        steps[parts] = -w.detach()
    for block in steps[3].chunk(3):  # split: every part's singular values near 1 (most of
        sv = torch.linalg.svdvals(block)  # them: a square random matrix has one tiny one)
        assert sv.median() > 0.7 and sv.max() < 1.25, (sv.median(), sv.max())
    norms = [b.norm() for b in steps[3].chunk(3)]
    assert max(norms) < 1.1 * min(norms)  # split: the same step size for q, k and v
    q, _, v = steps[1].chunk(3)
    assert torch.linalg.svdvals(v).max() < 0.6 and v.norm() < 0.25 * q.norm()  # v's step: small
    sv = torch.linalg.svdvals(steps[1] / math.sqrt(3))
    assert sv.min() > 0.6 and sv.max() < 1.25  # ... while the whole is orthogonal


def test_make_optimizers_splits_what_is_fused(s09):
    """muon: c_attn in 3 parts, SwiGLU's c_fc in 2, every other block matrix whole; muon_fused:
    all whole. Every parameter is in exactly one optimizer, the tied matrix once."""
    cfg = s09.Config(preset="tiny")
    for name, attn, fc in (("muon", 3, 2), ("muon_fused", 1, 1)):
        model, (adamw, muon) = s09.build(cfg, dict(mlp="swiglu", optimizer=name), "meta")
        parts = {id(g["params"][0]): g["parts"] for g in muon.param_groups}
        block = model.transformer.h[0]
        assert parts[id(block.attn.c_attn.weight)] == attn
        assert parts[id(block.mlp.c_fc.weight)] == fc and parts[id(block.mlp.c_proj.weight)] == 1
        ids = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())
        assert id(model.lm_head.weight) in {id(p) for g in adamw.param_groups for p in g["params"]}
    (adamw,) = s09.build(cfg, {}, "meta")[1]
    assert isinstance(adamw, torch.optim.AdamW)


def test_rows_join_with_plus_and_dtype_reaches_the_harness(s09, monkeypatch):
    joined = "rope+rmsnorm+qk_norm+swiglu+nobias+muon"
    assert ablation.parse_rows(joined, s09.ROWS)[joined] == s09.ROWS["all"]
    seen = {}
    monkeypatch.setattr(
        ablation,
        "run_ablation",
        lambda cfg, rows, build, device, dtype: seen.update(rows=rows, dtype=dtype),
    )
    monkeypatch.setattr(common.device, "cpu_info", lambda: ("a CPU", {"avx512_bf16"}))  # bf16 math
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        s09.main(s09.Config(device="cpu", rows="baseline,rope+relu2", dtype=name))
        assert seen == dict(
            rows={"baseline": {}, "rope+relu2": dict(rope=True, mlp="relu2")}, dtype=dtype
        )
    assert s09.Config.cpu["dtype"] == "float32" and s09.Config().dtype == "bfloat16"


def test_every_row_trains_and_the_table_says_it_is_noise(s09, shakespeare, micro, tmp_path, capsys):
    """Every switch alone and all together: 10 steps of 64 tokens each, the loss falls.
    (At this size the higher learning rates make the falls clear; no ranking is checked.)"""
    cfg = tiny(
        s09,
        preset=micro,
        input=str(shakespeare),
        batch_size=2,
        seq_len=32,
        total_batch=64,
        steps=10,
        warmup_steps=2,
        max_lr=1e-2,
        muon_lr=0.05,
        seeds=1,
        rows=",".join(s09.ROWS),
        val_steps=2,
        out=str(tmp_path),
    )
    out = s09.main(cfg)
    assert [r["name"] for r in out["rows"]] == list(s09.ROWS)
    for name, (run,) in out["runs"].items():
        losses = run["losses"]
        assert all(math.isfinite(v) for v in losses), name
        assert min(losses[-3:]) < losses[0] - 0.5, (name, losses)  # falls, whatever the switch
        assert run["val_loss"] < losses[0], name
    assert out["tokens"] == 10 * 64  # equal data for every row
    params = {r["name"]: r["params"] for r in out["rows"]}
    assert params["rope"] == params["baseline"] - 64 * 32  # no wpe
    assert params["nobias"] < params["baseline"] and params["muon"] == params["baseline"]
    text = capsys.readouterr().out
    assert sum(1 for line in text.splitlines() if STEP_RE.match(line)) == 10 * len(s09.ROWS)
    table = text[text.index("\nrow ") :]
    for name in s09.ROWS:
        assert any(line.split()[:1] == [name] for line in table.splitlines()), name
    assert "noise: one seed per row" in text and "CPU scale" in text
    assert "summary:" in text
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["name"] for r in saved["rows"]] == list(s09.ROWS) and saved["tokens"] == 640


def test_bad_rows_fail_before_any_training(s09, capsys):
    with pytest.raises(UserError, match="unknown row 'turbo'"):
        s09.main(s09.Config(device="cpu", rows="baseline,rope+turbo"))
    assert capsys.readouterr().out == ""  # nothing trained, nothing loaded


def test_help_lists_every_switch(helps):
    code, text = helps["09_modern"]  # `python 09_modern.py --help`
    assert code == "0"
    for flag in SWITCHES:
        assert flag in text, flag
    assert "Stage 09" in text and "(a+b: both" in text
