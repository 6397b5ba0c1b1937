"""common/plan.py: the memory and time planner, `--batch-size auto`, and the one-line
out-of-memory error (issue 27)."""

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, load_stage

from common import UserError, bench, plan
from common.checkpoint import list_checkpoints, load_checkpoint
from common.cli import parse_args
from common.model import GPT, GPTConfig

GiB = 2**30


def test_the_logits_and_loss_are_the_largest_item_at_gpt2_size():
    config = plan.model_config("gpt2")
    est = plan.estimate(config, 16, 1024, "bfloat16", compiled=False)
    # B x T x 50304: bf16 logits (2), fp32 log-probabilities (4), the two gradients (4 + 4)
    assert est["logits and loss"] == 16 * 1024 * 50304 * (2 + 4 + 4 + 4)
    items = dict(list(est.items())[:-3])  # the terms, without the two moments and the peak
    assert max(items, key=items.get) == "logits and loss"
    assert est["at the backward's start"] == sum(items.values()) == est["peak"]
    N = plan.meta_model(config).num_params()
    assert est["weights (fp32)"] == est["gradients (fp32)"] == 4 * N
    assert est["AdamW moments (2 x fp32)"] == 8 * N


def test_flash_attention_has_no_T_squared_term_and_manual_has():
    config = plan.model_config("gpt2")

    def per_token(attn, T):
        return sum(b for _, b in plan.layer_terms(config, T, 2, attn))

    assert per_token("sdpa", 2048) == per_token("sdpa", 512)  # per token: independent of T
    assert per_token("manual", 2048) - per_token("manual", 1024) == 6 * 12 * 1024  # (4 + 2) a T
    # compile recomputes the GELU output and the head merge: less kept
    assert sum(b for _, b in plan.layer_terms(config, 1024, 2, "sdpa", compiled=True)) < per_token(
        "sdpa", 1024
    )


def measure_step(config, B, T):
    return load_stage("bench/plan_memory").measure(config, B, T)


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_estimate_is_within_15_percent_of_a_measured_cpu_step(attn):
    """fp32 on this CPU: the planner's peak against the profiler's, for a real step
    (two micro-steps, AdamW). BENCHMARKS.md has the full table (bench/plan_memory.py)."""
    config = GPTConfig(
        n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304, tie_weights=True, attn=attn
    )
    for B in (2, 8):
        est = plan.estimate(config, B, 32, "float32", attn=attn)["peak"]
        got = measure_step(config, B, 32)
        assert abs(est / got - 1) < 0.15, (B, est, got)


def test_largest_batch_fits_keeps_the_total_batch_and_the_next_does_not():
    config = plan.model_config("gpt2")
    for memory in (16 * GiB, 24 * GiB, 80 * GiB):
        B, accum = plan.largest_batch(config, 1024, memory, 524288, dtype="bfloat16")
        assert B * 1024 * accum == 524288
        assert plan.estimate(config, B, 1024)["peak"] <= plan.usable(memory)
        bigger = plan.divisors_down(512)[plan.divisors_down(512).index(B) - 1]
        assert plan.estimate(config, bigger, 1024)["peak"] > plan.usable(memory)
    assert plan.largest_batch(config, 1024, 1 * GiB, 524288) == (None, None)
    with pytest.raises(UserError, match="not a multiple of T\\*GPUs"):
        plan.largest_batch(config, 1000, 80 * GiB, 524288)


def test_cli_for_a_card_prints_the_breakdown_largest_b_and_time(capsys):
    res = plan.main(parse_args(plan.Config, ["--gpu", "4090"]))
    text = capsys.readouterr().out
    B, accum = plan.largest_batch(plan.model_config("gpt2"), 1024, 24 * GiB, 524288)
    assert (res["batch_size"], res["accum_steps"]) == (B, accum)
    assert f"RTX 4090 (24 GiB; a run may use 21.6): --batch-size auto: B = {B} " in text
    for item in ("weights", "gradients", "AdamW moments", "activations", "logits and loss"):
        assert item in text
    assert re.search(
        r"time \(estimate\): 10\.0B tokens in [\d.]+ h on 1 x RTX 4090 at 165 TFLOPS", text
    )
    # hours = tokens * FLOPs per token / (MFU * peak)
    per_token = bench.flops_per_token(plan.meta_model(plan.model_config("gpt2")), 1024)
    assert res["hours"] == pytest.approx(19073 * 524288 * per_token / (0.4 * 165.2e12) / 3600)
    res = plan.main(parse_args(plan.Config, ["--memory", "24GiB", "--price", "2"]))
    assert res["batch_size"] == B and "hours" not in res  # no card: no peak, no time


def test_cli_errors_are_one_line():
    with pytest.raises(UserError, match="matches A100 40GB, A100 80GB"):
        plan.main(plan.Config(gpu="a100"))
    with pytest.raises(UserError, match="not in the table"):
        plan.main(plan.Config(gpu="GTX 480"))
    with pytest.raises(UserError, match="give a size"):
        plan.main(plan.Config(memory="lots"))
    assert plan.parse_memory("24GiB") == plan.parse_memory("24 GB") == 24 * GiB
    assert plan.parse_memory("8000MiB") == 8000 * 2**20


