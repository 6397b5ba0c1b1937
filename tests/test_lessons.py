"""Each stage shows its lesson's code, and common/ holds the same code for the stages after it.

`diff A.py B.py` of two adjacent stages is the lesson: these tests keep each diff within its
budget and check that it holds the idea's own code (not a flag); then that the code a stage
writes out and the copy in common/ give the same result, so the two never drift.
"""

import inspect
import math
import os
import re
import shutil
import subprocess
import textwrap
import types
from dataclasses import replace

import pytest
import torch
from conftest import ROOT, load_stage

from common import bench
from common.data import ShardLoader, TextLoader, shuffled_windows
from common.model import GPT, GPT2_VOCAB, gpt2_init, preset_config
from common.distributed import setup_ddp
from common.train import lr_at, make_optimizer

# (a, b): (budget of `diff a b | grep -c '^[<>]'`, code the diff must contain)
LESSONS = {
    ("00_model", "01_hf_eval"): (140, "from_pretrained("),
    ("01_hf_eval", "02_overfit_batch"): (110, "loss.backward()"),
    ("02_overfit_batch", "03_dataloader"): (60, "class TextLoader"),
    ("03_dataloader", "04_best_practices"): (
        40,
        "model.transformer.wte.weight = model.lm_head.weight",
    ),
    ("04_best_practices", "05_speedups"): (80, 'torch.set_float32_matmul_precision("high")'),
    # 06: + (issue 27) `--batch-size auto` (4 lines; 05 trains at one fixed batch, no accumulation)
    # and (issue 29) ruff's own line breaks where a formatter marker kept a line whole (6 lines)
    ("05_speedups", "06_hyperparams"): (90, "math.cos(math.pi * progress)"),
    # 07: DDP and validation, plus (issue 20) the shuffled order and (issue 19) a store per
    # restart attempt: 218 lines where DDP + validation alone took 191; (issue 26) ddp_exit
    # around main, (issue 27) auto for 07's GPUs, (issue 29) ruff's line breaks: 234
    ("06_hyperparams", "07_ddp_fineweb"): (235, 'dist.init_process_group(backend="nccl"'),
}
ALSO = {  # more of each lesson's code that must be in its diff
    ("04_best_practices", "05_speedups"): [
        "torch.autocast(",
        "torch.compile(",
        'attn="sdpa"',
        "vocab_size=50304",
        "GradScaler(",
    ],
    ("05_speedups", "06_hyperparams"): [
        "p.dim() >= 2",
        "fused=fused",
        "clip_grad_norm_",
        "loss / accum_steps",
    ],
    ("06_hyperparams", "07_ddp_fineweb"): [
        'os.environ["RANK"]',
        "require_backward_grad_sync",
        "DDP(model",
        "def evaluate_val",
        "def shuffled_windows",
        "rng.permutation(",
    ],
}


