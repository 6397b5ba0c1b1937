"""Stage 05 (speedups, benchmark, --compare-hf) and stage 06 (GPT-3 hyperparameters)."""

import json
import math
import re
from dataclasses import replace

import pytest
import torch
from conftest import load_stage, run_script
from test_stages import STEP_RE, tiny

from common import UserError, bench
from common.cli import parse_args
from common.data import TextLoader, get_tokenizer
from common.model import GPT, GPTConfig
from common.train import lr_at, make_optimizer


@pytest.fixture(scope="module")
def s05():
    return load_stage("05_speedups")


@pytest.fixture(scope="module")
def s06():
    return load_stage("06_hyperparams")


def test_05_benchmark_has_every_row(s05, shakespeare, tmp_path):
    """The whole table on CPU, torch.compile included (~30 s of compilation)."""
    cfg = tiny(
        s05,
        input=str(shakespeare),
        batch_size=2,
        seq_len=32,
        timed=3,
        steps=2,
        json=str(tmp_path / "bench.json"),
    )
    out = s05.main(cfg)
    rows = {r["name"]: r for r in out["benchmark"]["rows"]}
    assert list(rows) == ["fp32", "tf32", "bf16", "flash", "vocab", "compile"]
    assert rows["tf32"]["status"] == "n/a" and "CUDA" in rows["tf32"]["reason"]
    bf16 = bench.cpu_has_bf16() is not False  # a CPU without bf16 math: the row says why not
    assert rows["bf16"]["status"] == ("ok" if bf16 else "n/a")
    for name in [n for n in ("fp32", "bf16", "flash", "vocab", "compile") if bf16 or n != "bf16"]:
        r = rows[name]
        assert r["status"] == "ok" and r["ms"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1  # against the matmul peak measured in the same run
    assert rows["fp32"]["vs_base"] == 1.0 and rows["fp32"]["vs_prev"] is None
    prev = "bf16" if bf16 else "flash"
    assert rows[prev]["vs_prev"] == pytest.approx(
        rows[prev]["tokens_per_s"] / rows["fp32"]["tokens_per_s"]
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows)
    assert saved["torch"] == torch.__version__ and saved["hardware"] and saved["measured_peak"] > 0


def test_05_rows_are_timed_in_interleaved_rounds(s05, monkeypatch):
    """Every round times every row in turn, so no row alone pays a warm-up or a slow moment."""
    order = []  # the order is the point: no step is taken (test_05_benchmark_has_every_row
    # runs them)
    monkeypatch.setattr(
        bench.Row,
        "run",
        lambda self, x, y, n, timed=True: (
            order.append((self.name, timed)),
            self.times.extend([0.01] * n * timed),
        ),
    )
    cfg = tiny(s05, batch_size=2, seq_len=16, timed=3, benchmark="all")
    bench.speedup_table(replace(cfg, device="cpu"), "cpu")
    names = ["fp32", "bf16", "flash", "vocab", "compile"]
    if bench.cpu_has_bf16() is False:  # no bf16 math on this CPU: the row is n/a, never timed
        names.remove("bf16")
    assert order == [(n, False) for n in names] + [(n, True) for n in names] * bench.ROUNDS


def test_05_fp16_row_and_grad_scaler(s05, shakespeare):
    """float16 (GPUs without bf16): the table's half row is fp16 and training uses a scaler.
    (Small sizes: float16 matmuls are slow on a CPU.)"""
    cfg = tiny(
        s05,
        input=str(shakespeare),
        batch_size=2,
        seq_len=16,
        timed=2,
        steps=5,
        dtype="float16",
        benchmark="fp16",
    )
    out = s05.main(cfg)
    assert [r["name"] for r in out["benchmark"]["rows"]] == ["fp16"]
    assert out["benchmark"]["rows"][0]["status"] == "ok"
    assert all(map(math.isfinite, out["losses"])) and out["final_loss"] < out["losses"][0] - 0.5


def test_05_compare_hf(s05, shakespeare):
    cfg = tiny(
        s05,
        input=str(shakespeare),
        batch_size=2,
        seq_len=32,
        timed=3,
        steps=1,
        benchmark="flash",
        compare_hf=True,
    )
    rows = s05.main(cfg)["benchmark"]["rows"]
    assert [r["name"] for r in rows] == ["flash", "hf flash"]
    hf = rows[1]
    assert hf["ours_over_hf"] == pytest.approx(rows[0]["tokens_per_s"] / hf["tokens_per_s"])


def test_05_fp32_row_trains_like_stage_04(s05, shakespeare):
    """The speedups change speed, not the math: the table's fp32 row is stage 04's model."""
    s04 = load_stage("04_best_practices")
    a = s04.main(tiny(s04, input=str(shakespeare), steps=4))["losses"]
    row = bench.Row("fp32", ["fp32"], "tiny", 1337, "cpu", lr=1e-3)
    loader = TextLoader(get_tokenizer().encode_ordinary(shakespeare.read_text()), 8, 64)
    b = [row.step(*loader.next_batch()).item() for _ in range(4)]
    assert b == pytest.approx(a, abs=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--benchmark", "turbo"], "unknown --benchmark 'turbo'"),
        (["--benchmark", "tf32", "--steps", "0"], "--benchmark tf32 does not apply here"),
        (["--dtype", "float8"], "--dtype must be one of bfloat16, float16, float32 (got float8)"),
    ],
)
def test_05_bad_names_are_refused_before_any_work(s05, args, message, capsys):
    if "tf32" in args and torch.cuda.is_available():
        pytest.skip("TF32 applies on CUDA")
    with pytest.raises(UserError) as e:  # as `python 05_speedups.py --device cpu ...` runs it
        s05.main(parse_args(s05.Config, ["--device", "cpu", *args]))
    assert message in str(e.value) and "\n" not in str(e.value)
    out = capsys.readouterr().out
    assert "benchmark:" not in out and "step " not in out  # refused before any work


