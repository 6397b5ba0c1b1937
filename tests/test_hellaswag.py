"""HellaSwag: download (local HTTP server), rendering, scoring against transformers, batch-size
invariance, acc vs acc_norm, rank sharding, stage 08 (compare-hf, --ckpt, torchrun, errors)."""

import http.server
import json
import math
import shutil
import socket
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_stage, run_script

from common import UserError
from common.checkpoint import save_checkpoint
from common.data import EOT, get_tokenizer
from common.hellaswag import (
    collate,
    download_split,
    evaluate,
    load_examples,
    read_examples,
    render_example,
)
from common.hf import from_pretrained
from common.model import GPT, GPTConfig

FIXTURE = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"


@pytest.fixture(scope="module")
def examples():
    return read_examples(FIXTURE)


@pytest.fixture(scope="module")
def hf_model(hf_tiny_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(hf_tiny_dir).eval()


@pytest.fixture(scope="module")
def by_hand(examples, hf_model):
    """Per-ending summed and mean losses computed independently: one ending at a time through
    transformers, cross-entropy of the ending's tokens after the context."""
    enc = get_tokenizer()
    sums, means = [], []
    with torch.no_grad():
        for ex in examples:
            ctx = enc.encode(ex["ctx"])
            row_s, row_m = [], []
            for ending in ex["endings"]:
                end = enc.encode(" " + ending)
                logits = hf_model(torch.tensor([ctx + end])).logits[0]  # (T, V)
                # logits at positions len(ctx)-1 .. T-2 predict the ending's tokens
                loss = F.cross_entropy(
                    logits[len(ctx) - 1 : -1], torch.tensor(end), reduction="none"
                )
                row_s.append(loss.sum().item())
                row_m.append(loss.mean().item())
            sums.append(row_s)
            means.append(row_m)
    return torch.tensor(sums), torch.tensor(means)


# --- download ------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits = []

    def do_GET(self):
        _Handler.hits.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path):
    """127.0.0.1 serving a copy of the fixture as /data/hellaswag_val.jsonl."""
    root = tmp_path / "www"
    (root / "data").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "data" / "hellaswag_val.jsonl")
    handler = lambda *a, **kw: _Handler(*a, directory=str(root), **kw)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Handler.hits = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data"
    httpd.shutdown()
    httpd.server_close()


def test_download_then_cached(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_FROM_SCRATCH_CACHE", str(tmp_path / "cache"))
    first = load_examples("val", base_url=server)
    assert _Handler.hits == ["/data/hellaswag_val.jsonl"]
    path = tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
    assert path.read_bytes() == FIXTURE.read_bytes()
    again = load_examples("val", base_url=server, limit=3)
    assert _Handler.hits == ["/data/hellaswag_val.jsonl"]  # second call: from the cache
    assert len(first) == 16 and again == first[:3]


def test_download_offline_names_the_cache_path(tmp_path):
    s = socket.socket()  # a port on 127.0.0.1 that nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(UserError, match=r"put the file at .*hellaswag_val\.jsonl"):
        download_split("val", base_url=f"http://127.0.0.1:{port}/data", cache=tmp_path)
    assert not (tmp_path / "hellaswag_val.jsonl").exists()
    with pytest.raises(UserError, match="unknown HellaSwag split 'dev'"):
        download_split("dev", cache=tmp_path)


def test_read_examples_checks_the_file(tmp_path, examples):
    assert len(examples) == 16 and [ex["label"] for ex in examples[:4]] == [0, 1, 2, 3]
    assert all(len(ex["endings"]) == 4 for ex in examples)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(UserError, match="line 2 of .* is not a HellaSwag example"):
        read_examples(bad)
    with pytest.raises(UserError, match="HellaSwag file not found"):
        read_examples(tmp_path / "nope.jsonl")
    unlabeled = [dict(ex, label=None) for ex in examples[:2]]
    with pytest.raises(UserError, match="no labels"):
        evaluate(lambda idx: idx, unlabeled, "cpu")


# --- rendering ----------------------------------------------------------------------------


def test_render_layout(examples):
    enc = get_tokenizer()
    ex = examples[1]
    tokens, mask, label = render_example(ex, enc)
    ctx = enc.encode(ex["ctx"])
    ends = [enc.encode(" " + e) for e in ex["endings"]]
    assert label == ex["label"] == 1
    assert tokens.shape == mask.shape == (4, len(ctx) + max(map(len, ends)))
    assert tokens.dtype == torch.long and mask.dtype == torch.bool
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i, : len(ctx)].tolist() == ctx
        assert tokens[i, len(ctx) : n].tolist() == end  # " " + ending: the leading-space tokens
        assert tokens[i][mask[i]].tolist() == end  # the mask covers exactly the ending
        assert mask[i].nonzero().flatten().tolist() == list(range(len(ctx), n))
        assert (tokens[i, n:] == EOT).all() and not mask[i, n:].any()  # padding, never scored


