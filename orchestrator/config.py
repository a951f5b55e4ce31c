"""Configuration: Hydra-style ``key=value`` overrides composed with OmegaConf.

Two layers, one grammar:

* :class:`Settings` — everything that is not a method's own field (dataset, data paths,
  categories, scale, trial resources, tracking, ...). ``data.root=...``,
  ``trial.workers=2`` and so on address it.
* the method config — the frozen dataclass of ``methods/<name>.py``; its fields are
  addressed as ``method.<field>=...``. It is resolved from the paper defaults, then the
  scale preset (``scale=smoke|paper``), then a search space's ``fixed`` block, then the
  command line, then the trial's axis values.

Every unknown key, ill-typed value or invalid combination raises :class:`ConfigError`
with a one-line message listing what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import urllib.parse
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from methods import METHODS, get_method
from methods.fields import field_docs
from orchestrator.errors import ConfigError
from orchestrator.paths import default_cache_dir

if TYPE_CHECKING:  # imported where used: the data stack (numpy, PIL, scikit-image) loads only when a sweep runs
    from orchestrator.data import DataSpec
    from orchestrator.training import EvaluationSettings

SCALES = ("smoke", "paper")


@dataclass
class DataConfig:
    root: Optional[str] = None  # dataset root folder; None = the embedded synthetic data
    cache_dir: str = field(default_factory=default_cache_dir)  # preprocessed arrays, synthetic data
    val_fraction: float = 0.2  # share of train/good held out for the validation split
    foreground: str = "auto"  # foreground masks for anomaly synthesis: auto | on | off
    textures: Optional[str] = None  # folder of anomaly-appearance images (e.g. DTD); None = offline sources


AUTO = "auto"


@dataclass
class TrialConfig:
    cpus: float = 1.0  # CPUs per Ray Train worker (and per evaluation task)
    gpus: Any = AUTO  # GPUs per Ray Train worker: auto = 1 when the cluster has GPUs, else 0; or a number (0.25: four per GPU)
    workers: int = 1  # Ray Train workers (DDP ranks) per trial
    resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker, e.g. {accelerator_type:A100: 0.001}


@dataclass
class Settings:
    ablation: Optional[str] = None  # search space name (search_spaces/<name>.yaml)
    method: str = "transfusion"  # method name (set by the search space)
    dataset: str = "synthetic"  # dataset registry name
    data: DataConfig = field(default_factory=DataConfig)
    categories: Optional[list[str]] = None  # None = the search space's, else all of the dataset
    scale: Optional[str] = None  # smoke | paper; None = the search space's
    seed: int = 0  # seeds the data split, and the first training (and prediction) seed
    seeds: int = 1  # training seeds per grid point: seed, seed+1, ..., seed+seeds-1 (the data split keeps seed)
    trial: TrialConfig = field(default_factory=TrialConfig)
    max_concurrent: Any = AUTO  # trials running at once: auto = as many as the cluster's resources hold, or a number
    objectives: list[str] = field(default_factory=list)  # Optuna only: several objectives (Pareto front), the space's metric first, e.g. [val_pixel_ap,images_per_second]
    num_samples: Optional[int] = None  # override the search space's number of samples
    max_failures: int = 1  # retries of a failed trial (Tune) and of a failed worker group (Train)
    resume: bool = False  # finish an interrupted sweep (Tuner.restore)
    retrain: bool = False  # train even when a stored model for the training config exists
    reuse_models: bool = True  # false: every trial trains its own model (no train-once sharing; for benchmarks)
    tracking_uri: Optional[str] = None  # MLflow store; default $MLFLOW_TRACKING_URI or ./mlflow.db
    storage_path: str = "ray_results"  # Ray Tune/Train storage and the model store (shared on clusters)
    eval_every: int = 0  # epochs between validation reports + checkpoints (0 = auto: epochs // 4 with ASHA or >= 100 epochs, else the last epoch)
    autoscaling: bool = False  # the cluster adds nodes on demand: wait for resources instead of stopping; auto sizes use its maximum
    drivers: str = "head"  # where the scheduler, trial drivers and Train controllers run: head, or a Ray resource nodes declare
    checkpoint_every_s: float = 600.0  # wall-clock seconds between checkpoints of a training, besides those at validation
    eval_batch_size: int = 16  # images per predict() call
    latency_images: int = 4  # images timed one at a time for batch-1 latency
    sample_maps: int = 4  # anomaly-map PNGs logged per trial
    tracking_wait_s: float = 900.0  # at the sweep's end, how long to wait for an unreachable MLflow to replay its spooled writes
    dry_run: bool = False  # print the plan (trials, trainings, resources, targets) and exit before Ray starts
    help: bool = False  # print the ablations and keys, then exit

    def data_spec(self) -> DataSpec:
        from orchestrator.data import DataSpec

        d = self.data
        return DataSpec(self.dataset, d.root, d.cache_dir, d.val_fraction, self.seed, d.foreground, d.textures)

    def evaluation(self) -> EvaluationSettings:
        from orchestrator.training import EvaluationSettings

        return EvaluationSettings(self.eval_batch_size, self.seed, self.latency_images, self.sample_maps)


def parse_overrides(tokens: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``key=value`` tokens into (settings dotlist dict, method field dict).

    Values use OmegaConf's grammar (``categories=[a,b]``, ``data.root=/x``, ``resume=true``).
    """
    settings: dict[str, Any] = {}
    method: dict[str, Any] = {}
    for token in tokens:
        if token in ("--help", "-h", "help"):
            settings["help"] = True
            continue
        if "=" not in token:
            raise ConfigError(f"bad argument {token!r}: expected key=value (e.g. ablation=transfusion_steps, method.steps=10)")
        key, _, _ = token.partition("=")
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([token]))
        value = _leaf(parsed, key.split("."))
        if key.startswith("method."):
            method[key[len("method."):]] = value
        else:
            settings[key] = value
    return settings, method


