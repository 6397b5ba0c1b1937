"""FineWeb-Edu (or any text dataset) -> GPT-2 token shards: `python -m common.fineweb`.

Each document is tokenized with tiktoken's gpt2 BPE (`encode_ordinary`, so text that looks
like "<|endoftext|>" stays ordinary text), prefixed with the end-of-text token 50256 so that
every document starts with a delimiter, and packed back to back into numpy uint16 `.npy`
shards of `--shard-size` tokens (100M by default, 200 MB each). Shard 0 is the validation
split, the rest are training data:

    data/edu_fineweb10B/edufineweb_val_000000.npy
    data/edu_fineweb10B/edufineweb_train_000001.npy  ...

The real run (~10B tokens, ~100 shards, ~20 GB; it streams, so nothing is downloaded first):
    python -m common.fineweb
A quick look at the real data (one 10M-token val shard and one train shard):
    python -m common.fineweb --max-tokens 20_000_000 --shard-size 10_000_000 --out-dir data/fw_small
A tiny local run (jsonl or parquet files with a `text` column; no network):
    python -m common.fineweb --data-files docs.jsonl --shard-size 100_000 --out-dir data/tiny

Resuming. A shard is written to a temp file and renamed, so it is either complete or absent.
After each complete shard, `{prefix}_progress.json` (next to the shards, also written
atomically) records for every complete shard its size and where the source stood at its end:
`docs` (documents wholly inside shards 0..i) and `carry` (how many tokens of the next document
shard i already holds). A re-run with the same settings checks the listed shards on disk
(present, right size), keeps the longest run of good ones, skips `docs` documents of the
source (read, not tokenized), drops the first `carry` tokens of the next one and goes on from
there. The source order is deterministic, so an interrupted prep plus a re-run gives exactly
the shards of one uninterrupted run: no token twice, none lost. The last, partial shard is
written only at the end, and the progress file then marks the prep finished, so a re-run of
a finished prep does nothing. Settings that change the shards (source, text column, shard
size, prefix) must match the progress file; use another --out-dir to make a different set.
"""

import collections
import glob
import gzip
import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError
from common.cli import parse_args
from common.data import EOT, get_tokenizer


@dataclass
class Config:
    dataset: str = "HuggingFaceFW/fineweb-edu"  # hub dataset to read (unused with --data-files)
    name: str = "sample-10BT"  # the dataset's config (subset) name; empty for none
    split: str = "train"  # the dataset split to read
    data_files: str = ""  # local .jsonl/.json/.parquet files instead (comma separated, globs ok)
    text_column: str = "text"  # the column holding each document's text
    out_dir: str = "data/edu_fineweb10B"  # where the shards go
    prefix: str = "edufineweb"  # shard names: {prefix}_{val|train}_{index:06d}.npy
    shard_size: int = 100_000_000  # tokens per shard
    max_tokens: int = 0  # stop after this many tokens in all (0: the whole dataset)
    workers: int = 0  # tokenizing processes (0: all cores, os.cpu_count())
    streaming: bool = True  # stream the dataset instead of downloading it all first


# --- tokenizing (runs in the worker processes) ---------------------------------------------


