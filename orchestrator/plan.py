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

import dataclasses
import functools
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from methods import get_method
from methods.base import MethodConfig, field_docs
from orchestrator import search_space as spaces
from orchestrator.config import AUTO, Settings, build_settings, config_to_dict, flatten, param_text, redact_uri, resolve_method_config
from orchestrator.data import DataSpec
from orchestrator.errors import ConfigError
from orchestrator.schedule import EVALUATE, TRAIN, Job, SimTrial, fitting, simulate
from orchestrator.storage import REMOTE_SCHEMES, Storage, is_remote
from orchestrator.model_store import ModelKey, model_key
from orchestrator.timing import Estimate, TimingModel
from orchestrator.training import EvaluationSettings, model_groups


@dataclass(frozen=True)
class Point:
    """One grid row: its label (a condition name, ``axis=value, ...``, or in a benchmark
    the method's name), its method and its resolved config."""

    label: str
    method: str
    overrides: dict[str, Any]
    config: MethodConfig


@dataclass(frozen=True)
class TrainingSpec:
    """One model to train: the method config's training fields on these categories with
    this seed, under ``key`` in the model store."""

    method: str
    config: MethodConfig
    categories: tuple[str, ...]
    train_seed: int
    key: ModelKey
    expected: Estimate  # seconds, from the timing model


@dataclass(frozen=True)
class TrialSpec:
    """One trial, resolved once: what it runs, the categories it reports and the models it
    evaluates (one per category, or one over all of them for a multi-class method).
    Its ``id`` is what Tune's grid carries; the trial looks the spec up by it."""

    id: str
    label: str  # the grid point's label (a condition, "axis=value", a method), or the sampled values
    method: str
    config: MethodConfig
    categories: tuple[str, ...]
    train_seed: int
    model_groups: tuple[tuple[str, ...], ...]

    @property
    def name(self) -> str:
        """The child run's name, e.g. ``steps=5 · washer · seed 1`` (also its Tune id)."""
        return self.id


def spec_id(label: str, categories: tuple[str, ...] | None, train_seed: int | None) -> str:
    parts = [label] + ([categories[0]] if categories and len(categories) == 1 else [])
    return " · ".join(parts + ([f"seed {train_seed}"] if train_seed is not None else []))


@dataclass(frozen=True)
class TrialResources:
    """What each trial's jobs hold, resolved against the cluster: a Train worker (and an
    evaluation) holds ``per_worker``; a trial trains with ``workers`` of them. ``notes``
    say how ``auto`` values were derived (printed by ``dry_run=true`` and at start)."""

    cpus: float
    gpus: float
    workers: int
    custom: tuple[tuple[str, float], ...]  # trial.resources: extra Ray resources per worker
    max_concurrent: int
    notes: tuple[str, ...]

    @property
    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **dict(self.custom)}

    @property
    def per_training(self) -> dict[str, float]:
        return {k: v * self.workers for k, v in self.per_worker.items()}


@dataclass(frozen=True)
class Cluster:
    """The resources a sweep may use: what the cluster has now, or with ``autoscaling=true``
    what its autoscaler may grow it to; ``source`` says which."""

    resources: dict[str, float]
    source: str
    growing: bool = False  # autoscaling without a published maximum: the nodes up now, more may come

    def capacity(self, trial: "TrialResources") -> dict[str, float]:
        """What the sweep's scheduler may hand out: the resources, or on a growing cluster
        what ``max_concurrent`` trainings would hold (the autoscaler adds nodes for them)."""
        if not self.growing:
            return dict(self.resources)
        stated = {k: v * trial.max_concurrent for k, v in trial.per_training.items()}
        return {**self.resources, **{k: max(v, self.resources.get(k, 0.0)) for k, v in stated.items()}}


