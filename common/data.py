"""Data: the GPT-2 tokenizer, one download helper, tiny shakespeare, a text batch loader, and
the token-shard loader (in order, or shuffled afresh every epoch)."""

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import UserError
from common.model import GPT2_VOCAB

EOT = 50256  # <|endoftext|>: delimits documents
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def get_tokenizer():
    """tiktoken's GPT-2 BPE (downloaded once by tiktoken; TIKTOKEN_CACHE_DIR to work offline)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OS errors when it cannot fetch its files
        raise UserError(
            f"could not load the gpt2 tokenizer ({type(e).__name__}); offline? set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files"
        ) from None


def cache_dir():
    """Where downloads live: $GPT_FROM_SCRATCH_CACHE, else ~/.cache/gpt-from-scratch."""
    d = os.environ.get("GPT_FROM_SCRATCH_CACHE") or Path.home() / ".cache" / "gpt-from-scratch"
    return Path(d)


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, sha256=None, timeout=30):
    """Fetch url into path once: progress bar, temp file + rename, checksum when known.

    A second call finds the file and returns at once. On a checksum mismatch or a network
    error nothing is left at `path`, and the error says how to fill it by hand."""
    from tqdm import tqdm

    path = Path(path)
    if path.exists() and (sha256 is None or sha256_of(path) == sha256):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, leave=False) as bar:
                for chunk in iter(lambda: r.read(1 << 16), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        if sha256 is not None and (got := sha256_of(tmp)) != sha256:
            raise UserError(f"checksum mismatch for {url}: expected {sha256}, got {got}; not saved")
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"could not download {url} ({reason}); check the connection or put the file at {path}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_text(path=None):
    """The text at `path`, or tiny shakespeare (downloaded into the cache once)."""
    if not path:
        path = download(
            TINY_SHAKESPEARE_URL, cache_dir() / "tinyshakespeare.txt", TINY_SHAKESPEARE_SHA256
        )
    if not os.path.isfile(path):
        raise UserError(f"input file not found: {path} (omit --input to use tiny shakespeare)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # a binary file, or text in another encoding
        raise UserError(
            f"{path} is not UTF-8 text (byte {e.start}); give a plain text file, or convert it"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    if not text.strip():
        raise UserError(f"{path} is empty (no text to train on); give a file holding text")
    return text


class TextLoader:
    """Stage 03's loader, as 03_dataloader.py writes it (a test keeps them equal).
    (B, T) batches of a token list in order, wrapping at the end; y[b, t] follows x[b, t]."""

    def __init__(self, tokens, batch_size, seq_len):
        self.tokens, self.B, self.T, self.pos = torch.tensor(tokens), batch_size, seq_len, 0
        if len(self.tokens) < batch_size * seq_len + 1:
            raise UserError("the text is shorter than one batch: lower --batch-size or --seq-len")

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.pos : self.pos + B * T + 1]  # one extra token: the last target
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)  # inputs, targets
        self.pos += B * T
        if self.pos + B * T + 1 > len(self.tokens):  # the next batch would run off the end: wrap
            self.pos = 0
        return x, y


class WindowLoader:
    """(B, T) batches of a token list as stage 07 reads a shard with `--shuffle`: windows of
    T+1 tokens in the order `shuffled_windows` gives, seeded by (seed, epoch, 0), a fresh
    order each epoch; every window once per epoch. For a text trained on for several epochs
    (09's ablations), where TextLoader would repeat the same sequence every epoch."""

    def __init__(self, tokens, batch_size, seq_len, seed=0):
        self.tokens, self.B, self.T, self.seed = torch.tensor(tokens), batch_size, seq_len, seed
        if len(self.tokens) < batch_size * seq_len + seq_len:  # the offset takes up to T - 1
            raise UserError("the text is shorter than one batch: lower --batch-size or --seq-len")
        self.epoch, self.i = -1, 0
        self.starts = []

    def next_batch(self):
        if self.i + self.B > len(self.starts):  # this epoch is used up: the next one's order
            self.epoch, self.i = self.epoch + 1, 0
            self.starts = shuffled_windows(len(self.tokens), self.T, (self.seed, self.epoch, 0))
        rows = [self.tokens[s : s + self.T + 1] for s in self.starts[self.i : self.i + self.B]]
        self.i += self.B
        buf = torch.stack(rows)
        return buf[:, :-1], buf[:, 1:]


def shard_files(data_dir, split):
    """The `*_{split}_*.npy` token shards in data_dir, sorted (their names carry the index)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"data dir not found: {data_dir}; make the shards with `python -m common.fineweb`"
        )
    files = sorted(data_dir.glob(f"*_{split}_*.npy"))
    if not files:
        raise UserError(
            f"no '{split}' shards (*_{split}_*.npy) in {data_dir}; "
            "make them with `python -m common.fineweb`"
        )
    return files


def shuffled_windows(n_tokens, seq_len, seed):
    """Stage 07's, as 07_ddp_fineweb.py writes it (a test keeps the two the same).
    One shard's window starts for one epoch, in a seeded random order. A window is T+1 tokens
    (T inputs and, one token later, their T targets); a random offset 0..T-1 moves the window
    boundaries every epoch; every window comes once, and only the tail after the last whole
    window (< T tokens) and the offset are left out."""
    rng = np.random.default_rng(seed)  # seed: (run seed, epoch, shard): a fresh order each epoch
    offset = int(rng.integers(seq_len))
    return offset + seq_len * rng.permutation((n_tokens - 1 - offset) // seq_len)


class ShardLoader:
    """Serves (B, T) batches from uint16 token shards, one rank's share under DDP, resumable.

    A shard is cut into windows of T+1 tokens starting every T tokens: in order, or with
    `shuffle` (a function like `shuffled_windows`, seeded by `seed`) in a fresh random order
    every epoch, the shards too. One micro-step takes the next B*world_size windows: rank r
    the r-th B of them, so the ranks never read the same window and together read what one
    process would with world_size times the batch. `step_tokens` is the optimizer step's
    total batch (all ranks, all micro-steps; default one micro-step): shards change only
    between optimizer steps, when the next whole step would run out of windows (the last
    shard wraps to the first, the next epoch; the few windows left are skipped). So 1 process
    x k micro-steps and k processes x 1 read the same tokens for any shard size. state_dict()
    is the position (epoch, shard, window, seed: plain ints, the orders are recomputed),
    taken between optimizer steps, enough to continue exactly. A shard holding an id >=
    vocab_size (another tokenizer's, or a damaged file) is refused when it is first read: as
    an embedding index it would crash or silently poison the run."""

    def __init__(
        self,
        data_dir,
        split,
        batch_size,
        seq_len,
        rank=0,
        world_size=1,
        step_tokens=0,
        vocab_size=GPT2_VOCAB,
        shuffle=None,
        seed=0,
    ):
        self.B, self.T = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.micro_tokens = batch_size * seq_len * world_size  # all ranks, one micro-step
        self.step_tokens = step_tokens or self.micro_tokens  # all ranks, one optimizer step
        if self.step_tokens % self.micro_tokens:
            raise UserError(
                f"total batch {self.step_tokens} is not a multiple of "
                f"B*T*GPUs = {self.micro_tokens}"
            )
        self.step_windows = self.step_tokens // seq_len
        self.shuffle, self.seed = shuffle, seed
        need = self.step_tokens + 1 + (seq_len - 1 if shuffle else 0)  # the offset takes < T
        self.vocab_size = vocab_size  # GPT-2's ids; a padded vocab (50304) has no more tokens
        self.scanned = set()  # shards whose ids were checked: a full read, so once each
        self.files = []
        for path in shard_files(data_dir, split):  # check all now (headers only), not hours in
            if len(self._open(path, scan=False)) >= need:
                self.files.append(path)
            elif rank == 0:  # e.g. the last, partial shard of a prep: harmless, say so
                print(f"skipping {path.name}: fewer tokens than one step needs ({need:,})")
        if not self.files:
            raise UserError(
                f"every '{split}' shard in {data_dir} holds fewer tokens than one step needs "
                f"({need:,} tokens): lower --batch-size, --seq-len or "
                "--total-batch, or make bigger shards (--shard-size)"
            )
        self.reset()

    def _open(self, path, scan=True):
        """The shard as a read-only memory map: nothing is read until a batch needs it, except
        once per shard (scan) its largest token id."""
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # truncated header, not .npy at all, pickled objects ...
            raise UserError(
                f"cannot read shard {path} ({type(e).__name__}); delete it and re-run "
                "`python -m common.fineweb` to write it again"
            ) from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise UserError(
                f"shard {path} is not a 1-D array of token ids ({tokens.dtype}, shape "
                f"{tokens.shape}); delete it and re-run `python -m common.fineweb`"
            )
        if scan and path not in self.scanned and len(tokens):
            if (top := int(tokens.max())) >= self.vocab_size:
                raise UserError(
                    f"shard {path} holds token id {top}, beyond the {self.vocab_size} of GPT-2's "
                    "vocabulary (another tokenizer? damaged?); re-make it with `python -m "
                    "common.fineweb`"
                )
            self.scanned.add(path)
        return tokens

    def _order(self, epoch):
        """The shards of an epoch: in order, or with shuffle a fresh seeded permutation."""
        if self.shuffle is None:
            return list(range(len(self.files)))
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.files)).tolist()

    def _load(self, epoch, k, window):
        """Go to window `window` of the k-th shard of `epoch`'s order."""
        self.epoch, self.k, self.window, self.in_step = epoch, k, window, 0
        self.shard = self._order(epoch)[k]
        self.tokens = self._open(self.files[self.shard])
        if self.shuffle is None:  # consecutive windows: one T-token stride after another
            self.starts = self.T * np.arange((len(self.tokens) - 1) // self.T)
        else:
            self.starts = self.shuffle(len(self.tokens), self.T, (self.seed, epoch, self.shard))

    def _next_shard(self):
        if self.k + 1 < len(self.files):
            self._load(self.epoch, self.k + 1, 0)
        else:  # every shard read: the next epoch (a new order when shuffling)
            self._load(self.epoch + 1, 0, 0)

    def reset(self):
        """Back to the start of the first shard (e.g. before each validation pass)."""
        self._load(0, 0, 0)

    def next_batch(self):
        B, T = self.B, self.T
        first = self.window + self.rank * B  # this rank's windows within the micro-step
        rows = [self.tokens[s : s + T + 1] for s in self.starts[first : first + B]]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        x = buf[:, :-1].contiguous()  # inputs
        y = buf[:, 1:].contiguous()  # targets: the next token of each input
        self.window += B * self.world_size
        self.in_step = (self.in_step + self.micro_tokens) % self.step_tokens
        if self.in_step == 0 and self.window + self.step_windows > len(self.starts):
            self._next_shard()  # the next step won't fit in this shard
        return x, y

    def state_dict(self):
        # the file name too: the index alone could point elsewhere if another batch size or
        # world size skips a different set of too-small shards on resume
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "file": self.files[self.shard].name,
            "window": self.window,
            "seed": self.seed,
        }

    def load_state_dict(self, state):
        shard, epoch = int(state["shard"]), int(state.get("epoch", 0))
        # "pos": a token position, as checkpoints written before shuffling held it
        window = int(state["window"]) if "window" in state else int(state["pos"]) // self.T
        names = [p.name for p in self.files]
        if state.get("file") in names:
            shard = names.index(state["file"])
        if not 0 <= shard < len(self.files) or window < 0 or epoch < 0:
            raise UserError(
                f"loader state {state} does not match the {len(self.files)} shards here; "
                "resume with the data the run started with"
            )
        self.seed = int(state.get("seed", self.seed))  # the run's order, whatever --seed says now
        self._load(epoch, self._order(epoch).index(shard), window)
        if self.window + self.step_windows > len(self.starts):  # e.g. a bigger batch than before
            self._next_shard()


# ---- `python -m common.data`: the inputs the stages read, fetched or made once -----------
#   python -m common.data --tiny-shakespeare input.txt      # 02-06: --input input.txt
#   python -m common.data --docs-jsonl docs.jsonl           # 07's small run, via common.fineweb
#   python -m common.data --text my.txt --docs-jsonl docs.jsonl


@dataclass
class DataConfig:
    tiny_shakespeare: str = ""  # download tiny shakespeare (sha256-checked) and write it here
    docs_jsonl: str = ""  # write a text split at blank lines here, one {"text": doc} per line
    text: str = ""  # the text for --docs-jsonl; empty: tiny shakespeare


def split_documents(text):
    """A text -> its documents: the pieces between blank lines that hold more than spaces."""
    return [d for d in text.split("\n\n") if d.strip()]


def _write_atomic(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def main(cfg):
    import json

    if not (cfg.tiny_shakespeare or cfg.docs_jsonl):
        raise UserError("nothing to do: give --tiny-shakespeare PATH and/or --docs-jsonl PATH")
    result = {}
    if cfg.tiny_shakespeare:  # into the cache first, so stages run without --input find it too
        cached = download(
            TINY_SHAKESPEARE_URL, cache_dir() / "tinyshakespeare.txt", TINY_SHAKESPEARE_SHA256
        )
        text = cached.read_text(encoding="utf-8")
        _write_atomic(cfg.tiny_shakespeare, text)
        print(f"wrote {cfg.tiny_shakespeare}: tiny shakespeare, {len(text):,} characters")
        result["tiny_shakespeare"] = cfg.tiny_shakespeare
    if cfg.docs_jsonl:
        source = cfg.text or cfg.tiny_shakespeare
        if source and not os.path.isfile(source):
            raise UserError(f"--text {source}: file not found")
        docs = split_documents(load_text(source or None))
        if not docs:
            raise UserError(f"{source}: no text to split into documents")
        _write_atomic(cfg.docs_jsonl, "".join(json.dumps({"text": d}) + "\n" for d in docs))
        print(f"wrote {cfg.docs_jsonl}: {len(docs):,} documents of {source or 'tiny shakespeare'}")
        print(
            f"next: python -m common.fineweb --data-files {cfg.docs_jsonl} --shard-size 100000 "
            "--out-dir data/tiny"
        )
        result.update(docs_jsonl=cfg.docs_jsonl, docs=len(docs))
    return result


if __name__ == "__main__":
    from common.cli import parse_args

    main(parse_args(DataConfig))
