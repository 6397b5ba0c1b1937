"""HellaSwag: download (local HTTP server), rendering, scoring against transformers, batch-size
invariance, acc vs acc_norm, rank sharding, the lm-eval protocol (its text cleaning, its
scoring by hand, and against lm_eval itself when installed), stage 08 (both protocols,
compare-hf, --ckpt, torchrun, errors)."""

import http.server
import importlib.util
import json
import math
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SHAKESPEARE, load_stage, run_script

from common import UserError
from common.checkpoint import save_checkpoint
from common.cli import parse_args
from common.data import EOT, get_tokenizer
from common.hellaswag import (
    PUBLISHED,
    collate,
    download_split,
    evaluate,
    load_examples,
    preprocess,
    read_examples,
    render_example,
    texts,
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


# WikiHow-style examples in HellaSwag's schema, written for these tests: the markup lm-eval
# cleans ([header], [title], [step], [substeps], [other]), an ending that keeps a leading space
# after cleaning, a context that ends in a space after cleaning, a ctx_b to capitalize, three
# spaces (one pass of "  " -> " " leaves two), an empty ctx_b
ARTIFACTS = [
    dict(
        ind=900,
        activity_label="Home and Garden",
        ctx_a="[header] How to plant tulip bulbs "
        "[title] Choose a sunny spot. [step] Tulips need at least six hours of sun a day.",
        ctx_b="",
        split="val",
        split_type="zeroshot",
        label=0,
        source_id="wikihow~test_900",
        endings=[
            "[substeps] Dig a hole about  eight inches deep. [title] Water the bulbs.",
            "Paint the bulbs [blue] before planting them.",
            "You can eat the bulbs raw [step] with salt.",
            "  Plant them in the freezer.  ",
        ],
    ),
    dict(
        ind=901,
        activity_label="Food and Entertaining",
        ctx_a="[header] How to make lemonade [title] Squeeze the lemons.",
        ctx_b="add sugar [title]",
        split="val",
        split_type="indomain",
        label=3,
        source_id="wikihow~test_901",
        endings=[
            "Pour it on the lawn.",
            "[title] Freeze the sugar.",
            "Sell the lemons.",
            "Stir until the sugar dissolves [step] and serve cold.",
        ],
    ),
    dict(
        ind=902,
        activity_label="Playing lacrosse",
        ctx_a="Two teams run across a field.",
        ctx_b="the Player in RED catches the ball",
        split="val",
        split_type="indomain",
        label=1,
        source_id="activitynet~v_test_902",
        endings=[
            "and   eats it.",
            "and   runs toward the goal.",
            "and flies away.",
            "and [sits] falls asleep.",
        ],
    ),
]
for _ex in ARTIFACTS:
    _ex["ctx"] = (_ex["ctx_a"] + " " + _ex["ctx_b"]).strip()


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
            one["correct"],
            one["correct_norm"],
            one["n"],
        )
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
    ex = dict(
        ctx="The cat",
        endings=["one", "red green blue", "four five", "six seven eight nine"],
        label=1,
    )
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


# --- the lm-eval protocol -------------------------------------------------------------------


def test_lm_eval_text_cleaning():
    """lm-eval's rules, worked by hand: the context is activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize(); context and endings are trimmed, " [title]" -> ". ", [...] dropped,
    then one pass of "  " -> " ". The nanogpt protocol takes ctx and the endings as they are."""
    context, endings = texts(ARTIFACTS[0], "lm-eval")
    assert context == (
        "Home and Garden: How to plant tulip bulbs. Choose a sunny spot. Tulips need at least "
        "six hours of sun a day."
    )
    assert endings == [
        " Dig a hole about eight inches deep.. Water the bulbs.",  # trimmed before [substeps] went
        "Paint the bulbs before planting them.",
        "You can eat the bulbs raw with salt.",
        "Plant them in the freezer.",
    ]
    context, endings = texts(ARTIFACTS[1], "lm-eval")
    assert context == "Food and Entertaining: How to make lemonade. Squeeze the lemons. Add sugar. "
    assert endings[1] == " Freeze the sugar."  # no space before [title]: dropped as any [...]
    assert endings[1] == preprocess("[title] Freeze the sugar.")
    context, endings = texts(ARTIFACTS[2], "lm-eval")
    assert (
        context
        == "Playing lacrosse: Two teams run across a field. The player in red catches the ball"
    )
    assert endings[:2] == ["and  eats it.", "and  runs toward the goal."]  # 3 spaces -> 2
    assert endings[3] == "and falls asleep."
    assert texts(ARTIFACTS[2], "nanogpt") == (ARTIFACTS[2]["ctx"], ARTIFACTS[2]["endings"])
    with pytest.raises(UserError, match="unknown HellaSwag protocol 'helm'"):
        texts(ARTIFACTS[0], "helm")
    with pytest.raises(UserError, match="unknown HellaSwag protocol 'both'"):
        evaluate(lambda idx: idx, ARTIFACTS, "cpu", protocol="both")  # one at a time