def local_cluster() -> Cluster:
    """What an embedded Ray on this machine offers (every CPU, every CUDA GPU), known
    without starting Ray (``dry_run=true``)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Cluster({"CPU": float(os.cpu_count() or 1), **({"GPU": float(gpus)} if gpus else {})}, "the embedded Ray on this machine")


def resolve_trial_resources(settings: Settings, cluster: Cluster) -> TrialResources:
    """``trial.gpus=auto``: one GPU per worker when the cluster has GPUs, none otherwise.
    ``max_concurrent=auto``: as many trials as the cluster holds at once at the trial's
    resources (workers x per-worker). Explicit numbers win."""
    t, notes = settings.trial, []
    if cluster.growing and AUTO in (t.gpus, settings.max_concurrent):
        raise ConfigError("autoscaling=true, and the cluster publishes no autoscaler maximum to size trial.gpus=auto / max_concurrent=auto "
                          "from; state them, e.g. trial.gpus=1 max_concurrent=<worker nodes at most x GPUs per node>")
    gpus_on_cluster = cluster.resources.get("GPU", 0.0)
    if t.gpus == AUTO:
        gpus = 1.0 if gpus_on_cluster >= 1 else 0.0
        notes.append(f"trial.gpus=auto -> {gpus:g} ({cluster.source} has {gpus_on_cluster:g} GPU)")
    else:
        gpus = float(t.gpus)
    custom = tuple(sorted((str(k), float(v)) for k, v in (t.resources or {}).items()))
    per_trial = {k: v * t.workers for k, v in {"CPU": t.cpus, "GPU": gpus, **dict(custom)}.items() if v}
    if settings.max_concurrent == AUTO:
        fit = fitting(per_trial, cluster.resources)
        if fit >= 10**9 or fit < 1:
            fit = max(1, min(fit, 10**6))
        have = ", ".join(f"{cluster.resources.get(k, 0.0):g} {k}" for k in per_trial)
        need = ", ".join(f"{v:g} {k}" for k, v in per_trial.items())
        notes.append(f"max_concurrent=auto -> {fit} ({cluster.source} has {have}; a trial holds {need})")
        max_concurrent = fit
    else:
        max_concurrent = int(settings.max_concurrent)
    return TrialResources(float(t.cpus), gpus, int(t.workers), custom, max_concurrent, tuple(notes))


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
    split_sizes: dict[str, tuple[int, int]]  # category -> (training images, evaluated images): the timing model's input
    timing: TimingModel
    specs: tuple[TrialSpec, ...] = ()  # grid searches: every trial, in the order Tune starts them
    trainings: tuple[TrainingSpec, ...] = ()  # the models the sweep trains in its pipeline (known before the trials)

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

    @property
    def default_label(self) -> str:
        """The default row's label as report rows are labelled from the logged params
        ("none" for a benchmark, whose every row is a method's default)."""
        if self.space.is_benchmark:
            return "none"
        if self.space.conditions:
            return self.space.default_label
        values = config_to_dict(self.default_config)
        return ", ".join(f"{a.name}={param_text(values[a.name])}" for a in self.space.axes)

    @property
    def pipeline_keys(self) -> frozenset[str]:
        return frozenset(t.key.key for t in self.trainings)

    def spec(self, trial_config: dict[str, Any]) -> TrialSpec:
        """The trial a Tune config stands for: a grid's spec by its id, or an Optuna
        trial's sampled axis values resolved (once, in the trial)."""
        if "spec" in trial_config:
            return self._specs_by_id[trial_config["spec"]]
        values = {a.name: trial_config[a.name] for a in self.space.axes}
        label = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        config = self.resolve(values)
        return TrialSpec(label, label, self.space.method, config, self.categories, self.settings.seed,
                         model_groups(get_method(self.space.method), self.categories))

    @functools.cached_property
    def _specs_by_id(self) -> dict[str, TrialSpec]:
        return {s.id: s for s in self.specs}

    def resolve(self, axis_overrides: dict[str, Any]) -> MethodConfig:
        return resolve_config(self.space, self.space.method, self.scale, self.method_overrides, self.categories, axis_overrides)

    def model_key(self, method: str, config: MethodConfig, categories: Sequence[str], train_seed: int) -> ModelKey:
        return model_key(method, config, self.data, list(categories), self.settings.trial.workers, train_seed)

    def training(self, method: str, config: MethodConfig, categories: Sequence[str], train_seed: int) -> TrainingSpec:
        images = sum(self.split_sizes.get(c, (0, 0))[0] for c in categories)
        return TrainingSpec(method, config, tuple(categories), train_seed, self.model_key(method, config, categories, train_seed),
                            self.timing.training(method, config, images, self.settings.trial.workers))

    def evaluation_estimate(self, method: str, config: MethodConfig, category: str) -> Estimate:
        return self.timing.evaluation(method, config, self.split_sizes.get(category, (0, 0))[1])

    def trial_params(self, spec: TrialSpec, resources: TrialResources) -> dict[str, Any]:
        """A child run's MLflow params: the trial's resolved config, flattened, and what it ran on."""
        s = self.settings
        params = flatten({"method": config_to_dict(spec.config)})
        params.update({"method": spec.method, "ablation": self.space.name, "dataset": s.dataset, "scale": self.scale, "seed": s.seed,
                       "train_seed": spec.train_seed, "categories": ",".join(spec.categories),
                       "trial.workers": resources.workers, "trial.cpus": resources.cpus, "trial.gpus": resources.gpus})
        if self.space.conditions:
            params["condition"] = spec.label
        return params

    def describe(self, cluster: Cluster | None = None) -> list[str]:
        """What the sweep would run, for ``dry_run=true``: nothing is started or written.
        With the ``cluster`` it would run on, also how ``auto`` resources resolve and the
        plan's GPU-hours (or CPU-hours) and makespan simulated on it."""
        s, space = self.settings, self.space
        lines = [f"sweep {space.name}: {', '.join(self.methods)} on {s.dataset} ({self.scale} scale), "
                 f"{len(self.categories)} categor{'y' if len(self.categories) == 1 else 'ies'}: {', '.join(self.categories)}"]
        if space.search == "grid":
            keys = {self.model_key(spec.method, spec.config, group, spec.train_seed).key for spec in self.specs for group in spec.model_groups}
            lines.append(f"trials: {len(self.specs)} (grid: {len(self.points)} points"
                         + (" x categories" if self.per_category_trials else "")
                         + (f" x {len(self.training_seeds)} seeds" if len(self.training_seeds) > 1 else "") + ")")
            lines.append(f"trainings: {len(keys)} distinct models (other trials reuse a stored one)")
        else:
            samples = s.num_samples or space.num_samples
            docs = field_docs(get_method(space.method).Config)
            trained = [a.name for a in space.axes if docs[a.name][0]]
            groups = len(model_groups(get_method(space.method), self.categories))
            lines.append(f"trials: {samples} (Optuna TPE on {space.metric}, {space.mode})")
            lines.append(f"trainings: up to {samples * groups} (axes {', '.join(trained)} change the trained model)" if trained
                         else f"trainings: {groups} (every axis is inference-only: "
                              + ("one model over all categories" if get_method(space.method).multi_class else "one model per category")
                              + ", shared by all trials)")
        if cluster is None:
            t = s.trial
            lines.append(f"per trial: {t.workers} Train worker(s) x {t.cpus} CPU, trial.gpus={t.gpus}; max_concurrent={s.max_concurrent}"
                         + (f"; ASHA {space.asha}" if space.asha else ""))
        else:
            r = resolve_trial_resources(s, cluster)
            lines.append(f"per trial: {r.workers} Train worker(s) x {r.cpus:g} CPU" + (f" + {r.gpus:g} GPU" if r.gpus else "")
                         + "".join(f" + {v:g} {k}" for k, v in r.custom) + f"; at most {r.max_concurrent} trials at once"
                         + (f"; ASHA {space.asha}" if space.asha else ""))
            lines += [f"  {note}" for note in r.notes]
            lines += self.estimate_lines(r, cluster)
        lines.append(f"storage: {redact_uri(s.storage_path)} (Tune/Train state, model store, evaluations, sample maps)")
        lines.append(f"tracking: {redact_uri(s.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'sqlite:///<cwd>/mlflow.db')}")
        lines.append(f"data: {s.dataset} at {s.data.root or 'the embedded synthetic data'}, cache {s.data.cache_dir}, "
                     f"validation fraction {s.data.val_fraction}, split seed {s.seed}")
        lines += [f"skipped grid point {reason}" for reason in self.skipped]
        return lines

    def estimate_lines(self, resources: TrialResources, cluster: Cluster) -> list[str]:
        """GPU-hours (CPU-hours) and makespan of this plan on ``cluster``, simulated with the
        scheduling policy and the timing model (orchestrator/schedule.py, timing.py)."""
        if not self.specs and not self.trainings:
            return ["estimate: an Optuna search whose axes change the trained model (trials train as they are sampled); not simulated"]
        unit = "GPU" if resources.gpus else "CPU"
        capacity = {k: v for k, v in cluster.resources.items() if k in resources.per_worker}
        if fitting(resources.per_training, capacity) < 1:
            need = ", ".join(f"{v:g} {k}" for k, v in resources.per_training.items())
            return [f"estimate: not simulated: a training holds {need}, more than {cluster.source} has "
                    f"({', '.join(f'{capacity.get(k, 0.0):g} {k}' for k in resources.per_training)}); the sweep would stop at start"]
        trainings, trials = simulation_jobs(self, resources)
        sim = simulate(trainings, trials, capacity, resources.max_concurrent)
        hours = sum(r.held_seconds() * r.resources.get(unit, 0.0) for r in sim.records) / 3600
        makespan = max((r.end for r in sim.records), default=0.0)
        sources = sorted({t.expected.source for t in self.trainings}
                         | {self.evaluation_estimate(spec.method, spec.config, spec.categories[0]).source for spec in self.specs[:1]})
        marked = "" if all(src.startswith("measured") for src in sources) else " (an ESTIMATE: " + ", ".join(sources) + "; see orchestrator/timing.py)"
        return [f"estimate: {hours:.2f} {unit}-hours, makespan {makespan / 3600:.2f} h on {capacity.get(unit, 0):g} {unit}{marked}"]


def simulation_jobs(plan: SweepPlan, resources: TrialResources) -> tuple[list[Job], list[SimTrial]]:
    """The plan's pipeline trainings and its trials' evaluations as schedule jobs (the
    shapes the sweep hands its scheduler), for :func:`orchestrator.schedule.simulate`.
    An Optuna space's trials are its ``num_samples`` trials on the default config."""
    trainings = [Job.make(f"train {t.key.short}", TRAIN, t.key.key, resources.per_training, t.expected.seconds) for t in plan.trainings]
    specs = list(plan.specs) or [plan.spec({a.name: getattr(plan.default_config, a.name) for a in plan.space.axes})]
    if not plan.specs:
        specs = [dataclasses.replace(specs[0], id=f"{specs[0].id} #{i}") for i in range(plan.settings.num_samples or plan.space.num_samples)]
    trials = []
    for spec in specs:
        jobs = []
        for group in spec.model_groups:
            key = plan.model_key(spec.method, spec.config, group, spec.train_seed).key
            for category in group:
                jobs.append(Job.make(f"evaluate {spec.id} {category}", EVALUATE, key, resources.per_worker,
                                     plan.evaluation_estimate(spec.method, spec.config, category).seconds, trial=spec.id))
        trials.append(SimTrial(spec.id, tuple(jobs)))
    return trainings, trials


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


DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy URIs MLflow takes, with or without +driver


def check_tracking_uri(uri: str | None, must_exist: bool = False) -> None:
    """The MLflow target must answer before anything starts (MLflow itself would retry for
    minutes, after Ray had started): an http(s) server (one GET of ``/health``, 5 s), a
    database (one connection, 5 s), or a SQLite file whose folder exists and can be written
    (``must_exist``: the file itself, for the report, which must not create an empty store).
    One :class:`ConfigError` line naming the target, credentials redacted. No MLflow here."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = "sqlite:///" + str(Path.cwd().resolve() / "mlflow.db")  # the default store
    shown = redact_uri(uri)
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            return  # it answered (a server or proxy without /health): reachable
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(f"tracking_uri {shown} is not reachable ({reason}); start the server or fix tracking_uri") from None
    elif scheme == "sqlite":
        database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not database or database == ":memory:":
            return
        path = Path(database).resolve()
        if must_exist and not path.is_file():
            raise ConfigError(f"tracking_uri {shown}: no MLflow store at {path}; give the store the sweeps wrote (tracking_uri=sqlite:////abs/mlflow.db)")
        if not path.parent.is_dir():
            raise ConfigError(f"tracking_uri {shown}: folder {path.parent} does not exist; create it or fix tracking_uri")
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(f"tracking_uri {shown}: {path if path.exists() else path.parent} is not writable; fix its permissions or tracking_uri")
    elif scheme.split("+")[0] in DATABASE_SCHEMES:
        check_database(uri, shown)
    elif scheme in ("file", ""):
        raise ConfigError(f"tracking_uri {shown}: MLflow's file store is deprecated; use sqlite:////abs/path/mlflow.db or a server URL")
    else:
        raise ConfigError(f"tracking_uri {shown}: unknown scheme {scheme!r}; use http(s)://<server>, sqlite:////abs/mlflow.db "
                          f"or a database URI ({', '.join(DATABASE_SCHEMES)})")


def check_database(uri: str, shown: str) -> None:
    """One connection to MLflow's database with a 5 s timeout."""
    import sqlalchemy  # MLflow's own database layer; only database URIs need it

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5}, pool_pre_ping=False)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - a missing driver, a refused connection, bad credentials
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"tracking_uri {shown}: cannot connect to the database ({redact_uri(first)}); start it or fix tracking_uri") from None


