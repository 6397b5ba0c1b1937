"""Prep throughput: `python -m common.fineweb` with a process pool vs one process.

Makes a local stand-in for FineWeb-Edu: tiny shakespeare repeated `--copies` times (~43M
tokens at 128), cut into documents of `--paras` paragraphs (20: ~1,000 tokens, FineWeb-Edu's
average; 1: ~50-token documents, the worst case for per-document overhead), each copy's
number in front so no two are equal, in one parquet file. Then runs the prep on it as a user
would, once per worker count, each into a fresh output dir, and prints the tokens/s each run
reports (timed inside main: opening the dataset, reading, tokenizing and writing the shards;
not interpreter start-up).

    python bench/fineweb_prep.py                 # --workers 1, then --workers <all cores>
    python bench/fineweb_prep.py --workers 1,2,4 --copies 64 --paras 1
"""

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_docs(path, copies, paras_per_doc):
    sys.path.insert(0, str(ROOT))  # a script, not a package: find `common` from the repo root
    import datasets

    from common.data import load_text

    paras = [p for p in load_text().split("\n\n") if p.strip()]
    docs = [
        f"{c}: " + "\n\n".join(paras[i : i + paras_per_doc])
        for c in range(copies)
        for i in range(0, len(paras), paras_per_doc)
    ]
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(path))
    return len(docs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default=f"1,{os.cpu_count()}", help="worker counts to time")
    parser.add_argument("--copies", type=int, default=128, help="copies of tiny shakespeare")
    parser.add_argument("--paras", type=int, default=20, help="paragraphs per document")
    parser.add_argument("--dir", default="data/bench_fineweb", help="scratch dir (deleted first)")
    args = parser.parse_args()

    work = ROOT / args.dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    docs = work / "docs.parquet"
    n = make_docs(docs, args.copies, args.paras)
    print(f"{n:,} documents in {docs} ({docs.stat().st_size / 1e6:.1f} MB)")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )

    for w in [int(w) for w in args.workers.split(",")]:
        out = work / f"shards_w{w}"
        cmd = [
            sys.executable,
            "-m",
            "common.fineweb",
            "--data-files",
            str(docs),
            "--out-dir",
            str(out),
            "--shard-size",
            "10_000_000",
            "--workers",
            str(w),
        ]
        print("$ " + " ".join(["python", *cmd[1:]]))
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stderr)
        line = next(s for s in run.stdout.splitlines() if s.startswith("wrote"))
        rate = re.search(r"([\d,]+) tokens/s", line).group(1)
        print(f"  workers {w}: {rate} tokens/s   ({line})")


if __name__ == "__main__":
    main()