def _pool_context():
    """forkserver where the platform has it (Linux), else spawn (macOS, Windows): never fork.

    The server imports this module once (torch, numpy, tiktoken) and lives as long as this
    process, so each pool's workers fork from it ready to work instead of importing it all."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["common.fineweb"])  # no effect once the server has started
    return ctx


def tokenize_batch(texts):
    """A list of texts -> (tokens, ends): each text as [EOT, *its tokens] (the EOT marks where
    a document starts), all back to back as one uint16 array, and where each one ends.

    One flat array crosses between processes far faster than an array per document. The
    function is top-level so a pool can pickle it; tiktoken keeps the loaded encoding per
    process, so get_tokenizer() here is cheap."""
    enc = get_tokenizer()
    tokens, ends = [], []
    for text in texts:
        tokens.append(EOT)
        tokens.extend(enc.encode_ordinary(text))
        ends.append(len(tokens))
    tokens = np.array(tokens, dtype=np.int64)
    if tokens.max() >= 2**16:  # uint16 holds 0..65535; gpt2's 50257 ids fit, other BPEs may not
        raise UserError(f"token id {tokens.max()} does not fit uint16; shards need a vocab < 65536")
    return tokens.astype(np.uint16), ends


def token_batches(text_batches, pool=None, in_flight=4):
    """Yield tokenize_batch() of each batch of texts, in the source's order.

    With a process pool the workers tokenize; at most `in_flight` batches wait at a time, so
    reading the source never runs far ahead of tokenizing (Pool.imap would read it all)."""
    if pool is None:
        for texts in text_batches:
            yield tokenize_batch(texts)
        return
    pending = collections.deque()
    for texts in text_batches:
        pending.append(pool.apply_async(tokenize_batch, (texts,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# --- the source -----------------------------------------------------------------------------


def local_files(spec):
    """'a.jsonl,b/*.parquet' -> (builder, [files]): every file must exist and share one format."""
    files = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        found = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not found or not all(os.path.isfile(f) for f in found):
            raise UserError(
                f"--data-files: no file at '{part}'; give existing .jsonl/.parquet files"
            )
        files += found
    if empty := [f for f in files if os.path.getsize(f) == 0]:
        raise UserError(f"--data-files: '{empty[0]}' is empty; give files holding documents")
    kinds = set()
    for f in files:
        if re.search(r"\.jsonl?(\.gz)?$", f):
            kinds.add("json")
        elif f.endswith(".parquet"):
            kinds.add("parquet")
        else:
            raise UserError(f"--data-files: '{f}' is neither .jsonl/.json nor .parquet")
    if len(kinds) > 1:
        raise UserError("--data-files: mix of jsonl and parquet; convert them to one format")
    return kinds.pop(), [str(Path(f).resolve()) for f in files]


def check_jsonl(files):
    """Every non-blank line of local .jsonl files must be a JSON object (one document).

    One quick pass before the prep: a bad line would otherwise stop it, maybe hours in, with
    a pyarrow traceback that names neither the file nor the line."""
    for f in files:
        if not re.search(r"\.jsonl(\.gz)?$", f):
            continue
        with (gzip.open if f.endswith(".gz") else open)(f, "rb") as lines:
            for n, line in enumerate(lines, 1):
                try:
                    ok = not line.strip() or isinstance(json.loads(line), dict)
                except ValueError:  # bad JSON, or bytes that are not UTF-8
                    ok = False
                if not ok:
                    raise UserError(
                        f"line {n} of {f} is not a JSON object (one document per line): "
                        "fix or delete that line"
                    )


def open_source(cfg):
    """The documents as a `datasets` dataset (iterable when streaming), from the hub or files."""
    import datasets  # only this module needs `datasets`, and only when it runs

    try:
        if cfg.data_files:
            builder, files = local_files(cfg.data_files)
            check_jsonl(files)
            return datasets.load_dataset(
                builder, data_files=files, split="train", streaming=cfg.streaming
            )
        return datasets.load_dataset(
            cfg.dataset, name=cfg.name or None, split=cfg.split, streaming=cfg.streaming
        )
    except UserError:
        raise
    except Exception as e:  # offline, unknown name/config/split, unreadable file ...
        what = cfg.data_files or f"{cfg.dataset} (config '{cfg.name}', split '{cfg.split}')"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"could not open {what}: {type(e).__name__}: {reason[:200]}; check the name and "
            "the connection, or point --data-files at local files"
        ) from None


def text_batches(ds, column, skip, batch_size=256):
    """Lists of document texts, in order, after the first `skip` documents."""
    if ds.column_names is not None and column not in ds.column_names:
        raise UserError(
            f"no '{column}' column in the dataset (it has {ds.column_names}); set --text-column"
        )
    ds = ds.select_columns([column])
    if skip:
        ds = ds.skip(skip)  # reads past them; only the tokenizing is saved
    batches, read = iter(ds.iter(batch_size=batch_size)), skip
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # a damaged file, a dropped connection: the shards so far stay
            if isinstance(e, KeyError) and e.args == (column,):  # older datasets find it here
                raise UserError(f"no '{column}' column in the dataset; set --text-column") from None
            reason = " ".join(str(e).split())[:200]
            raise UserError(
                f"reading the dataset failed after document {read:,} ({type(e).__name__}: "
                f"{reason}); fix the cause and re-run: the prep resumes after its last shard"
            ) from None
        if column not in batch:
            raise UserError(f"no '{column}' column in the dataset (it has {list(batch)})")
        texts = batch[column]
        if not all(isinstance(t, str) for t in texts):
            raise UserError(f"the '{column}' column holds a non-text value (null?); clean the data")
        read += len(texts)
        yield texts


# --- shards and the progress file -----------------------------------------------------------


def shard_path(out_dir, prefix, index):
    split = "val" if index == 0 else "train"  # shard 0 is the validation split
    return Path(out_dir) / f"{prefix}_{split}_{index:06d}.npy"


def write_shard(path, tokens):
    """np.save to a temp file, then rename: a reader (or a re-run) never sees half a shard."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, tokens)
    os.replace(tmp, path)