def test_05_cli_json(cache_env, tmp_path, shakespeare):
    r = run_script(
        [
            "05_speedups.py",
            "--preset",
            "tiny",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--steps",
            "0",
            "--benchmark",
            "flash",
            "--timed",
            "3",
            "--input",
            str(shakespeare),
            "--json",
            str(tmp_path / "b.json"),
        ],
        env=cache_env,
    )
    assert r.returncode == 0, r.stderr
    assert "flash" in r.stdout and "tok/s" in r.stdout and "torch " + torch.__version__ in r.stdout
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["name"] == "flash"
    assert not re.search(r"^step ", r.stdout, flags=re.M)  # --steps 0: the table alone


# ---- stage 06 ----------------------------------------------------------------------------


def test_lr_schedule_values():
    kw = dict(max_lr=6e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(6e-5)  # 1/10 of the peak
    assert lr_at(9, **kw) == pytest.approx(6e-4)  # end of warmup: the peak
    assert lr_at(10, **kw) == pytest.approx(6e-4)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway down the cosine
    assert lr_at(110, **kw) == pytest.approx(6e-5) and lr_at(500, **kw) == pytest.approx(6e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_decay_groups_cover_every_parameter_once():
    model = GPT(
        GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16, tie_weights=True)
    )
    optimizer = make_optimizer(model, 0.1, 1e-3, "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # tied wte/lm_head once
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert any(names[id(p)] == "transformer.wte.weight" for p in decay["params"])
    assert all(
        names[id(p)].endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
        for p in no_decay["params"]
    )
    assert optimizer.defaults["fused"] is False and optimizer.defaults["betas"] == (0.9, 0.95)


def test_gradient_accumulation_equals_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16))
    x, y = torch.randint(0, 97, (8, 16)), torch.randint(0, 97, (8, 16))
    _, loss = model(x, y)
    loss.backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for xs, ys in zip(x.chunk(4), y.chunk(4)):  # 4 micro-batches of 2
        _, loss = model(xs, ys)
        (loss / 4).backward()
    for g, p in zip(big, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_clipping_caps_the_norm():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=16))
    _, loss = model(torch.randint(0, 97, (2, 8)), torch.randint(0, 97, (2, 8)))
    (loss * 100).backward()  # a large gradient
    before = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert before > 1.0 and after == pytest.approx(1.0, rel=1e-4)


