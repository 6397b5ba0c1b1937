"""A stage's Config dataclass -> command-line flags, and one-line errors instead of tracebacks.

    @dataclass
    class Config:
        batch_size: int = 16  # sequences per step      ->  --batch-size 16  (help from the comment)
        cpu: ClassVar[dict] = dict(preset="tiny", batch_size=4)

`cpu` holds the defaults used when no CUDA GPU is found and no --preset was given (or the
CPU preset is named), so `python NN_stage.py` finishes quickly on a laptop while
`--preset gpt2` forces the real thing. Flags given on the command line always win.
`consts` (optional) names flags that may stand alone: consts = {"resume": "latest"} makes
`--resume` mean `--resume latest`.
"""

import argparse
import dataclasses
import inspect
import re
import sys
import typing

from common import UserError


def _field_help(cls):
    """The trailing comment of each `name: type = value  # comment` line in the class source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M))


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")


def parse_args(Config, argv=None):
    """Build an argparse parser from Config's fields, parse argv, return a Config."""
    module = sys.modules.get(Config.__module__)
    doc = (module.__doc__ or "") if module else ""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    helps = _field_help(Config)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        text = f"{helps.get(f.name, '')} (default: {default})".strip().replace("%", "%%")
        if kind is bool:
            # `--flag` alone means true; `--flag false` switches a default-on feature off
            parser.add_argument(
                flag, type=_bool, nargs="?", const=True, default=default, metavar="BOOL", help=text
            )
        elif f.name in getattr(Config, "consts", {}):  # `--resume` alone = consts["resume"]
            const = Config.consts[f.name]
            parser.add_argument(flag, nargs="?", const=const, default=default, help=text)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) else kind  # Optional[X]
            parser.add_argument(flag, type=base, default=default, help=text)
    ns = parser.parse_args(argv)
    typed = {t.split("=")[0] for t in (sys.argv[1:] if argv is None else argv)}
    given = {a.dest for a in parser._actions if typed & set(a.option_strings)}
    cfg = Config(**vars(ns))
    cpu = getattr(Config, "cpu", None)
    if cpu:
        auto = "preset" not in given and _no_cuda(cfg)  # nothing asked for, no GPU: go small
        if auto or cfg.__dict__.get("preset") == cpu.get("preset"):  # or the CPU preset by name
            cfg = dataclasses.replace(cfg, **{k: v for k, v in cpu.items() if k not in given})
        if auto:
            shown = ", ".join(f"{k}={v}" for k, v in cpu.items())
            hint = (
                "--preset gpt2 forces the real size" if "preset" in hints else "flags override them"
            )
            print(f"No CUDA GPU: using the CPU defaults ({shown}); {hint}.")
    sys.excepthook = _excepthook
    return cfg


def _no_cuda(cfg):
    import torch

    return not torch.cuda.is_available() or getattr(cfg, "device", "auto") == "cpu"


def _excepthook(kind, value, tb):
    """UserError -> one line on stderr (exit code 1); anything else keeps its traceback."""
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)
