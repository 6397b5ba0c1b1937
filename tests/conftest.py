"""Shared test fixtures: offline tokenizer, a tiny-shakespeare sample, stage loading.

The suite needs no network and nothing outside the repo but tiktoken's gpt2 files, found
through TIKTOKEN_CACHE_DIR. In-process code that tries to reach another host fails at once
(see `no_network`); downloads are tested against a local server on 127.0.0.1."""

import importlib.util
import ipaddress
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the first 64 KiB of tiny shakespeare (karpathy/char-rnn; public domain), cut at a blank line
SHAKESPEARE = ROOT / "tests" / "data" / "shakespeare_sample.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use local stand-ins, never the hub
# tiktoken fetches its gpt2 files from the network unless they are in TIKTOKEN_CACHE_DIR.
# A developer's convenience only: CI sets TIKTOKEN_CACHE_DIR itself (.ci/run).
_DEV_CACHE = ROOT.parent / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _DEV_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_DEV_CACHE)


def _is_local(host):
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


@pytest.fixture(scope="session", autouse=True)
def no_network():
    """Any connection from the test process to a host other than this one is an error,
    so a test that would need the network fails here too, not only on a machine without."""
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise OSError(f"tests must not use the network (tried {address[0]})")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _is_local(host if isinstance(host, str) or host is None else host.decode()):
            raise socket.gaierror(f"tests must not use the network (looked up {host})")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_getaddrinfo
    yield
    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo


def load_stage(name):
    """Import a numbered stage (its file name starts with a digit, so no plain import)."""
    path = ROOT / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shakespeare():
    """A text to train on: 454 paragraphs, ~20k tokens, committed with the tests."""
    return SHAKESPEARE


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory):
    """Environment for subprocess runs: an empty download cache of their own, so nothing is
    read from (or written to) the user's; pass `--input` where a stage needs text."""
    cache = tmp_path_factory.mktemp("cache")
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


@pytest.fixture(scope="session")
def shards(tmp_path_factory, shakespeare):
    """Token shards made from tiny shakespeare's paragraphs by the real prep code (stage 07's
    tests): ~20k tokens in shards of 4,000, so a run crosses from one shard to the next."""
    import json

    from common import fineweb
    from common.data import split_documents

    tmp = tmp_path_factory.mktemp("shards")
    docs = split_documents(shakespeare.read_text())  # as `python -m common.data --docs-jsonl`
    with open(tmp / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    fineweb.main(
        fineweb.Config(
            data_files=str(tmp / "docs.jsonl"),
            out_dir=str(tmp / "data"),
            shard_size=4_000,
            workers=1,
        )
    )
    return tmp / "data"


def run_script(args, env=None, timeout=300):
    """Run a stage as a user would; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# `python NN_stage.py --help` for every stage, run as __main__ in one process (one torch import)
HELP_ALL = """
import runpy, sys
for name in sys.argv[1:]:
    sys.argv = [name + ".py", "--help"]
    print("=== " + name, flush=True)
    try:
        runpy.run_path(name + ".py", run_name="__main__")
    except SystemExit as e:
        print("=== exit", e.code, flush=True)
"""


@pytest.fixture(scope="session")
def helps():
    """{stage: (its exit code, its help text)}"""
    stages = sorted(p.stem for p in ROOT.glob("[0-9][0-9]_*.py"))
    r = run_script(["-c", HELP_ALL, *stages])
    assert r.returncode == 0, r.stderr
    found = re.findall(r"^=== (\S+)\n(.*?)^=== exit (\S+)$", r.stdout, flags=re.S | re.M)
    return {name: (code, text) for name, text, code in found}
