"""HellaSwag: download, render, batched completion-style scoring, split across DDP ranks.

Each HellaSwag example is a context ("A man is sitting on a roof. he") and four endings, one
of them right. A base language model cannot read four options and answer "B", so each ending
is scored as a completion: the log-likelihood of its tokens after the context. The model's
choice is the ending it finds most likely:
    acc       highest summed log-likelihood (lowest summed loss): favours short endings
    acc_norm  the same, normalized for length

Two protocols, two published figures for the same GPT-2 124M; compare like with like:
    nanogpt  build-nanogpt / llm.c: the raw `ctx`, " " + ending; acc_norm normalizes by the
             ending's number of *tokens* (mean loss per token). GPT-2 124M: acc 0.2859,
             acc_norm 0.2955.
    lm-eval  EleutherAI's lm-evaluation-harness (the leaderboards' tool): the context is
             `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`, and it and every
             ending are cleaned of WikiHow's artifacts (`preprocess`); acc_norm divides the
             log-likelihood by the cleaned ending's length in *characters* (the leading space
             not counted). GPT-2 124M: acc 0.2892, acc_norm 0.3114.
`tests/test_hellaswag.py` checks our lm-eval protocol against lm_eval itself when installed.

Batched: many examples per forward pass (4 rows each, right-padded to the longest row in the
batch). Causal attention means the padding at the end of a row never reaches the positions
that are scored, so the batch size changes the speed and nothing else.

Sequences longer than the model's block_size are cropped from the left: the oldest context
tokens go, the ending is always scored whole (an ending longer than that is an error).
lm-eval crops alike but keeps one more context token (it never feeds the last token in);
HellaSwag's rows are far shorter than GPT-2's 1024 tokens, so neither crops there.
"""

import json
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common import UserError
from common.data import EOT, cache_dir, download, get_tokenizer

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SPLITS = ("train", "val", "test")  # val: 10,042 examples; test has no labels

PROTOCOLS = ("nanogpt", "lm-eval")
CHOICES = (*PROTOCOLS, "both")  # what --protocol takes

# Published figures on all 10,042 val examples, by protocol: (model, acc, acc_norm, source).
# Measured elsewhere, not here; None where the source gives no acc.
PUBLISHED = {
    "nanogpt": (
        ("GPT-2 124M (OpenAI weights)", 0.2859, 0.2955, "build-nanogpt / llm.c hellaswag.py"),
        ("GPT-2 1558M (OpenAI gpt2-xl)", 0.3842, 0.4893, "build-nanogpt / llm.c hellaswag.py"),
        ("GPT-3 125M", None, 0.337, "zero-shot, per-token normalized, Brown et al. 2020"),
    ),
    "lm-eval": (  # EleutherAI's figures, as llm.c's hellaswag.py quotes them
        ("GPT-2 124M (OpenAI weights)", 0.2892, 0.3114, "lm-evaluation-harness"),
        ("GPT-2 1558M (OpenAI gpt2-xl)", 0.4004, 0.5089, "lm-evaluation-harness"),
    ),
}


def protocols(name):
    """--protocol -> the protocols to score: ("nanogpt",), ("lm-eval",) or both."""
    if name not in CHOICES:
        raise UserError(f"unknown HellaSwag protocol '{name}': use {', '.join(CHOICES)}")
    return PROTOCOLS if name == "both" else (name,)


def evaluate_protocols(model, examples, device, protocol="both", *args, **kwargs):
    """`evaluate` once per protocol that --protocol names: {protocol: its result}."""
    return {
        p: evaluate(model, examples, device, *args, protocol=p, **kwargs)
        for p in protocols(protocol)
    }


def acc_norms(scores):
    """{protocol: result} -> "acc_norm 0.2950 nanogpt, 0.3110 lm-eval (10,042 examples)"."""
    got = ", ".join(f"{s['acc_norm']:.4f} {p}" for p, s in scores.items())
    return f"acc_norm {got} ({next(iter(scores.values()))['n']:,} examples)"


def key(protocol, metric):
    """A protocol's number as --json and metrics.jsonl label it: nanogpt_acc, lm_eval_acc_norm."""
    return f"{protocol.replace('-', '_')}_{metric}"


