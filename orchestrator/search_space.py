"""Search spaces: ``search_spaces/<name>.yaml``, data not code, validated on load.

A space names a method and either ``axes`` (a cartesian grid, or Optuna distributions)
or named ``conditions`` (rows such as "w/o PE", each a set of method-field overrides).
A *benchmark* space names ``methods`` instead: the method itself is its one axis, each
method at its own defaults (one row per method; see :data:`METHOD_AXIS`).
See search_spaces/README.md for the schema. Grid points whose method config is invalid
(e.g. t_s >= t_b) are skipped and listed, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods import METHODS, get_method
from methods.fields import field_docs
from orchestrator.errors import ConfigError
from orchestrator.results import VALIDATION_METRICS


def _spaces_dir() -> Path:
    """The built-in spaces: the copy a wheel ships inside the package (pyproject.toml maps
    search_spaces/ to orchestrator/search_spaces), else the repository's search_spaces/ (a
    source checkout or an editable install, where edits to the YAMLs take effect at once)."""
    packaged = Path(__file__).resolve().parent / "search_spaces"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "search_spaces"


SPACES_DIR = _spaces_dir()
METRICS = VALIDATION_METRICS  # a sweep optimises validation metrics only
# Objectives a multi-objective search may add (settings `objectives=`): speed, with its direction.
SPEED_OBJECTIVES = {"images_per_second": "max", "latency_ms": "min"}
DISTRIBUTIONS = ("grid", "uniform", "loguniform", "int", "choice")
TOP_KEYS = {
    "description", "method", "methods", "dataset", "categories", "scale", "fixed", "default_label", "axes",
    "conditions", "search", "num_samples", "points_to_evaluate", "metric", "mode", "asha", "trial", "paper",
}
# A benchmark space's grid points are {METHOD_AXIS: <method name>}: the method is the axis.
METHOD_AXIS = "method"
# Keys a benchmark space may not have: its rows are the methods at their defaults.
SINGLE_METHOD_KEYS = ("method", "fixed", "default_label", "axes", "conditions", "points_to_evaluate")


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
    source: Path | None = None  # the YAML file it was loaded from (logged as the sweep's config artifact)
    # Benchmark spaces: the methods compared, each at its defaults (then ``method`` is the
    # first of them, for code that needs one method, e.g. ``--help``). Empty otherwise.
    methods: tuple[str, ...] = ()

    @property
    def is_benchmark(self) -> bool:
        return bool(self.methods)

    @property
    def axis_names(self) -> tuple[str, ...]:
        if self.is_benchmark:
            return (METHOD_AXIS,)
        return tuple(a.name for a in self.axes) or ("condition",)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every grid point as method overrides (conditions: the default row first).
        A benchmark's points are ``{"method": name}``: split them with :meth:`point_method`."""
        if self.is_benchmark:
            return [{METHOD_AXIS: m} for m in self.methods]
        if self.conditions:
            return [{}] + [dict(c.overrides) for c in self.conditions]
        return [dict(zip([a.name for a in self.axes], combo)) for combo in itertools.product(*(a.values for a in self.axes))]

    def point_method(self, point: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(the method a grid point runs, its method-field overrides)."""
        fields = {k: v for k, v in point.items() if not (self.is_benchmark and k == METHOD_AXIS)}
        return (str(point[METHOD_AXIS]) if self.is_benchmark else self.method), fields

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


def is_path(ablation: str) -> bool:
    """``ablation=`` names a YAML file (``/tmp/my_space.yaml``, ``./x.yml``) rather than a built-in space."""
    return ablation.endswith((".yaml", ".yml")) or "/" in ablation or os.sep in ablation


def space_path(ablation: str, directory: Path = SPACES_DIR) -> Path:
    """The YAML file ``ablation=`` stands for: a built-in name (``<directory>/<name>.yaml``)
    or a path to a .yaml file, whose stem is then the space's name."""
    if not is_path(ablation):
        path = directory / f"{ablation}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(ablation, available(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown ablation {ablation!r}{hint}; valid: {', '.join(available()) or '(none found in ' + str(directory) + ')'}, "
                              f"or a path to a search-space .yaml file")
        return path
    path = Path(ablation).expanduser()
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"ablation={ablation}: a search-space file must end in .yaml or .yml")
    if not path.is_file():
        raise ConfigError(f"ablation={ablation}: search-space file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    return path.resolve()


def description(name: str, directory: Path = SPACES_DIR) -> str:
    """A built-in space's one-line description, read without checking the space (which
    imports its method): what ``--help`` lists."""
    raw = yaml.safe_load(space_path(name, directory).read_text()) or {}
    return str(raw.get("description", "")) if isinstance(raw, dict) else ""


def load(name: str, directory: Path = SPACES_DIR) -> SearchSpace:
    """A built-in space by name, or any search-space YAML by path (named after its stem)."""
    path = space_path(str(name), directory)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the search space ({exc})") from None
    return dataclasses.replace(parse(path.stem, raw, path), source=path)


def parse(name: str, raw: dict[str, Any], path: Path | str = "<memory>") -> SearchSpace:
    def fail(message: str) -> ConfigError:
        return ConfigError(f"{path}: {message}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping at the top level")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(TOP_KEYS))}")
    if "methods" in raw:
        return _parse_benchmark(name, raw, fail)
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
    points = tuple(raw.get("points_to_evaluate") or ())
    for point in points:
        for key in point:
            if key not in [a.name for a in axes]:
                raise fail(f"points_to_evaluate: {key!r} is not an axis; axes: {', '.join(a.name for a in axes)}")
    return _space(name, raw, fail, method=method, fixed=fixed, axes=tuple(axes), conditions=tuple(conditions),
                  search=search, metric=metric, points=points)


