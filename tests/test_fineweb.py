"""`python -m common.fineweb`: local documents -> token shards, exact round trip, resume."""

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import run_script

from common import UserError
from common import fineweb as fw
from common.data import EOT, ShardLoader, get_tokenizer

SHARD = 2000  # tokens per shard in these tests: the ~18k-token corpus makes 10 shards


@pytest.fixture(scope="module")
def docs(shakespeare):
    """~300 documents: paragraphs of shakespeare, one longer than two shards, and two
    awkward ones (a literal end-of-text string must stay text; non-ASCII)."""
    paras = [p for p in shakespeare.read_text().split("\n\n") if p.strip()]
    enc, end = get_tokenizer(), 300
    while len(enc.encode_ordinary("\n\n".join(paras[300:end]))) < 2.2 * SHARD:
        end += 1
        assert end <= len(paras), "the text is too short for a document of 2.2 shards"
    long_doc = "\n\n".join(paras[300:end])  # spans more than two whole shards
    return [
        *paras[:150],
        long_doc,
        "a <|endoftext|> inside text",
        "naïve café ☕ 東京",
        *paras[150:300],
    ]


@pytest.fixture(scope="module")
def sources(docs, tmp_path_factory):
    """The same documents as parquet (via `datasets`) and as jsonl, plus an extra column."""
    import datasets

    d = tmp_path_factory.mktemp("src")
    datasets.Dataset.from_dict({"id": list(range(len(docs))), "text": docs}).to_parquet(
        str(d / "docs.parquet")
    )
    with open(d / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(docs))
    return d


def cfg_for(sources, out, **kw):
    base = fw.Config(data_files=str(sources / "docs.parquet"), out_dir=str(out), shard_size=SHARD)
    return replace(base, **{"workers": 2, **kw})


def shards_in(out):
    """{file name: tokens} of the shards in `out`, in index order (val_000000 first)."""
    files = sorted(out.glob("*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return {p.name: np.load(p) for p in files}


def decode_docs(out):
    """All shards in index order -> the documents, split at each EOT (which must lead each)."""
    tokens = np.concatenate(list(shards_in(out).values())).astype(np.int64)
    assert tokens[0] == EOT  # every document starts with the delimiter, the first one too
    starts = np.flatnonzero(tokens == EOT)
    enc = get_tokenizer()
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, [*starts[1:], None])]


@pytest.fixture(scope="module")
def reference(sources, docs, tmp_path_factory):
    """One uninterrupted run with 2 workers: every other run must give exactly these shards."""
    out = tmp_path_factory.mktemp("ref")
    result = fw.main(cfg_for(sources, out))
    return out, result, shards_in(out)


def test_round_trip_every_document_in_order(reference, docs):
    out, result, shards = reference
    assert decode_docs(out) == docs  # nothing lost, duplicated or reordered
    enc = get_tokenizer()
    n_tokens = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    n = -(-n_tokens // SHARD)  # ceil
    assert result["tokens"] == result["new_tokens"] == n_tokens and result["shards"] == n >= 5
    names = ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)]
    assert sorted(shards) == sorted(names)  # shard 0 is val, the rest train
    sizes = [len(shards[name]) for name in names]
    assert sizes[:-1] == [SHARD] * (n - 1) and sizes[-1] == n_tokens - (n - 1) * SHARD
    assert all(a.dtype == np.uint16 for a in shards.values())
    assert not list(out.glob(".*tmp*"))  # no temp files left behind
    # the resume points the crash tests go through include the hard cases: a shard ending
    # deep inside a document (more than a whole shard of it already out) and one ending
    # exactly where a document ends
    progress = json.loads((out / "edufineweb_progress.json").read_text())
    carries = [s["carry"] for s in progress["shards"]]
    assert len(carries) == n - 1 and max(carries) > SHARD