def check_ui_url(url: str | None) -> None:
    """``mlflow_ui_url``: where the report's run links point: an http(s) address."""
    if url is None:
        return
    parts = urllib.parse.urlparse(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"mlflow_ui_url {url!r} is not an http(s) address; give the MLflow UI's, e.g. mlflow_ui_url=http://127.0.0.1:5000")


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


def plan(values: dict[str, Any], method_overrides: dict[str, Any], timing: TimingModel | None = None) -> SweepPlan:
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
    draft = SweepPlan(space, settings, scale, categories, dict(method_overrides), data, settings.evaluation(), default_config,
                      tuple(points), tuple(skipped), data.split_sizes(categories), timing or TimingModel.load())
    return with_trials(draft)


def with_trials(draft: SweepPlan) -> SweepPlan:
    """The plan's trials (grid searches) and the trainings its pipeline runs before the
    trials need them: every model of a grid, the one default model (per category) of an
    Optuna space whose axes are all inference-only, none when trials sample training
    fields (they train as they are sampled) or with ``reuse_models=false``. Grid trials
    are ordered as the pipeline trains their models, longest first, so Tune starts the
    trials whose models come first."""
    specs: list[TrialSpec] = []
    seeds = draft.training_seeds
    for point in draft.points:
        groups = model_groups(get_method(point.method), draft.categories)
        for seed in seeds:
            if draft.per_category_trials:
                specs += [TrialSpec(spec_id(point.label, group, seed if len(seeds) > 1 else None), point.label, point.method, point.config,
                                    group, seed, (group,)) for group in groups]
            else:
                specs.append(TrialSpec(spec_id(point.label, None, seed if len(seeds) > 1 else None), point.label, point.method,
                                       point.config, draft.categories, seed, groups))
    trainings: dict[str, TrainingSpec] = {}
    if draft.settings.reuse_models:
        if draft.space.search == "grid":
            needed = [(spec.method, spec.config, group, spec.train_seed) for spec in specs for group in spec.model_groups]
        elif not any(field_docs(get_method(draft.space.method).Config)[a.name][0] for a in draft.space.axes):
            needed = [(draft.space.method, draft.default_config, group, draft.settings.seed)
                      for group in model_groups(get_method(draft.space.method), draft.categories)]
        else:
            needed = []
        for method, config, group, seed in needed:
            training = draft.training(method, config, group, seed)
            trainings.setdefault(training.key.key, training)
    expected = {(t.method, t.config, t.categories, t.train_seed): t.expected.seconds for t in trainings.values()}

    def spec_seconds(spec: TrialSpec) -> float:
        return sum(expected.get((spec.method, spec.config, group, spec.train_seed), 0.0) for group in spec.model_groups)

    specs.sort(key=spec_seconds, reverse=True)  # stable: equal trials keep the grid's order
    return dataclasses.replace(draft, specs=tuple(specs), trainings=tuple(sorted(trainings.values(), key=lambda t: -t.expected.seconds)))