def shard_tokens(path):
    """How many uint16 tokens the shard at `path` holds (header only), or -1 if unreadable."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return -1
    return arr.shape[0] if arr.dtype == np.uint16 and arr.ndim == 1 else -1


def progress_path(out_dir, prefix):
    return Path(out_dir) / f"{prefix}_progress.json"


def write_progress(path, progress):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(progress, indent=1))
    os.replace(tmp, path)


def settings_of(cfg):
    """What decides the shards' content: a re-run must match these to resume."""
    files = local_files(cfg.data_files)[1] if cfg.data_files else []
    source = dict(data_files=files) if files else dict(dataset=cfg.dataset, name=cfg.name)
    split = "train" if files else cfg.split
    return dict(
        **source,
        split=split,
        text_column=cfg.text_column,
        prefix=cfg.prefix,
        shard_size=cfg.shard_size,
        tokenizer="gpt2",
    )


def resume_point(cfg, settings):
    """-> (shard entries to keep, done): the complete shards already on disk that a run with
    these settings would write again; done when a finished prep needs nothing more."""
    path = progress_path(cfg.out_dir, cfg.prefix)
    if not path.is_file():
        return [], False
    try:
        progress = json.loads(path.read_text())
        old, shards = progress["settings"], progress["shards"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is corrupt; delete it (and the shards next to it) and re-run")
    if not shards and not progress.get("finished"):  # a prep that failed before its first shard
        return [], False  # (older versions wrote this file first): nothing to keep or protect
    if old != settings:
        diff = ", ".join(k for k in settings if old.get(k) != settings[k])
        raise UserError(
            f"{cfg.out_dir} holds shards made with other settings ({diff} differ); "
            "use another --out-dir, or delete that one"
        )
    keep = []
    for entry in shards:  # the longest run of complete shards still on disk
        index = len(keep)
        if shard_tokens(shard_path(cfg.out_dir, cfg.prefix, index)) != cfg.shard_size:
            break
        keep.append(entry)
    if cfg.max_tokens:  # never keep more than this run asks for
        keep = keep[: cfg.max_tokens // cfg.shard_size]
    fin = progress.get("finished")
    if fin and len(keep) == len(shards):
        same_limit = fin["max_tokens"] == cfg.max_tokens
        all_of_it = fin["exhausted"] and (not cfg.max_tokens or cfg.max_tokens >= fin["tokens"])
        rest = fin["tokens"] - len(keep) * cfg.shard_size  # tokens in the final partial shard
        tail_ok = rest == 0 or shard_tokens(shard_path(cfg.out_dir, cfg.prefix, len(keep))) == rest
        if (same_limit or all_of_it) and tail_ok:
            return keep, True
    return keep, False


def remove_stale_shards(out_dir, prefix, count):
    """Delete our shards numbered `count` and up: left by an earlier, longer run, a loader
    would read them as data."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(val|train)_(\d{{6}})\.npy$")
    for p in Path(out_dir).iterdir():
        if (m := pattern.match(p.name)) and int(m.group(2)) >= count:
            p.unlink()


# --- the prep -------------------------------------------------------------------------------


def main(cfg):
    from tqdm import tqdm

    if cfg.shard_size < 1 or cfg.max_tokens < 0 or cfg.workers < 0:
        raise UserError("--shard-size must be >= 1, --max-tokens and --workers >= 0")
    workers = cfg.workers or os.cpu_count() or 1
    get_tokenizer()  # fail early when offline; workers load it from the same cache
    settings = settings_of(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress_file = progress_path(out_dir, cfg.prefix)

    shards, done = resume_point(cfg, settings)
    if done:
        fin = json.loads(progress_file.read_text())["finished"]
        print(f"{out_dir}: already complete ({fin['files']} shards, {fin['tokens']:,} tokens)")
        return dict(
            shards_written=0,
            shards=fin["files"],
            tokens=fin["tokens"],
            new_tokens=0,
            seconds=0.0,
            tokens_per_s=0.0,
            out_dir=str(out_dir),
        )
    progress = dict(settings=settings, shards=shards, finished=None)
    if shards:  # from here a crash resumes at len(shards); with none, there is nothing to keep
        write_progress(progress_file, progress)

    index = len(shards)  # the next shard to write
    doc, offset = (shards[-1]["docs"], shards[-1]["carry"]) if shards else (0, 0)
    if index:
        print(f"resuming after {index} complete shards: skipping {doc:,} documents")
    total = start_total = index * cfg.shard_size  # tokens in all shards so far
    budget = cfg.max_tokens or float("inf")
    buf = np.empty(cfg.shard_size, dtype=np.uint16)
    fill = 0  # tokens in buf
    written = 0
    exhausted = True  # the source ran out (vs. stopping at --max-tokens)

    t0 = time.perf_counter()
    # workers start from a clean server process (forkserver), never forked from this one: a
    # lock that one of its threads (torch's, a reader's) holds at fork time would hang them
    pool = _pool_context().Pool(workers) if workers > 1 else None
    bar = None
    try:
        texts = text_batches(open_source(cfg), cfg.text_column, skip=doc)
        bar = tqdm(total=cfg.max_tokens or None, initial=total, unit="tok", unit_scale=True)
        for flat, ends in token_batches(texts, pool, in_flight=2 * workers):
            for begin, end in zip([0, *ends], ends):
                tokens = flat[begin:end]  # one document: [EOT, *its tokens]
                pos, offset = offset, 0  # on resume, the first document's head is already out
                while pos < len(tokens) and total < budget:
                    n = int(min(cfg.shard_size - fill, len(tokens) - pos, budget - total))
                    buf[fill : fill + n] = tokens[pos : pos + n]
                    fill, pos, total = fill + n, pos + n, total + n
                    if fill == cfg.shard_size:  # full: write it and record where the source is
                        write_shard(shard_path(out_dir, cfg.prefix, index), buf)
                        whole = pos == len(tokens)  # did this document end with the shard?
                        shards.append(
                            dict(tokens=fill, docs=doc + whole, carry=0 if whole else pos)
                        )
                        write_progress(progress_file, progress)
                        index, fill, written = index + 1, 0, written + 1
                doc += pos == len(tokens)
                if total >= budget:
                    break
            bar.update(total - bar.n)  # once a batch: cheaper than once a document
            if total >= budget:
                exhausted = False  # stopped at --max-tokens, not at the end of the source
                break
    finally:
        if pool is not None:
            pool.terminate()  # also when stopping early or on an error: no stray workers
        if bar is not None:
            bar.close()

    if total == 0:
        raise UserError("the dataset has no documents; check --data-files / --dataset / --split")
    if fill:  # the last, partial shard
        write_shard(shard_path(out_dir, cfg.prefix, index), buf[:fill])
        index, written = index + 1, written + 1
    remove_stale_shards(out_dir, cfg.prefix, index)
    progress["finished"] = dict(
        files=index, tokens=total, max_tokens=cfg.max_tokens, exhausted=exhausted
    )
    write_progress(progress_file, progress)

    seconds = time.perf_counter() - t0
    new = total - start_total
    print(
        f"wrote {written} shards ({new:,} tokens, {workers} workers) in {seconds:.1f}s: "
        f"{new / seconds:,.0f} tokens/s"
    )
    print(f"summary: {out_dir} holds {index} shards, {total:,} tokens (shard 0 is val)")
    if index == 1:
        print("note: only one shard, the val split; lower --shard-size to get train shards")
    return dict(
        shards_written=written,
        shards=index,
        tokens=total,
        new_tokens=new,
        seconds=seconds,
        tokens_per_s=new / seconds,
        out_dir=str(out_dir),
    )


if __name__ == "__main__":
    main(parse_args(Config))
