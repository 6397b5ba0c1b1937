"""Export to transformers: ours -> HF -> ours keeps the logits; the CLI writes a directory
that GPT2LMHeadModel, the tokenizer and pipeline("text-generation") load."""

import json

import pytest
import torch
from conftest import run_script

from common import UserError
from common.checkpoint import save_checkpoint
from common.data import get_tokenizer
from common.export import export
from common.hf import from_pretrained
from common.model import GPT, GPTConfig

SMALL = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)


def random_model(**kw):
    torch.manual_seed(0)
    config = GPTConfig(**{**SMALL, "vocab_size": 50304, "tie_weights": True, **kw}, gpt2_init=True)
    model = GPT(config).eval()
    with torch.no_grad():  # make every tensor non-trivial: biases and LayerNorms included
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_keeps_logits(tmp_path, tied):
    from transformers import GPT2LMHeadModel

    ours = random_model(tie_weights=tied)
    export(ours, tmp_path / "hf", tokenizer=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_positions"], config["vocab_size"], config["n_layer"]) == (64, 50257, 2)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    back = from_pretrained(str(tmp_path / "hf"), tie_weights=tied).eval()
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(x)[0][..., :50257]  # our padded vocab: the first 50257 are the real tokens
        assert torch.allclose(hf(x).logits, want, atol=1e-5)
        assert torch.equal(back(x)[0][..., :50257], want)  # bit for bit: the same tensors


def test_refuses_to_overwrite_unless_forced(tmp_path):
    model = random_model()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty.*--force"):
        export(model, tmp_path, tokenizer=False)
    assert not (tmp_path / "config.json").exists()
    export(model, tmp_path, force=True, tokenizer=False)
    assert (tmp_path / "config.json").exists() and (tmp_path / "notes.txt").exists()


def test_missing_tokenizer_files_give_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("common.export.GPT2_FILES", "http://127.0.0.1:9/")  # nothing listens
    out = export(random_model(), tmp_path / "hf")
    note = capsys.readouterr().out.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: no tokenizer files written")
    assert "save_pretrained" in note[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_export_cli_on_a_checkpoint(tmp_path, cache_env):
    from transformers import AutoTokenizer, GPT2LMHeadModel, pipeline

    model = random_model()
    save_checkpoint(tmp_path / "run", 7, model, model.config)
    out = tmp_path / "hf"
    r = run_script(
        ["-m", "common.export", "--ckpt", str(tmp_path / "run"), "--out", str(out)], env=cache_env
    )
    assert r.returncode == 0, r.stderr
    assert f"exported step 7 ({model.num_params():,} parameters" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json"} <= {
        p.name for p in out.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(out)
    text = "Hello, I'm a language model, naïve café<|endoftext|>"
    assert tok(text).input_ids == get_tokenizer().encode(text, allowed_special="all")
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    x = torch.tensor([tok("The quick brown fox").input_ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x)[0][..., :50257], atol=1e-5)
    gen = pipeline("text-generation", model=str(out), device="cpu")
    result = gen("Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert result.startswith("Hello") and len(result) > len("Hello")

    from common import export as export_cli  # the same command again, in this process

    with pytest.raises(UserError, match=r"^--out .*--force") as e:
        export_cli.main(export_cli.Config(ckpt=str(tmp_path / "run"), out=str(out)))
    assert "\n" not in str(e.value)  # one line
