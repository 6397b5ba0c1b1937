"""The documents: every relative link lands on a file and, with a #anchor, on a heading; every
command in README.md and docs/*.md still parses as written; the front page stays short.

A command is only parsed, never run: `python NN_stage.py ...`, `python -m common.X ...`,
`python bench/X.py ...` and the script of `torchrun ... NN_stage.py ...` run as __main__ in
this process until they parse their flags (common.cli.parse_args, or argparse), and stop
there. So a renamed flag, file or module in a page fails here, and a command that needs GPUs
or downloads costs no more than its imports."""

import argparse
import importlib.util
import json
import re
import runpy
import shlex
import sys
import warnings
from functools import partial

import pytest
from conftest import ROOT

import common.cli
from common import UserError

FRONT = ROOT / "README.md"
PAGES = [FRONT, *sorted((ROOT / "docs").glob("*.md"))]  # whose commands are checked
LINKED = [*PAGES, ROOT / "BENCHMARKS.md"]  # whose links are checked
FENCE = re.compile(r"^ {0,3}(```|~~~)(\w*).*?^ {0,3}\1[ \t]*$", flags=re.M | re.S)
SHELLS = ("bash", "sh", "shell", "console")


def rel(path):
    return path.relative_to(ROOT).as_posix()


def without_code(text):
    """The text with fenced blocks and inline code blanked out (line numbers kept)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`]*`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def slug(heading):
    """GitHub's anchor for a heading: its text, lowercased, punctuation but - and _ dropped,
    each space a hyphen (`## Which HellaSwag number?` -> `which-hellaswag-number`)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    seen, found = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return found


def links():
    for page in LINKED:
        text = without_code(page.read_text())
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)", text):
            target = m.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # not http:, mailto:, ...
                yield page, text.count("\n", 0, m.start()) + 1, target


LINKS = list(links())


def test_the_pages_have_links_to_check():
    assert {page for page, _, _ in LINKS} >= set(PAGES)  # every page links somewhere
    assert any("#" in target for _, _, target in LINKS)


@pytest.mark.parametrize(
    ("page", "line", "target"), LINKS, ids=[f"{rel(p)}:{n}:{t}" for p, n, t in LINKS]
)
def test_relative_link_lands(page, line, target):
    file, _, anchor = target.partition("#")
    if not file:  # #anchor: a heading of this page
        dest = page
    elif file.startswith("/"):  # GitHub reads /path from the repository's root
        dest = ROOT / file.lstrip("/")
    else:
        dest = page.parent / file
    where = f"{rel(page)}:{line}: {target}"
    assert dest.exists(), f"{where}: no file {dest}"
    if anchor and dest.suffix == ".md":
        assert anchor in anchors(dest), f"{where}: {rel(dest)} has no heading #{anchor}"


def test_slug_follows_github():
    assert slug("Which HellaSwag number?") == "which-hellaswag-number"
    assert slug("One writer per `--out`") == "one-writer-per---out"
    assert slug("CPU-2: every stage, stage 05's table") == "cpu-2-every-stage-stage-05s-table"
    assert slug("metrics.jsonl") == "metricsjsonl"


def test_every_docs_page_is_reachable_from_the_front_page():
    linked = {target.partition("#")[0] for page, _, target in LINKS if page == FRONT}
    for page in PAGES[1:]:
        assert rel(page) in linked, f"README.md does not link {rel(page)}"


def test_the_front_page_reads_in_five_minutes():
    lines = FRONT.read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move reference text to docs/"


def commands():
    """(page, line, argv) for each shell command in a fenced bash/console block, and each
    inline `python ...` / `torchrun ... X.py` span outside the blocks (the tables' commands)."""
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(2) not in SHELLS:
                continue
            first = text.count("\n", 0, m.start()) + 1
            body, i = m.group(0).split("\n")[1:-1], 0
            while i < len(body):
                start, line = i, body[i]
                while line.endswith("\\") and i + 1 < len(body):  # continued on the next line
                    i += 1
                    line = line[:-1] + body[i]
                i += 1
                if m.group(2) == "console":  # `$ command`, then its output
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                for argv in split_commands(line):
                    yield page, first + 1 + start, argv
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for m in re.finditer(r"`((?:python3?|torchrun) [^`]+)`", prose):
            argv = shlex.split(" ".join(m.group(1).split()))
            if argv[0] == "torchrun" and not any(a.endswith(".py") for a in argv):
                continue  # a flag of torchrun's quoted in a sentence
            yield page, prose.count("\n", 0, m.start()) + 1, argv


def split_commands(line):
    """One shell line -> the argv of each command in it (`a && b; c`), comments and leading
    VAR=value assignments dropped."""
    out, argv = [], []
    for tok in shlex.split(line, comments=True) + ["&&"]:
        if tok in ("&&", "||", ";", "|"):
            while argv and re.match(r"^\w+=", argv[0]):
                argv.pop(0)
            if argv:
                out.append(argv)
            argv = []
        else:
            argv.append(tok)
    return out


COMMANDS = list(commands())


def test_the_pages_have_commands_to_check():
    kinds = {" ".join(argv[:2]) for _, _, argv in COMMANDS}
    assert {"python 00_model.py", "python -m", "torchrun --standalone"} <= kinds


