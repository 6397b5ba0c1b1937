"""Shared test fixtures: offline tokenizer, a tiny-shakespeare stand-in, stage loading."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use local stand-ins, never the hub
# tiktoken fetches its gpt2 files from the network unless they are in this cache
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken-cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken-cache")


def load_stage(name):
    """Import a numbered stage (its file name starts with a digit, so no plain import)."""
    path = ROOT / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The real tiny shakespeare from ../shared when present, else a stand-in of similar text."""
    real = SHARED / "data" / "tinyshakespeare.txt"
    if real.is_file():
        return real
    path = tmp_path_factory.mktemp("text") / "input.txt"
    lines = ["First Citizen:\nBefore we proceed any further, hear me speak.\n\n"] * 2000
    path.write_text("".join(f"{i} {s}" for i, s in enumerate(lines)))
    return path


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory, shakespeare):
    """Environment for subprocess runs: a download cache that already holds the text."""
    cache = tmp_path_factory.mktemp("cache")
    shutil.copy(shakespeare, cache / "tinyshakespeare.txt")
    return {**os.environ, "GPT_FROM_SCRATCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory):
    """A random 2-layer GPT2LMHeadModel saved with save_pretrained: stands in for OpenAI's."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)
    model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    return path


def run_script(args, env=None, timeout=300):
    """Run a stage as a user would; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