def _leaf(tree: Any, path: list[str]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def build_settings(values: dict[str, Any], base: dict[str, Any] | None = None) -> Settings:
    """Settings from dotted keys (``data.root``) on top of ``base`` (e.g. a search space's defaults)."""
    schema = OmegaConf.structured(Settings)
    try:
        merged = OmegaConf.merge(schema, base or {})
        for key, value in values.items():
            _check_known(schema, key)
            if key == "categories" and isinstance(value, str):
                raise ConfigError(f"categories must be a list, e.g. categories=[{value}], got {value!r}")
            OmegaConf.update(merged, key, value, merge=True, force_add=False)
        settings: Settings = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_omegaconf_message(exc, valid=settings_keys())) from None
    if settings.scale is not None and settings.scale not in SCALES:
        raise ConfigError(f"unknown scale {settings.scale!r}; valid: {', '.join(SCALES)}")
    if settings.method not in METHODS:
        raise ConfigError(f"unknown method {settings.method!r}; valid: {', '.join(sorted(METHODS))}")
    if settings.data.foreground not in ("auto", "on", "off"):
        raise ConfigError(f"unknown data.foreground {settings.data.foreground!r}; valid: auto, on, off")
    for key in AUTO_KEYS:
        parent, _, name = key.rpartition(".")
        owner = functools.reduce(getattr, parent.split("."), settings) if parent else settings
        setattr(owner, name, _auto_or_number(key, getattr(owner, name)))
    for key, (ok, valid) in RANGES.items():
        value = functools.reduce(getattr, key.split("."), settings)
        if value is not None and value != AUTO and not ok(value):
            raise ConfigError(f"{key} must be {valid}, got {value}")
    for name, amount in settings.trial.resources.items():
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
            raise ConfigError(f"trial.resources.{name} must be a number > 0 (Ray resource per worker), got {amount!r}")
    if not settings.drivers.strip():
        raise ConfigError("drivers must be head or the name of a Ray resource that driver nodes declare, got ''")
    return settings


# Settings that take `auto` or a number.
AUTO_KEYS = ("trial.gpus", "max_concurrent")


def _auto_or_number(key: str, value: Any) -> Any:
    if value == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be auto or a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be auto or a number, got {value!r}") from None
    if key == "max_concurrent":
        if number != int(number):
            raise ConfigError(f"{key} must be auto or a whole number, got {value!r}")
        return int(number)
    return number