def test_lm_eval_protocol_by_hand(hf_model, examples):
    """Our lm-eval scores against an independent computation: lm-eval's tokenization (the
    context's trailing spaces moved to the continuation, context + continuation encoded
    together and cut after the context's tokens), one ending at a time through transformers;
    acc = argmax of the summed log-likelihood, acc_norm = argmax of it / len(ending)."""
    enc = get_tokenizer()
    exs = examples[:1] + ARTIFACTS
    res = evaluate(hf_model, exs, "cpu", batch_size=4, details=True, protocol="lm-eval")
    lls, preds, preds_norm = [], [], []
    with torch.no_grad():
        for ex in exs:
            context, endings = texts(ex, "lm-eval")
            ctx = enc.encode(context.rstrip())
            row = []
            for ending in endings:
                cont = enc.encode(context + " " + ending)[len(ctx) :]
                logits = hf_model(torch.tensor([ctx + cont])).logits[0]
                logp = F.log_softmax(logits[len(ctx) - 1 : -1], dim=-1)
                row.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
            lens = torch.tensor([float(len(e)) for e in endings], dtype=torch.float64)
            lls.append(row)
            preds.append(int(torch.tensor(row).argmax()))
            preds_norm.append(int((torch.tensor(row, dtype=torch.float64) / lens).argmax()))
    lls = torch.tensor(lls)
    torch.testing.assert_close(-res["loss_sum"], lls, atol=1e-4, rtol=1e-5)
    assert res["pred"] == preds and res["pred_norm"] == preds_norm
    labels = [ex["label"] for ex in exs]
    assert res["correct"] == sum(p == g for p, g in zip(preds, labels))
    assert res["correct_norm"] == sum(p == g for p, g in zip(preds_norm, labels))
    chars = torch.tensor([[len(e) for e in texts(ex, "lm-eval")[1]] for ex in exs])
    torch.testing.assert_close(res["loss_avg"], res["loss_sum"].double() / chars)
    nanogpt = evaluate(hf_model, exs, "cpu", batch_size=4, details=True)
    assert not torch.allclose(nanogpt["loss_sum"], res["loss_sum"])  # other text, other losses


