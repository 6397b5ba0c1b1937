"""bench/gpu_data.py: the carried inputs of the GPU proof (issue 13), at a tiny size."""

import numpy as np
import pytest
from conftest import SHAKESPEARE, load_stage

from common import UserError
from common.data import get_tokenizer, shard_files


@pytest.fixture(scope="module")
def gpu_data():
    return load_stage("bench/gpu_data")


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
