"""Plot a training run from its metrics.jsonl: loss by step and by tokens, HellaSwag by step.

    python -m common.plot out/                      # writes out/metrics.png
    python -m common.plot out/ --png run1.png       # (or --run out/)

Reads `{run}/metrics.jsonl` (or the file itself), one JSON object per line, as stage 07 writes:
every line has `step` and `split` ("train", "val" or "hellaswag"); train lines carry `loss`
and `tokens` (processed so far), val lines `loss` and `tokens`, hellaswag lines `n` and each
protocol's `nanogpt_acc`, `nanogpt_acc_norm`, `lm_eval_acc`, `lm_eval_acc_norm` (older runs:
`acc`, `acc_norm`, the nanogpt protocol). Other keys are ignored; a run without val or
HellaSwag lines still plots.
The run's header line (`"split": "run"`, no step) is passed over; a line that is cut off, not
UTF-8, not a JSON object, or whose values are not numbers is skipped and counted in one note.

The dashed lines are published figures, not measured here: OpenAI's GPT-2 124M reaches a val
loss of 3.2924 on FineWeb-Edu's val shard (as build-nanogpt measured it). Its HellaSwag
acc_norm is 0.2955 by the nanogpt protocol (build-nanogpt, llm.c) and 0.3114 by lm-eval's
(lm-evaluation-harness): each protocol's line and its baseline share a colour. GPT-3 125M
reaches 0.337 (its paper; per-token normalized, like the nanogpt protocol).
"""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from common import UserError
from common.cli import parse_args

GPT2_VAL_LOSS = 3.2924  # OpenAI GPT-2 124M on FineWeb-Edu val (build-nanogpt's measurement)
# OpenAI GPT-2 124M's published acc_norm by protocol (common.hellaswag.PUBLISHED, which a test
# checks; not imported, so that plotting needs no torch)
GPT2_HELLASWAG = {"nanogpt": 0.2955, "lm-eval": 0.3114}
GPT3_HELLASWAG = 0.337  # GPT-3 125M, acc_norm (Brown et al. 2020)
COLOURS = {"nanogpt": "tab:green", "lm-eval": "tab:blue"}  # a protocol's line and its baseline


@dataclass
class Config:
    run: str = "out"  # run directory holding metrics.jsonl, or the file (also positional)
    png: str = ""  # where to write the figure; empty: metrics.png beside metrics.jsonl


PLOTTED = (  # the values a line is drawn from
    "loss",
    "tokens",
    "acc",
    "acc_norm",
    "nanogpt_acc",
    "nanogpt_acc_norm",
    "lm_eval_acc",
    "lm_eval_acc_norm",
)