def test_lm_eval_itself_agrees(tmp_path, monkeypatch):
    """The same examples scored by lm_eval (its own hellaswag task: only the data files are
    local) and by our lm-eval protocol: every example's two choices and both aggregates equal.
    Optional: lm-eval is not a requirement of this project."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip(
            "lm-eval is not installed: `pip install lm-eval accelerate` (a separate "
            "venv is fine) to check our lm-eval protocol against lm_eval itself"
        )
    import lm_eval
    import lm_eval.tasks
    import numpy as np

    from common.export import export

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    exs = read_examples(FIXTURE) + ARTIFACTS
    data = tmp_path / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in exs))
    torch.manual_seed(0)  # our GPT, padded vocab, exported as `python -m common.export` does
    model = GPT(
        GPTConfig(
            block_size=128,
            vocab_size=50304,
            n_layer=2,
            n_head=2,
            n_embd=32,
            tie_weights=True,
            gpt2_init=True,
        )
    )
    # 30 steps on Shakespeare first: a random model picks the shortest ending every time
    tokens = torch.tensor(get_tokenizer().encode_ordinary(SHAKESPEARE.read_text()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        starts = torch.randint(0, len(tokens) - 65, (8,)).tolist()
        batch = torch.stack([tokens[i : i + 65] for i in starts])  # (8, 65)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    export(model.eval(), tmp_path / "model")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    stock = Path(lm_eval.tasks.__file__).parent / "hellaswag" / "hellaswag.yaml"
    (tasks / "hellaswag_local.yaml").write_text(
        f"include: {stock}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\ntraining_split: null\n"
    )
    got = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'model'},dtype=float32",
        device="cpu",
        tasks=["hellaswag_local"],
        batch_size=8,
        log_samples=True,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)),
    )
    samples = sorted(got["samples"]["hellaswag_local"], key=lambda r: r["doc_id"])
    assert len(samples) == len(exs)
    ours = evaluate(model, exs, "cpu", batch_size=4, details=True, protocol="lm-eval")
    for i, (ex, sample) in enumerate(zip(exs, samples)):
        assert sample["doc"]["query"] == texts(ex, "lm-eval")[0]  # the same text was scored
        assert sample["doc"]["choices"] == texts(ex, "lm-eval")[1]
        lls = np.array([ll for ll, _ in sample["filtered_resps"]])
        lens = np.array([float(len(c)) for c in sample["doc"]["choices"]])
        assert ours["pred"][i] == int(np.argmax(lls)), i
        assert ours["pred_norm"][i] == int(np.argmax(lls / lens)), i
        assert sample["acc"] == float(ours["pred"][i] == ex["label"])
        assert sample["acc_norm"] == float(ours["pred_norm"][i] == ex["label"])
        np.testing.assert_allclose(-ours["loss_sum"][i].numpy(), lls, atol=1e-4, rtol=1e-5)
    result = got["results"]["hellaswag_local"]
    assert result["acc,none"] == pytest.approx(ours["acc"], abs=1e-12)
    assert result["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-12)
    print(
        f"lm-eval {lm_eval.__version__}: {len(exs)} examples, acc {ours['acc']:.4f}, acc_norm "
        f"{ours['acc_norm']:.4f} (lm_eval: {result['acc,none']:.4f}, "
        f"{result['acc_norm,none']:.4f}); choices (acc, acc_norm) "
        f"{list(zip(ours['pred'], ours['pred_norm']))}: all agree"
    )


# --- stage 08 -----------------------------------------------------------------------------


def stage_config(stage, **kw):
    return stage.Config(device="cpu", data=str(FIXTURE), batch_size=4, **kw)


def test_08_compare_hf_agrees(hf_tiny_dir, capsys):
    stage = load_stage("08_hellaswag")
    out = stage.main(stage_config(stage, model=str(hf_tiny_dir), compare_hf=True))
    assert out["n"] == 16 and out["disagree"] == 0 and out["max_loss_diff"] < 1e-5
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    for p, label in (("nanogpt", "nanogpt"), ("lm-eval", "lm_eval")):
        acc, acc_norm = out[f"{label}_acc"], out[f"{label}_acc_norm"]
        assert (acc, acc_norm) == (out[f"{label}_hf_acc"], out[f"{label}_hf_acc_norm"])
        assert out[f"{label}_disagree"] == 0 and acc_norm == out[f"{label}_correct_norm"] / 16
        _, pub_acc, pub_norm, _ = PUBLISHED[p][0]
        assert out["published"][f"{label}_acc"] == pub_acc
        assert out["published"][f"{label}_acc_norm"] == pub_norm
        # one line per protocol: ours, then the published figures measured the same way
        row = [line for line in lines if line.startswith(f"hellaswag val: {p} protocol")]
        assert row == [
            f"hellaswag val: {p} protocol, 16 examples | acc {acc:.4f} | acc_norm {acc_norm:.4f}"
            f" | published for GPT-2 124M: acc {pub_acc:.4f}, acc_norm {pub_norm:.4f} "
            f"({PUBLISHED[p][0][3]})"
        ]
        assert f"transformers GPT2LMHeadModel, {p} protocol:" in printed
    assert out["published"]["nanogpt_acc_norm"] == 0.2955
    assert (out["published"]["lm_eval_acc"], out["published"]["lm_eval_acc_norm"]) == (
        0.2892,
        0.3114,
    )
    assert printed.count("predictions that differ: 0 of 16") == 2
    assert "GPT-2 124M (OpenAI weights)    0.2859  0.2955" in printed and "GPT-3 125M" in printed
    assert "GPT-2 124M (OpenAI weights)    0.2892  0.3114" in printed
    assert "published" in printed and lines[-1].startswith("summary:")
    assert f"acc_norm {out['nanogpt_acc_norm']:.4f} (nanogpt protocol" in lines[-1]
    assert f"{out['lm_eval_acc_norm']:.4f} (lm-eval protocol" in lines[-1]


def test_08_checkpoint_padded_vocab_and_cropping(tmp_path, capsys, examples):
    """Our checkpoint (vocab padded to 50304, random rows there; block_size 24, so long rows
    are cropped) scores like its transformers export."""
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=24,
        vocab_size=50304,
        n_layer=2,
        n_head=2,
        n_embd=32,
        tie_weights=True,
        gpt2_init=True,
    )
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
    assert out["n"] == 5 and {"nanogpt_acc", "lm_eval_acc"} <= set(out)  # --limit: both


def test_08_one_protocol(hf_tiny_dir, capsys):
    stage = load_stage("08_hellaswag")
    both = stage.main(stage_config(stage, model=str(hf_tiny_dir), limit=4))
    capsys.readouterr()
    out = stage.main(stage_config(stage, model=str(hf_tiny_dir), limit=4, protocol="lm-eval"))
    printed = capsys.readouterr().out
    assert out["n"] == 4 and not any(k.startswith("nanogpt") for k in out)
    assert (out["lm_eval_acc"], out["lm_eval_acc_norm"]) == (
        both["lm_eval_acc"],
        both["lm_eval_acc_norm"],
    )
    assert "nanogpt" not in printed and "0.3114" in printed and "0.2955" not in printed


def test_08_bad_input(hf_tiny_dir, tmp_path):
    stage = load_stage("08_hellaswag")
    with pytest.raises(UserError, match="HellaSwag file not found"):
        stage.main(stage.Config(device="cpu", model=str(hf_tiny_dir), data="/no/such.jsonl"))
    with pytest.raises(UserError, match="unknown model 'gpt-9'"):
        stage.main(stage_config(stage, model="gpt-9"))
    with pytest.raises(UserError, match="no checkpoint"):
        stage.main(stage_config(stage, ckpt=str(tmp_path)))
    with pytest.raises(UserError, match="unknown HellaSwag protocol 'helm'"):
        stage.main(stage_config(stage, model=str(hf_tiny_dir), protocol="helm"))
    bare = tmp_path / "bare.jsonl"  # ctx and endings only: enough for nanogpt, not for lm-eval
    bare.write_text(json.dumps(dict(ctx="A man", endings=["a", "b", "c", "d"], label=2)) + "\n")
    with pytest.raises(UserError, match="lm-eval protocol needs each example's activity_label"):
        stage.main(stage.Config(device="cpu", model=str(hf_tiny_dir), data=str(bare)))
    out = stage.main(
        stage.Config(device="cpu", model=str(hf_tiny_dir), data=str(bare), protocol="nanogpt")
    )
    assert out["n"] == 1
    r = run_script(["08_hellaswag.py", "--device", "cpu", "--data", "/no/such.jsonl"])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: HellaSwag file not found: /no/such.jsonl (omit --data to download the split)"
    ]
    for name, flag in (("08_hellaswag", "--protocol"), ("07_ddp_fineweb", "--hellaswag-protocol")):
        with pytest.raises(UserError, match=f"{flag} must be one of nanogpt, lm-eval, both"):
            parse_args(load_stage(name).Config, [flag, "helm"])  # before any work


def test_08_torchrun_two_processes_match_one(hf_tiny_dir, tmp_path):
    stage = load_stage("08_hellaswag")
    single = stage.main(stage_config(stage, model=str(hf_tiny_dir)))
    out = tmp_path / "result.json"
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "08_hellaswag.py",
        "--device",
        "cpu",
        "--model",
        str(hf_tiny_dir),
        "--data",
        str(FIXTURE),
        "--compare-hf",
        "true",
        "--json",
        str(out),
    ]
    r = run_script(args)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["disagree"] == 0
    for key in (
        "n",
        "nanogpt_correct",
        "nanogpt_correct_norm",
        "lm_eval_correct",
        "lm_eval_correct_norm",
    ):
        assert got[key] == single[key]
    assert "(2 processes)" in r.stdout
    assert sum(line.startswith("hellaswag val:") for line in r.stdout.splitlines()) == 2  # rank 0


def test_the_speed_bench_scores_real_rows_repeated_by_both_protocols():
    """bench/hellaswag_speed.py --data F --examples N --protocol both: the file's rows in order,
    repeated to N (18 of 16 rows here), each method timed by each protocol, the same
    predictions within each."""
    hs = load_stage("bench/hellaswag_speed")
    fixture = str(ROOT / "tests/data/hellaswag_fixture.jsonl")
    cfg = hs.Config(
        device="cpu", examples=18, batch_sizes="1,4", repeats=1, data=fixture, protocol="both"
    )
    result = hs.main(cfg)
    assert sorted(result["examples_per_s"]) == sorted(
        f"{method}, {protocol}"
        for protocol in ("nanogpt", "lm-eval")
        for method in ("batch size   1, all logits", "batch size   1", "batch size   4")
    )
    assert all(rate > 0 for rate in result["examples_per_s"].values())
    assert result["same_predictions"] is True
    with pytest.raises(UserError, match="unknown HellaSwag protocol 'lm_eval'"):
        hs.main(hs.Config(device="cpu", examples=2, data=fixture, protocol="lm_eval"))