def test_from_run_uses_the_measured_mfu_and_price_gives_a_cost(tmp_path, capsys):
    rows = [dict(step=0, split="run", run={})] + [
        dict(step=s, split="train", loss=3.0, mfu=0.9 if s < 10 else 0.25) for s in range(30)
    ]  # the first 10 steps (compilation) are left out
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = plan.main(plan.Config(gpu="H100", from_run=str(tmp_path), price=3.0))
    text = capsys.readouterr().out
    assert res["mfu"] == 0.25 and f"measured in {tmp_path}" in text
    assert f"${res['hours'] * 3.0:,.0f} at $3.00/GPU-hour" in text
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plan.main(plan.Config(from_run=str(tmp_path / "none")))


def test_every_card_row_and_the_readme_table_agree(capsys):
    """The "Which GPU?" table (README.md or docs/) holds the planner's figures."""
    res = plan.main(plan.Config())
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = next(t for t in (p.read_text() for p in docs if p.exists()) if "### Which GPU?" in t)
    table = text.split("### Which GPU?")[1]
    assert set(res["cards"]) == set(bench.CARDS)
    for name, row in res["cards"].items():
        m = re.search(
            rf"^\| {re.escape(name)} \| (\d+) GB \| (\d+) \| (\d+) \| ([\d.]+) h \|", table, re.M
        )
        assert m, name
        assert int(m[1]) == bench.CARDS[name].memory_gib
        assert (int(m[2]), int(m[3])) == (row["batch_size"], row["accum_steps"]), name
        assert float(m[4]) == round(row["hours"], 1), name


def test_card_table_matches_device_names():
    assert bench.card_for("NVIDIA A100-SXM4-40GB")[0] == "A100 40GB"
    assert bench.card_for("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert bench.card_for("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert bench.card_for("NVIDIA L40S")[0] == "L40S" and bench.card_for("NVIDIA L4")[0] == "L4"
    assert bench.card_for("Tesla T4")[1].bf16 is None  # fp16 only: 07 runs it with a GradScaler
    assert bench.card_for("NVIDIA GeForce GTX 1080") == (None, None)


# --- --batch-size auto ---------------------------------------------------------------------


def oom_above(limit):
    """GPT.forward that runs out of memory (as CUDA would) for batches larger than limit."""
    forward = GPT.forward

    def patched(self, idx, *args, **kwargs):
        if idx.size(0) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, idx, *args, **kwargs)

    return patched


def test_auto_halves_on_out_of_memory_and_says_so(monkeypatch, capsys):
    s07 = load_stage("07_ddp_fineweb")
    cfg = replace(s07.Config(), preset="tiny", seq_len=32, total_batch=32 * 32, dtype="float32")
    monkeypatch.setattr(GPT, "forward", oom_above(4))
    rng = torch.get_rng_state()
    B = plan.auto_batch_size(cfg, "cpu", memory=64 * GiB, card="a test card")
    assert torch.equal(torch.get_rng_state(), rng)  # the run's seed still decides its weights
    text = capsys.readouterr().out
    assert B == 4
    tried = re.findall(r"B=(\d+) ran out of memory; trying B=(\d+)", text)
    assert tried == [("32", "16"), ("16", "8"), ("8", "4")]  # 32: the planner's, for 64 GiB
    line = re.search(
        r"--batch-size auto: B=4, 8 micro-step\(s\) of 4x32 per GPU per optimizer "
        r"step; peak memory ([\d.]+) GiB estimated, ([\d.]+) GiB measured, of 64.0 "
        r"GiB on a test card",
        text,
    )
    assert line and float(line[2]) > 0
    monkeypatch.setattr(GPT, "forward", oom_above(0))
    with pytest.raises(UserError, match="out of memory even at B=1"):
        plan.auto_batch_size(cfg, "cpu", memory=64 * GiB)


def test_auto_on_a_gpu_plans_for_the_share_of_memory_the_process_may_use(monkeypatch):
    """Under torch.cuda.set_per_process_memory_fraction (a smaller card, emulated), auto plans
    for that share of the card, not all of it; without a cap, for the whole card."""
    s07 = load_stage("07_ddp_fineweb")
    card = type("Props", (), {"total_memory": 80 * GiB, "name": "NVIDIA H100 80GB HBM3"})
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    monkeypatch.setattr(plan, "auto_batch_size", lambda *a: asked.append(a) or 16)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.3, False)
    assert plan.fit_batch_size(s07.Config(), "cuda:0").batch_size == 16
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0, False)
    plan.fit_batch_size(s07.Config(), "cuda:0")
    (capped, whole) = [(memory, name) for _, _, memory, _, name in asked]
    assert capped == (0.3 * 80 * GiB, "NVIDIA H100 80GB HBM3 capped at 30%")
    assert whole == (80 * GiB, "NVIDIA H100 80GB HBM3")