# Every numeric setting and its valid range (a test checks none is missing): checked in
# build_settings, so a bad number stops the sweep before data, Ray or MLflow are touched.
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "data.val_fraction": (lambda v: 0 < v < 1, "in (0, 1) (the share of train/good held out for validation)"),
    "seed": (lambda v: 0 <= v < 2**32, "in [0, 2^32)"),
    "seeds": (lambda v: 1 <= v <= 100, "in [1, 100] (training seeds per grid point)"),
    "trial.cpus": (lambda v: v > 0, "> 0"),
    "trial.gpus": (lambda v: v >= 0, ">= 0"),
    "trial.workers": (lambda v: v >= 1, ">= 1"),
    "max_concurrent": (lambda v: v >= 1, ">= 1"),
    "num_samples": (lambda v: v >= 1, ">= 1 (leave it out to use the search space's num_samples)"),
    "max_failures": (lambda v: v >= 0, ">= 0"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0 = auto)"),
    "checkpoint_every_s": (lambda v: v > 0, "> 0 seconds"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "latency_images": (lambda v: v >= 1, ">= 1"),
    "sample_maps": (lambda v: v >= 0, ">= 0 (0 = none)"),
    "tracking_wait_s": (lambda v: v >= 0, ">= 0 seconds"),
}


def _check_known(schema: Any, key: str) -> None:
    if OmegaConf.select(schema, key, throw_on_missing=False, default="__missing__") == "__missing__" and key not in settings_keys():
        head, _, rest = key.partition(".")
        close = difflib.get_close_matches(key, settings_keys() + ([f"method.{rest}"] if rest else []), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {key!r}{hint}; valid: {', '.join(settings_keys())}, method.<field>")


def settings_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(Settings):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


def resolve_method_config(name: str, scale: str, *layers: dict[str, Any]) -> Any:
    """The method's frozen config: paper defaults <- PRESETS[scale] <- each layer in order."""
    cls = get_method(name)
    if scale not in cls.PRESETS:
        raise ConfigError(f"method {name} has no preset for scale {scale!r}; valid: {', '.join(cls.PRESETS)}")
    config_class = cls.Config
    valid = sorted(field_docs(config_class))
    merged = OmegaConf.structured(config_class)
    try:
        for layer in (cls.PRESETS[scale], *layers):
            for key in layer:
                if key not in valid:
                    raise ConfigError(f"unknown key 'method.{key}' for {name}; valid: {', '.join('method.' + v for v in valid)}")
            if layer:  # one merge per layer: each merge deep-copies the whole config
                merged = OmegaConf.merge(merged, dict(layer))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{name}: " + _omegaconf_message(exc, valid=[f"method.{v}" for v in valid], prefix="method.")) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid {name} config: {exc}") from None


def _omegaconf_message(exc: OmegaConfBaseException, valid: list[str], prefix: str = "") -> str:
    first = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    key = f"{prefix}{key}" if key else key
    if "not in" in first or "Key" in first and "not" in first:
        return f"unknown key {key!r}; valid: {', '.join(valid)}"
    return f"bad value for {key!r}: {first}"


SECRET_QUERY_KEYS = ("password", "secret", "token", "key", "credential", "signature")


def redact_uri(value: Any) -> Any:
    """A URI without its credentials (``user:***@host``, secret query values as ``***``);
    anything else unchanged. Settings pass through here before MLflow params or logs."""
    if not isinstance(value, str) or "://" not in value:
        return value
    parts = urllib.parse.urlsplit(value)
    if "@" not in parts.netloc and not any(s in parts.query.lower() for s in SECRET_QUERY_KEYS):
        return value  # nothing to hide: returned exactly as given (urlunsplit would rewrite sqlite:///)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else f"***@{host}"
    query = urllib.parse.urlencode([(k, "***" if any(s in k.lower() for s in SECRET_QUERY_KEYS) else v)
                                    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-able view of a (method or settings) dataclass: enums as values, tuples as lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, Enum):
            return v.value
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


def param_text(value: Any) -> str:
    """How a value is written as an MLflow param (and so how reports read it back)."""
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (MLflow params, report columns)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def describe_method_fields(name: str) -> list[str]:
    """Help lines: method.<field> (train|infer): doc."""
    cls = get_method(name)
    lines = []
    for field_name, (affects_training, doc) in field_docs(cls.Config).items():
        kind = "train" if affects_training else "infer"
        lines.append(f"  method.{field_name} [{kind}]  {doc}")
    return lines
