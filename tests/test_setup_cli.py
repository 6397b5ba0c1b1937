"""The newcomer's input commands: `python -m common.data` (tiny shakespeare, docs.jsonl) and
`python -m common.random_model` (a random GPT-2 for stages 01 and 08)."""

import json

import pytest
import torch
from conftest import load_stage, run_script
import test_data
from test_stages import tiny

import common.data as data
from common import UserError
from common.cli import parse_args

server = test_data.server  # the fixture: a local HTTP server on 127.0.0.1


@pytest.fixture()
def served(server, tmp_path, monkeypatch, shakespeare):
    """Tiny shakespeare's URL and checksum pointed at the sample, served on 127.0.0.1."""
    url, root = server
    (root / "input.txt").write_bytes(shakespeare.read_bytes())
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_URL", f"{url}/input.txt")
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", data.sha256_of(shakespeare))
    monkeypatch.setenv("GPT_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    return shakespeare


def test_data_cli_downloads_tiny_shakespeare_and_splits_it(served, tmp_path):
    from test_data import _Handler

    dest, docs = tmp_path / "input.txt", tmp_path / "docs.jsonl"
    argv = ["--tiny-shakespeare", str(dest), "--docs-jsonl", str(docs)]
    res = data.main(parse_args(data.DataConfig, argv))
    assert dest.read_bytes() == served.read_bytes() and _Handler.hits == ["/input.txt"]
    assert (tmp_path / "cache" / "tinyshakespeare.txt").is_file()  # stages find it without --input
    rows = [json.loads(line) for line in docs.read_text().splitlines()]
    assert rows[0] == {"text": "First Citizen:\nBefore we proceed any further, hear me speak."}
    assert len(rows) == res["docs"] == 454 and "\n\n".join(r["text"] for r in rows) == (
        served.read_text()
    )  # nothing lost: the documents joined again are the text
    data.main(parse_args(data.DataConfig, ["--tiny-shakespeare", str(tmp_path / "again.txt")]))
    assert _Handler.hits == ["/input.txt"]  # the second time from the cache
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_data_cli_checksum_mismatch_writes_nothing(served, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "TINY_SHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(UserError, match="checksum mismatch"):
        data.main(data.DataConfig(tiny_shakespeare=str(tmp_path / "input.txt")))
    assert not (tmp_path / "input.txt").exists()


def test_data_cli_docs_of_a_local_text_and_errors(shakespeare, tmp_path, cache_env):
    """As a user runs it: no network needed for a text of one's own; mistakes are one line."""
    docs = tmp_path / "docs.jsonl"
    r = run_script(
        ["-m", "common.data", "--text", str(shakespeare), "--docs-jsonl", str(docs)], env=cache_env
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "454 documents" in r.stdout and "common.fineweb" in r.stdout
    assert len(docs.read_text().splitlines()) == 454
    r = run_script(["-m", "common.data"], env=cache_env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: nothing to do")
    with pytest.raises(UserError, match="nope.txt: file not found"):
        data.main(data.DataConfig(text=str(tmp_path / "nope.txt"), docs_jsonl=str(docs)))


def test_split_documents():
    text = "a b\n\nc\nd\n\n\n\n  \n\ne\n"
    assert data.split_documents(text) == ["a b", "c\nd", "e\n"]


def test_random_model_cli_saves_a_preset_that_stage_01_loads(tmp_path, cache_env):
    from transformers import GPT2LMHeadModel

    from common.model import PRESETS

    out = tmp_path / "gpt2-random"
    r = run_script(["-m", "common.random_model", str(out), "--preset", "tiny"], env=cache_env)
    assert r.returncode == 0, r.stderr
    assert "7,259,008 parameters" in r.stdout
    hf = GPT2LMHeadModel.from_pretrained(out)
    tiny_sizes = PRESETS["tiny"]
    c = hf.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (
        tiny_sizes["n_layer"],
        tiny_sizes["n_head"],
        tiny_sizes["n_embd"],
        tiny_sizes["block_size"],
        50257,
    )
    # stage 01 loads it into our model and into transformers' and finds the same network
    stage = load_stage("01_hf_eval")
    res = stage.main(tiny(stage, model=str(out), new_tokens=4))
    assert res["max_abs_diff"] < 1e-5

    # the same seed writes the same weights; another seed, others
    from common import random_model

    again = random_model.main(random_model.Config(out=str(tmp_path / "again"), preset="tiny"))
    other = random_model.main(random_model.Config(out=str(tmp_path / "other"), seed=1))
    assert again["params"] == other["params"] == 7_259_008
    w = GPT2LMHeadModel.from_pretrained(tmp_path / "again").transformer.h[0].attn.c_attn.weight
    w1 = GPT2LMHeadModel.from_pretrained(tmp_path / "other").transformer.h[0].attn.c_attn.weight
    assert torch.equal(w, hf.transformer.h[0].attn.c_attn.weight) and not torch.equal(w, w1)


def test_random_model_unknown_preset_is_one_line(tmp_path, cache_env):
    r = run_script(
        ["-m", "common.random_model", str(tmp_path / "m"), "--preset", "gpt5"], env=cache_env
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "unknown preset 'gpt5'" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "m").exists()


def test_a_preset_chooses_the_size_only(monkeypatch, capsys):
    """On a GPU `--preset tiny` is the tiny model with the GPU's batch, steps and lr, and no
    line (and T=1024 is refused at once: tiny's block is 256); on a CPU the CPU defaults apply
    to each flag not given, `--preset gpt2` included, and one line names every value that is
    not the stage's default."""
    import common.cli as cli

    s05 = load_stage("05_speedups")
    default = s05.Config()
    monkeypatch.setattr(cli, "_no_cuda", lambda cfg: False)  # a GPU
    cfg = parse_args(s05.Config, ["--preset", "tiny", "--seq-len", "256"])
    assert cfg == s05.Config(preset="tiny", seq_len=256) and capsys.readouterr().out == ""
    with pytest.raises(
        UserError,
        match="^sequence length 1024 exceeds block_size 256 of --preset tiny: lower --seq-len$",
    ):
        parse_args(s05.Config, ["--preset", "tiny"])  # the GPU's T=1024: said before any work
    monkeypatch.setattr(cli, "_no_cuda", lambda cfg: True)  # a CPU
    cfg = parse_args(s05.Config, ["--preset", "gpt2", "--steps", "5", "--json", "t.json"])
    assert (cfg.preset, cfg.steps, cfg.json) == ("gpt2", 5, "t.json")
    assert (cfg.batch_size, cfg.seq_len, cfg.compile) == (8, 64, False)  # the CPU's
    note = capsys.readouterr().out.strip()
    assert note == (
        "No CUDA GPU: using the CPU defaults (batch_size=8, seq_len=64, lr=0.001, "
        "compile=False, timed=6; as given: steps=5, json=t.json); --preset gpt2 "
        "forces the real size."
    )
    differs = [f for f in vars(cfg) if getattr(cfg, f) != getattr(default, f)]
    assert all(f"{f}={getattr(cfg, f)}" in note for f in differs)