def test_06_accumulation_matches_one_big_batch(s06, shakespeare):
    """The script's loop: 2 micro-steps of B=4 take the same steps as 1 of B=8 (same tokens)."""
    base = tiny(s06, input=str(shakespeare), steps=4, seq_len=32, dtype="float32")
    a = s06.main(replace(base, batch_size=4, total_batch=8 * 32))
    b = s06.main(replace(base, batch_size=8, total_batch=8 * 32))
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-4)
    assert a["norms"] == pytest.approx(b["norms"], rel=1e-3)


def test_06_trains_and_reports(s06, shakespeare, capsys):
    out = s06.main(tiny(s06, input=str(shakespeare), steps=16, seq_len=32, total_batch=512))
    text = capsys.readouterr().out
    assert "2 micro-steps of 8x32 per step" in text  # the CPU preset still accumulates
    lines = [m for m in map(STEP_RE.match, text.splitlines()) if m]
    assert len(lines) == 16 and all(m.group(3) and m.group(4) for m in lines)  # lr and norm
    assert out["final_loss"] < out["losses"][0] - 1.5 and all(map(math.isfinite, out["norms"]))
    assert "summary: 16 steps of 512 tokens" in text


def test_06_total_batch_must_divide(s06, shakespeare):
    with pytest.raises(UserError, match="not a multiple of B\\*T = 512"):
        s06.main(tiny(s06, input=str(shakespeare), total_batch=1000))


def test_06_float16_with_grad_scaler_trains(s06, shakespeare):
    """--dtype float16 (older GPUs): autocast to fp16, the loss scaled, gradients unscaled
    before clipping; on CPU too, so the path is tested without a GPU."""
    cfg = tiny(
        s06,
        input=str(shakespeare),
        steps=6,
        batch_size=2,
        seq_len=16,
        total_batch=64,
        dtype="float16",
    )
    out = s06.main(cfg)
    assert all(map(math.isfinite, out["losses"])) and out["final_loss"] < out["losses"][0] - 0.5
    assert all(math.isfinite(n) for n in out["norms"])  # unscaled: true norms, not x 65536
    assert max(out["norms"]) < 100


@pytest.mark.parametrize(
    "flags, has",
    [
        ({"avx2", "fma"}, False),
        ({"avx512_bf16"}, True),
        ({"amx_bf16"}, True),
        ({"fp", "asimd", "bf16"}, True),
        (set(), None),
    ],
)
def test_a_cpu_without_bf16_math_trains_in_float32(monkeypatch, capsys, flags, has):
    """Autocast on a CPU without bf16 instructions emulates bf16 (50-65x slower than fp32 on an
    AVX2 EPYC): --dtype bfloat16 falls back to float32 with one line, 05's bf16 row says why.
    Unknown flags (no /proc/cpuinfo) change nothing."""
    import common.device

    monkeypatch.setattr(common.device, "cpu_info", lambda: ("some CPU", flags))
    assert bench.cpu_has_bf16() is has
    want = torch.float32 if has is False else torch.bfloat16
    assert common.device.amp_dtype("bfloat16", "cpu") is want
    said = capsys.readouterr().out
    assert ("no bf16 instructions" in said) is (has is False)
    assert (bench.unavailable("bf16", "cpu") is None) is (has is not False)
    assert common.device.amp_dtype("float32", "cpu") is torch.float32
