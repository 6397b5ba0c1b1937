"""bench/gpu_data.py: the carried inputs of the GPU proof (issue 13), at a tiny size; and
bench/gpu.py's training parts and its torchrun fault runs, dry-run on the CPU."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SHAKESPEARE, load_stage

from common import UserError
from common.data import get_tokenizer, shard_files
from common.model import GPT, preset_config


@pytest.fixture(scope="module")
def gpu_data():
    return load_stage("bench/gpu_data")


def tiny(gpu, shards, tmp_path, **kw):
    """bench/gpu.py's Config for a CPU dry run at the tiny size, its JSON in tmp_path."""
    kw = dict(
        device="cpu", preset="tiny", data_dir=str(shards), json=str(tmp_path / "gpu.json"), **kw
    )
    return gpu.Config(**kw)


def test_writes_the_text_and_shards_that_start_with_it(gpu_data, tmp_path):
    out = tmp_path / "bench_data"
    cfg = gpu_data.Config(out=str(out), text=str(SHAKESPEARE), max_tokens=60_000, shard_size=20_000)
    res = gpu_data.main(cfg)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert (out / "input.txt").read_text(encoding="utf-8") == text
    val = np.load(shard_files(out / "shards", "val")[0])
    train = [np.load(p) for p in shard_files(out / "shards", "train")]
    assert len(val) == 20_000 and [len(t) for t in train] == [20_000, 20_000]
    assert res["train_shards"] == 2 and res["bytes"] > 120_000
    enc = get_tokenizer()
    assert val[0] == enc.eot_token  # each document starts with <|endoftext|>
    first_doc = text.split("\n\n")[0]
    assert enc.decode(val[1 : 1 + len(enc.encode_ordinary(first_doc))].tolist()) == first_doc
    # past the text, the interpreter's own Python sources: code, not more shakespeare
    assert "def " in enc.decode(train[-1][:5000].tolist())


def test_refuses_what_cannot_work(gpu_data, tmp_path, monkeypatch):
    cfg = gpu_data.Config(
        out=str(tmp_path / "a"), text=str(SHAKESPEARE), max_tokens=10_000, shard_size=20_000
    )
    with pytest.raises(UserError, match="no training shard would remain"):
        gpu_data.main(cfg)
    monkeypatch.setattr(gpu_data, "CARRY_LIMIT", 50_000)
    cfg = gpu_data.Config(
        out=str(tmp_path / "b"), text=str(SHAKESPEARE), max_tokens=60_000, shard_size=20_000
    )
    with pytest.raises(UserError, match="more than the 64 MiB"):
        gpu_data.main(cfg)


def test_the_gpu_script_dry_runs_train_and_auto_on_the_cpu(shards, tmp_path):
    """bench/gpu.py's training and checkpoint parts at the tiny size on the CPU, as its
    docstring's dry run: one row per B with the planner's estimate beside it, auto's pick
    (the CPU default), a checkpoint's stall against a blocking save."""
    gpu = load_stage("bench/gpu")
    cfg = tiny(
        gpu,
        shards,
        tmp_path,
        batch_sizes="1,2",
        seq_len=32,
        steps=3,
        parts="train,auto,checkpoint",
        total_batch=256,  # auto's CPU default, B=8, fits it once
    )
    result = gpu.main(cfg)
    assert json.loads((tmp_path / "gpu.json").read_text())["train"] == result["train"]
    train, auto = result["train"], result["auto"]
    assert [r["batch_size"] for r in train] == [1, 2]
    assert [r["accum_steps"] for r in train] == [8, 4]
    assert all(r["tokens_per_s"] > 0 and r["peak_mb"] is None for r in train)
    assert 0 < train[0]["plan_mb"] < train[1]["plan_mb"]  # more tokens, more activations
    s07 = load_stage("07_ddp_fineweb")
    assert [(r["cap_gib"], r["batch_size"], r["error"]) for r in auto] == [
        (None, s07.Config.cpu["batch_size"], "")
    ]
    stall = result["checkpoint"]  # medians of bench/checkpoint_stall.py, at the tiny size
    assert 0 < stall["background stall"] < stall["blocking save"] and stall["sha256"] > 0
    with pytest.raises(UserError, match="unknown --parts lever; choose from train,auto,levers"):
        gpu.main(gpu.Config(device="cpu", parts="lever"))


