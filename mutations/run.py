"""Mutation testing of the paper equations: does some test fail when an equation is broken?

    python -m mutations.run                       # every mutations/<method>.yaml
    python -m mutations.run --method transfusion  # one file
    python -m mutations.run --id ssim-dropped     # one entry (any file)
    python -m mutations.run -j 2                  # two mutations at a time

Each ``mutations/<method>.yaml`` is a list of entries

    - id: short-name
      file: methods/transfusion.py
      find: "exact source text"       # must occur exactly once in the file
      replace: "mutated text"
      tests: [tests/test_transfusion_equations.py]
      why: "what equation it breaks"

For each entry the repository's code (methods/, orchestrator/, tests/, search_spaces/,
bench/, pyproject.toml, conftest files) is copied to a temporary folder, the replacement
is applied there, and ``python -m pytest -x -q -p no:cacheprovider <tests>`` runs in that
folder with this interpreter. The mutation is *caught* when a test fails (pytest exit 1);
a run that times out, or that cannot import or collect the tests (exit 2 or 3: the
mutation broke the code, no assertion judged it), is *not* caught. The project is
installed in editable mode (a meta-path finder pointing at the checkout), so the copy is
put first on PYTHONPATH and run from its own folder; a sanity check proves once that the
copy is what gets imported (an unmutated copy imports from itself and passes the tests, a
copy with a broken ``methods/__init__.py`` fails to import). The last line reads
"N caught, M survived, K timed out of T" (", E errored" added when a run could not import
or collect). Exit status 1 if any mutation survived, timed out or errored, 2 on a malformed
entry or a failed sanity check.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# What a test run needs; never .venv, .cache, mlruns, reports or bench wheels.
COPIED = ("methods", "orchestrator", "tests", "search_spaces", "bench", "pyproject.toml", "conftest.py")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "wheels", "*.whl")
KEYS = {"id", "file", "find", "replace", "tests", "why"}


class MutationError(Exception):
    """A malformed mutation file or entry (exit status 2)."""


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
    source: str  # the YAML file it came from


class Verdict(str, Enum):
    """How a mutated copy's test run ended; only CAUGHT means a test assertion judged it."""

    CAUGHT = "caught"  # pytest exit 1: a test failed
    SURVIVED = "SURVIVED"  # pytest exit 0: every test passed on the mutated code
    TIMEOUT = "TIMEOUT"  # killed after --timeout seconds: nothing was judged
    ERROR = "ERROR"  # pytest exit 2/3: the tests could not be imported or collected


@dataclass(frozen=True)
class Outcome:
    mutation: Mutation
    verdict: Verdict
    seconds: float

    @property
    def caught(self) -> bool:
        return self.verdict is Verdict.CAUGHT


def load(path: Path) -> list[Mutation]:
    """The entries of one mutations/<method>.yaml, each checked against the source tree."""
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list):
        raise MutationError(f"{path.name}: expected a YAML list of mutations")
    out = []
    for i, e in enumerate(entries):
        where = f"{path.name} entry {i + 1}"
        if not isinstance(e, dict) or set(e) != KEYS:
            got = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise MutationError(f"{where}: needs exactly the keys {sorted(KEYS)}, got {got}")
        where = f"{path.name} entry {e['id']!r}"
        target = ROOT / e["file"]
        if not target.is_file():
            raise MutationError(f"{where}: file {e['file']} does not exist")
        count = target.read_text().count(e["find"])
        if count != 1:
            raise MutationError(f"{where}: 'find' must occur exactly once in {e['file']}, found {count} times")
        if e["find"] == e["replace"]:
            raise MutationError(f"{where}: 'replace' equals 'find'")
        tests = tuple(e["tests"]) if isinstance(e["tests"], list) else ()
        if not tests or any(not (ROOT / t.split("::")[0]).is_file() for t in tests):
            raise MutationError(f"{where}: 'tests' must be a non-empty list of existing test files, got {e['tests']}")
        out.append(Mutation(str(e["id"]), e["file"], e["find"], e["replace"], tests, str(e["why"]), path.name))
    return out


def copy_tree(dest: Path) -> None:
    """Copy what the tests need into ``dest``."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        elif src.is_file():
            shutil.copy2(src, dest / name)


def environment(copy: Path) -> dict[str, str]:
    """The copy first on sys.path (ahead of the editable install's finder, which only
    answers when no sys.path entry has the package); no stale bytecode written."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def pytest_command(tests: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]