def test_resume_where_a_shard_ends_with_a_document(tmp_path, monkeypatch):
    """Documents of 4 tokens (EOT + 3) in shards of 8: every shard ends exactly with a
    document, the case where the resume point is (next document, carry 0)."""
    words = ["cat", "dog", "sun", "red", "big", "one", "two", "sky"]
    texts = [f"{w} {w} {w}" for w in words * 3]
    assert all(len(get_tokenizer().encode_ordinary(t)) == 3 for t in texts)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = fw.Config(data_files=str(tmp_path / "docs.jsonl"), shard_size=8, workers=1)
    ref = fw.main(replace(cfg, out_dir=str(tmp_path / "ref")))
    assert ref["shards"] == 12 and decode_docs(tmp_path / "ref") == texts

    real_write = fw.write_shard

    def crash_at_shard_5(path, tokens):
        if path.name.endswith("_000005.npy"):
            raise KeyboardInterrupt
        real_write(path, tokens)

    monkeypatch.setattr(fw, "write_shard", crash_at_shard_5)
    with pytest.raises(KeyboardInterrupt):
        fw.main(replace(cfg, out_dir=str(tmp_path / "run")))
    progress = json.loads((tmp_path / "run" / "edufineweb_progress.json").read_text())
    assert progress["shards"][-1] == dict(tokens=8, docs=10, carry=0)
    monkeypatch.setattr(fw, "write_shard", real_write)
    assert fw.main(replace(cfg, out_dir=str(tmp_path / "run")))["shards_written"] == 7
    assert decode_docs(tmp_path / "run") == texts


