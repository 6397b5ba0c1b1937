"""A stage's Config dataclass -> command-line flags, and one-line errors instead of tracebacks.

    @dataclass
    class Config:
        batch_size: int = 16  # sequences per step      ->  --batch-size 16  (help from the comment)
        cpu: ClassVar[dict] = dict(preset="tiny", batch_size=4)

`cpu` holds the defaults used when the stage runs on a CPU (no CUDA GPU, or --device cpu),
so `python NN_stage.py` finishes quickly on a laptop; each applies only where its flag was
not given. A preset chooses the model's size and nothing else: `--preset gpt2` on a CPU is
GPT-2's size with the CPU batch and steps, `--preset tiny` on a GPU the tiny model with the
GPU's. On a CPU one line names every value that is not the stage's default (the CPU defaults
used, then the flags as given). A Config may inherit fields (and their help) from a base.
`consts` (optional) names flags that may stand alone: consts = {"resume": "latest"} makes
`--resume` mean `--resume latest`.

Every flag also takes nanoGPT's spelling (`--batch_size 32`, `--batch_size=32`); prefixes of
flags are refused (`--st 5` is not `--steps 5`). Numbers are checked right after parsing by
the rules in RULES (one table for every stage, keyed by field name): `--batch-size 0` ends
with `error: --batch-size must be a positive integer (got 0)` before any work. A stage that
means something else by a flag overrides its rule in one line:
    rules: ClassVar[dict] = dict(steps=">= 0")  # --steps 0: the benchmark alone
"""

import argparse
import copy
import dataclasses
import inspect
import math
import re
import sys
import typing
from pathlib import Path

from common import UserError, finish_checkpoint_writes

# The meaning of a number is the same in every stage, so its rule is keyed by the field's name:
# "> 0", ">= 0", "(0, 1]", or a tuple of the allowed values. Fields ending in _every are >= 0
# (0: never). Floats must also be finite (argparse takes "nan" and "inf").
RULES = {
    **dict.fromkeys(
        (
            "batch_size",
            "seq_len",
            "steps",
            "total_batch",
            "val_steps",
            "new_tokens",
            "max_new_tokens",
            "num_samples",
            "shard_size",
            "timed",
            "lr",
            "max_lr",
            "grad_clip",
        ),
        "> 0",
    ),
    **dict.fromkeys(
        (
            "warmup_steps",
            "warmup",
            "seed",
            "keep_last",
            "limit",
            "hellaswag_limit",
            "max_tokens",
            "workers",
            "top_k",
            "weight_decay",
            "temperature",
        ),
        ">= 0",
    ),
    "top_p": "(0, 1]",
    "dtype": ("bfloat16", "float16", "float32"),
}


