"""The inputs bench/gpu.py needs on a machine with no network, made here and carried there.

The GPU machine has no network and no `datasets`, and what travels with the working tree is
at most 64 MiB. Stage 07 at the real size reads 524,288 tokens per optimizer step, more than
all of tiny shakespeare (338,025), so the shards here are made of tiny shakespeare plus the
Python source files of this interpreter (its standard library and installed packages): public
text of the right kind for a throughput test, with no download. The result:

    {out}/input.txt   the text for stages 02-06 (tiny shakespeare unless --text)
    {out}/shards/     token shards (common.fineweb): shard 0 validation, the rest training

    python bench/gpu_data.py --out bench_data        # ~24M tokens, 47 MiB, ~15 s on 2 cores
    # then, on the GPU (the `carry` of the device tool names bench_data):
    python bench/gpu.py --data-dir bench_data/shards --text bench_data/input.txt \\
        --json $OUT/gpu.json
"""

import json
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import UserError, fineweb
from common.cli import parse_args
from common.data import load_text, shard_files, split_documents

CARRY_LIMIT = 64 * 2**20  # bytes the device tool carries in all


@dataclass
class Config:
    out: str = "bench_data"  # folder to write (kept out of git by .gitignore)
    text: str = ""  # the text for stages 02-06; empty: tiny shakespeare (downloaded once)
    max_tokens: int = 24_000_000  # tokens in all shards (2 bytes each)
    shard_size: int = 6_000_000  # tokens per shard: >= 524,289 for one step of stage 07
    rules: ClassVar[dict] = dict(max_tokens="> 0", shard_size="> 0")


def source_documents():
    """Every .py file of this interpreter's standard library and installed packages, in a
    fixed order, as one document each (files that are not UTF-8 are left out)."""
    seen = set()
    for key in ("stdlib", "purelib", "platlib"):
        base = Path(sysconfig.get_paths()[key])
        if base in seen or not base.is_dir():
            continue
        seen.add(base)
        for path in sorted(base.rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield text


def main(cfg):
    if cfg.shard_size > cfg.max_tokens:
        raise UserError("--shard-size is larger than --max-tokens: no training shard would remain")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = load_text(cfg.text or None)
    (out / "input.txt").write_text(text, encoding="utf-8")
    budget = cfg.max_tokens * 6  # characters: more than enough at ~3-4 characters per token
    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs.jsonl"
        with docs.open("w", encoding="utf-8") as f:
            for doc in [*split_documents(text), *source_documents()]:
                f.write(json.dumps({"text": doc}) + "\n")
                budget -= len(doc)
                if budget <= 0:
                    break
        fineweb.main(
            fineweb.Config(
                data_files=str(docs),
                out_dir=str(out / "shards"),
                shard_size=cfg.shard_size,
                max_tokens=cfg.max_tokens,
            )
        )
    train = shard_files(out / "shards", "train")
    if not train:
        raise UserError(f"no training shard in {out}/shards: raise --max-tokens")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(train)} training shard(s), {size / 2**20:.1f} MiB in all")
    if size > CARRY_LIMIT:
        raise UserError(
            f"{out} is {size / 2**20:.1f} MiB, more than the 64 MiB the device tool "
            "carries: lower --max-tokens"
        )
    return dict(out=str(out), train_shards=len(train), bytes=size)


if __name__ == "__main__":
    main(parse_args(Config))
