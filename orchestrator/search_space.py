"""Search spaces: ``search_spaces/<name>.yaml``, data not code, validated on load.

A space names a method and either ``axes`` (a cartesian grid, or Optuna distributions)
or named ``conditions`` (rows such as "w/o PE", each a set of method-field overrides).
See search_spaces/README.md for the schema. Grid points whose method config is invalid
(e.g. t_s >= t_b) are skipped and listed, never silently dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods import METHODS, get_method
from methods.base import field_docs
from orchestrator.errors import ConfigError
from orchestrator.results import VALIDATION_METRICS

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
METRICS = VALIDATION_METRICS  # a sweep optimises validation metrics only
DISTRIBUTIONS = ("grid", "uniform", "loguniform", "int", "choice")
TOP_KEYS = {
    "description", "method", "dataset", "categories", "scale", "fixed", "default_label", "axes",
    "conditions", "search", "num_samples", "points_to_evaluate", "metric", "mode", "asha", "trial", "paper",
}


@dataclass(frozen=True)
class Axis:
    name: str  # a method config field
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # grid/choice values, or (low, high)


@dataclass(frozen=True)
class Condition:
    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    method: str
    dataset: str
    categories: tuple[str, ...] | None
    scale: str
    fixed: dict[str, Any]
    default_label: str
    axes: tuple[Axis, ...]
    conditions: tuple[Condition, ...]
    search: str  # grid | optuna
    num_samples: int
    points_to_evaluate: tuple[dict[str, Any], ...]
    metric: str
    mode: str
    asha: dict[str, Any] | None
    trial: dict[str, Any]
    paper: dict[str, Any] = field(default_factory=dict)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes) or ("condition",)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid point as method overrides (conditions: the default row first)."""
        if self.conditions:
            return [{}] + [dict(c.overrides) for c in self.conditions]
        return [dict(zip([a.name for a in self.axes], combo)) for combo in itertools.product(*(a.values for a in self.axes))]

    def condition(self, name: str) -> dict[str, Any]:
        if name == self.default_label:
            return {}
        for c in self.conditions:
            if c.name == name:
                return dict(c.overrides)
        raise ConfigError(f"{self.name}: unknown condition {name!r}; valid: {', '.join(self.condition_names())}")

    def condition_names(self) -> list[str]:
        return [self.default_label] + [c.name for c in self.conditions]


def available() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load(name: str, directory: Path = SPACES_DIR) -> SearchSpace:
    path = directory / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown ablation {name!r}; valid: {', '.join(available()) or '(none found in ' + str(directory) + ')'}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse(name, raw, path)


def parse(name: str, raw: dict[str, Any], path: Path | str = "<memory>") -> SearchSpace:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping at the top level")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(TOP_KEYS))}")
    method = raw.get("method")
    if method not in METHODS:
        raise fail(f"method must be one of {', '.join(sorted(METHODS))}, got {method!r}")
    fields = field_docs(get_method(method).Config)

    def check_field(key: str, where: str) -> None:
        if key not in fields:
            raise fail(f"{where}: {key!r} is not a {method} config field; valid: {', '.join(sorted(fields))}")

    fixed = dict(raw.get("fixed") or {})
    for key in fixed:
        check_field(key, "fixed")

    axes = []
    for axis_name, spec in (raw.get("axes") or {}).items():
        check_field(axis_name, "axes")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise fail(f"axes.{axis_name}: expected exactly one of {', '.join(DISTRIBUTIONS)}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise fail(f"axes.{axis_name}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "int") and (len(values) != 2 or values[0] >= values[1]):
            raise fail(f"axes.{axis_name}.{kind}: expected [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise fail(f"axes.{axis_name}.loguniform: bounds must be > 0, got {values}")
        axes.append(Axis(axis_name, kind, tuple(values)))

    conditions = []
    for i, item in enumerate(raw.get("conditions") or []):
        if not isinstance(item, dict) or set(item) != {"name", "set"} or not isinstance(item["set"], dict):
            raise fail(f"conditions[{i}]: expected {{name: ..., set: {{field: value}}}}, got {item!r}")
        for key in item["set"]:
            check_field(key, f"conditions[{i}] ({item['name']})")
        conditions.append(Condition(str(item["name"]), dict(item["set"])))

    if bool(axes) == bool(conditions):
        raise fail("give exactly one of 'axes' or 'conditions'")
    search = raw.get("search", "grid")
    if search not in ("grid", "optuna"):
        raise fail(f"search must be grid or optuna, got {search!r}")
    if search == "grid" and any(a.kind not in ("grid", "choice") for a in axes):
        raise fail("a grid search takes only 'grid'/'choice' axes; use search: optuna for distributions")
    if search == "optuna" and conditions:
        raise fail("search: optuna needs axes, not conditions")
    metric = raw.get("metric", "val_image_auroc")
    if metric not in METRICS:
        raise fail(f"metric must be a validation metric ({', '.join(METRICS)}), got {metric!r}: tuning never looks at the test split")
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise fail(f"mode must be max or min, got {mode!r}")
    scale = raw.get("scale", "smoke")
    if scale not in ("smoke", "paper"):
        raise fail(f"scale must be smoke or paper, got {scale!r}")
    trial = dict(raw.get("trial") or {})
    if set(trial) - {"cpus", "gpus", "workers"}:
        raise fail(f"trial: unknown key(s) {', '.join(sorted(set(trial) - {'cpus', 'gpus', 'workers'}))}; valid: cpus, gpus, workers")
    asha = raw.get("asha")
    if asha is not None and (not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor", "max_t"}):
        raise fail("asha: expected null or {grace_period, reduction_factor, max_t}")
    points = tuple(raw.get("points_to_evaluate") or ())
    for point in points:
        for key in point:
            if key not in [a.name for a in axes]:
                raise fail(f"points_to_evaluate: {key!r} is not an axis; axes: {', '.join(a.name for a in axes)}")
    categories = raw.get("categories")
    return SearchSpace(
        name=name,
        description=str(raw.get("description", "")),
        method=method,
        dataset=str(raw.get("dataset", "synthetic")),
        categories=tuple(categories) if categories else None,
        scale=scale,
        fixed=fixed,
        default_label=str(raw.get("default_label", "default")),
        axes=tuple(axes),
        conditions=tuple(conditions),
        search=search,
        num_samples=int(raw.get("num_samples", 1)),
        points_to_evaluate=points,
        metric=metric,
        mode=mode,
        asha=asha,
        trial=trial,
        paper=dict(raw.get("paper") or {}),
    )