def _field_help(cls):
    """The trailing comment of each `name: type = value  # comment` line in the class source
    (and its bases', a field redefined in the class taking the class's comment)."""
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):  # object has no source
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        helps.update(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M))
    return helps


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help names each flag once: the underscore aliases are left out."""

    def _format_action_invocation(self, action):
        shown = [s for s in action.option_strings if "_" not in s]
        if shown and shown != action.option_strings:
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def parse_args(Config, argv=None):
    """Build an argparse parser from Config's fields, parse argv, return a checked Config."""
    module = sys.modules.get(Config.__module__)
    doc = (module.__doc__ or "") if module else ""
    parser = argparse.ArgumentParser(
        description=doc,
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # `--st 5` is an error, not a guess at --steps or --start
        epilog="Flags may also be written with underscores, as in nanoGPT: --batch_size=32.",
    )
    helps = _field_help(Config)
    hints = typing.get_type_hints(Config)
    defaults = {}
    for f in dataclasses.fields(Config):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        defaults[f.name] = default
        flags = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])  # + nanoGPT's
        text = f"{helps.get(f.name, '')} (default: {default})".strip().replace("%", "%%")
        if kind is bool:
            # `--flag` alone means true; `--flag false` switches a default-on feature off
            parser.add_argument(
                *flags, type=_bool, nargs="?", const=True, metavar="BOOL", help=text
            )
        elif f.name in getattr(Config, "consts", {}):  # `--resume` alone = consts["resume"]
            const = Config.consts[f.name]
            parser.add_argument(*flags, nargs="?", const=const, help=text)
        elif {int, str} <= set(typing.get_args(kind)):  # int | str: a number or a word (auto)
            parser.add_argument(*flags, type=_int_or_word, help=text)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) else kind  # Optional[X]
            parser.add_argument(*flags, type=base, help=text)
    # every field starts out as `unset`: argparse then fills in only what the command line
    # gives, however it was spelled (--batch-size 3, --batch_size=3, ...)
    unset = object()
    ns = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset)))
    given = {k for k, v in vars(ns).items() if v is not unset}
    cfg = Config(**{k: getattr(ns, k) if k in given else v for k, v in defaults.items()})
    sys.excepthook = _excepthook
    cpu, note = getattr(Config, "cpu", None), None
    if cpu and _no_cuda(cfg):  # on a CPU: its defaults, each where its flag was not given
        # (or was given as `auto`: --batch-size auto sizes a GPU's batch; a CPU takes its own)
        given -= {k for k in cpu if getattr(cfg, k) == "auto"}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in cpu.items() if k not in given})
        differs = [k for k in defaults if getattr(cfg, k) != defaults[k]]
        used = [f"{k}={getattr(cfg, k)}" for k in differs if k not in given]
        kept = [f"{k}={getattr(cfg, k)}" for k in differs if k in given]
        if used:  # the one line naming every value that is not the stage's default
            shown = ", ".join(used) + (f"; as given: {', '.join(kept)}" if kept else "")
            why = "--device cpu" if getattr(cfg, "device", None) == "cpu" else "No CUDA GPU"
            hint = (
                "--preset gpt2 forces the real size" if "preset" in hints else "flags override them"
            )
            note = f"{why}: using the CPU defaults ({shown}); {hint}."
    validate(cfg)  # a bad value is then the only thing said
    if note:
        print(note)
    return cfg