def run_in_copy(mutation: Mutation | None, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str]:
    """Run ``tests`` in a fresh copy, with ``mutation`` applied if given.
    Returns (pytest exit status or None on timeout, output tail)."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        if mutation is not None:
            target = copy / mutation.file
            text = target.read_text()
            target.write_text(text.replace(mutation.find, mutation.replace, 1))
        try:
            done = subprocess.run(pytest_command(tests), cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, ""
        return done.returncode, (done.stdout + done.stderr)[-2000:]


def run_mutation(mutation: Mutation, timeout: float) -> Outcome:
    start = time.monotonic()
    code, output = run_in_copy(mutation, mutation.tests, timeout)
    seconds = time.monotonic() - start
    if code in (4, 5):  # pytest usage error / no tests collected: the entry is broken, not caught
        raise MutationError(f"{mutation.source} entry {mutation.id!r}: pytest could not run {list(mutation.tests)} (exit {code}):\n{output}")
    if code is None:
        return Outcome(mutation, Verdict.TIMEOUT, seconds)
    verdict = {0: Verdict.SURVIVED, 1: Verdict.CAUGHT}.get(code, Verdict.ERROR)
    if verdict is Verdict.ERROR:
        print(f"{mutation.id}: pytest exit {code} (import/collection error or internal error):\n{output}", file=sys.stderr)
    return Outcome(mutation, verdict, seconds)


def sanity_check(tests: tuple[str, ...], timeout: float) -> None:
    """Prove once that a run imports the copy, not the checkout: (1) the copy's
    ``methods`` and ``orchestrator`` resolve inside the copy, (2) the unmutated tests pass
    there (else every mutation would look caught), (3) a copy whose ``methods/__init__.py``
    raises fails to import."""
    probe = "import methods, orchestrator, sys; print(methods.__file__); print(orchestrator.__file__)"
    with tempfile.TemporaryDirectory(prefix="mutation-sanity-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=120)
        files = out.stdout.split()
        if out.returncode != 0 or len(files) != 2 or not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in files):
            raise MutationError(f"sanity check: the copy is not what gets imported ({out.stdout.strip()} {out.stderr.strip()[-300:]})")
        init = copy / "methods" / "__init__.py"
        init.write_text(init.read_text() + '\nraise ImportError("mutation runner sanity probe")\n')
        broken = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=120)
        if broken.returncode == 0 or "sanity probe" not in broken.stderr:
            raise MutationError("sanity check: a broken methods/__init__.py in the copy still imported; the checkout is being used")
    start = time.monotonic()
    code, output = run_in_copy(None, tests, timeout)
    if code != 0:
        raise MutationError(f"sanity check: the unmutated tests fail (exit {code}), so no mutation can be judged:\n{output}")
    print(f"sanity: the copy is imported, a broken copy fails, unmutated tests pass ({time.monotonic() - start:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mutations.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", help="run only mutations/<method>.yaml")
    parser.add_argument("--id", help="run only the entry with this id")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutations run in parallel (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300); a timeout is not caught")
    parser.add_argument("--no-sanity", action="store_true", help="skip the one-off check that the copy is what gets imported")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"-j must be >= 1, got {args.jobs}")
    try:
        files = sorted(HERE.glob("*.yaml"))
        if args.method:
            files = [f for f in files if f.stem == args.method]
            if not files:
                raise MutationError(f"no mutations/{args.method}.yaml; valid: {', '.join(f.stem for f in sorted(HERE.glob('*.yaml')))}")
        mutations = [m for f in files for m in load(f)]
        ids = [m.id for m in mutations]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise MutationError(f"duplicate mutation ids: {', '.join(duplicates)}")
        if args.id:
            mutations = [m for m in mutations if m.id == args.id]
            if not mutations:
                raise MutationError(f"no mutation with id {args.id!r}")
        if not mutations:
            raise MutationError("no mutations to run")
        if not args.no_sanity:
            sanity_check(tuple(dict.fromkeys(t for m in mutations for t in m.tests)), args.timeout)
        outcomes = []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for outcome in pool.map(lambda m: run_mutation(m, args.timeout), mutations):
                m = outcome.mutation
                print(f"{m.id:<32} {outcome.verdict.value:<8} {outcome.seconds:6.1f}s  {m.file}: {m.why}", flush=True)
                outcomes.append(outcome)
    except MutationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(outcomes))
    return 0 if all(o.caught for o in outcomes) else 1


def summary(outcomes: list[Outcome]) -> str:
    """"N caught, M survived, K timed out of T" (+ ", E errored" when any did)."""
    count = Counter(o.verdict for o in outcomes)
    errored = f", {count[Verdict.ERROR]} errored" if count[Verdict.ERROR] else ""
    return (f"{count[Verdict.CAUGHT]} caught, {count[Verdict.SURVIVED]} survived, {count[Verdict.TIMEOUT]} timed out{errored} "
            f"of {len(outcomes)}")


if __name__ == "__main__":
    if __package__ in (None, ""):  # python mutations/run.py
        sys.path.insert(0, str(ROOT))
    sys.exit(main())
