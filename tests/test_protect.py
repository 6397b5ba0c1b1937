"""Issue #12, the common/ side: a training run never loses or poisons its work.

One writer per --out (a real second process), no checkpoint with nan/inf, checksums that
catch flipped bytes and name the older good checkpoint, resume-settings check, stale temp
files, compiled/DDP state dicts, CLI flag checks, and bad input files (fineweb jsonl,
shard token ids, HellaSwag labels, metrics lines, text files) as one line each."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import ROOT, load_stage, run_script

from common import UserError, cli
from common import fineweb as fw
from common.checkpoint import (
    RunLock,
    check_resume,
    clean_state_dict,
    content_hash,
    list_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    newest_good_checkpoint,
    prune_checkpoints,
    remove_stale_temps,
    save_checkpoint,
)
from common.data import ShardLoader, load_text
from common.hellaswag import read_examples
from common.model import GPT, GPTConfig
from common.plot import Config as PlotConfig
from common.plot import main as plot_main
from common.plot import read_metrics

SMALL = GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=16)


def small_model(seed=0, config=SMALL):
    torch.manual_seed(seed)
    return GPT(config)


def flip(path, start, n=64):
    """Invert n bytes of the file at `path` from offset `start`: bit rot, a bad copy."""
    data = bytearray(path.read_bytes())
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def dead_pid():
    """The PID of a process that has already exited."""
    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(p.stdout)


# --- one writer per --out -------------------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from common.checkpoint import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(300)
"""


