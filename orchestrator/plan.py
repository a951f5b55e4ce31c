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

import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods import get_method
from methods.base import MethodConfig
from orchestrator import search_space as spaces
from orchestrator.config import Settings, build_settings, resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.errors import ConfigError
from orchestrator.store import ModelKey, model_key
from orchestrator.training import EvaluationSettings


@dataclass(frozen=True)
class Point:
    """One grid row: its label (a condition name, or ``axis=value, ...``) and its config."""

    label: str
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
    def method(self) -> str:
        return self.space.method

    @property
    def multi_class(self) -> bool:
        return get_method(self.method).multi_class

    @property
    def per_category_trials(self) -> bool:
        """Grid searches of per-category methods run one trial per (point, category)."""
        return self.space.search == "grid" and not self.multi_class

    def method_config(self, trial_config: dict[str, Any]) -> MethodConfig:
        """The method config a Tune trial config stands for."""
        if "point" in trial_config:
            return next(p.config for p in self.points if p.label == trial_config["point"])
        return self.resolve({a.name: trial_config[a.name] for a in self.space.axes})  # Optuna: one value per axis

    def resolve(self, axis_overrides: dict[str, Any]) -> MethodConfig:
        return resolve_config(self.space, self.scale, self.method_overrides, self.categories, axis_overrides)

    def model_groups(self, trial_config: dict[str, Any]) -> list[list[str]]:
        """The models a trial needs: one over all categories (multi-class), else one per
        category — the trial's own category in a per-category grid, or every category."""
        if self.multi_class:
            return [list(self.categories)]
        if "category" in trial_config:
            return [[trial_config["category"]]]
        return [[c] for c in self.categories]

    def model_key(self, config: MethodConfig, categories: list[str]) -> ModelKey:
        return model_key(self.method, config, self.data, categories, self.settings.trial.workers)


def resolve_config(space: spaces.SearchSpace, scale: str, method_overrides: dict[str, Any], categories: tuple[str, ...],
                   axis_overrides: dict[str, Any]) -> MethodConfig:
    """Paper defaults <- scale preset <- the space's fixed block <- method.* from the
    command line <- what the categories set (multi-class) <- the point's axis values."""
    cls = get_method(space.method)
    return resolve_method_config(space.method, scale, space.fixed, method_overrides, cls.category_overrides(categories), axis_overrides)


def point_label(space: spaces.SearchSpace, index: int, overrides: dict[str, Any]) -> str:
    if space.conditions:
        return space.condition_names()[index]
    return ", ".join(f"{k}={v}" for k, v in overrides.items())


def settings_for(space: spaces.SearchSpace, values: dict[str, Any]) -> Settings:
    """The search space's defaults (dataset, scale, categories, trial resources) under the
    command line. A space's ``categories`` are for its own dataset only."""
    base: dict[str, Any] = {"method": space.method, "dataset": space.dataset, "scale": space.scale, "trial": space.trial}
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
        return  # a remote URI (s3://...): not probed from here
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
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(f"tracking_uri {uri} is not reachable ({reason}); start the server or fix tracking_uri") from None
    elif scheme == "sqlite":
        database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if database and database != ":memory:" and not Path(database).resolve().parent.is_dir():
            raise ConfigError(f"tracking_uri {uri}: folder {Path(database).resolve().parent} does not exist; create it or fix tracking_uri")


def sweep_prefix(ablation: str, dataset: str) -> str:
    """Sweep folders and names start with this; ``resume=true`` restores the latest."""
    return f"{ablation}-{dataset}"


def check_resume(space: spaces.SearchSpace, settings: Settings) -> None:
    """``resume=true`` needs an earlier sweep of this ablation and dataset under storage_path
    (the sweep checks that Tune can restore it, once Ray is imported)."""
    sweeps_root = Path(settings.storage_path).resolve() / "sweeps"
    prefix = sweep_prefix(space.name, settings.dataset)
    if settings.resume and not any(p.is_dir() for p in sweeps_root.glob(f"{prefix}-*")):
        raise ConfigError(f"resume=true but no sweep {prefix}-* under {sweeps_root} to restore; run without resume=true")


def plan(values: dict[str, Any], method_overrides: dict[str, Any]) -> SweepPlan:
    """Everything a sweep will run, checked before anything starts."""
    space = spaces.load(values["ablation"])
    if space.is_benchmark:  # reports and leaderboards read them; sweeping several methods at once is not built yet
        raise ConfigError(f"{space.name} compares several methods, and a sweep runs one method so far; "
                          f"run each method's own ablation on {space.dataset} instead (e.g. ablation={space.methods[0]}_steps dataset={space.dataset})")
    settings = settings_for(space, values)
    scale = settings.scale or space.scale
    check_resume(space, settings)
    check_storage(settings.storage_path)
    check_tracking_uri(settings.tracking_uri)
    data = settings.data_spec()
    categories = tuple(resolve_categories(settings, data))
    default_config = resolve_config(space, scale, method_overrides, categories, {})
    points, skipped = [], []
    if space.search == "grid":
        for i, overrides in enumerate(space.grid_points()):
            label = point_label(space, i, overrides)
            try:
                points.append(Point(label, overrides, resolve_config(space, scale, method_overrides, categories, overrides)))
            except ConfigError as exc:
                skipped.append(f"{label}: {exc}")
        if not points:
            raise ConfigError(f"every grid point of {space.name} is invalid: {'; '.join(skipped)}")
    return SweepPlan(space, settings, scale, categories, dict(method_overrides), data, settings.evaluation(),
                     default_config, tuple(points), tuple(skipped))