def test_collate_pads_and_crops_from_the_left(examples):
    enc = get_tokenizer()
    rendered = [render_example(ex, enc) for ex in examples[:3]]
    tokens, mask = collate(rendered)
    longest = max(r[0].size(1) for r in rendered)
    assert tokens.shape == mask.shape == (12, longest)
    assert torch.equal(tokens[4:8, : rendered[1][0].size(1)], rendered[1][0])
    # block_size 18: the oldest context tokens go, the ending stays whole at the end
    tokens, mask = collate(rendered, block_size=18)
    assert tokens.shape == (12, 18)
    for r, (t, m, _) in enumerate(rendered):
        for i in range(4):
            n = int(m[i].nonzero().max()) + 1
            kept = t[i, :n][-18:]  # rows shorter than 18 are kept whole, then padded
            assert tokens[4 * r + i, : len(kept)].tolist() == kept.tolist()
            assert mask[4 * r + i].sum() == m[i].sum()
    with pytest.raises(UserError, match="does not fit the model's block_size 8"):
        collate(rendered, block_size=8)


# --- scoring ------------------------------------------------------------------------------


def test_scores_match_transformers_by_hand(hf_tiny_dir, hf_model, examples, by_hand):
    sums, means = by_hand
    labels = torch.tensor([ex["label"] for ex in examples])
    ours = from_pretrained(str(hf_tiny_dir))
    for model in (ours, hf_model, lambda idx: hf_model(idx).logits):  # hooked lm_head, or not
        res = evaluate(model, examples, "cpu", batch_size=16, details=True)
        assert res["indices"] == list(range(16)) and res["labels"] == labels.tolist()
        torch.testing.assert_close(res["loss_sum"], sums, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(res["loss_avg"], means, atol=1e-5, rtol=1e-5)
        assert res["pred"] == sums.argmin(1).tolist()
        assert res["pred_norm"] == means.argmin(1).tolist()
        assert res["correct"] == (sums.argmin(1) == labels).sum().item()
        assert res["correct_norm"] == (means.argmin(1) == labels).sum().item()
        assert res["n"] == 16 and res["acc_norm"] == res["correct_norm"] / 16
        assert res["examples_per_s"] > 0


def test_batch_size_changes_nothing(hf_tiny_dir, examples):
    model = from_pretrained(str(hf_tiny_dir))
    one = evaluate(model, examples, "cpu", batch_size=1, details=True)
    many = evaluate(model, examples, "cpu", batch_size=16, details=True)
    some = evaluate(model, examples, "cpu", batch_size=5, details=True)  # a ragged last batch
    for res in (many, some):
        assert (res["pred"], res["pred_norm"]) == (one["pred"], one["pred_norm"])
        assert (res["correct"], res["correct_norm"], res["n"]) == (
            one["correct"], one["correct_norm"], one["n"],
        )  # fmt: skip
        torch.testing.assert_close(res["loss_sum"], one["loss_sum"], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(res["loss_avg"], one["loss_avg"], atol=1e-6, rtol=1e-6)


def test_eval_mode_only_during_the_call(hf_model, examples, by_hand):
    """transformers' GPT-2 has dropout: scored in train mode, the losses would be random."""
    hf_model.train()
    try:
        res = evaluate(hf_model, examples[:4], "cpu", batch_size=2, details=True)
        assert hf_model.training  # the caller's mode is back
    finally:
        hf_model.eval()
    torch.testing.assert_close(res["loss_avg"], by_hand[1][:4], atol=1e-5, rtol=1e-5)


def test_acc_and_acc_norm_are_computed_as_defined():
    """A stub model: every token costs ln(Z), except the long ending's tokens, boosted by b.
    The short ending has the lowest sum (acc's pick), the long one the lowest mean (acc_norm's)."""
    enc = get_tokenizer()
    ex = dict(ctx="The cat", endings=["one", "red green blue", "four five", "six seven eight nine"],
              label=1)  # fmt: skip
    ends = [enc.encode(" " + e) for e in ex["endings"]]
    assert [len(e) for e in ends] == [1, 3, 2, 4]
    boosted, b, V = ends[1], 3.0, 50257

    def stub(idx):  # no lm_head to hook: full (R, T, V) logits
        logits = torch.zeros(*idx.shape, V)
        logits[..., boosted] = b
        return logits

    L = math.log(len(boosted) * math.exp(b) + V - len(boosted))  # -log p of a plain token
    res = evaluate(stub, [ex], "cpu", details=True)
    want_sum = torch.tensor([[L, 3 * (L - b), 2 * L, 4 * L]])
    want_avg = torch.tensor([[L, L - b, L, L]])
    torch.testing.assert_close(res["loss_sum"], want_sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(res["loss_avg"], want_avg, atol=1e-4, rtol=1e-5)
    assert res["pred"] == [0] and res["pred_norm"] == [1]
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_ranks_split_the_examples(hf_tiny_dir, examples):
    """Without torch.distributed each rank returns its own share: together, the whole."""
    model = from_pretrained(str(hf_tiny_dir))
    whole = evaluate(model, examples, "cpu", details=True)
    parts = [evaluate(model, examples, "cpu", rank=r, world_size=3, details=True) for r in range(3)]
    assert [p["indices"] for p in parts] == [list(range(r, 16, 3)) for r in range(3)]
    for key in ("n", "correct", "correct_norm"):
        assert sum(p[key] for p in parts) == whole[key]
    for p in parts:
        assert p["pred_norm"] == [whole["pred_norm"][i] for i in p["indices"]]


# --- stage 08 -----------------------------------------------------------------------------


def stage_config(stage, **kw):
    return stage.Config(device="cpu", data=str(FIXTURE), batch_size=4, **kw)


def test_08_compare_hf_agrees(hf_tiny_dir, capsys):
    stage = load_stage("08_hellaswag")
    out = stage.main(stage_config(stage, model=str(hf_tiny_dir), compare_hf=True))
    assert out["n"] == 16 and out["disagree"] == 0 and out["max_loss_diff"] < 1e-5
    assert (out["acc"], out["acc_norm"]) == (out["hf_acc"], out["hf_acc_norm"])
    printed = capsys.readouterr().out
    assert "predictions that differ: 0 of 16" in printed
    assert f"acc_norm {out['acc_norm']:.4f}" in printed
    assert "GPT-2 124M (OpenAI weights)    0.2955" in printed and "GPT-3 125M" in printed
    assert "published" in printed and printed.strip().splitlines()[-1].startswith("summary:")


def test_08_checkpoint_padded_vocab_and_cropping(tmp_path, capsys, examples):
    """Our checkpoint (vocab padded to 50304, random rows there; block_size 24, so long rows
    are cropped) scores like its transformers export."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=24, vocab_size=50304, n_layer=2, n_head=2, n_embd=32,
                       tie_weights=True, gpt2_init=True)  # fmt: skip
    model = GPT(config)
    assert model.lm_head.weight[50257:].abs().sum() > 0  # the padded rows are not zero
    enc = get_tokenizer()
    assert any(render_example(ex, enc)[0].size(1) > 24 for ex in examples)  # some are cropped
    save_checkpoint(tmp_path, 7, model, config)
    stage = load_stage("08_hellaswag")
    out = stage.main(stage_config(stage, ckpt=str(tmp_path), compare_hf=True))
    assert out["n"] == 16 and out["disagree"] == 0 and out["max_loss_diff"] < 1e-5
    assert "(step 7)" in capsys.readouterr().out


def test_08_default_split_comes_from_the_cache(hf_tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "hellaswag").mkdir()
    shutil.copy(FIXTURE, tmp_path / "hellaswag" / "hellaswag_val.jsonl")
    monkeypatch.setenv("GPT_FROM_SCRATCH_CACHE", str(tmp_path))  # no network: the file is there
    stage = load_stage("08_hellaswag")
    out = stage.main(stage.Config(device="cpu", model=str(hf_tiny_dir), limit=5))
    assert out["n"] == 5


def test_08_bad_input(hf_tiny_dir, tmp_path):
    stage = load_stage("08_hellaswag")
    with pytest.raises(UserError, match="HellaSwag file not found"):
        stage.main(stage.Config(device="cpu", model=str(hf_tiny_dir), data="/no/such.jsonl"))
    with pytest.raises(UserError, match="unknown model 'gpt-9'"):
        stage.main(stage_config(stage, model="gpt-9"))
    with pytest.raises(UserError, match="no checkpoint"):
        stage.main(stage_config(stage, ckpt=str(tmp_path)))
    r = run_script(["08_hellaswag.py", "--device", "cpu", "--data", "/no/such.jsonl"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: HellaSwag file not found: /no/such.jsonl (omit --data to download the split)"
    ]


def test_08_torchrun_two_processes_match_one(hf_tiny_dir, tmp_path):
    stage = load_stage("08_hellaswag")
    single = stage.main(stage_config(stage, model=str(hf_tiny_dir)))
    out = tmp_path / "result.json"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "08_hellaswag.py", "--device", "cpu", "--model", str(hf_tiny_dir), "--data",
            str(FIXTURE), "--compare-hf", "true", "--json", str(out)]  # fmt: skip
    r = run_script(args)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["disagree"] == 0
    for key in ("n", "correct", "correct_norm"):
        assert got[key] == single[key]
    assert "(2 processes)" in r.stdout
    assert sum(line.startswith("hellaswag val:") for line in r.stdout.splitlines()) == 1  # rank 0
