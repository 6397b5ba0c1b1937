"""`python -m common.plot RUN` turns metrics.jsonl into a PNG; bad input is one clear line."""

import json
import math
import random

from conftest import run_script

from common.plot import COLOURS, GPT2_HELLASWAG, Config, hellaswag_lines, main, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, steps=300, val_every=25, hellaswag_every=50, extra_lines=()):
    """A run as stage 07 logs it: train lines every step, val and HellaSwag every so often."""
    rng, tokens_per_step = random.Random(0), 8 * 64 * 32
    lines = []
    for s in range(steps):
        loss = 3.3 + 7.5 * math.exp(-s / 60) + rng.gauss(0, 0.08)
        tokens = (s + 1) * tokens_per_step
        lines.append(
            dict(
                step=s,
                split="train",
                loss=loss,
                lr=6e-4 * min(1, (s + 1) / 20),
                norm=0.5 + rng.random(),
                dt=0.31,
                tokens_per_s=52_000.0,
                mfu=None,
                tokens=tokens,
                host="gpu-7",
            )
        )
        if val_every and (s % val_every == 0 or s == steps - 1):
            lines.append(dict(step=s, split="val", loss=loss + 0.04, tokens=tokens))
        if hellaswag_every and (s % hellaswag_every == 0 or s == steps - 1):
            acc = 0.25 + 0.05 * s / steps
            lines.append(
                dict(
                    step=s,
                    split="hellaswag",
                    nanogpt_acc=acc,
                    nanogpt_acc_norm=acc + 0.01,
                    lm_eval_acc=acc + 0.005,
                    lm_eval_acc_norm=acc + 0.02,
                    n=10042,
                )
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(d) + "\n" for d in lines) + "".join(extra_lines)
    path.write_text(text)


def test_plot_writes_a_png(tmp_path, capsys):
    extra = ['{"step": 300, "split": "sample", "text": "hi"}\n', '{"step": 301, "split": "tr']
    write_metrics(tmp_path / "metrics.jsonl", extra_lines=extra)  # last line cut mid-write
    out = main(Config(run=str(tmp_path)))
    png = tmp_path / "metrics.png"
    assert out["png"] == str(png) and out["counts"] == {"train": 300, "val": 13, "hellaswag": 7}
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 40_000  # three panels of lines, not a blank
    captured = capsys.readouterr()
    assert "skipped 1 unreadable line" in captured.err and "wrote" in captured.out


def test_plot_without_val_or_hellaswag(tmp_path):
    write_metrics(tmp_path / "run" / "metrics.jsonl", val_every=0, hellaswag_every=0)
    runs = read_metrics(tmp_path / "run" / "metrics.jsonl")  # the file itself works too
    assert [len(runs[k]) for k in ("train", "val", "hellaswag")] == [300, 0, 0]
    out = main(Config(run=str(tmp_path / "run"), png=str(tmp_path / "figs" / "a.png")))
    assert (tmp_path / "figs" / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert out["counts"]["train"] == 300


def test_plot_cli(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", steps=60)
    r = run_script(["-m", "common.plot", str(tmp_path), "--png", str(tmp_path / "p.png")])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'p.png'}") and "60 train" in r.stdout
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_or_empty_metrics_is_one_error_line(tmp_path):
    r = run_script(["-m", "common.plot", str(tmp_path / "nothing")])
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"error: no metrics file at {tmp_path / 'nothing' / 'metrics.jsonl'}: "
        "train with stage 07 first, or give its --out"
    ]
    (tmp_path / "metrics.jsonl").write_text("\n")
    r = run_script(["-m", "common.plot", "--run", str(tmp_path)])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "holds no metrics" in lines[0]
    assert not (tmp_path / "metrics.png").exists()


def test_hellaswag_baselines_go_with_their_protocol(tmp_path):
    """Each protocol's line and the published figure measured its way share a colour and a
    label; a run from before the protocols (plain acc, acc_norm) is the nanogpt protocol's."""
    from common.hellaswag import PUBLISHED

    assert GPT2_HELLASWAG == {p: rows[0][2] for p, rows in PUBLISHED.items()}  # not copied wrong
    write_metrics(tmp_path / "metrics.jsonl", steps=60, val_every=0)
    lines = hellaswag_lines(read_metrics(tmp_path)["hellaswag"])
    assert [line[0] for line in lines] == ["nanogpt", "lm-eval"]
    for protocol, colour, (xs, ys), (xs2, ys2), published in lines:
        assert colour == COLOURS[protocol] and published == GPT2_HELLASWAG[protocol]
        assert xs == xs2 == [0, 50, 59] and len(ys) == len(ys2) == 3
    assert lines[1][2][1][0] == 0.25 + 0.02  # lm_eval_acc_norm, not nanogpt's
    old = [dict(step=s, split="hellaswag", acc=0.26, acc_norm=0.27, n=16) for s in (0, 5)]
    (lines,) = hellaswag_lines(old)
    assert lines[0] == "nanogpt" and lines[2] == ([0, 5], [0.27, 0.27]) and lines[4] == 0.2955