def test_auto_on_a_cpu_is_the_cpu_default_and_a_number_is_kept():
    s07 = load_stage("07_ddp_fineweb")
    assert plan.fit_batch_size(s07.Config(), "cpu").batch_size == s07.Config.cpu["batch_size"]
    assert plan.fit_batch_size(s07.Config(batch_size=3), "cuda").batch_size == 3
    assert parse_args(s07.Config, ["--device", "cpu", "--batch-size", "auto"]).batch_size == 8
    with pytest.raises(UserError, match="a positive integer or auto"):
        parse_args(s07.Config, ["--batch-size", "most"])


# --- out of memory in a run: one line, nothing lost; a resume at half the batch -------------

INJECT = """
import runpy, sys, torch
from common.model import GPT
forward, calls = GPT.forward, [0]
def patched(self, idx, *args, **kwargs):  # out of memory from the {after}th training forward on
    if self.training and idx.size(0) > {limit}:
        calls[0] += 1
        if calls[0] > {after}:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return forward(self, idx, *args, **kwargs)
GPT.forward = patched
sys.argv = {argv}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_injected(argv, env, limit, after):
    code = INJECT.format(limit=limit, after=after, argv=argv)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_out_of_memory_is_one_line_touches_no_checkpoint_and_half_the_batch_resumes(
    shards, tmp_path, cache_env
):
    """B=4: out of memory at step 4 (after the step-3 checkpoint). One line, exit code 1,
    the checkpoint untouched; the command it names (--batch-size 2 --resume) finishes the
    run with the same tokens per step and the same losses as a run never stopped."""
    args = [
        "07_ddp_fineweb.py",
        "--data-dir",
        str(shards),
        "--device",
        "cpu",
        "--seq-len",
        "32",
        "--total-batch",
        "256",
        "--steps",
        "6",
        "--warmup-steps",
        "2",
        "--val-every",
        "0",
        "--sample-every",
        "0",
        "--ckpt-every",
        "3",
        "--dtype",
        "float32",
    ]
    env = {**cache_env, "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    full_run = subprocess.Popen(
        [sys.executable, *args, "--batch-size", "4", "--out", str(full)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # meanwhile
    r = run_injected([*args, "--batch-size", "4", "--out", str(cut)], env, limit=2, after=3 * 2)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith("error: out of memory at step 3, micro-step 1 of 2 (B=4, T=32); ")
    assert (
        "rerun with --batch-size 2, the same 256 tokens per step (or --batch-size auto): " in line
    )
    assert line.endswith(f"--batch-size 2 --resume; newest checkpoint: {cut / 'ckpt_000003.pt'}")
    assert [p.name for p in list_checkpoints(cut)] == ["ckpt_000003.pt"]
    assert load_checkpoint(cut / "ckpt_000003.pt")["step"] == 3  # verifies: written whole
    assert not [p for p in cut.iterdir() if ".tmp" in p.name]  # no half-written save
    before = hashlib.sha256((cut / "ckpt_000003.pt").read_bytes()).hexdigest()
    # the command it names: another micro-batch, the same tokens per optimizer step
    r = subprocess.run(
        [sys.executable, *args, "--batch-size", "2", "--out", str(cut), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert full_run.wait(timeout=300) == 0, full_run.stderr.read()
    full_run.stderr.close()
    assert "resumed from step 3" in r.stdout and "4 micro-steps of 2x32" in r.stdout
    assert hashlib.sha256((cut / "ckpt_000003.pt").read_bytes()).hexdigest() == before
    rows = {
        p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        for p in (full, cut)
    }
    train = {p: {x["step"]: x for x in rows[p] if x["split"] == "train"} for p in rows}
    assert sorted(train[cut]) == list(range(6))
    for s in range(6):  # the same tokens every step: the same losses (fp32, in another order)
        assert train[cut][s]["tokens"] == train[full][s]["tokens"] == (s + 1) * 256
        assert train[cut][s]["loss"] == pytest.approx(train[full][s]["loss"], rel=1e-5)
    headers = [x["run"]["config"]["batch_size"] for x in rows[cut] if x["split"] == "run"]
    assert headers == [4, 2]  # metrics.jsonl says which B each part ran at
    assert load_checkpoint(cut)["config"]["batch_size"] == 2
    assert load_checkpoint(cut / "ckpt_000003.pt")["config"]["batch_size"] == 4


def test_out_of_memory_in_stage_05_is_one_line(tmp_path, cache_env, shakespeare):
    argv = ["05_speedups.py", "--input", str(shakespeare), "--benchmark", "none", "--steps", "3"]
    r = run_injected(argv, {**cache_env, "OMP_NUM_THREADS": "1"}, limit=4, after=1)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: out of memory at step 1 (B=8, T=64); ")
    assert "rerun with --batch-size 4: python 05_speedups.py --input" in r.stderr  # no auto in 05
    assert r.stderr.strip().endswith("newest checkpoint: none")