def test_jsonl_one_worker_gives_identical_shards(reference, sources, tmp_path):
    fw.main(cfg_for(sources, tmp_path, data_files=str(sources / "docs.jsonl"), workers=1))
    got, want = shards_in(tmp_path), reference[2]
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_rerun_of_finished_prep_does_nothing(reference, sources, capsys):
    out = reference[0]
    again = fw.main(cfg_for(sources, out))
    assert again["shards_written"] == 0 and again["tokens"] == reference[1]["tokens"]
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize("crash_after", range(1, 9))  # after each complete shard
def test_crash_then_rerun_matches_uninterrupted(
    reference, sources, tmp_path, monkeypatch, capsys, crash_after
):
    """Kill the prep right after its N-th shard, for every N (some land inside the long
    document, see below): the re-run resumes there and gives the uninterrupted run's shards."""
    if crash_after >= reference[1]["shards"]:
        pytest.skip("the corpus has fewer shards than this crash point")  # stand-in text only
    real_write, calls = fw.write_shard, []

    def crashing_write(path, tokens):
        if len(calls) == crash_after:
            raise KeyboardInterrupt  # as if killed
        calls.append(path.name)
        real_write(path, tokens)

    monkeypatch.setattr(fw, "write_shard", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        fw.main(cfg_for(sources, tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == crash_after
    monkeypatch.setattr(fw, "write_shard", real_write)

    result = fw.main(cfg_for(sources, tmp_path))
    assert f"resuming after {crash_after} complete shards" in capsys.readouterr().out
    assert result["shards_written"] == reference[1]["shards"] - crash_after
    got, want = shards_in(tmp_path), reference[2]
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_crash_between_shard_and_progress_file(reference, sources, tmp_path, monkeypatch):
    """Shard 2 renamed into place but the progress file not yet updated: the re-run writes
    shard 2 again (same bytes) instead of trusting or skipping it."""
    real, calls = fw.write_progress, []

    def crashing(path, progress):
        calls.append(1)
        if len(progress["shards"]) == 3:
            raise KeyboardInterrupt
        real(path, progress)

    monkeypatch.setattr(fw, "write_progress", crashing)
    with pytest.raises(KeyboardInterrupt):
        fw.main(cfg_for(sources, tmp_path, workers=1))
    monkeypatch.setattr(fw, "write_progress", real)
    assert len(list(tmp_path.glob("*.npy"))) == 3  # on disk, but not in the progress file
    assert (
        fw.main(cfg_for(sources, tmp_path, workers=1))["shards_written"]
        == reference[1]["shards"] - 2
    )
    assert decode_docs(tmp_path) == decode_docs(reference[0])


def test_deleted_shards_are_written_again(reference, sources, tmp_path):
    fw.main(cfg_for(sources, tmp_path, workers=1))
    names = list(shards_in(tmp_path))  # index order
    (tmp_path / names[-1]).unlink()  # the partial last one
    (tmp_path / names[-2]).unlink()  # and a complete one
    result = fw.main(cfg_for(sources, tmp_path, workers=1))
    assert result["shards_written"] == 2
    got, want = shards_in(tmp_path), reference[2]
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_max_tokens_then_the_rest(reference, sources, tmp_path):
    small = fw.main(cfg_for(sources, tmp_path, max_tokens=2 * SHARD + 500))
    sizes = [len(a) for a in shards_in(tmp_path).values()]
    assert small["tokens"] == 2 * SHARD + 500 and sorted(sizes) == [500, SHARD, SHARD]
    full = fw.main(cfg_for(sources, tmp_path))  # no limit now: goes on from shard 2
    assert full["shards_written"] == reference[1]["shards"] - 2
    assert decode_docs(tmp_path) == decode_docs(reference[0])


def test_shards_feed_the_loader(reference):
    out = reference[0]
    val = ShardLoader(out, "val", batch_size=2, seq_len=16)
    x, y = val.next_batch()
    assert x[0, 0].item() == EOT and x.shape == (2, 16)
    train = ShardLoader(out, "train", batch_size=4, seq_len=32)
    want = reference[2]["edufineweb_train_000001.npy"][: 4 * 32].astype(np.int64)
    assert train.next_batch()[0].flatten().tolist() == want.tolist()


def test_bad_input_is_user_error(sources, tmp_path):
    import datasets

    with pytest.raises(UserError, match="no file at"):
        fw.main(cfg_for(sources, tmp_path, data_files=str(tmp_path / "missing.jsonl")))
    (tmp_path / "docs.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="neither .jsonl"):
        fw.main(cfg_for(sources, tmp_path, data_files=str(tmp_path / "docs.csv")))
    with pytest.raises(UserError, match="no 'body' column"):
        fw.main(cfg_for(sources, tmp_path / "a", text_column="body"))
    with pytest.raises(UserError, match="--shard-size must be"):
        fw.main(cfg_for(sources, tmp_path / "b", shard_size=0))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl' is empty"):
        fw.main(cfg_for(sources, tmp_path / "c", data_files=str(tmp_path / "empty.jsonl")))
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(UserError, match="no documents"):
        fw.main(cfg_for(sources, tmp_path / "c", data_files=str(tmp_path / "none.parquet")))
    with open(tmp_path / "null.jsonl", "w") as f:
        f.write('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(UserError, match="non-text value"):
        fw.main(cfg_for(sources, tmp_path / "e", data_files=str(tmp_path / "null.jsonl")))
    fw.main(cfg_for(sources, tmp_path / "d", max_tokens=100))
    with pytest.raises(UserError, match="shard_size differ"):  # same dir, other shard size
        fw.main(cfg_for(sources, tmp_path / "d", shard_size=SHARD + 1, max_tokens=100))


def test_cli_help_run_and_error(reference, sources, tmp_path, cache_env):
    help_ = run_script(["-m", "common.fineweb", "--help"], env=cache_env)
    assert help_.returncode == 0
    assert "--data-files" in help_.stdout and "--shard-size" in help_.stdout
    assert "python -m common.fineweb" in help_.stdout  # the docstring's commands

    out = tmp_path / "shards"
    args = ["--data-files", str(sources / "docs.jsonl"), "--out-dir", str(out)]
    run = run_script(
        ["-m", "common.fineweb", *args, "--shard-size", "5000", "--workers", "2"], env=cache_env
    )
    assert run.returncode == 0, run.stderr
    tokens = reference[1]["tokens"]
    n = -(-tokens // 5000)
    assert f"summary: {out} holds {n} shards, {tokens:,} tokens" in run.stdout
    names = {p.name: len(np.load(p)) for p in out.glob("*.npy")}
    assert names.pop("edufineweb_val_000000.npy") == 5000
    assert sorted(names) == [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)]
    assert (out / "edufineweb_progress.json").is_file()

    bad = run_script(
        ["-m", "common.fineweb", "--data-files", str(tmp_path / "nope.parquet")], env=cache_env
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --data-files: no file at")


def test_workers_never_fork_from_a_threaded_process():
    """A pool forked from a process with threads (torch's, pytest's) hung a worker on a lock
    held at fork time (seen in a full suite run); the workers start from a clean process.
    On Linux that is one server for every pool, which has imported the module already."""
    import os
    import sys

    ctx = fw._pool_context()
    assert ctx.get_start_method() in ("forkserver", "spawn")
    if ctx.get_start_method() != "forkserver":
        return
    parents = []
    for _ in range(2):  # two pools, as two preps in one process
        with ctx.Pool(2) as pool:
            parents += [pool.apply(os.getppid) for _ in range(2)]
    assert os.getpid() not in parents and len(set(parents)) == 1  # not us: one server
    if sys.platform == "linux":  # the server holds torch (via common.data) before any fork
        assert "libtorch_cpu" in open(f"/proc/{parents[0]}/maps").read()
