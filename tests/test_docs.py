"""The README stays a five-minute read and the docs hold together.

* README.md has at most 300 lines; the rest lives in docs/*.md, every page linked from it.
* Every relative Markdown link of README.md and docs/*.md reaches a file and, for an
  ``#anchor`` into a Markdown file, one of its headings (GitHub's slugs).
* Every ``python -m orchestrator.<module> ...`` and ``make <target>`` in a fenced code block
  is known: make targets are the Makefile's; ``key=value`` keys are the ones the CLI accepts
  (taken from orchestrator/config.py, orchestrator/report/cli.py and orchestrator/data, not
  listed here); a ``--flag`` appears in ``python -m orchestrator.<module> --help``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 300
PYTHON = ROOT / ".venv" / "bin" / "python"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]+`")  # a code span may wrap onto the next line
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # link text may wrap too
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "2>&1", "<", "<<"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (no links live there)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped except hyphens and
    spaces (letters, digits and underscores stay), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return found


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def resolve(page: Path, target: str) -> tuple[Path, str]:
    file, _, anchor = target.partition("#")
    return ((page.parent / file).resolve() if file else page), anchor


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move a section to docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked here
        file, anchor = resolve(page, target)
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {rel(file)} (has: {', '.join(sorted(anchors(file)))})")
    assert not broken, f"{rel(page)}:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {resolve(README, t)[0] for t in links(README) if not SCHEME.match(t)}
    missing = [rel(p) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_slug_rule():
    assert slug("Fault → what happens") == "fault--what-happens"
    assert slug("Paper scale on CPU (`bench.paper_scale`)") == "paper-scale-on-cpu-benchpaper_scale"
    assert slug("One machine: a local head and `ray job submit`") == "one-machine-a-local-head-and-ray-job-submit"


# ------------------------------------------------------------------------- commands


def code_lines(path: Path) -> list[str]:
    """The lines of the fenced code blocks, backslash continuations joined."""
    lines = []
    for block in FENCE.finditer(path.read_text()):
        body = block.group(0).split("\n")[1:-1]
        pending = ""
        for line in body:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
        if pending:
            lines.append(pending)
    return lines


def words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # not shell (e.g. the body of a heredoc)
        return line.split("#", 1)[0].split()


def commands(path: Path) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """(``(module, arguments)`` of every ``python -m orchestrator.<module>``, the
    arguments of every ``make``) in ``path``'s code blocks."""
    python, make = [], []
    for line in code_lines(path):
        tokens = words(line)
        for i, token in enumerate(tokens):
            rest = tokens[i + 1:]
            end = next((j for j, t in enumerate(rest) if t in SHELL_OPERATORS), len(rest))
            at_start = i == 0 or tokens[i - 1] in SHELL_OPERATORS
            if re.fullmatch(r"(.*/)?python(3(\.\d+)?)?", token) and rest[:1] == ["-m"] and len(rest) > 1 \
                    and rest[1].startswith("orchestrator."):
                python.append((rest[1].removeprefix("orchestrator."), rest[2:end]))
            elif token == "make" and at_start:
                make.append(rest[:end])
    return python, make


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=[ \t]*(.*?)[ \t]*$", text, re.M))

    def expand(value: str, depth: int = 0) -> str:
        return value if depth > 5 else expand(re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), value), depth + 1)

    targets = set()
    for names in re.findall(r"^([^\s#=:][^=:\n]*):(?!=)", text, re.M):
        targets.update(expand(names).split())
    targets.discard(".PHONY")
    return targets


def sweep_keys() -> set[str]:
    from orchestrator.config import settings_keys

    return set(settings_keys())


def method_fields() -> set[str]:
    from methods import METHODS, get_method

    return {f.name for name in METHODS for f in dataclasses.fields(get_method(name).Config)}