def test_the_gpu_script_dry_runs_its_faults_under_torchrun_on_the_cpu(shards, tmp_path):
    """bench/gpu.py's faults part at the tiny size (gloo instead of NCCL): a kill -9 of the
    worker after a checkpoint is saved, with one restart left, resumes from that checkpoint
    and torchrun exits 0; a SIGTERM makes the worker exit 75 with a checkpoint of the step it
    stopped at. The signals come after step 3 of 20: the rest of the run is their margin."""
    gpu = load_stage("bench/gpu")
    cfg = tiny(gpu, shards, tmp_path, seq_len=32, total_batch=512, fault_steps=20, parts="faults")
    kill, term = gpu.main(cfg)["faults"]
    assert kill["sent"] == ["saved", "killed"] and kill["rc"] == 0, kill
    assert kill["worker_exitcodes"] == [-9] and not kill["aborted"]
    assert kill["resumed_from"] >= 2 and kill["resumed_from"] % 2 == 0  # a saved checkpoint
    assert kill["checkpoints"][-1] == "ckpt_000020.pt"  # and it went on to the end
    assert term["sent"] == ["sigterm"] and term["rc"] != 0 and term["worker_exitcodes"] == [75]
    assert not term["aborted"] and term["resumed_from"] is None
    stop = int(term["checkpoints"][-1][5:11])  # the step it stopped at has its checkpoint
    assert 3 <= stop < 20


def test_the_levers_table_dry_runs_and_a_lever_that_fails_is_a_row(shards, tmp_path, capsys):
    """bench/gpu.py's levers at the tiny size on the CPU: 07 as it is, then levers put on from
    outside. cuDNN attention does not exist on a CPU: its row holds the error and the table
    goes on. DDP of one process (gloo here) runs 07 wrapped, with gradient_as_bucket_view.
    --minutes ends a part early with a line saying what was not measured."""
    gpu = load_stage("bench/gpu")
    levers = "base,cudnn,chunked_ce,bucket_view"
    cfg = tiny(gpu, shards, tmp_path, seq_len=32, total_batch=256, parts="levers", levers=levers)
    cfg = replace(cfg, levers_batch=2, levers_steps=3)
    base, cudnn, chunked, bucket = gpu.main(cfg)["levers"]
    assert base["lever"] == "07 as it is" and base["ms"] > 0 and base["speedup"] == 1.0
    assert cudnn["ms"] is None and "RuntimeError" in cudnn["error"]
    assert chunked["ms"] > 0 and not chunked["error"]
    assert bucket["ms"] > 0 and bucket["speedup"] > 0 and not bucket["error"]
    assert bucket["batch_size"] == 2 and "RANK" not in os.environ  # the environment put back
    assert not torch.distributed.is_initialized()
    capsys.readouterr()
    result = gpu.main(replace(cfg, minutes=1e-9, levers="base"))
    assert result["levers"] == []
    assert (
        "out of time (--minutes 1e-09): lever 07 as it is not measured" in capsys.readouterr().out
    )
    with pytest.raises(UserError, match="unknown --levers fp8; choose from base,flash,cudnn"):
        gpu.main(gpu.Config(device="cpu", parts="levers", levers="base,fp8"))


def test_the_chunked_loss_lever_gives_gpt_s_loss_and_gradients():
    """bench/gpu.py's ChunkedLossGPT: the loss over 8 slices of the sequence, each recomputed
    in backward, is GPT's loss, with GPT's gradients; without targets it is GPT itself."""
    gpu = load_stage("bench/gpu")
    torch.manual_seed(0)
    config = preset_config("tiny", tie_weights=True, gpt2_init=True)
    model, chunked = GPT(config), gpu.ChunkedLossGPT(config)
    chunked.load_state_dict(model.state_dict())
    x = torch.randint(0, config.vocab_size, (2, 64))
    y = torch.randint(0, config.vocab_size, (2, 64))
    losses = [m(x, y)[1] for m in (model, chunked)]
    torch.testing.assert_close(losses[1], losses[0])
    for loss in losses:
        loss.backward()
    for (name, a), b in zip(model.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    torch.testing.assert_close(chunked(x)[0], model(x)[0])


def test_a_gpu_run_cut_short_keeps_the_rows_it_measured(shards, tmp_path):
    """The JSON file is rewritten after every row: when the second B of the train part fails
    (3 x 32 tokens do not divide the 256-token step), the first B's row is on disk."""
    gpu = load_stage("bench/gpu")
    cfg = tiny(gpu, shards, tmp_path, batch_sizes="1,3", seq_len=32, total_batch=256, steps=3)
    cfg = replace(cfg, parts="train")
    with pytest.raises(UserError, match=r"not a multiple of B\*T\*GPUs = 96"):
        gpu.main(cfg)
    rows = json.loads((tmp_path / "gpu.json").read_text())["train"]
    assert [r["batch_size"] for r in rows] == [1] and rows[0]["tokens_per_s"] > 0
