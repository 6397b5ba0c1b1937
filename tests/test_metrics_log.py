"""metrics.jsonl's run header, resume, the experiment tracker, and the ETA of a step line."""

import json
import platform
import subprocess
from dataclasses import dataclass

import pytest
import torch
from conftest import ROOT

from common import UserError
from common.metrics import MetricsLog, format_eta, make_tracker, read_run_header


@dataclass
class RunConfig:
    steps: int = 8
    max_lr: float = 6e-4
    out: str = "out"


def lines_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fresh_run_starts_with_its_header(tmp_path):
    log = MetricsLog(tmp_path, run_config=RunConfig())
    log.write(step=0, split="train", loss=10.9)
    first, second = lines_of(tmp_path)
    assert first["split"] == "run" and first["step"] == 0 and second["split"] == "train"
    run = read_run_header(tmp_path)
    assert run == first["run"] == read_run_header(tmp_path / "metrics.jsonl")
    assert run["config"] == {"steps": 8, "max_lr": 6e-4, "out": "out"}  # a dataclass, as a dict
    assert run["python"] == platform.python_version() and run["torch"] == torch.__version__
    assert run["cuda"] == torch.version.cuda and "resumed_at" not in run
    assert run["gpu_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert run["host"] and run["date"][:2] == "20" and run["date"].endswith("+00:00")
    try:  # the commit of this checkout, when the tests run in one
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        commit = head.stdout.strip() if head.returncode == 0 else None
    except OSError:  # no git here
        commit = None
    assert run["git_commit"] == commit and isinstance(run["git_dirty"], (bool, type(None)))


def test_header_takes_any_config_and_a_dict(tmp_path):
    MetricsLog(tmp_path, run_config={"data_dir": tmp_path, "steps": 3})  # a Path: as text
    assert read_run_header(tmp_path)["config"] == {"data_dir": str(tmp_path), "steps": 3}
    MetricsLog(tmp_path / "b")  # no config at all
    assert read_run_header(tmp_path / "b")["config"] == {}


def test_resume_keeps_the_header_drops_later_steps_and_adds_its_own(tmp_path):
    log = MetricsLog(tmp_path, run_config={"steps": 8})
    for step in range(6):
        log.write(step=step, split="train", loss=10.0 - step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "split": "tr')  # killed mid-line
    MetricsLog(tmp_path, resume_step=4, run_config={"steps": 8})  # from ckpt_000004.pt
    rows = lines_of(tmp_path)
    assert [(r["split"], r["step"]) for r in rows] == [
        ("run", 0),
        *(("train", s) for s in range(4)),
        ("run", 4),
    ]
    assert "resumed_at" not in rows[0]["run"] and rows[-1]["run"]["resumed_at"] == 4
    assert read_run_header(tmp_path) == rows[0]["run"]  # the run's own header, not the resume's

    # a second crash and a resume from an earlier checkpoint drops the later resume's header
    MetricsLog(tmp_path, resume_step=2)
    assert [(r["split"], r["step"]) for r in lines_of(tmp_path)] == [
        ("run", 0),
        ("train", 0),
        ("train", 1),
        ("run", 2),
    ]


def test_readers_skip_the_header(tmp_path):
    """The plot reads train/val/hellaswag lines; the header is none of them."""
    from common.plot import read_metrics

    log = MetricsLog(tmp_path, run_config={"steps": 2})
    log.write(step=0, split="train", loss=10.0, tokens=256)
    log.write(step=1, split="train", loss=9.0, tokens=512)
    runs = read_metrics(tmp_path)
    assert [r["step"] for r in runs["train"]] == [0, 1] and "run" not in runs


def test_read_run_header_without_one_or_without_a_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "split": "train", "loss": 1.0}\n')
    assert read_run_header(tmp_path) is None  # a file from before run headers
    with pytest.raises(UserError, match="no metrics file"):
        read_run_header(tmp_path / "nowhere")


class FakeTracker:
    """A stand-in for wandb: remembers what it was given."""

    def __init__(self):
        self.records, self.finished = [], 0

    def log(self, record):
        self.records.append(record)

    def finish(self):
        self.finished += 1


def test_every_record_reaches_the_tracker(tmp_path):
    tracker = FakeTracker()
    log = MetricsLog(tmp_path, run_config={"steps": 2}, tracker=tracker)
    log.write(step=0, split="val", loss=10.9, tokens=0)
    log.write(step=0, split="train", loss=10.9, lr=6e-5, norm=1.5, dt=0.8, tokens=256)
    log.write(step=1, split="hellaswag", acc=0.25, acc_norm=0.3, n=16)
    written = [r for r in lines_of(tmp_path) if r["split"] != "run"]
    assert tracker.records == written and len(written) == 3  # the same records, in order
    log.close()
    log.close()  # once is enough: a second close does nothing
    assert tracker.finished == 1


def test_make_tracker_none_and_unknown():
    assert make_tracker(None, "p", "r", {}) is None
    assert make_tracker("none", "p", "r", {}) is None
    with pytest.raises(UserError, match="unknown tracker 'tensorboard'"):
        make_tracker("tensorboard", "p", "r", {})


def test_make_tracker_without_wandb_is_a_user_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UserError, match=r"^--wandb needs the wandb package: pip install wandb$"):
        make_tracker("wandb", "gpt-from-scratch", "run", {})


def test_wandb_offline_gets_the_records(tmp_path, monkeypatch):
    """The real wandb (optional, not in requirements) in offline mode: nothing leaves here."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = make_tracker("wandb", "gpt-from-scratch", "test-run", RunConfig())
    log = MetricsLog(tmp_path / "out", run_config=RunConfig(), tracker=tracker)
    log.write(step=0, split="train", loss=10.9, lr=6e-5)
    log.write(step=1, split="train", loss=9.5, lr=1.2e-4)
    log.write(step=1, split="val", loss=9.87654)
    log.write(step=2, split="train", loss=9.1, lr=1.8e-4)
    run = tracker.run
    assert dict(run.config)["steps"] == 8 and run.name == "test-run"
    # wandb commits a step's values when a later step arrives: step 1 is in, both splits
    assert run.summary["train/loss"] == 9.5 and run.summary["val/loss"] == 9.87654
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # for `wandb sync`


@pytest.mark.parametrize(
    "seconds,text",
    [
        (0, "0s"),
        (12.4, "12s"),
        (59.4, "59s"),
        (59.6, "1m00s"),
        (185, "3m05s"),
        (3599.4, "59m59s"),
        (3599.6, "1h00m"),
        (4 * 3600 + 12 * 60 + 20, "4h12m"),
        (52 * 3600 + 3 * 60, "52h03m"),
        (None, "?"),
        (-1, "?"),
        (float("inf"), "?"),
        (float("nan"), "?"),
    ],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_header_on_a_gpu_machine(tmp_path, monkeypatch):
    """The CUDA branch without a GPU: what torch and nvidia-smi would say, stubbed."""
    import common.metrics as metrics

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(metrics, "_cuda_driver", lambda: "550.54.15")
    MetricsLog(tmp_path, run_config={"steps": 1})
    run = read_run_header(tmp_path)
    assert (run["gpu"], run["gpu_count"], run["cuda_driver"]) == (
        "NVIDIA H100 80GB HBM3",
        8,
        "550.54.15",
    )


def test_cuda_driver_without_nvidia_smi(monkeypatch):
    import common.metrics as metrics

    monkeypatch.setenv("PATH", "")  # no nvidia-smi to be found
    assert metrics._cuda_driver() is None