class Parsed(Exception):
    """Raised where the command's program would start its work: its flags parsed."""


def parse_only(run, argv, monkeypatch, capsys):
    """Run `run()` (a script or module as __main__) with sys.argv = argv until it has parsed
    its flags; returns its error output if it refused them."""
    real_cli, inside = common.cli.parse_args, []
    real_argparse, real_known = (
        argparse.ArgumentParser.parse_args,
        argparse.ArgumentParser.parse_known_args,
    )
    in_parse_args = []  # parse_args calls parse_known_args, then refuses what is left over

    def cli_parse(Config, args=None):
        inside.append(1)
        try:
            cfg = real_cli(Config, args)
        finally:
            inside.pop()
        raise Parsed(cfg)

    def argparse_parse(self, args=None, namespace=None):
        in_parse_args.append(1)
        try:
            ns = real_argparse(self, args, namespace)
        finally:
            in_parse_args.pop()
        if inside:
            return ns
        raise Parsed(ns)

    def argparse_known(self, args=None, namespace=None):  # a script that passes the rest on
        found = real_known(self, args, namespace)
        if inside or in_parse_args:
            return found
        raise Parsed(found)

    monkeypatch.setattr(common.cli, "parse_args", cli_parse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", argparse_parse)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", argparse_known)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # parse_args sets its own
    try:
        run()
    except Parsed:
        return None
    except SystemExit as e:  # argparse: usage and the error on stderr
        return capsys.readouterr().err.strip() or f"exit {e.code}"
    except UserError as e:
        return f"error: {e}"
    return "ran to the end without parsing any flags"


def run_module(module):
    """`python -m module`: runs the module's code anew as __main__ (runpy warns that it was
    imported already, which is harmless here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".* found in sys.modules after import", RuntimeWarning)
        runpy.run_module(module, run_name="__main__", alter_sys=True)


def check_python(args, monkeypatch, capsys):
    """`python ARGS`: the problem with it, or None."""
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        if module == "pytest":
            files = [a for a in rest if a.startswith("tests/")]
            for f in files:
                if not (ROOT / f.split("::")[0]).is_file():
                    return f"no test file {f}"
            word = rest[rest.index("-k") + 1] if "-k" in rest else ""
            if files and word.isidentifier():  # `-k name`: some test's name holds it
                if not any(
                    re.search(rf"def test_\w*{word}", (ROOT / f).read_text()) for f in files
                ):
                    return f"-k {word} selects no test in {', '.join(files)}"
            return None
        if not module.startswith("common."):
            return None  # venv, pip: not ours
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        run = partial(run_module, module)
        return parse_only(run, [module, *rest], monkeypatch, capsys)
    if args[0] == "-c":
        return None
    script, rest = args[0], args[1:]
    if not (ROOT / script).is_file():
        return f"no file {script}"
    run = partial(runpy.run_path, str(ROOT / script), run_name="__main__")
    return parse_only(run, [script, *rest], monkeypatch, capsys)


@pytest.mark.parametrize(
    ("page", "line", "argv"), COMMANDS, ids=[f"{rel(p)}:{n}:{' '.join(a)}" for p, n, a in COMMANDS]
)
def test_command_runs_as_written(page, line, argv, monkeypatch, capsys):
    where = f"{rel(page)}:{line}: {shlex.join(argv)}"
    program, args = argv[0], argv[1:]
    if program in ("python", "python3") and args:
        problem = check_python(args, monkeypatch, capsys)
    elif program == "torchrun":
        from torch.distributed.run import get_args_parser

        try:
            ns = get_args_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: torchrun refuses it: {capsys.readouterr().err.strip()}")
        problem = check_python([ns.training_script, *ns.training_script_args], monkeypatch, capsys)
    elif program == "diff":
        problem = next((f"no file {a}" for a in args if not (ROOT / a).is_file()), None)
    elif program == "pip" and "-r" in args:
        req = args[args.index("-r") + 1]
        problem = None if (ROOT / req).is_file() else f"no file {req}"
    else:
        problem = None  # `.`, `pip install torch`, ...: nothing of ours to check
    assert problem is None, f"{where}: {problem}"


def test_generated_tables_are_those_of_the_stored_run():
    """README.md, docs/stages.md and BENCHMARKS.md hold, between their cpu-numbers markers,
    what bench/cpu_numbers.py renders from its last run (bench/cpu_numbers.json): nobody edited
    a number by hand, and --write finds every table where it now lives."""
    spec = importlib.util.spec_from_file_location("cpu_numbers", ROOT / "bench" / "cpu_numbers.py")
    cpu_numbers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_numbers)
    result = json.loads((ROOT / "bench" / "cpu_numbers.json").read_text())
    blocks = cpu_numbers.blocks(result)
    assert {rel(p) for p in blocks} == {"README.md", "docs/stages.md", "BENCHMARKS.md"}
    for path, block in blocks.items():
        text = path.read_text()
        assert text.count(cpu_numbers.BEGIN) == text.count(cpu_numbers.END) == 1, rel(path)
        shown = text.split(cpu_numbers.BEGIN)[1].split(cpu_numbers.END)[0].strip()
        assert shown == block, f"{rel(path)}: run `python bench/cpu_numbers.py --render-only`"