def report_keys() -> set[str]:
    for name in ("orchestrator.report.cli", "orchestrator.report"):  # the CLI's module, or the package's
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        if hasattr(module, "KEYS"):
            return {*module.KEYS, "help"}
    raise AssertionError("no KEYS in orchestrator.report(.cli): where does the report CLI list its keys now?")


def data_cli():
    return importlib.import_module("orchestrator.data.__main__")


def unknown_key(module: str, key: str) -> str | None:
    """Why ``key=`` is not accepted by ``python -m orchestrator.<module>``, or None."""
    top = key.split(".", 1)[0]
    if module == "sweep":
        if key.startswith("method."):
            return None if key.split(".", 1)[1] in method_fields() else f"method.{key.split('.', 1)[1]} is no method's field"
        if top not in {k.split(".", 1)[0] for k in sweep_keys()}:
            return f"{top} is not a sweep key"
        return None if key in sweep_keys() else f"{key} is not a sweep key"
    if module == "report":
        return None if key in report_keys() else f"{key} is not a report key ({', '.join(sorted(report_keys()))})"
    if module == "data":
        cli = data_cli()
        if key.startswith("method."):
            return None if key.split(".", 1)[1] in method_fields() else f"{key} is no method's field"
        return None if key in sweep_keys() | set(cli.EXTRA_KEYS) else f"{key} is not a data CLI key"
    return f"tests/test_docs.py does not know the keys of orchestrator.{module}: teach it (unknown_key)"


@pytest.fixture(scope="module")
def help_output():
    """``python -m orchestrator.<module> --help`` (stdout + stderr, exit status), run once per module."""
    python = str(PYTHON if PYTHON.exists() else sys.executable)
    outputs: dict[str, tuple[str, int]] = {}

    def get(module: str) -> tuple[str, int]:
        if module not in outputs:
            done = subprocess.run([python, "-m", f"orchestrator.{module}", "--help"], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
            outputs[module] = (done.stdout + done.stderr, done.returncode)
        return outputs[module]

    return get


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_make_target_shown_exists(page):
    targets = makefile_targets()
    _, makes = commands(page)
    shown = [arg for args in makes for arg in args if not arg.startswith("-") and "=" not in arg]
    assert set(shown) <= targets, f"{rel(page)}: make targets not in the Makefile: {sorted(set(shown) - targets)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_orchestrator_command_shown_is_accepted(page, help_output):
    problems = []
    for module, args in commands(page)[0]:
        if not (ROOT / "orchestrator" / f"{module.replace('.', '/')}.py").exists() \
                and not (ROOT / "orchestrator" / module.replace(".", "/") / "__main__.py").exists():
            problems.append(f"orchestrator.{module}: no such module")
            continue
        positional = [a for a in args if "=" not in a and not a.startswith("-")]
        if module == "data":
            if positional[:1] and positional[0] not in data_cli().COMMANDS:
                problems.append(f"orchestrator.data {positional[0]}: not one of {data_cli().COMMANDS}")
            positional = positional[1:]
        problems += [f"orchestrator.{module} {a}: not key=value" for a in positional if a != "help"]
        for arg in args:
            if arg.startswith("-"):
                text, status = help_output(module)
                if not (arg in text or (arg in ("--help", "-h") and status == 0)):
                    problems.append(f"orchestrator.{module} {arg}: not in its --help (exit {status})")
            elif "=" in arg:
                why = unknown_key(module, arg.split("=", 1)[0])
                if why:
                    problems.append(f"orchestrator.{module} {arg}: {why}")
    assert not problems, f"{rel(page)}:\n" + "\n".join(problems)


def test_the_command_finder_sees_the_readme():
    python, makes = commands(README)
    assert ("sweep", ["ablation=transfusion_steps"]) in python  # `make run`'s sweep, shown first
    assert any(module == "report" for module, _ in python) and ["run"] in makes and ["test"] in makes
    assert {"run", "test", ".venv/.installed"} <= makefile_targets()