def test_run_lock_refuses_a_second_process_until_the_first_dies(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(root=str(ROOT)), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert f"{out} is in use by another run (pid {holder.pid} on " in msg
        assert "wait for it to finish, or choose another --out" in msg and "\n" not in msg
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup at all: the OS drops the lock
        holder.wait(timeout=30)
        lock = RunLock(out).acquire()
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        assert RunLock.held(out)
        again = run_script(
            ["-c", HOLDER.format(root=str(ROOT)).replace("time.sleep(300)", ""), str(out)]
        )
        assert again.returncode != 0 and "is in use by another run" in again.stderr
        lock.release()
        assert not RunLock.held(out)
        again = run_script(
            ["-c", HOLDER.format(root=str(ROOT)).replace("time.sleep(300)", ""), str(out)]
        )
        assert again.returncode == 0 and again.stdout.strip() == "locked", again.stderr
    finally:
        holder.kill()
        holder.wait()


def test_run_lock_in_one_process_is_taken_over(tmp_path):
    first = RunLock(tmp_path).acquire()  # e.g. a main() that raised and never released
    with RunLock(tmp_path) as second:
        assert second.fd == first.fd and RunLock.held(tmp_path)
    assert not RunLock.held(tmp_path)


# --- no nan/inf, pruning --------------------------------------------------------------------


def test_non_finite_state_is_never_saved(tmp_path):
    model = small_model()
    good = save_checkpoint(tmp_path, 1, model, model.config)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = float("nan")
    with pytest.raises(
        UserError,
        match=r"not saving step 2: transformer\.h\.0\.mlp\.c_fc\.weight "
        rf"holds nan/inf; newest good checkpoint: {good}",
    ):
        save_checkpoint(tmp_path, 2, model, model.config)
    model = small_model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    opt.step()
    opt.state[model.lm_head.weight]["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(UserError, match=r"not saving step 3: optimizer\.state\.\d+\.exp_avg_sq"):
        save_checkpoint(tmp_path, 3, model, model.config, optimizer=opt.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt"]  # nothing else


def test_pruning_never_deletes_the_newest_good_checkpoint(tmp_path):
    model = small_model()
    one = save_checkpoint(tmp_path, 1, model, model.config)
    two = save_checkpoint(tmp_path, 2, model, model.config)
    flip(two, two.stat().st_size // 2)  # damaged after it was written
    assert newest_good_checkpoint(tmp_path) == one
    prune_checkpoints(tmp_path, keep_last=1)
    assert list_checkpoints(tmp_path) == [one, two]  # two is the newest, one the newest good
    three = save_checkpoint(tmp_path, 3, model, model.config)
    prune_checkpoints(tmp_path, keep_last=1)
    assert list_checkpoints(tmp_path) == [three]
    prune_checkpoints(tmp_path, keep_last=0)  # 0 keeps everything
    assert list_checkpoints(tmp_path) == [three]


# --- checksums ------------------------------------------------------------------------------


def test_flipped_bytes_are_refused_naming_the_older_good_checkpoint(tmp_path, cache_env):
    config = dataclasses.replace(SMALL, vocab_size=50257, n_embd=32)  # ~7 MB, mostly weights
    model = small_model(config=config)
    opt = torch.optim.AdamW(model.parameters())
    one = save_checkpoint(tmp_path, 1, model, config, optimizer=opt.state_dict())
    two = save_checkpoint(tmp_path, 2, model, config, optimizer=opt.state_dict())
    assert load_checkpoint(tmp_path)["step"] == 2
    flip(two, two.stat().st_size // 2)  # 64 bytes in the middle: inside the tensor data
    assert torch.load(two, weights_only=False)["step"] == 2  # torch itself notices nothing
    want = re.escape(
        f"checkpoint {two} fails its checksum: its content changed after it was written; "
        f"the newest older one that verifies is {one}: use it, or move ckpt_000002.pt away"
    )
    for path in (tmp_path, two):  # the directory is never a silent fall-back to ckpt 1
        with pytest.raises(UserError, match=want):
            load_checkpoint(path)
    with pytest.raises(UserError, match=want):
        model_from_checkpoint(tmp_path)

    r = run_script(
        ["-m", "common.export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")],
        env=cache_env,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {two} fails its checksum")
    assert str(one) in lines[0] and not (tmp_path / "hf").exists()

    for offset in (one.stat().st_size // 4, 3 * one.stat().st_size // 4):  # anywhere else
        flip(one, offset)
        with pytest.raises(UserError, match=f"no older checkpoint in {tmp_path} verifies"):
            load_checkpoint(two)
        with pytest.raises(UserError, match=f"checkpoint {one} (fails its checksum|cannot be)"):
            load_checkpoint(one)
        flip(one, offset)  # back as it was
        assert load_checkpoint(one)["step"] == 1


def test_checkpoint_without_checksum_is_refused_until_adopted(tmp_path, capsys):
    from common import checkpoint as cli  # `python -m common.checkpoint`, in this process

    model = small_model()
    old = tmp_path / "ckpt_000005.pt"  # as written before checkpoints carried a checksum
    torch.save(dict(step=5, model=model.state_dict(), model_config=dataclasses.asdict(SMALL)), old)
    with pytest.raises(UserError, match=r"has no checksum .* python -m common.checkpoint --adopt"):
        load_checkpoint(tmp_path)
    cli.main(cli.Config(adopt=str(old)))
    assert "added a checksum" in capsys.readouterr().out
    assert load_checkpoint(tmp_path)["step"] == 5
    r = run_script(["-m", "common.checkpoint", str(tmp_path)])  # as a user types it
    assert r.returncode == 0 and r.stdout.strip() == f"{old}: ok"
    flip(old, old.stat().st_size // 2)
    with pytest.raises(UserError, match=r"^1 of 1 checkpoints do not verify$"):
        cli.main(cli.Config(path=str(tmp_path)))
    assert capsys.readouterr().out.startswith(f"{old}: fails its checksum")


# --- resume settings, temp files, foreign state dicts ---------------------------------------


def test_check_resume_lists_what_changes_and_needs_the_flag():
    s07 = load_stage("07_ddp_fineweb")
    saved = dataclasses.asdict(s07.Config())
    assert check_resume(saved, dict(saved, batch_size=8, out="elsewhere", resume="latest")) == []
    new = dict(saved, max_lr=3e-4, total_batch=2**18, steps=30000)
    with pytest.raises(UserError) as e:
        check_resume(saved, new)
    assert str(e.value) == (
        "resuming would change the run (--total-batch 524288 -> 262144; --steps 19073 -> 30000; "
        "--max-lr 0.0006 -> 0.0003): give the checkpoint's settings, or add "
        "--allow-config-change to accept the change"
    )
    changes = check_resume(saved, new, allow_change=True)
    assert changes == [
        "--total-batch 524288 -> 262144",
        "--steps 19073 -> 30000",
        "--max-lr 0.0006 -> 0.0003",
    ]
    assert check_resume(saved, dict(saved, seed=1), keys=("seed",), allow_change=True) == [
        "--seed 1337 -> 1"
    ]


def test_remove_stale_temps_touches_nothing_else(tmp_path):
    dead, live = dead_pid(), os.getpid()
    stale = tmp_path / f".ckpt_000004.pt.tmp{dead}"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f".ckpt_000008.pt.tmp{live}"
    mine.write_bytes(b"y" * 300)
    others = [
        "ckpt_000004.pt",
        f"ckpt_000004.pt.tmp{dead}",
        f".ckpt_4.pt.tmp{dead}",
        ".ckpt_000004.pt.tmp12x",
        f".edufineweb_val_000000.npy.tmp{dead}",
        "metrics.jsonl",
        "notes.txt",
        f".ckpt_000004.pt.tmp{dead}.bak",
    ]
    for name in others:
        (tmp_path / name).write_text("keep me")
    (tmp_path / ".ckpt_000009.pt.tmp1x").mkdir()
    assert remove_stale_temps(tmp_path) == (1, 1000)  # no lock: only a dead process's file
    assert not stale.exists() and mine.exists()
    with RunLock(tmp_path):  # the lock holder is the only writer: every temp file is stale
        assert remove_stale_temps(tmp_path) == (1, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*others, ".lock", ".ckpt_000009.pt.tmp1x"]
    )
    assert all((tmp_path / n).read_text() == "keep me" for n in others)
    assert remove_stale_temps(tmp_path / "missing") == (0, 0)


def test_compiled_and_ddp_state_dicts_load(tmp_path):
    model = small_model()
    compiled = torch.compile(model)  # nothing is compiled until it runs: state_dict is enough
    keys = list(compiled.state_dict())
    assert keys[0].startswith("_orig_mod.")
    assert list(clean_state_dict(compiled.state_dict())) == list(model.state_dict())
    sd = model.state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        state = dict(
            step=1,
            model={prefix + k: v for k, v in sd.items()},
            model_config=dataclasses.asdict(SMALL),
        )
        state["sha256"] = content_hash(state)
        torch.save(state, tmp_path / "ckpt_000001.pt")
        loaded, _ = model_from_checkpoint(tmp_path / "ckpt_000001.pt")
        x = torch.randint(0, 512, (2, 8))
        assert torch.equal(loaded(x)[0], model(x)[0])
    path = save_checkpoint(tmp_path, 2, compiled, SMALL)  # saved under the bare names
    assert list(load_checkpoint(path)["model"]) == list(sd)


# --- the command line -----------------------------------------------------------------------


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(cli, "_no_cuda", lambda cfg: True)  # the CPU defaults apply


@pytest.fixture(scope="module")
def s07():
    return load_stage("07_ddp_fineweb")


BAD_FLAGS = [
    (["--batch-size", "0"], "--batch-size must be a positive integer (got 0)"),
    (["--batch-size", "-2"], "--batch-size must be a positive integer (got -2)"),
    (["--batch_size=-2"], "--batch-size must be a positive integer (got -2)"),
    (["--seq-len", "0"], "--seq-len must be a positive integer (got 0)"),
    (["--steps", "0"], "--steps must be a positive integer (got 0)"),
    (["--total-batch", "0"], "--total-batch must be a positive integer (got 0)"),
    (["--keep-last", "-1"], "--keep-last must be a non-negative integer (got -1)"),
    (["--val-every", "-5"], "--val-every must be a non-negative integer (got -5)"),
    (["--max-lr", "0"], "--max-lr must be a positive number (got 0.0)"),
    (["--max-lr", "nan"], "--max-lr must be a finite number (got nan)"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number (got inf)"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_numeric_flags_are_checked(s07, no_cuda, argv, message, capsys):
    with pytest.raises(UserError) as e:
        cli.parse_args(s07.Config, argv)
    assert str(e.value) == message
    assert capsys.readouterr().out == ""  # the error is the only thing said


def test_flag_rules_by_config_and_validate():
    @dataclasses.dataclass
    class Config:
        steps: int = 5  # optimizer steps (0: only the benchmark)
        top_p: float = 1.0  # nucleus
        dtype: str = "float32"  # compute type
        rules: ClassVar[dict] = dict(steps=">= 0", dtype=("float32", "bfloat16"))

    assert cli.parse_args(Config, ["--steps", "0"]).steps == 0  # the Config says 0 is fine
    with pytest.raises(UserError, match=r"^--steps must be a non-negative integer \(got -1\)$"):
        cli.parse_args(Config, ["--steps", "-1"])
    with pytest.raises(UserError, match=r"^--dtype must be one of float32, bfloat16 \(got fp8\)$"):
        cli.parse_args(Config, ["--dtype", "fp8"])
    with pytest.raises(UserError, match=r"^--top-p must be a number in \(0, 1\] \(got 1\.5\)$"):
        cli.validate(Config(top_p=1.5))
    cli.validate(Config(top_p=0.9, dtype="bfloat16"))


def test_no_prefixes_and_underscore_spelling(s07, no_cuda, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(s07.Config, ["--st", "5"])
    assert e.value.code == 2 and "unrecognized arguments: --st 5" in capsys.readouterr().err
    for argv in (["--batch_size=3"], ["--batch_size", "3"], ["--batch-size=3"]):
        cfg = cli.parse_args(s07.Config, [*argv, "--steps", "60", "--keep_last", "0"])
        assert (cfg.batch_size, cfg.steps, cfg.keep_last) == (3, 60, 0)
        assert cfg.seq_len == s07.Config.cpu["seq_len"]  # the other CPU defaults still apply
        note = capsys.readouterr().out.strip()
        assert note.startswith("No CUDA GPU: using the CPU defaults (preset=tiny, seq_len=64,")
        assert note.endswith(
            "; as given: batch_size=3, steps=60, keep_last=0); --preset gpt2 forces the real size."
        )
        assert "batch_size=8" not in note and "steps=40" not in note
    help_ = run_script(["07_ddp_fineweb.py", "--help"]).stdout
    assert "--batch-size BATCH_SIZE" in help_ and "--batch_size BATCH_SIZE" not in help_


def test_bad_flag_on_the_command_line_is_one_line(cache_env):
    r = run_script(["03_dataloader.py", "--batch-size", "0"], env=cache_env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: --batch-size must be a positive integer (got 0)"
    ]


# --- input files ----------------------------------------------------------------------------


def test_fineweb_failed_start_leaves_nothing_that_blocks(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": f"document number {i}. " * 20}) + "\n" for i in range(40))
    )
    cfg = fw.Config(data_files=str(docs), out_dir=str(tmp_path / "out"), shard_size=500, workers=1)
    with pytest.raises(UserError, match="no 'body' column"):
        fw.main(dataclasses.replace(cfg, text_column="body"))  # fails before its first shard
    assert list((tmp_path / "out").iterdir()) == []
    assert fw.main(cfg)["shards"] > 1  # with the right column: not "made with other settings"
    # a 0-shard progress file left by an older version is treated as absent, too
    other = dataclasses.replace(cfg, out_dir=str(tmp_path / "old"))
    settings = dict(fw.settings_of(cfg), text_column="body")
    (tmp_path / "old").mkdir()
    fw.write_progress(
        fw.progress_path(other.out_dir, other.prefix),
        dict(settings=settings, shards=[], finished=None),
    )
    assert fw.main(other)["shards"] > 1


@pytest.mark.parametrize("bad", ['{"text": "cut off', "[1, 2]", b"\xff\xfe not text", '"text"'])
def test_fineweb_bad_jsonl_line_names_file_and_line(tmp_path, bad):
    docs = tmp_path / "docs.jsonl"
    bad = bad if isinstance(bad, bytes) else bad.encode()
    docs.write_bytes(b'{"text": "one"}\n\n{"text": "two"}\n' + bad + b'\n{"text": "five"}\n')
    cfg = fw.Config(data_files=str(docs), out_dir=str(tmp_path / "out"), shard_size=4, workers=1)
    with pytest.raises(UserError) as e:
        fw.main(cfg)
    assert str(e.value) == (
        f"line 4 of {docs} is not a JSON object (one document per line): fix or delete that line"
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_shard_with_token_ids_beyond_the_vocab_is_refused(tmp_path):
    ok = np.arange(1000, dtype=np.uint16)
    np.save(tmp_path / "edufineweb_train_000001.npy", ok)
    bad = ok.copy()
    bad[700] = 60000  # from another tokenizer, or a damaged file
    np.save(tmp_path / "edufineweb_train_000002.npy", bad)
    loader = ShardLoader(tmp_path, "train", 4, 32)  # reads shard 1 now, shard 2 when it gets there
    with pytest.raises(
        UserError,
        match=r"shard .*edufineweb_train_000002\.npy holds token id "
        r"60000, beyond the 50257 of GPT-2's vocabulary",
    ):
        for _ in range(10):
            loader.next_batch()
    np.save(tmp_path / "edufineweb_train_000001.npy", bad)
    with pytest.raises(UserError, match=r"edufineweb_train_000001\.npy holds token id 60000"):
        ShardLoader(tmp_path, "train", 4, 32)  # the first shard: before any step
    loader = ShardLoader(tmp_path, "train", 4, 32, vocab_size=65536)
    assert loader.next_batch()[0].max() < 1000


@pytest.mark.parametrize("label", [7, -1, "x", 1.0, True, None])
def test_hellaswag_labels_are_checked(tmp_path, label):
    good = dict(ctx="A man", endings=["a", "b", "c", "d"], label=2)
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, label=label)) + "\n")
    if label is None:  # the test split has no labels: read, refused later by evaluate
        assert [ex["label"] for ex in read_examples(path)] == [2, None]
        return
    with pytest.raises(UserError) as e:
        read_examples(path)
    assert str(e.value).startswith(f"line 2 of {path}: label {label!r} is not 0, 1, 2 or 3")


def test_hellaswag_endings_and_text_labels(tmp_path):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(dict(ctx="A man", endings=["a", "b", "c", "d"], label="3")) + "\n")
    assert read_examples(path)[0]["label"] == 3  # some copies store it as text
    for ends in ("abcd", ["a", "b", "c"], ["a", "b", "c", 4]):
        path.write_text(json.dumps(dict(ctx="A man", endings=ends, label=1)) + "\n")
        with pytest.raises(UserError, match="line 1 of .* is not a HellaSwag example"):
            read_examples(path)
    path.write_bytes(b'{"ctx": "caf\xe9", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    with pytest.raises(UserError, match="line 1 of .* is not a HellaSwag example"):
        read_examples(path)  # Latin-1, not UTF-8


def test_plot_skips_and_counts_bad_lines(tmp_path, capsys):
    lines = [json.dumps({"split": "run", "run": {"preset": "tiny"}}).encode()]  # the header
    lines += [
        json.dumps(dict(step=s, split="train", loss=5.0 - s / 10, tokens=1024 * (s + 1))).encode()
        for s in range(20)
    ]
    lines += [
        b'{"step": 20, "split": "train", "loss": "abc", "tokens": 1}',
        b'{"step": 21, "split": "val", "loss": 3.\xff}',
        b"\xff\xfe",
        b'{"step": 22, "split": "hellaswag", "acc": NaN, "acc_norm": 0.3}',
        b"[1, 2]",
        b'{"step": 23, "split": "train", "loss": 4.0, "tokens": true}',
    ]
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    runs = read_metrics(tmp_path)
    assert [len(runs[k]) for k in ("train", "val", "hellaswag")] == [20, 0, 0]
    assert capsys.readouterr().err.strip() == (
        f"note: skipped 6 unreadable line(s) in {tmp_path / 'metrics.jsonl'}"
    )
    assert plot_main(PlotConfig(run=str(tmp_path)))["counts"]["train"] == 20


def test_load_text_refuses_binary_and_empty_files(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=rf"^{binary} is not UTF-8 text \(byte 128\)"):
        load_text(binary)
    for text in ("", " \n\t\n"):
        (tmp_path / "empty.txt").write_text(text)
        with pytest.raises(UserError, match=r"empty\.txt is empty \(no text to train on\)"):
            load_text(tmp_path / "empty.txt")
    (tmp_path / "ok.txt").write_text("naïve café\n")
    assert load_text(tmp_path / "ok.txt") == "naïve café\n"


def test_sample_prompt_file_not_utf8(tmp_path):
    from common.sample import Config as SampleConfig
    from common.sample import read_prompt

    (tmp_path / "p.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match=r"p\.txt is not UTF-8 text \(byte 3\)"):
        read_prompt(SampleConfig(prompt_file=str(tmp_path / "p.txt")), None)
