"""The bad-input catalogue: every bad command line, search space or dataset ends in ONE
``error: ...`` line on stderr and exit status 2, before any training, before Ray starts
and before anything is written to MLflow or the model store.

Each case runs the sweep CLI in-process (``sweep.main``). A sweep that got past its checks
would import ``orchestrator.ray_backend`` / ``tracking`` / ``report``: the ``no_ray``
fixture replaces them by modules that fail the test on first use, so a missed check shows
up as a failure here rather than as a Ray start. Fake datasets are tiny MVTec-layout
trees in tmp_path; nothing needs the synthetic dataset.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import orchestrator
from orchestrator import sweep
from orchestrator.config import AUTO_KEYS, RANGES, Settings, build_settings
from orchestrator.data.__main__ import main as data_main
from orchestrator.errors import ConfigError
from orchestrator.plan import check_storage, plan
from orchestrator.search_space import SPACES_DIR

SIZE = 32


# --------------------------------------------------------------------------- fake trees


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def fake_mvtec(root: Path, *, size: int = SIZE, anomalous: bool = True, mask: bool = True, corrupt: bool = False) -> Path:
    """<root>/bottle: 6 train/good, 1 test/good and (``anomalous``) 1 test/broken image with
    its mask (unless ``mask`` is False); ``corrupt``: train/good/003.png is not a PNG."""
    rng = np.random.default_rng(0)
    folder = root / "bottle"
    for i in range(6):
        save_png(folder / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    save_png(folder / "test" / "good" / "000.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if anomalous:
        save_png(folder / "test" / "broken" / "000.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        if mask:
            block = np.zeros((size, size), np.uint8)
            block[size // 4 : size // 2, size // 4 : size // 2] = 255
            save_png(folder / "ground_truth" / "broken" / "000_mask.png", block)
    if corrupt:
        (folder / "train" / "good" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return root


# --------------------------------------------------------------------------- harness


class _Forbidden(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # introspection (inspect, pickle) walks sys.modules
            raise AttributeError(name)
        raise AssertionError(f"bad input got past the checks: {self.__name__}.{name} was used (Ray/MLflow would start)")


@pytest.fixture
def no_ray(monkeypatch):
    """Ray, MLflow and the report replaced by modules that fail on first use."""
    for name in ("ray_backend", "tracking", "report"):
        fake = _Forbidden(f"orchestrator.{name}")
        monkeypatch.setitem(sys.modules, f"orchestrator.{name}", fake)
        monkeypatch.setattr(orchestrator, name, fake, raising=False)


@dataclasses.dataclass
class Outputs:
    """Where a sweep would write: the model store / Ray storage and the SQLite MLflow store."""

    storage: Path
    db: Path
    cache: Path

    def tokens(self) -> list[str]:
        return [f"storage_path={self.storage}", f"tracking_uri=sqlite:///{self.db}", f"data.cache_dir={self.cache}"]

    def untouched(self) -> bool:
        return not self.storage.exists() and not self.db.exists()


@pytest.fixture
def outputs(tmp_path, cache_dir) -> Outputs:
    return Outputs(tmp_path / "storage", tmp_path / "mlflow.db", cache_dir)


def error_line(err: str) -> str:
    """The one ``error:`` line, which must be the last thing on stderr (progress bars may precede it)."""
    assert "Traceback" not in err, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0][len("error: "):]


def run_sweep(capsys, tokens: list[str]) -> str:
    capsys.readouterr()
    code = sweep.main(tokens)
    err = capsys.readouterr().err
    assert code == 2, err
    return error_line(err)


def write_space(folder: Path, name: str, text: str | None = None, **replace: str) -> Path:
    """A search-space YAML at ``folder/name``: a copy of transfusion_steps.yaml, or ``text``."""
    folder.mkdir(parents=True, exist_ok=True)
    body = (SPACES_DIR / "transfusion_steps.yaml").read_text() if text is None else text
    for old, new in replace.items():
        assert old in body
        body = body.replace(old, new)
    path = folder / name
    path.write_text(body)
    return path


# --------------------------------------------------------------------------- the catalogue

# (id, extra tokens built from (tmp_path, Outputs), substrings the message must contain).
# "{tree}" etc. are filled in by ``tokens_for``; the ablation defaults to transfusion_steps.
CASES = [
    ("unknown ablation", ["ablation=transfusion_stepz"], ["unknown ablation 'transfusion_stepz'", "did you mean transfusion_steps"]),
    ("unknown key", ["methd.steps=5"], ["unknown key 'methd.steps'", "did you mean method.steps"]),
    ("ill-typed method field", ["method.steps=abc"], ["method.steps", "abc"]),
    ("method field out of range", ["method.steps=-3"], ["steps must be >= 1", "-3"]),
    ("unknown scale", ["scale=huge"], ["unknown scale 'huge'", "smoke, paper"]),
    ("missing dataset root", ["dataset=mvtec_ad", "data.root=/nonexistent"], ["/nonexistent does not exist", "train/good"]),
    ("empty dataset root", ["dataset=mvtec_ad", "data.root={empty}"], ["no categories under", "train/good"]),
    ("unknown category", ["dataset=mvtec_ad", "data.root={tree}", "categories=[zebra]"], ["unknown category zebra", "valid: bottle"]),
    ("val_fraction out of range", ["data.val_fraction=1.5"], ["data.val_fraction must be in (0, 1)", "1.5"]),
    ("resume without a sweep", ["resume=true"], ["resume=true but no sweep transfusion_steps-synthetic-*", "without resume=true"]),
    ("corrupt PNG", ["dataset=mvtec_ad", "data.root={corrupt}"], ["corrupt or truncated image", "003.png"]),
    ("anomalous image without mask", ["dataset=mvtec_ad", "data.root={no_mask}"], ["has no mask", "000_mask.png"]),
    ("unknown dataset", ["dataset=mnist"], ["unknown dataset 'mnist'", "mvtec_ad"]),
    ("num_samples=0", ["num_samples=0"], ["num_samples must be >= 1", "got 0"]),
    ("trial.gpus=-1", ["trial.gpus=-1"], ["trial.gpus must be >= 0", "-1"]),
    ("trial.cpus=0", ["trial.cpus=0"], ["trial.cpus must be > 0", "got 0"]),
    ("trial.workers=0", ["trial.workers=0"], ["trial.workers must be >= 1", "got 0"]),
    ("max_concurrent=0", ["max_concurrent=0"], ["max_concurrent must be >= 1", "got 0"]),
    ("max_failures=-1", ["max_failures=-1"], ["max_failures must be >= 0", "got -1"]),
    ("eval_batch_size=0", ["eval_batch_size=0"], ["eval_batch_size must be >= 1", "got 0"]),
    ("latency_images=-1", ["latency_images=-1"], ["latency_images must be >= 1", "got -1"]),
    ("sample_maps=-1", ["sample_maps=-1"], ["sample_maps must be >= 0", "got -1"]),
    ("eval_every=-1", ["eval_every=-1"], ["eval_every must be >= 0", "got -1"]),
    ("seed=-1", ["seed=-1"], ["seed must be in [0, 2^32)", "got -1"]),
    ("malformed YAML", ["ablation={bad_yaml}"], ["not valid YAML at line 4", "my_space.yaml"]),
    ("unknown method field in a space", ["ablation={bad_field}"], ["'stepz' is not a transfusion config field", "bad_field.yaml"]),
    ("missing search-space file", ["ablation={missing_yaml}"], ["does not exist", "missing.yaml"]),
    ("no test anomalies", ["dataset=mvtec_ad", "data.root={only_good}"], ["mvtec_ad/bottle", "no anomalous", "need both classes",
                                                                          "categories=[...]"]),
    ("crop larger than the image", ["dataset=mvtec_ad", "data.root={tree}", "method.crop_size=100"], ["crop_size", "image_size=64", "100"]),
    ("storage under a file", ["storage_path={afile}/sub"], ["storage_path", "afile/sub", "Not a directory", "set storage_path="]),
    ("unreachable tracking server", ["tracking_uri=http://127.0.0.1:9"], ["tracking_uri http://127.0.0.1:9 is not reachable",
                                                                          "start the server or fix tracking_uri"]),
    ("tracking folder missing", ["tracking_uri=sqlite:///{tmp}/nowhere/mlflow.db"], ["nowhere does not exist"]),
    ("unreachable tracking database", ["tracking_uri=postgresql://mlflow:s3cret@127.0.0.1:9/mlflow"],
     ["tracking_uri postgresql://mlflow:***@127.0.0.1:9/mlflow", "cannot connect to the database", "start it or fix tracking_uri"]),
    ("unknown tracking scheme", ["tracking_uri=ftp://host/mlflow"], ["unknown scheme 'ftp'", "sqlite:////abs/mlflow.db"]),
    ("trial.gpus not a number", ["trial.gpus=many"], ["trial.gpus must be auto or a number", "many"]),
    ("max_concurrent not whole", ["max_concurrent=2.5"], ["max_concurrent must be auto or a whole number", "2.5"]),
    ("fractional workers", ["trial.workers=2.5"], ["trial.workers", "2.5", "Integer"]),
    ("categories not a list", ["categories=washer"], ["categories must be a list", "categories=[washer]"]),
    ("unknown foreground mode", ["data.foreground=maybe"], ["data.foreground 'maybe'", "auto, on, off"]),
]


def tokens_for(case_tokens: list[str], tmp_path: Path, out: Outputs) -> list[str]:
    """Fill the placeholders, building only the trees a case names."""
    builders = {
        "tmp": lambda: tmp_path,
        "tree": lambda: fake_mvtec(tmp_path / "tree"),
        "empty": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "corrupt": lambda: fake_mvtec(tmp_path / "corrupt", corrupt=True),
        "no_mask": lambda: fake_mvtec(tmp_path / "no_mask", mask=False),
        "only_good": lambda: fake_mvtec(tmp_path / "only_good", anomalous=False),
        "bad_yaml": lambda: write_space(tmp_path / "x", "my_space.yaml", "method: transfusion\naxes:\n  steps: {grid: [5, 10\nsearch: grid\n"),
        "bad_field": lambda: write_space(tmp_path / "x", "bad_field.yaml", **{"  steps: {grid:": "  stepz: {grid:"}),
        "missing_yaml": lambda: tmp_path / "x" / "missing.yaml",
        "afile": lambda: (tmp_path / "afile").write_text("a file, not a folder") and tmp_path / "afile",
    }
    filled = []
    for token in case_tokens:
        for name in re.findall(r"\{(\w+)\}", token):
            token = token.replace(f"{{{name}}}", str(builders[name]()))
        filled.append(token)
    ablation = [] if any(t.startswith("ablation=") for t in filled) else ["ablation=transfusion_steps"]
    return ablation + out.tokens() + filled


@pytest.mark.parametrize("case_tokens, expected", [pytest.param(t, e, id=i) for i, t, e in CASES])
def test_bad_input_is_one_error_line_and_nothing_written(case_tokens, expected, tmp_path, outputs, capsys, no_ray):
    tokens = tokens_for(case_tokens, tmp_path, outputs)
    message = run_sweep(capsys, tokens)
    for part in expected:
        assert part in message, message
    assert outputs.untouched(), f"{outputs} written by a failed start"


def test_database_password_never_printed(tmp_path, outputs, capsys, no_ray):
    message = run_sweep(capsys, ["ablation=transfusion_steps", *outputs.tokens(), "tracking_uri=postgresql://mlflow:s3cret@127.0.0.1:9/mlflow"])
    assert "s3cret" not in message and "***" in message


@pytest.mark.parametrize("tokens, expected", [
    (["tracking_uri=sqlite:///{tmp}/absent.db"], "no MLflow store at"),
    (["mlflow_ui_url=not-a-url"], "mlflow_ui_url 'not-a-url' is not an http(s) address"),
])
def test_the_report_refuses_a_missing_store_and_a_bad_ui_url(tokens, expected, tmp_path, empty_store, capsys):
    from orchestrator import report

    store = tmp_path / "mlflow.db"
    if "{tmp}" not in tokens[0]:
        shutil.copyfile(empty_store, store)
        tokens = [f"tracking_uri=sqlite:///{store}", *tokens]
    tokens = [t.replace("{tmp}", str(tmp_path)) for t in tokens]
    assert report.main(tokens) == 2
    assert expected in error_line(capsys.readouterr().err)
    assert not (tmp_path / "absent.db").exists()  # the report did not create an empty store


def test_storage_under_a_file_leaves_the_file_alone(tmp_path, outputs, capsys, no_ray):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    message = run_sweep(capsys, ["ablation=transfusion_steps", *outputs.tokens(), f"storage_path={afile}/sub/deeper"])
    assert str(afile / "sub" / "deeper") in message and afile.read_text() == "keep me"


def test_check_storage_probes_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    check_storage(target)  # creatable: fine, and removed again
    assert not (tmp_path / "a").exists()
    target.mkdir(parents=True)
    check_storage(target)
    assert list(target.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_storage(tmp_path / "file" / "x")


def test_every_numeric_setting_is_range_checked():
    def numeric(cls: type, prefix: str = "") -> list[str]:
        hints, keys = typing.get_type_hints(cls), []
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                keys += numeric(kind, f"{prefix}{f.name}.")
            elif typing.get_origin(kind) is not dict and {int, float} & set(typing.get_args(kind) or (kind,)):
                keys.append(prefix + f.name)
        return keys

    assert sorted(numeric(Settings) + list(AUTO_KEYS)) == sorted(RANGES)  # auto-or-number settings are typed Any
    build_settings({})  # the defaults are in range
    build_settings({"num_samples": 3, "trial.gpus": 0.5, "eval_every": 0, "sample_maps": 0, "seed": 2**32 - 1})


def test_search_space_given_as_a_path_plans(tmp_path, cache_dir):
    path = write_space(tmp_path / "x", "my_space.yaml")
    tree = fake_mvtec(tmp_path / "tree")
    sweep_plan = plan({"ablation": str(path), "dataset": "mvtec_ad", "data.root": str(tree), "data.cache_dir": str(cache_dir),
                       "storage_path": str(tmp_path / "storage")}, {})
    assert sweep_plan.space.name == "my_space" and sweep_plan.space.source == path.resolve()
    assert [p.label for p in sweep_plan.points] == ["steps=5", "steps=10", "steps=20", "steps=50"]
    assert sweep_plan.categories == ("bottle",) and not (tmp_path / "storage").exists()
    shutil.copy(path, tmp_path / "x" / "other.yml")  # .yml too
    assert plan({"ablation": str(tmp_path / "x" / "other.yml"), "dataset": "mvtec_ad", "data.root": str(tree),
                 "data.cache_dir": str(cache_dir)}, {}).space.name == "other"


# --------------------------------------------------------------------------- the data CLI


def run_data(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = data_main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return error_line(err)


def test_data_cli_unknown_dataset(capsys):
    assert "unknown dataset 'mnist'" in run_data(capsys, "verify", "dataset=mnist")


def test_data_cli_corrupt_png(tmp_path, capsys):
    root = fake_mvtec(tmp_path / "corrupt", corrupt=True)
    message = run_data(capsys, "verify", "dataset=mvtec_ad", f"data.root={root}")
    assert "corrupt or truncated image" in message and str(root / "bottle" / "train" / "good" / "003.png") in message


def test_data_cli_no_test_anomalies(tmp_path, capsys):
    root = fake_mvtec(tmp_path / "only_good", anomalous=False)
    assert "mvtec_ad/bottle: the test split has 1 image(s) but no anomalous one" in run_data(capsys, "verify", "dataset=mvtec_ad",
                                                                                             f"data.root={root}")