def number(v):
    """A value matplotlib can place: an int or float (not a bool, text, nan or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path):
    """metrics.jsonl -> {"train": [...], "val": [...], "hellaswag": [...]} of dicts by step."""
    path = Path(path)
    if not path.is_file() and path.suffix != ".jsonl":  # a run directory (given or meant)
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file at {path}: train with stage 07 first, or give its --out")
    runs, bad = {"train": [], "val": [], "hellaswag": []}, 0
    for line in path.read_bytes().splitlines():  # bytes: one bad byte spoils one line only
        if not line.strip():
            continue
        try:
            rec = json.loads(line)  # decodes UTF-8 itself: other bytes are a ValueError
            if rec.get("split") == "run" and "step" not in rec:
                continue  # the run's header (settings, versions): no point to plot
            rec["step"], split = int(rec["step"]), rec["split"]
            ok = all(number(rec[k]) for k in PLOTTED if rec.get(k) is not None)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            ok = False  # e.g. the last line of a run that is still writing
        if not ok:
            bad += 1
            continue
        if split in runs:  # a split this plot does not know is left out
            runs[split].append(rec)
    if bad:
        print(f"note: skipped {bad} unreadable line(s) in {path}", file=sys.stderr)
    if not any(runs.values()):
        raise UserError(f"{path} holds no metrics (empty?): nothing to plot")
    for recs in runs.values():
        recs.sort(key=lambda r: r["step"])
    return runs


def smooth(values, window):
    """Trailing mean over `window` points: the train loss is noisy from batch to batch."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def series(recs, x, y):
    """The (x, y) pairs of the records that have both, as two lists."""
    pts = [(r[x], r[y]) for r in recs if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def hellaswag_lines(recs):
    """What the HellaSwag panel draws, one entry per protocol the run logged: (protocol, colour,
    acc_norm (steps, values), acc (steps, values), the published acc_norm drawn in the same
    colour). Older runs logged the nanogpt protocol's numbers as plain `acc`/`acc_norm`."""
    lines = []
    for protocol, colour in COLOURS.items():
        got = []
        for metric in ("acc_norm", "acc"):
            name = f"{protocol.replace('-', '_')}_{metric}"
            old = metric if protocol == "nanogpt" else None  # older runs' plain acc, acc_norm
            pts = [(r["step"], r.get(name, r.get(old))) for r in recs]
            got.append(([x for x, y in pts if y is not None], [y for x, y in pts if y is not None]))
        if got[0][0] or got[1][0]:
            lines.append((protocol, colour, got[0], got[1], GPT2_HELLASWAG[protocol]))
    return lines


def plot(runs, png):
    """Three panels: loss vs step, loss vs tokens, HellaSwag vs step; written to `png`."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: works over ssh and in CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    for ax, x, unit in ((axes[0], "step", 1), (axes[1], "tokens", 1e9)):
        xs, ys = series(runs["train"], x, "loss")
        if xs:
            xs = [v / unit for v in xs]
            ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8, label="train (raw)")
            w = max(1, len(ys) // 50)
            ax.plot(xs, smooth(ys, w), color="tab:blue", label=f"train (mean of {w})")
        xs, ys = series(runs["val"], x, "loss")
        if xs:
            xs = [v / unit for v in xs]
            ax.plot(xs, ys, "o-", color="tab:orange", ms=3, label=f"val (last {ys[-1]:.4f})")
        ax.axhline(
            GPT2_VAL_LOSS,
            color="tab:red",
            ls="--",
            label=f"OpenAI GPT-2 124M val, published ({GPT2_VAL_LOSS})",
        )
        ax.set_xlabel("step" if x == "step" else "tokens (billions)")
        ax.set_ylabel("loss")
        ax.set_title(f"loss by {'step' if x == 'step' else 'tokens seen'}")
    all_losses = series(runs["train"], "step", "loss")[1] + series(runs["val"], "step", "loss")[1]
    if all_losses:  # the first steps sit near 11: cut them off to keep the range readable
        top = min(max(all_losses), sorted(all_losses)[int(0.95 * (len(all_losses) - 1))] + 1.0)
        for ax in axes[:2]:
            ax.set_ylim(min(min(all_losses), GPT2_VAL_LOSS) - 0.1, top)

    ax = axes[2]
    lines = hellaswag_lines(runs["hellaswag"])
    for protocol, colour, (xs, ys), (xs2, ys2), published in lines:
        if xs:
            ax.plot(
                xs,
                ys,
                "o-",
                color=colour,
                ms=3,
                label=f"ours, {protocol} protocol, acc_norm (last {ys[-1]:.4f})",
            )
        if xs2:
            ax.plot(
                xs2, ys2, ".:", color=colour, alpha=0.6, label=f"ours, {protocol} protocol, acc"
            )
        ax.axhline(
            published,
            color=colour,
            ls="--",  # measured the same way: the same colour
            label=f"OpenAI GPT-2 124M, {protocol} protocol acc_norm, published ({published})",
        )
    if not lines:
        ax.text(
            0.5, 0.5, "no HellaSwag evaluations in this run", ha="center", transform=ax.transAxes
        )
    ax.axhline(
        GPT3_HELLASWAG,
        color="tab:purple",
        ls="--",
        label=f"GPT-3 125M acc_norm, published ({GPT3_HELLASWAG})",
    )
    ax.axhline(0.25, color="gray", ls=":", lw=0.8, label="chance (0.25)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    n = runs["hellaswag"][-1].get("n") if runs["hellaswag"] else None
    ax.set_title("HellaSwag" + (f" ({n:,} examples)" if isinstance(n, int) else ""))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)


def main(cfg):
    runs = read_metrics(cfg.run)
    run = Path(cfg.run)
    png = Path(cfg.png) if cfg.png else (run if run.is_dir() else run.parent) / "metrics.png"
    plot(runs, png)
    counts = {k: len(v) for k, v in runs.items()}
    print(
        f"wrote {png} ({png.stat().st_size / 1024:.0f} KB) from "
        f"{', '.join(f'{n} {k}' for k, n in counts.items())} lines"
    )
    return dict(png=str(png), counts=counts)


def cli_argv(argv):
    """Allow `python -m common.plot out/`: a leading bare argument means --run."""
    return ["--run", *argv] if argv and not argv[0].startswith("-") else list(argv)


if __name__ == "__main__":
    main(parse_args(Config, cli_argv(sys.argv[1:])))