def diff_lines(a, b):
    """The changed lines of `diff a.py b.py` (what a learner reads), without the markers."""
    if shutil.which("diff"):
        out = subprocess.run(
            ["diff", f"{a}.py", f"{b}.py"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        return [line[2:] for line in out.splitlines() if line[:1] in "<>"]
    import difflib

    la, lb = ((ROOT / f"{n}.py").read_text().splitlines() for n in (a, b))
    return [
        d[2:]
        for d in difflib.unified_diff(la, lb, n=0)
        if d[:1] in "+-" and d[:3] not in ("+++", "---")
    ]


def code_key(code, doc=None):
    """What a code object computes with: bytecode, constants (with their types: 1 is not 1.0;
    nested code objects, such as lambdas, compared the same way), names and local names. Not
    the docstring `doc`, line numbers or the file name."""
    consts = tuple(
        code_key(c) if isinstance(c, types.CodeType) else (type(c).__name__, c)
        for c in code.co_consts
        if doc is None or c != doc
    )
    return (
        code.co_code,
        consts,
        code.co_names,
        code.co_varnames,
        code.co_freevars,
        code.co_cellvars,
    )


def same_code(a, b):
    """A stage's written-out function and common/'s are the same code (docstrings aside)."""
    return code_key(a.__code__, a.__doc__) == code_key(b.__code__, b.__doc__)


def edited(fn, old, new):
    """fn compiled again from its source with `old` replaced by `new` (once, in its body)."""
    src = textwrap.dedent(inspect.getsource(fn))
    assert src.count(old) == 1, (fn.__name__, old)
    namespace = dict(fn.__globals__)
    exec(compile(src.replace(old, new), inspect.getsourcefile(fn), "exec"), namespace)
    return namespace[fn.__name__]


def test_same_code_catches_a_changed_constant_or_name():
    """co_code alone misses a changed constant or name (0.02 -> 0.01 keeps the bytecode:
    only the constant table changes); same_code does not. Both copies are compiled the same
    way (a function compiled alone can differ in bytecode from one in its module: 3.11 calls
    an imported module's function with LOAD_ATTR there, LOAD_METHOD here)."""
    s04 = load_stage("04_best_practices")
    for fn, old, new in (
        (s04.gpt2_init, "std=0.02", "std=0.01"),
        (s04.gpt2_init, "init.zeros_", "init.ones_"),
        (setup_ddp, 'backend="nccl"', 'backend="gloo"'),
        (lr_at, "(0.1 + 0.9", "(0.2 + 0.9"),
    ):
        same, changed = edited(fn, old, old), edited(fn, old, new)
        assert not same_code(changed, same), (fn.__name__, new)
        if "gloo" not in new:  # "gloo" is already a constant of setup_ddp: its index differs
            assert changed.__code__.co_code == same.__code__.co_code  # what co_code cannot see
    assert same_code(s04.gpt2_init, gpt2_init)  # docstrings differ, the code does not


def test_every_adjacent_diff_is_the_lesson_within_budget():
    report, problems = [], []
    for (a, b), (budget, code) in LESSONS.items():
        changed = diff_lines(a, b)
        report.append(f"diff {a}.py {b}.py: {len(changed)} changed lines (budget {budget})")
        if len(changed) > budget:
            problems.append(report[-1])
        text = "\n".join(changed)
        for snippet in [code, *ALSO.get((a, b), [])]:
            if snippet not in text:
                problems.append(f"diff {a} {b} lacks the lesson's code: {snippet}")
    print("\n".join(report))  # shown with -s, and in the report of a failure
    assert not problems, "\n".join(report + problems)


def test_model_file_is_the_model_only():
    src = (ROOT / "common" / "model.py").read_text()
    assert len(src.splitlines()) <= 250
    imports = re.findall(r"^\s*(?:from|import) (\S+)", src, flags=re.M)
    assert not [
        m
        for m in imports
        if m.startswith(("transformers", "common.generate", "common.sample", "common.hf"))
    ]
    assert "def generate" not in src and "def from_pretrained" not in src


def test_stages_name_things_plainly():
    """raw_model / model, one print0, no one-letter objects, one constant for 50,257."""
    for path in sorted(ROOT.glob("0[0-9]_*.py")):
        src = path.read_text()
        assert not re.search(r"^\s+(d|hs) = ", src, flags=re.M), path.name
        assert "lambda *a" not in src and "def print0" not in src, path.name
        assert "50257" not in src.replace("50,257", ""), path.name  # GPT2_VOCAB instead
    assert "raw_model = GPT(config)" in (ROOT / "07_ddp_fineweb.py").read_text()


def test_03_loader_equals_common(shakespeare):
    s03 = load_stage("03_dataloader")
    tokens = list(range(1000))
    ours, theirs = s03.TextLoader(tokens, 4, 16), TextLoader(tokens, 4, 16)
    for _ in range(40):  # past the wrap-around
        (x1, y1), (x2, y2) = ours.next_batch(), theirs.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_04_tying_and_init_equal_common_bitwise():
    s04 = load_stage("04_best_practices")
    torch.manual_seed(7)
    model = GPT(preset_config("tiny"))  # stage 04's three lines, with its own function
    model.transformer.wte.weight = model.lm_head.weight
    model.apply(lambda module: s04.gpt2_init(module, model.config.n_layer))
    torch.manual_seed(7)
    common = GPT(preset_config("tiny", tie_weights=True, gpt2_init=True))
    a, b = model.state_dict(), common.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for m in (model, common):  # tied: one storage, not two equal copies
        assert m.transformer.wte.weight.data_ptr() == m.lm_head.weight.data_ptr()
    assert same_code(s04.gpt2_init, gpt2_init)  # the same code, constants and names
    proj = common.transformer.h[0].attn.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 * (2 * 4) ** -0.5, rel=0.1)


def test_05_model_equals_the_benchmark_row(shakespeare):
    """05's training model (its five switches) is the table's last row: same first loss."""
    s05 = load_stage("05_speedups")
    cfg = replace(s05.Config(device="cpu"), **s05.Config.cpu)
    cfg = replace(cfg, input=str(shakespeare), steps=1, benchmark="none", dtype="float32")
    loss05 = s05.main(cfg)["losses"][0]
    row = bench.Row("vocab", ["fp32", "flash", "vocab"], "tiny", cfg.seed, "cpu")
    enc_tokens = load_stage("03_dataloader").TextLoader  # the same first batch as 05 reads
    from common.data import get_tokenizer, load_text

    loader = enc_tokens(get_tokenizer().encode_ordinary(load_text(str(shakespeare))), 8, 64)
    x, y = loader.next_batch()
    assert row.step(x, y) == pytest.approx(loss05, abs=1e-6)


def test_06_schedule_and_groups_equal_common():
    s06 = load_stage("06_hyperparams")
    for step in range(0, 130):
        assert s06.lr_at(step, 6e-4, 10, 110) == lr_at(step, 6e-4, 10, 110)
    assert same_code(s06.lr_at, lr_at) and same_code(s06.make_optimizer, make_optimizer)
    model = GPT(preset_config("tiny", tie_weights=True))
    a, b = s06.make_optimizer(model, 0.1, 1e-3, "cpu"), make_optimizer(model, 0.1, 1e-3, "cpu")
    for ga, gb in zip(a.param_groups, b.param_groups, strict=True):
        assert [id(p) for p in ga["params"]] == [id(p) for p in gb["params"]]
        assert ga["weight_decay"] == gb["weight_decay"] and ga["betas"] == gb["betas"] == (
            0.9,
            0.95,
        )
    assert math.isclose(lr_at(110, 6e-4, 10, 110), 6e-5)  # the cosine ends at 10%


def test_07_ddp_setup_equals_common(monkeypatch):
    s07 = load_stage("07_ddp_fineweb")
    assert same_code(s07.setup_ddp, setup_ddp)
    assert s07.setup_ddp("cpu") == setup_ddp("cpu")  # no torchrun: one plain process
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for name, port in (("stage", "29611"), ("common", "29612")):
        monkeypatch.setattr(os, "environ", {**os.environ, **env, "MASTER_PORT": port})
        ddp = (s07.setup_ddp if name == "stage" else setup_ddp)("auto")
        try:
            assert (ddp.rank, ddp.world_size, ddp.enabled, ddp.device) == (0, 1, True, "cpu")
            assert torch.distributed.get_backend() == "gloo"
        finally:
            torch.distributed.destroy_process_group()


def test_vocab_constant():
    assert GPT2_VOCAB == 50257 and preset_config("gpt2").vocab_size == GPT2_VOCAB


def test_07_shuffle_equals_common(tmp_path):
    """07's shuffled_windows is common's: the same code, the same orders, the same batches."""
    import numpy as np

    s07 = load_stage("07_ddp_fineweb")
    assert s07.shuffled_windows.__code__.co_code == shuffled_windows.__code__.co_code
    for n, T, seed in ((1000, 16, (1337, 0, 0)), (1000, 16, (1337, 1, 0)), (5000, 64, (3, 2, 7))):
        a, b = s07.shuffled_windows(n, T, seed), shuffled_windows(n, T, seed)
        assert np.array_equal(a, b) and len(set(a.tolist())) == len(a) == (n - 1 - a.min() % T) // T
    np.save(tmp_path / "x_train_000001.npy", np.arange(3000, dtype=np.uint16))
    ours, theirs = (
        ShardLoader(tmp_path, "train", 4, 16, shuffle=f, seed=1)
        for f in (s07.shuffled_windows, shuffled_windows)
    )
    for _ in range(100):  # past the end of the epoch
        assert torch.equal(ours.next_batch()[0], theirs.next_batch()[0])
    assert s07.Config().shuffle is True  # on by default in the real run