def labelled(scores):
    """{protocol: evaluate(...)} -> one flat dict, every number labelled by its protocol
    (nanogpt_acc, nanogpt_acc_norm, lm_eval_acc, ...), n, seconds and examples_per_s (all
    protocols together), and `published`: GPT-2 124M's published figures, labelled alike."""
    seconds = sum(s["seconds"] for s in scores.values())
    n = next(iter(scores.values()))["n"]
    out = dict(n=n, seconds=seconds, examples_per_s=n * len(scores) / seconds)  # all protocols
    published = {}
    for protocol, s in scores.items():
        for metric in ("acc", "acc_norm", "correct", "correct_norm"):
            out[key(protocol, metric)] = s[metric]
        _, acc, acc_norm, _ = PUBLISHED[protocol][0]
        published.update({key(protocol, "acc"): acc, key(protocol, "acc_norm"): acc_norm})
    return dict(out, published=dict(published, model="GPT-2 124M (OpenAI weights)"))


def download_split(split="val", base_url=BASE_URL, cache=None):
    """hellaswag_{split}.jsonl from the HellaSwag repository, downloaded into the cache once."""
    if split not in SPLITS:
        raise UserError(f"unknown HellaSwag split '{split}': use {', '.join(SPLITS)}")
    name = f"hellaswag_{split}.jsonl"
    return download(f"{base_url}/{name}", Path(cache or cache_dir() / "hellaswag") / name)


def read_examples(path, limit=0):
    """The examples of a HellaSwag jsonl file (the first `limit` when limit > 0), checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"HellaSwag file not found: {path} (omit --data to download the split)")
    examples = []
    with open(path, "rb") as f:  # json.loads decodes: a line that is not UTF-8 is a bad line
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                ends = ex["endings"]
                ok = isinstance(ex["ctx"], str) and isinstance(ends, list) and len(ends) == 4
                ok = ok and all(isinstance(e, str) for e in ends)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise UserError(
                    f"line {n} of {path} is not a HellaSwag example (ctx, 4 endings, label): "
                    "delete the file to download it again, or fix it"
                )
            label = ex.get("label")  # the test split has none
            if isinstance(label, str) and label.strip() in ("0", "1", "2", "3"):
                label = int(label)  # some copies store it as text
            if label == "":
                label = None
            if label is not None and (type(label) is not int or not 0 <= label <= 3):
                raise UserError(
                    f"line {n} of {path}: label {label!r} is not 0, 1, 2 or 3 (the index of "
                    "the right ending); delete the file to download it again, or fix it"
                )
            examples.append(dict(ex, label=label))
            if limit and len(examples) == limit:
                break
    if not examples:
        raise UserError(f"no HellaSwag examples in {path}")
    return examples


def load_examples(split="val", path=None, limit=0, base_url=BASE_URL):
    """A local jsonl file when `path` is given, else the split (downloaded once)."""
    return read_examples(path or download_split(split, base_url), limit)


def preprocess(text):
    """lm-eval's cleaning of HellaSwag text (its WikiHow half is full of markup): trim, turn
    " [title]" into ". ", drop every other [bracketed] piece, then one pass of "  " -> " "."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)  # shortest match: "[step] a [b]" loses both brackets
    return text.replace("  ", " ")  # one pass: three spaces become two, as lm-eval leaves them


def texts(example, protocol="nanogpt"):
    """(context, endings) as the protocol scores them; each ending follows the context after
    one space."""
    if protocol == "nanogpt":
        return example["ctx"], example["endings"]
    if protocol != "lm-eval":
        raise UserError(f"unknown HellaSwag protocol '{protocol}': use {', '.join(PROTOCOLS)}")
    ctx = example["ctx_a"] + " " + example["ctx_b"].capitalize()  # capitalize: rest lowercased
    return preprocess(example["activity_label"] + ": " + ctx), [
        preprocess(e) for e in example["endings"]
    ]


