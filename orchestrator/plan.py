"""A sweep's plan: what will run, with every method config resolved once — no Ray, no MLflow.

``plan(values, method_overrides)`` turns the command line and the search space into a
:class:`SweepPlan`: the settings, the categories, the data spec, the default method
config and, for grid searches, every valid point with its resolved config (invalid ones
are listed, never silently dropped). Trials look their config up here by point label;
an Optuna trial resolves its sampled values once.

Before the dataset is touched, ``plan`` also checks where the sweep will write:
``storage_path`` writable (probed, nothing left behind; ``data.cache_dir`` is not probed,
as a complete cache may be read-only), an http(s) ``tracking_uri`` answering (one GET,
5 s) or a SQLite one's folder present, and for ``resume=true`` an earlier sweep to
resume. Bad input thus fails here, in one :class:`ConfigError` line, before Ray starts
or MLflow is written.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods import get_method
from methods.base import MethodConfig, field_docs
from orchestrator import search_space as spaces
from orchestrator.config import Settings, build_settings, redact_uri, resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.errors import ConfigError
from orchestrator.storage import REMOTE_SCHEMES, Storage, is_remote
from orchestrator.store import ModelKey, model_key
from orchestrator.training import EvaluationSettings


@dataclass(frozen=True)
class Point:
    """One grid row: its label (a condition name, ``axis=value, ...``, or in a benchmark
    the method's name), its method and its resolved config."""

    label: str
    method: str
    overrides: dict[str, Any]
    config: MethodConfig


@dataclass(frozen=True)
class SweepPlan:
    space: spaces.SearchSpace
    settings: Settings
    scale: str
    categories: tuple[str, ...]
    method_overrides: dict[str, Any]  # method.* from the command line
    data: DataSpec
    evaluation: EvaluationSettings
    default_config: MethodConfig  # the method config with no axis value applied
    points: tuple[Point, ...]  # grid searches: the valid points; Optuna: empty
    skipped: tuple[str, ...]  # grid points whose config is invalid, with the reason

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods the sweep runs: a benchmark's several, else the space's one."""
        return self.space.methods or (self.space.method,)

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """(metric, mode) pairs the search optimises: ``objectives=`` or the space's metric."""
        names = self.settings.objectives or [self.space.metric]
        return tuple((n, spaces.SPEED_OBJECTIVES.get(n, self.space.mode if n == self.space.metric else "max")) for n in names)

    @property
    def per_category_trials(self) -> bool:
        """Grid searches of a per-category method run one trial per (point, category); a
        benchmark runs one trial per method, over all categories."""
        return self.space.search == "grid" and not self.space.is_benchmark and not get_method(self.space.method).multi_class

    @property
    def training_seeds(self) -> tuple[int, ...]:
        """``seeds=N`` repeats every point under N training seeds; the data split keeps ``seed``."""
        return tuple(range(self.settings.seed, self.settings.seed + self.settings.seeds))

    def train_seed(self, trial_config: dict[str, Any]) -> int:
        """The training (and prediction) seed of a trial."""
        return int(trial_config.get("train_seed", self.settings.seed))

    def method_of(self, trial_config: dict[str, Any]) -> str:
        """The method a Tune trial config runs (a benchmark's point names it)."""
        if "point" in trial_config:
            return next(p.method for p in self.points if p.label == trial_config["point"])
        return self.space.method

    def method_config(self, trial_config: dict[str, Any]) -> MethodConfig:
        """The method config a Tune trial config stands for."""
        if "point" in trial_config:
            return next(p.config for p in self.points if p.label == trial_config["point"])
        return self.resolve({a.name: trial_config[a.name] for a in self.space.axes})  # Optuna: one value per axis

    def resolve(self, axis_overrides: dict[str, Any]) -> MethodConfig:
        return resolve_config(self.space, self.space.method, self.scale, self.method_overrides, self.categories, axis_overrides)

    def model_groups(self, trial_config: dict[str, Any]) -> list[list[str]]:
        """The models a trial needs: one over all categories (multi-class), else one per
        category — the trial's own category in a per-category grid, or every category."""
        if get_method(self.method_of(trial_config)).multi_class:
            return [list(self.categories)]
        if "category" in trial_config:
            return [[trial_config["category"]]]
        return [[c] for c in self.categories]

    def model_key(self, method: str, config: MethodConfig, categories: list[str], train_seed: int) -> ModelKey:
        return model_key(method, config, self.data, categories, self.settings.trial.workers, train_seed)

    def grid_trials(self) -> list[dict[str, Any]]:
        """A grid search's trial configs, as Tune will expand them (Optuna: empty)."""
        trials: list[dict[str, Any]] = [{"point": p.label} for p in self.points]
        if self.per_category_trials:
            trials = [{**t, "category": c} for t in trials for c in self.categories]
        if len(self.training_seeds) > 1:
            trials = [{**t, "train_seed": seed} for t in trials for seed in self.training_seeds]
        return trials

    def pretrain_models(self) -> list[tuple[str, MethodConfig, list[str], int]]:
        """(method, config, categories, training seed) of the models to train in parallel
        before any trial starts: those trials would otherwise train one after another
        (a trial needing one model per category trains them in a row). Known in advance
        for grids, and for Optuna spaces whose axes are all inference-only (every trial
        then shares the default training config). Empty when each trial needs one model:
        Tune's own trial parallelism covers that."""
        if not self.settings.reuse_models:
            return []
        if self.space.search == "grid":
            trials = self.grid_trials()
        elif any(field_docs(get_method(self.space.method).Config)[a.name][0] for a in self.space.axes):
            return []  # Optuna samples training fields: the models are not known before the trials
        else:
            trials = [{}]
        if all(len(self.model_groups(t)) <= 1 for t in trials):
            return []
        models: dict[str, tuple[str, MethodConfig, list[str], int]] = {}
        for t in trials:
            method, config, seed = self.method_of(t), self.method_config(t) if t else self.default_config, self.train_seed(t)
            for group in self.model_groups(t):
                models.setdefault(self.model_key(method, config, group, seed).key, (method, config, group, seed))
        return list(models.values())

    def describe(self) -> list[str]:
        """What the sweep would run, for ``dry_run=true``: nothing is started or written."""
        s, space = self.settings, self.space
        t = s.trial
        lines = [f"sweep {space.name}: {', '.join(self.methods)} on {s.dataset} ({self.scale} scale), "
                 f"{len(self.categories)} categor{'y' if len(self.categories) == 1 else 'ies'}: {', '.join(self.categories)}"]
        if space.search == "grid":
            trials = self.grid_trials()
            keys = {self.model_key(self.method_of(c), self.method_config(c), group, self.train_seed(c)).key
                    for c in trials for group in self.model_groups(c)}
            lines.append(f"trials: {len(trials)} (grid: {len(self.points)} points"
                         + (" x categories" if self.per_category_trials else "")
                         + (f" x {len(self.training_seeds)} seeds" if len(self.training_seeds) > 1 else "") + ")")
            lines.append(f"trainings: {len(keys)} distinct models (other trials reuse a stored one)")
        else:
            samples = s.num_samples or space.num_samples
            docs = field_docs(get_method(space.method).Config)
            trained = [a.name for a in space.axes if docs[a.name][0]]
            groups = len(self.model_groups({}))
            lines.append(f"trials: {samples} (Optuna TPE on {space.metric}, {space.mode})")
            lines.append(f"trainings: up to {samples * groups} (axes {', '.join(trained)} change the trained model)" if trained
                         else f"trainings: {groups} (every axis is inference-only: "
                              + ("one model over all categories" if get_method(space.method).multi_class else "one model per category")
                              + ", shared by all trials)")
        lines.append(f"per trial: {t.workers} Train worker(s) x {t.cpus} CPU" + (f" + {t.gpus} GPU" if t.gpus else "")
                     + f"; at most {s.max_concurrent} trials at once" + (f"; ASHA {space.asha}" if space.asha else ""))
        lines.append(f"storage: {redact_uri(s.storage_path)} (Tune/Train state, model store, evaluations, sample maps)")
        lines.append(f"tracking: {redact_uri(s.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///<cwd>/mlflow.db')}")
        lines.append(f"data: {s.dataset} at {s.data.root or 'the embedded synthetic data'}, cache {s.data.cache_dir}, "
                     f"validation fraction {s.data.val_fraction}, split seed {s.seed}")
        lines += [f"skipped grid point {reason}" for reason in self.skipped]
        return lines


def resolve_config(space: spaces.SearchSpace, method: str, scale: str, method_overrides: dict[str, Any], categories: tuple[str, ...],
                   axis_overrides: dict[str, Any]) -> MethodConfig:
    """Paper defaults <- scale preset <- the space's fixed block <- method.* from the
    command line <- what the categories set (multi-class) <- the point's axis values.
    In a benchmark, ``method.*`` fields apply to the methods that have them."""
    cls = get_method(method)
    if space.is_benchmark:
        method_overrides = {k: v for k, v in method_overrides.items() if k in field_docs(cls.Config)}
    return resolve_method_config(method, scale, space.fixed, method_overrides, cls.category_overrides(categories), axis_overrides)


def check_benchmark_overrides(space: spaces.SearchSpace, method_overrides: dict[str, Any]) -> None:
    """A benchmark applies each ``method.*`` field to the methods that have it; one that
    no compared method has is a typo."""
    known = {name for m in space.methods for name in field_docs(get_method(m).Config)}
    unknown = sorted(k for k in method_overrides if k not in known)
    if unknown:
        raise ConfigError(f"unknown key 'method.{unknown[0]}': none of {', '.join(space.methods)} has it; "
                          f"valid: {', '.join('method.' + k for k in sorted(known))}")


def point_label(space: spaces.SearchSpace, index: int, overrides: dict[str, Any]) -> str:
    if space.is_benchmark:
        return space.point_method(overrides)[0]
    if space.conditions:
        return space.condition_names()[index]
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def settings_for(space: spaces.SearchSpace, values: dict[str, Any]) -> Settings:
    """The search space's defaults (dataset, scale, categories, trial resources) under the
    command line. A space's ``categories`` are for its own dataset only."""
    base: dict[str, Any] = {"method": space.method, "dataset": space.dataset, "scale": space.scale, "trial": space.trial}
    if "method" in values and space.is_benchmark:
        raise ConfigError(f"{space.name} runs each of {', '.join(space.methods)}; drop method={values['method']} or pick the method's own ablation")
    if "method" in values and values["method"] != space.method:
        raise ConfigError(f"ablation {space.name} is for method {space.method}; drop method={values['method']} or pick another ablation")
    if space.categories and values.get("dataset", space.dataset) == space.dataset:
        base["categories"] = list(space.categories)
    return build_settings(values, base)


def resolve_categories(settings: Settings, data: DataSpec) -> list[str]:
    found = data.categories()
    if not settings.categories:
        return found
    unknown = [c for c in settings.categories if c not in found]
    if unknown:
        raise ConfigError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {settings.dataset}; valid: {', '.join(found)}")
    return list(settings.categories)


def check_storage(path: str | Path, key: str = "storage_path") -> None:
    """Check that ``path`` is (or can become) a folder we can write in, leaving nothing
    behind: missing folders are created for a probe file and removed again, so a sweep
    that stops later on bad input has not created its storage."""
    if "://" in str(path):
        if not is_remote(path):
            raise ConfigError(f"{key} {path}: unknown scheme; use a folder or one of {', '.join(REMOTE_SCHEMES)}")
        Storage(path).probe()  # the bucket answers, with these credentials, and takes a write
        return
    folder = Path(path).resolve()
    created: list[Path] = []
    try:
        for parent in reversed([folder, *folder.parents]):
            if not parent.exists():
                parent.mkdir()
                created.append(parent)
        probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
        raise ConfigError(f"{key} {path} is not a writable folder ({reason}); set {key}= to a folder you can write to") from None
    finally:
        for made in reversed(created):
            try:
                made.rmdir()
            except OSError:
                pass  # someone else has put something there meanwhile: keep it


def check_tracking_uri(uri: str | None) -> None:
    """An MLflow server must answer before anything starts (MLflow itself would retry
    for minutes, after Ray had started); a SQLite store needs its folder. No MLflow here:
    one plain GET of ``<uri>/health`` with a 5 s timeout."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return  # the default ./mlflow.db
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            return  # it answered (a server or proxy without /health): reachable
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(f"tracking_uri {redact_uri(uri)} is not reachable ({reason}); start the server or fix tracking_uri") from None
    elif scheme == "sqlite":
        database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if database and database != ":memory:" and not Path(database).resolve().parent.is_dir():
            raise ConfigError(f"tracking_uri {uri}: folder {Path(database).resolve().parent} does not exist; create it or fix tracking_uri")


def sweep_prefix(ablation: str, dataset: str) -> str:
    """Sweep folders and names start with this; ``resume=true`` restores the latest."""
    return f"{ablation}-{dataset}"


def check_objectives(space: spaces.SearchSpace, settings: Settings) -> None:
    """``objectives=[...]``: a multi-objective Optuna search. The space's own metric comes
    first (it stays the selection metric of every report); the others are validation
    metrics or a speed (``images_per_second``, ``latency_ms``), and a speed is only
    measured alone (``max_concurrent=1``): concurrent trials would time each other."""
    objectives = list(settings.objectives)
    if not objectives:
        return
    if space.search != "optuna":
        raise ConfigError(f"objectives= steers an Optuna search and {space.name} is a {space.search} search (it evaluates every point); drop objectives=")
    if space.asha:
        raise ConfigError(f"objectives= cannot be combined with {space.name}'s ASHA scheduler (it stops trials on one metric); drop objectives=")
    valid = [*spaces.METRICS, *spaces.SPEED_OBJECTIVES]
    unknown = [o for o in objectives if o not in valid]
    if unknown:
        raise ConfigError(f"unknown objective {unknown[0]!r}; valid: {', '.join(valid)} (tuning never looks at the test split)")
    if len(set(objectives)) != len(objectives) or len(objectives) < 2:
        raise ConfigError(f"objectives={objectives} needs two or more distinct objectives; for one, drop objectives= (the space's metric is used)")
    if objectives[0] != space.metric:
        raise ConfigError(f"objectives= must start with {space.name}'s selection metric {space.metric}, e.g. objectives=[{space.metric},images_per_second]")
    timed = [o for o in objectives if o in spaces.SPEED_OBJECTIVES]
    if timed and settings.max_concurrent != 1:
        raise ConfigError(f"objective {timed[0]} is timed, and {settings.max_concurrent} trials at once would time each other; add max_concurrent=1")


def check_resume(space: spaces.SearchSpace, settings: Settings) -> None:
    """``resume=true`` needs an earlier sweep of this ablation and dataset under storage_path
    (the sweep checks that Tune can restore it, once Ray is imported)."""
    if not settings.resume:
        return
    storage = Storage(settings.storage_path)
    prefix = sweep_prefix(space.name, settings.dataset)
    if not any(e.path.rsplit("/", 1)[-1].startswith(f"{prefix}-") for e in storage.list("sweeps")):
        raise ConfigError(f"resume=true but no sweep {prefix}-* under {storage.join('sweeps')} to restore; run without resume=true")


def plan(values: dict[str, Any], method_overrides: dict[str, Any]) -> SweepPlan:
    """Everything a sweep will run, checked before anything starts."""
    space = spaces.load(values["ablation"])
    settings = settings_for(space, values)
    scale = settings.scale or space.scale
    if settings.seeds > 1 and space.search != "grid":
        raise ConfigError(f"seeds={settings.seeds} repeats grid points, and {space.name} is an Optuna search; "
                          "drop seeds= (or sweep the chosen point with a grid space)")
    check_objectives(space, settings)
    check_storage(settings.storage_path)
    check_resume(space, settings)
    check_tracking_uri(settings.tracking_uri)
    data = settings.data_spec()
    categories = tuple(resolve_categories(settings, data))
    if space.is_benchmark:
        check_benchmark_overrides(space, method_overrides)
    default_config = resolve_config(space, space.method, scale, method_overrides, categories, {})
    points, skipped = [], []
    if space.search == "grid":
        for i, point in enumerate(space.grid_points()):
            method, overrides = space.point_method(point)
            label = point_label(space, i, point)
            try:
                points.append(Point(label, method, overrides, resolve_config(space, method, scale, method_overrides, categories, overrides)))
            except ConfigError as exc:
                skipped.append(f"{label}: {exc}")
        if not points:
            raise ConfigError(f"every grid point of {space.name} is invalid: {'; '.join(skipped)}")
    return SweepPlan(space, settings, scale, categories, dict(method_overrides), data, settings.evaluation(),
                     default_config, tuple(points), tuple(skipped))
