"""Flake hunt: run the same tests N times in a row, each time in a fresh pytest process,
optionally with the CPU kept busy, and count what passed and what failed, test by test.

    python bench/flake_loop.py --runs 50 --burn 2 tests/test_faults.py -k dead_worker
    python bench/flake_loop.py --runs 30 --burn 2 --process-tests  # every process-starting test

Everything after the options is given to pytest as it is. `--burn K` starts K processes
that spin (`while True: pass`) for the whole loop: a loaded machine, where a race between
threads or processes shows up. `--process-tests` adds PROCESS_TESTS, the tests that start
processes (torchrun, signals, kill -9, the prep's pool, stages run as subprocesses). The
output of each failing run is kept under --logs; one line per run, then the counts.
"""

import argparse
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# every test file with a test that starts a process (grep tests/ for subprocess, torchrun,
# Popen, os.kill, workers=); their in-process tests come along
PROCESS_TESTS = [
    "tests/test_faults.py",
    "tests/test_shutdown.py",
    "tests/test_async_checkpoint.py",
    "tests/test_07.py",
    "tests/test_plan.py",
    "tests/test_fineweb.py",
    "tests/test_stages.py",
    "tests/test_05_06.py",
    "tests/test_setup_cli.py",
    "tests/test_metrics_log.py",
    "tests/test_hellaswag.py",
    "tests/test_protect.py",
    "tests/test_export.py",
    "tests/test_sample.py",
    "tests/test_plot.py",
    "tests/test_lessons.py",
    "tests/test_gpu_data.py",
    "tests/test_09.py",
]

RESULT = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\S* (\S+)", re.M)


def main():
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    p.add_argument("--runs", type=int, default=30, help="times to run the tests (default 30)")
    p.add_argument("--burn", type=int, default=0, help="CPU-spinning processes meanwhile")
    p.add_argument("--hours", type=float, default=0, help="stop starting runs after this long")
    p.add_argument("--process-tests", action="store_true", help="add PROCESS_TESTS")
    p.add_argument("--logs", default="/tmp/flake_loop", help="failing runs' output go here")
    args, pytest_args = p.parse_known_args()
    pytest_args = (PROCESS_TESTS if args.process_tests else []) + pytest_args
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    burn = [sys.executable, "-c", "while True: pass"]
    burners = [subprocess.Popen(burn) for _ in range(args.burn)]
    counts, runs, runs_failed, start = Counter(), 0, 0, time.monotonic()
    # one pass's temp files at a time (about 4 GB for --process-tests): pytest empties
    # --basetemp when it starts, where it would keep the last three passes in $TMPDIR
    basetemp = logs / "pytest-tmp"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += ["--basetemp", str(basetemp), *pytest_args]
    print(f"{' '.join(cmd)}\n{args.runs} runs, {args.burn} CPU burner(s)", flush=True)
    try:
        for i in range(1, args.runs + 1):
            if args.hours and time.monotonic() - start > args.hours * 3600:
                print(f"time is up after {runs} runs")
                break
            runs = i
            t0 = time.monotonic()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            results = RESULT.findall(r.stdout)
            counts.update(results)
            bad = [f"{what} {test}" for what, test in results if what in ("FAILED", "ERROR")]
            if r.returncode not in (0, 5) or bad:
                runs_failed += 1
                (logs / f"run{i:03d}.txt").write_text(r.stdout + "\n--- stderr\n" + r.stderr)
            tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "(no output)"
            print(
                f"run {i:3d}: rc {r.returncode} in {time.monotonic() - t0:5.0f} s: {tail}"
                + "".join(f"\n    {b}" for b in bad),
                flush=True,
            )
    finally:
        for b in burners:
            b.kill()
            b.wait()
    print(f"\n{runs - runs_failed} of {runs} runs green; per test (passed/failed):")
    for test in sorted({t for _, t in counts}):
        passed, failed = counts["PASSED", test], counts["FAILED", test] + counts["ERROR", test]
        print(f"  {passed:3d} / {failed:3d}  {test}")
    return 1 if runs_failed else 0


if __name__ == "__main__":
    sys.exit(main())