def render_example(example, enc, protocol="nanogpt"):
    """One example -> tokens (4, T) int64, mask (4, T) bool, label.

    Row i is the context's tokens followed by ending i's tokens, right-padded to the longest
    row; mask is True exactly on ending i's tokens, the only positions that are scored."""
    context, endings = texts(example, protocol)
    space = ""  # lm-eval moves a context's trailing spaces (a final " [title]" leaves one) to
    if protocol == "lm-eval":  # the front of each continuation, so the ending's tokens own them
        space = context[len(context.rstrip()) :]
        context = context.rstrip()
    ctx = enc.encode_ordinary(context) or [EOT]  # an empty context: a document start
    # " " + ending: GPT-2's BPE glues a word's leading space to the word (" pair", not "pair")
    ends = [enc.encode_ordinary(space + " " + ending) for ending in endings]
    T = len(ctx) + max(len(e) for e in ends)
    tokens = torch.full((4, T), EOT, dtype=torch.long)
    mask = torch.zeros((4, T), dtype=torch.bool)
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        tokens[i, :n] = torch.tensor(ctx + end)
        mask[i, len(ctx) : n] = True
    return tokens, mask, example.get("label")


def collate(rendered, block_size=None):
    """Rendered examples -> one batch: tokens (4B, T), mask (4B, T), right-padded.

    A row longer than block_size loses its oldest context tokens (cropped from the left)."""
    rows = []
    for tokens, mask, _ in rendered:
        for t, m in zip(tokens, mask):
            n = int(m.nonzero().max()) + 1  # the row's own length: its ending is last
            t, m = t[:n], m[:n]
            if block_size and n > block_size:
                if int(m.sum()) >= block_size:  # the first ending token needs one token before it
                    raise UserError(
                        f"a HellaSwag ending of {int(m.sum())} tokens does not fit the model's "
                        f"block_size {block_size}: use a model with a longer context"
                    )
                t, m = t[-block_size:], m[-block_size:]
            rows.append((t, m))
    T = max(len(t) for t, _ in rows)
    tokens = torch.full((len(rows), T), EOT, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, (t, m) in enumerate(rows):
        tokens[r, : len(t)], mask[r, : len(m)] = t, m
    return tokens, mask


def logits_of(model, idx):
    """Logits from our GPT ((logits, loss)), a transformers model (.logits) or a plain callable."""
    out = model(idx)
    if isinstance(out, tuple):
        out = out[0]
    return getattr(out, "logits", out)


def completion_losses(model, tokens, mask, vocab_size=EOT + 1, chunk=128):
    """Cross-entropy of each row's masked tokens: summed (R,) and mean per token (R,).

    Only the M positions whose next token is scored need logits, and the vocabulary projection
    is the biggest matmul of a small model. So a hook takes the hidden states going into the
    model's lm_head (ours and transformers' GPT-2 have one), keeps the M positions and leaves
    lm_head nothing to do; lm_head then runs here, `chunk` positions at a time, so each block of
    logits is still in the CPU's cache for the softmax. A model without an lm_head (a plain
    callable) gives all its logits and the M positions are picked from them.
    Ids from vocab_size up (stage 05 pads the vocab to 50304) are not tokens: they are left out
    of the softmax, as the HF export leaves them out."""
    scored = mask[:, 1:]  # (R, T-1): the logits at position t predict the token at t + 1
    targets = tokens[:, 1:][scored]  # (M,)
    head, hidden, hook = getattr(model, "lm_head", None), [], None
    if isinstance(head, torch.nn.Module):

        def grab(module, args):  # x (R, T, C) -> hidden (M, C); lm_head gets (R, 0, C)
            hidden.append(args[0][:, :-1][scored])
            return (args[0][:, :0],)

        hook = head.register_forward_pre_hook(grab)
    try:
        logits = logits_of(model, tokens)
    finally:
        if hook is not None:
            hook.remove()
    if hidden:
        blocks = (head(h) for h in hidden[0].split(chunk))  # (chunk, V) each
    else:  # no lm_head hooked: (R, T, V) -> (M, V)
        blocks = logits[:, :-1][scored].split(chunk)
    losses = [
        F.cross_entropy(x[:, :vocab_size].float(), t, reduction="none")
        for x, t in zip(blocks, targets.split(chunk))
    ]
    per_token = torch.zeros(scored.shape, device=targets.device)
    per_token[scored] = torch.cat(losses)  # (M,) back in place: (R, T-1)
    sums = per_token.sum(dim=1)
    return sums, sums / scored.sum(dim=1)


def model_block_size(model):
    """The longest sequence a model takes (ours: block_size, transformers: n_positions), or None."""
    config = getattr(model, "config", None)
    return getattr(config, "block_size", None) or getattr(config, "n_positions", None)


def all_reduce(values, device, op="sum"):
    """Numbers summed (or maxed) over all ranks; as they are without torch.distributed."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


@torch.no_grad()
def evaluate(
    model,
    examples,
    device,
    batch_size=16,
    rank=0,
    world_size=1,
    autocast_dtype=None,
    block_size=None,
    details=False,
    protocol="nanogpt",
):
    """Score HellaSwag examples by one protocol ("nanogpt" or "lm-eval", see the top of this
    file); the counts are summed over all ranks.

    model: our GPT, a transformers GPT2LMHeadModel, or any callable idx (B, T) -> logits.
    A module is put in eval mode for the call only. Rank r scores examples r, r + world_size,
    ... so every rank must call this. Returns acc, acc_norm, n, correct, correct_norm, seconds,
    examples_per_s; with details=True also this rank's share example by example: indices, labels,
    loss_sum and loss_avg (n_local, 4): the loss acc_norm ranks, per token (nanogpt) or per
    character of the ending (lm-eval), pred, pred_norm."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if any(ex["label"] is None for ex in examples):
        raise UserError("these HellaSwag examples have no labels (the test split): use val")
    if protocol not in PROTOCOLS:  # one at a time: evaluate_protocols does "both"
        raise UserError(f"unknown HellaSwag protocol '{protocol}': use {', '.join(PROTOCOLS)}")
    lm_eval = protocol == "lm-eval"
    fields = ("activity_label", "ctx_a", "ctx_b")
    if lm_eval and not all(isinstance(ex.get(f), str) for ex in examples for f in fields):
        raise UserError(
            "the lm-eval protocol needs each example's activity_label, ctx_a and ctx_b (as in "
            "HellaSwag's own files): use --protocol nanogpt for files of ctx and endings only"
        )
    enc = get_tokenizer()
    block_size = block_size or model_block_size(model)
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"  # autocast wants no index
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()

    mine = range(rank, len(examples), world_size)  # this rank's share
    rendered = {i: render_example(examples[i], enc, protocol) for i in mine}
    # longest first: similar lengths share a batch (little padding); a too-big batch fails at once
    order = sorted(mine, key=lambda i: -rendered[i][0].size(1))
    loss_sum, loss_avg = {}, {}
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            tokens, mask = collate([rendered[i] for i in batch], block_size)
            tokens, mask = tokens.to(device), mask.to(device)
            with amp:
                sums, avgs = completion_losses(model, tokens, mask)  # (4B,) each
            sums, avgs = sums.view(-1, 4).cpu(), avgs.view(-1, 4).cpu()  # (B, 4): one row each
            for k, i in enumerate(batch):
                loss_sum[i], loss_avg[i] = sums[k], avgs[k]
                if lm_eval:  # acc_norm: the summed loss per character of the cleaned ending
                    chars = [len(e) for e in texts(examples[i], protocol)[1]]
                    loss_avg[i] = sums[k].double() / torch.tensor(chars, dtype=torch.float64)
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)

    idx = sorted(loss_sum)
    labels = torch.tensor([rendered[i][2] for i in idx], dtype=torch.long)
    sums = torch.stack([loss_sum[i] for i in idx]) if idx else torch.zeros(0, 4)  # (n_local, 4)
    avgs = torch.stack([loss_avg[i] for i in idx]) if idx else torch.zeros(0, 4)  # (n_local, 4)
    pred, pred_norm = sums.argmin(dim=1), avgs.argmin(dim=1)
    correct, correct_norm, n = all_reduce(
        [(pred == labels).sum().item(), (pred_norm == labels).sum().item(), len(idx)], device
    )
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    (seconds,) = all_reduce([time.perf_counter() - t0], device, op="max")  # the slowest rank
    result = dict(
        acc=correct / max(n, 1),
        acc_norm=correct_norm / max(n, 1),
        n=int(n),
        correct=int(correct),
        correct_norm=int(correct_norm),
        seconds=seconds,
        examples_per_s=n / seconds,
    )
    if details:
        result.update(
            indices=idx,
            labels=labels.tolist(),
            loss_sum=sums,
            loss_avg=avgs,
            pred=pred.tolist(),
            pred_norm=pred_norm.tolist(),
        )
    return result