def _parse_benchmark(name: str, raw: dict[str, Any], fail) -> SearchSpace:
    """``methods: [a, b, ...]``: every method at its own defaults, one grid row each."""
    methods = raw["methods"]
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        raise fail(f"methods must be a non-empty list of {', '.join(sorted(METHODS))}, got {methods!r}")
    if len(set(methods)) != len(methods):
        raise fail(f"methods: each method once, got {methods!r}")
    given = [k for k in SINGLE_METHOD_KEYS if k in raw]
    if given:
        raise fail(f"a benchmark space (methods: [...]) runs each method at its defaults; drop {', '.join(given)}")
    if raw.get("search", "grid") != "grid":
        raise fail(f"a benchmark space is a grid over its methods; search must be grid, got {raw.get('search')!r}")
    metric = raw.get("metric", "val_image_auroc")
    if metric not in METRICS:
        raise fail(f"metric must be a validation metric ({', '.join(METRICS)}), got {metric!r}: tuning never looks at the test split")
    paper = raw.get("paper") or {}
    if paper.get("delta"):
        raise fail("paper.delta: a benchmark's rows are absolute (each method at its defaults); drop delta: true")
    rows = paper.get("rows") or {}
    stray = [r for r in rows if r not in methods]
    if stray:
        raise fail(f"paper.rows of a benchmark are keyed by method; {', '.join(map(repr, stray))} not in methods {methods}")
    return _space(name, raw, fail, method=methods[0], fixed={}, axes=(), conditions=(), search="grid", metric=metric,
                  points=(), methods=tuple(methods))


def _space(name: str, raw: dict[str, Any], fail, *, method: str, fixed: dict[str, Any], axes: tuple[Axis, ...],
           conditions: tuple[Condition, ...], search: str, metric: str, points: tuple[dict[str, Any], ...],
           methods: tuple[str, ...] = ()) -> SearchSpace:
    """The keys every space shares, checked, and the SearchSpace."""
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise fail(f"mode must be max or min, got {mode!r}")
    scale = raw.get("scale", "smoke")
    if scale not in ("smoke", "paper"):
        raise fail(f"scale must be smoke or paper, got {scale!r}")
    trial = dict(raw.get("trial") or {})
    if set(trial) - {"cpus", "gpus", "workers", "resources"}:
        raise fail(f"trial: unknown key(s) {', '.join(sorted(set(trial) - {'cpus', 'gpus', 'workers', 'resources'}))}; valid: cpus, gpus, workers, resources")
    asha = raw.get("asha")
    if asha is not None and (not isinstance(asha, dict) or set(asha) - {"grace_period", "reduction_factor", "max_t"}):
        raise fail("asha: expected null or {grace_period, reduction_factor, max_t}")
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
        axes=axes,
        conditions=conditions,
        search=search,
        num_samples=int(raw.get("num_samples", 1)),
        points_to_evaluate=points,
        metric=metric,
        mode=mode,
        asha=asha,
        trial=trial,
        paper=dict(raw.get("paper") or {}),
        methods=methods,
    )


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE starts modelling: a third of the budget, at least 2."""
    return max(2, num_samples // 3)


def tpe_sampler(num_samples: int, seed: int):
    """The Optuna sampler of a ``search: optuna`` sweep of ``num_samples`` trials: TPE,
    seeded with the sweep seed so a rerun proposes the same points."""
    import optuna  # only Optuna sweeps need it

    # TPE's default of 10 random start-up trials would leave at most 2 guided proposals in
    # the shipped 8-12-trial spaces: a random search that calls itself TPE.
    return optuna.samplers.TPESampler(n_startup_trials=startup_trials(num_samples), seed=seed)