def validate(cfg):
    """Check every numeric field of a Config against RULES (and the Config's own `rules`);
    the first violation raises UserError, e.g. `--batch-size must be a positive integer
    (got 0)`. parse_args calls it; tests and in-process callers may too."""
    rules = {**RULES, **getattr(type(cfg), "rules", {})}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        rule = rules.get(f.name, ">= 0" if f.name.endswith("_every") else None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number (got {value})")
        if isinstance(rule, tuple):
            ok, need = value in rule, f"one of {', '.join(map(str, rule))}"
        elif rule and isinstance(value, (int, float)) and not isinstance(value, bool):
            number = "integer" if isinstance(value, int) else "number"
            ok, need = {
                "> 0": (value > 0, f"a positive {number}"),
                ">= 0": (value >= 0, f"a non-negative {number}"),
                "(0, 1]": (0 < value <= 1, "a number in (0, 1]"),
            }[rule]
        elif isinstance(value, str) and {int, str} <= set(typing.get_args(hints[f.name])):
            if value == "auto":  # int | str: a number or auto
                continue
            ok, need = False, "a positive integer or auto"
        else:  # text, switches, None, auto: nothing to check here
            continue
        if not ok:
            raise UserError(f"{flag} must be {need} (got {value})")
    preset, T = getattr(cfg, "preset", None), getattr(cfg, "seq_len", None)
    if isinstance(preset, str) and isinstance(T, int):
        from common.model import preset_config  # here: the model's module needs torch

        block = preset_config(preset).block_size  # an unknown preset: one line, now
        if T > block:  # said before any data is read (the model would say it at step 0)
            raise UserError(
                f"sequence length {T} exceeds block_size {block} of --preset {preset}: "
                "lower --seq-len"
            )


def _int_or_word(text):
    """A flag that is a number or a word: '16' -> 16, 'auto' -> 'auto'."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _no_cuda(cfg):
    import torch

    return not torch.cuda.is_available() or getattr(cfg, "device", "auto") == "cpu"


def _excepthook(kind, value, tb):
    """UserError -> one line on stderr (exit code 1); so is running out of memory (where,
    how much, the flag to change: _out_of_memory); anything else keeps its
    traceback."""
    import torch

    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
    elif issubclass(kind, torch.OutOfMemoryError):
        print(f"error: {_out_of_memory(tb)}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


def _out_of_memory(tb):
    """The one line for a torch.OutOfMemoryError: where (step, micro-step, micro-batch, from
    the stage's main() in the traceback `tb`), how much (peak and card memory), the command
    to rerun (--batch-size halved, the same tokens per step, or auto) and the newest
    checkpoint. The error stops the run before the optimizer step and before any save, so no
    checkpoint is touched; one still being written in the background is finished first."""
    import os
    import typing

    import torch

    finish_checkpoint_writes()  # the newest checkpoint may be one still being written
    where = {}
    while tb is not None:  # the innermost main() of a stage file (NN_name.py)
        code = tb.tb_frame.f_code
        if code.co_name == "main" and re.search(r"\d\d_\w+\.py$", code.co_filename):
            where = tb.tb_frame.f_locals
        tb = tb.tb_next
    cfg, parts = where.get("cfg"), []
    B, T = getattr(cfg, "batch_size", None), getattr(cfg, "seq_len", None)
    head = "out of memory"
    if "step" in where:  # in the training loop (before it: setting up, or an evaluation)
        head += f" at step {where['step']}"
        micro, accum = where.get("micro_step"), where.get("accum_steps")
        if micro is not None and accum:
            head += f", micro-step {micro + 1} of {accum}"
    shape = ", ".join(f"{k}={v}" for k, v in (("B", B), ("T", T)) if v is not None)
    parts.append(head + (f" ({shape})" if shape else ""))
    if torch.cuda.is_available():
        d = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(d)
        parts.append(
            f"peak {torch.cuda.max_memory_allocated(d) / 2**30:.1f} GiB allocated of "
            f"{props.total_memory / 2**30:.1f} GiB on {props.name}"
        )
    else:
        parts.append("no CUDA memory statistics here (peak and card memory unknown)")
    out = getattr(cfg, "out", None)  # ckpt_{step:06d}.pt: sorted by name is sorted by step
    ckpts = sorted(Path(out).glob("ckpt_*.pt")) if out else []
    if isinstance(B, int) and B > 1:
        argv, given = [], iter(sys.argv[1:])
        for arg in given:  # the command as given, without its --batch-size
            if arg in ("--batch-size", "--batch_size"):
                next(given, None)  # and its value
            elif not arg.startswith(("--batch-size=", "--batch_size=")):
                argv.append(arg)
        argv += ["--batch-size", str(B // 2)]
        if ckpts and not any(a.startswith("--resume") for a in argv):
            argv.append("--resume")
        prog = "torchrun ... " if "RANK" in os.environ else "python "
        tokens = getattr(cfg, "total_batch", None)
        same = f", the same {tokens:,} tokens per step" if tokens else ""
        hint = typing.get_type_hints(type(cfg))["batch_size"]  # int | str: the stage has auto
        auto = " (or --batch-size auto)" if str in typing.get_args(hint) else ""
        parts.append(
            f"rerun with --batch-size {B // 2}{same}{auto}: "
            f"{prog}{' '.join([os.path.basename(sys.argv[0]), *argv])}"
        )
    elif B == 1:
        parts.append("even B=1 does not fit: use a smaller --preset or --seq-len")
    else:  # not in a stage's main(): no config to go by
        parts.append("rerun with a smaller --batch-size")
    parts.append(f"newest checkpoint: {ckpts[-1] if ckpts else 'none'}")
    return "; ".join(parts)
