"""Every stage runs: main(cfg) with a tiny config in-process, and a few runs as a user would."""

import math
import re
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, load_stage, run_script

from common.model import GPT2_VOCAB

STEP_RE = re.compile(
    r"^step +(\d+)(?:/\d+ \([\d.]+%\))? \| loss (\d+\.\d{4})( \| lr [\d.e+-]+)?"
    r"( \| norm [\d.]+)?( \| dt [\d.]+ms)?( \| tok/s [\d,]+)?( \| eta \S+)?"
)


def tiny(stage, **kw):
    """The stage's Config with its CPU defaults plus overrides."""
    cfg = stage.Config(device="cpu")
    return replace(cfg, **{**getattr(stage.Config, "cpu", {}), **kw})


def test_00_model_tour(capsys):
    stage = load_stage("00_model")
    out = stage.main(tiny(stage))
    assert out["params"] == sum(out["table"].values()) == 13_691_904
    assert abs(out["loss_init"] - math.log(50257)) < 0.5
    assert out["causal_before"] == 0.0 and out["causal_after"] > 0
    assert out["sample"].startswith("Hello, I'm a language model,")
    assert "loss at init" in capsys.readouterr().out


def test_01_hf_eval_parity(hf_tiny_dir, capsys):
    stage = load_stage("01_hf_eval")
    out = stage.main(tiny(stage, model=str(hf_tiny_dir), new_tokens=10))
    assert out["max_abs_diff"] < 1e-5
    assert len(out["samples"]) == 5 and len(set(out["samples"])) == 5  # 5 different draws
    assert all(s.startswith("Hello, I'm a language model,") for s in out["samples"])
    again = stage.main(tiny(stage, model=str(hf_tiny_dir), new_tokens=10))
    assert again["samples"] == out["samples"]  # seed 42: same text every run


def test_02_overfits_one_batch(shakespeare):
    stage = load_stage("02_overfit_batch")
    out = stage.main(tiny(stage, input=str(shakespeare), steps=25, lr=3e-3))  # fewer steps
    assert out["losses"][0] > 10 and out["final_loss"] < 0.5


def test_03_dataloader_loss_falls(shakespeare):
    stage = load_stage("03_dataloader")
    out = stage.main(
        tiny(stage, input=str(shakespeare), steps=20, batch_size=4, seq_len=32, lr=3e-3)
    )
    losses = out["losses"]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 3  # learned something about English


def test_04_tying_and_init(shakespeare, capsys):
    stage = load_stage("04_best_practices")
    out = stage.main(
        tiny(stage, input=str(shakespeare), steps=20, batch_size=4, seq_len=32, lr=3e-3)
    )
    assert "parameters: 7,259,008 (tying saved 6,432,896)" in capsys.readouterr().out
    assert 6_432_896 == GPT2_VOCAB * 128  # tying saves vocab_size x n_embd
    assert abs(out["losses"][0] - math.log(GPT2_VOCAB)) < 0.15  # GPT-2 init: near-uniform
    assert sum(out["losses"][-5:]) / 5 < out["losses"][0] - 2


STAGES = sorted(p.stem for p in ROOT.glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("name", STAGES)
def test_help_lists_shared_flags(helps, name):
    code, text = helps[name]
    assert code == "0"
    assert "--device" in text and "--seed" in text
    assert f"Stage {name[:2]}" in text  # the docstring is the description


def test_cli_run_prints_step_lines(cache_env, shakespeare):
    args = [
        "03_dataloader.py",
        "--input",
        str(shakespeare),
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--device",
        "cpu",
    ]
    r = run_script(args, env=cache_env)
    assert r.returncode == 0, r.stderr
    steps = [m for m in map(STEP_RE.match, r.stdout.splitlines()) if m]
    assert [int(m.group(1)) for m in steps] == [0, 1, 2, 3]
    assert all(m.group(5) and m.group(6) for m in steps)  # dt and tok/s present
    # on a CPU the CPU default of the one flag not given (lr) applies, and the line says so
    assert r.stdout.splitlines()[0].startswith(
        "--device cpu: using the CPU defaults (lr=0.001; as given: device=cpu, preset=tiny, input="
    )
    assert re.search(r"summary: 4 batches of 2x16 tokens", r.stdout)


def test_cli_auto_cpu_defaults(cache_env, shakespeare):
    if torch.cuda.is_available():
        pytest.skip("CPU defaults apply only without CUDA")
    r = run_script(
        ["02_overfit_batch.py", "--input", str(shakespeare), "--steps", "3"], env=cache_env
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("No CUDA GPU: using the CPU defaults (preset=tiny")
    assert sum(1 for line in lines if STEP_RE.match(line)) == 3  # --steps given: it wins


BAD = [
    (["00_model.py", "--preset", "gpt5"], "unknown preset 'gpt5'"),
    (["01_hf_eval.py", "--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["03_dataloader.py", "--input", "/no/such/file.txt"], "input file not found"),
    (
        [
            "04_best_practices.py",
            "--input",
            "/no/such/file.txt",
            "--preset",
            "tiny",
            "--seq-len",
            "512",
        ],
        "exceeds block_size 256 of --preset tiny",
    ),  # said before the input is read
    (["02_overfit_batch.py", "--device", "cuda"], "no CUDA GPU"),
    (["02_overfit_batch.py", "--steps", "many"], "invalid int value"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[b[1] for b in BAD])
def test_bad_input_is_one_clear_line(args, message, cache_env):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    r = run_script(args, env=cache_env)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert message in r.stderr.strip().splitlines()[-1]
    lines = [s for s in r.stderr.splitlines() if s.startswith("error:") or ": error:" in s]
    assert len(lines) == 1, r.stderr
