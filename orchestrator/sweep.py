"""Run an ablation sweep: Ray Tune over a search space, every trial in MLflow, then the report.

    python -m orchestrator.sweep ablation=transfusion_steps
    python -m orchestrator.sweep ablation=transfusion_lambda num_samples=12 max_concurrent=2
    python -m orchestrator.sweep ablation=transfusion_steps scale=paper dataset=mvtec_ad \\
        data.root=/data/mvtec categories=[bottle,carpet] trial.gpus=1 trial.workers=2
    python -m orchestrator.sweep ablation=transfusion_steps resume=true   # finish an interrupted sweep
    ray job submit --working-dir . -- python -m orchestrator.sweep ablation=transfusion_steps
    python -m orchestrator.sweep --help

Without RAY_ADDRESS an embedded local Ray is started; with it (or inside ``ray job
submit``) the sweep runs on that cluster.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator import search_space as spaces
from orchestrator.config import (Settings, build_settings, config_to_dict, describe_method_fields, flatten, parse_overrides,
                                 resolve_method_config, _settings_keys)
from orchestrator.errors import ConfigError, UserError

log = logging.getLogger("orchestrator.sweep")

TRIAL_DRIVER_MEMORY = 2**20  # bytes of Ray logical memory; see the trainable below


def settings_for(space: spaces.SearchSpace, values: dict[str, Any]) -> Settings:
    """The search space's defaults (dataset, scale, categories, trial resources) under the command line."""
    base = {"method": space.method, "dataset": space.dataset, "scale": space.scale, "trial": space.trial}
    if space.categories:
        base["categories"] = list(space.categories)
    if "method" in values and values["method"] != space.method:
        raise ConfigError(f"ablation {space.name} is for method {space.method}; drop method={values['method']} or pick another ablation")
    return build_settings(values, base)


def resolve_categories(settings: Settings) -> list[str]:
    from orchestrator.data import list_categories

    found = list_categories(settings.dataset, settings.data.root, settings.data.cache_dir)
    if not settings.categories:
        return found
    unknown = [c for c in settings.categories if c not in found]
    if unknown:
        raise ConfigError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in {settings.dataset}; valid: {', '.join(found)}")
    return list(settings.categories)


def valid_points(space: spaces.SearchSpace, scale: str, cli: dict[str, Any], extra: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """Grid points (or condition names) whose method config is valid, and why others were skipped."""
    keep, skipped = [], []
    labels = space.condition_names() if space.conditions else None
    for i, point in enumerate(space.grid_points()):
        try:
            resolve_method_config(space.method, scale, space.fixed, cli, extra, point)
        except ConfigError as exc:
            skipped.append(f"{labels[i] if labels else point}: {exc}")
            continue
        keep.append(labels[i] if labels else point)
    return keep, skipped


def print_help(ablation: str | None) -> None:
    print(__doc__)
    print("ablations:\n  " + "\n  ".join(f"{n}: {spaces.load(n).description}" for n in spaces.available()))
    print("keys:\n  " + ", ".join(_settings_keys()) + ", method.<field>")
    if ablation:
        method = spaces.load(ablation).method
        print(f"method fields of {method} (train = changing it trains a new model):")
        print("\n".join(describe_method_fields(method)))


def connect_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # a cluster (or the job's own head under `ray job submit`)
    else:
        start_local_ray()


def start_local_ray(num_cpus: int | None = None, **init_kwargs: Any) -> None:
    """An embedded single-machine Ray, with the Ray Train settings a laptop wants."""
    import ray

    # A trial's Ray Train worker group waits for CPUs while other trials train or
    # evaluate; on a laptop that can take minutes, which is not an error (Ray Train's
    # default start-up timeout, 60 s, logs one and retries).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "3600")
    # Every Ray Train run otherwise starts one more process (importing Ray Train) to
    # watch for spot-instance preemption, which a single machine never sees, and
    # notices a finished worker group only at its 2 s health-check poll. Both are
    # per-trial costs that dominate short trials on a laptop.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # address="local": never attach to a stale cluster named in /tmp/ray (FACTS.md).
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **{"log_to_driver": True, **init_kwargs})


def latest_sweep_dir(root: Path, prefix: str) -> Path | None:
    candidates = sorted(root.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def run(tokens: list[str]) -> dict[str, Any]:
    values, cli_method = parse_overrides(tokens)
    if values.get("help") or "ablation" not in values:
        print_help(values.get("ablation"))
        if not values.get("help"):
            raise ConfigError(f"missing ablation=<name>; valid: {', '.join(spaces.available())}")
        return {}
    space = spaces.load(values["ablation"])
    settings = settings_for(space, values)
    scale = settings.scale or space.scale
    categories = resolve_categories(settings)
    from methods import get_method

    method_cls = get_method(space.method)
    extra = {"num_categories": len(categories)} if method_cls.multi_class else {}
    default_config = resolve_method_config(space.method, scale, space.fixed, cli_method, extra)
    points, skipped = valid_points(space, scale, cli_method, extra)
    for reason in skipped:
        log.warning("skipping grid point %s", reason)
    if not points and space.search == "grid":
        raise ConfigError(f"every grid point of {space.name} is invalid: {'; '.join(skipped)}")

    # Decode and cache every category once, here, before trials start: errors surface
    # before Ray does, and concurrent trials never race to build the same cache.
    from orchestrator import training
    from orchestrator.data import texture_bank

    datas = training.load_data(settings.dataset, categories, default_config, root=settings.data.root, cache_dir=settings.data.cache_dir,
                               val_fraction=settings.data.val_fraction, seed=settings.seed, foreground=settings.data.foreground,
                               textures=settings.data.textures)
    texture_bank(datas[0].train_images.shape[-1], cache_dir=settings.data.cache_dir, source=settings.data.textures)

    from orchestrator import report, tracking

    storage = Path(settings.storage_path).resolve()
    sweeps_root = storage / "sweeps"
    prefix = f"{space.name}-{settings.dataset}"
    uri = tracking.resolve_uri(settings.tracking_uri)
    mlflow_client = tracking.client(uri)
    experiment = tracking.experiment_id(mlflow_client, space.name)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.store import claims_actor
    from orchestrator.trial import TrialSpec, run_trial, trial_method_config

    resume_dir = latest_sweep_dir(sweeps_root, prefix) if settings.resume else None
    if settings.resume and (resume_dir is None or not tune.Tuner.can_restore(str(resume_dir))):
        raise ConfigError(f"resume=true but no restorable sweep {prefix}-* under {sweeps_root}; run without resume=true")
    sweep_name = resume_dir.name if resume_dir else f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"

    connect_ray()
    claims_name = f"claims-{sweep_name}"
    claims = claims_actor(claims_name)
    spec = TrialSpec(space=space, settings=settings, method_overrides=cli_method, categories=tuple(categories), scale=scale,
                     claims_actor=claims_name, storage_path=str(storage), artifact_dir=str(storage / "artifacts" / sweep_name))

    per_category = space.search == "grid" and not method_cls.multi_class
    if space.search == "grid":
        param_space: dict[str, Any] = {"condition" if space.conditions else "point": tune.grid_search(points)}
        if per_category:
            param_space["category"] = tune.grid_search(categories)
        search_alg = None
    else:
        param_space = {a.name: _distribution(a) for a in space.axes}
        search_alg = OptunaSearch(metric=space.metric, mode=space.mode, points_to_evaluate=list(space.points_to_evaluate) or None, seed=settings.seed)
    scheduler = ASHAScheduler(time_attr="training_iteration", **space.asha) if space.asha else None

    def trial_params(config: dict[str, Any]) -> dict[str, Any]:
        method_config = trial_method_config(spec, config)
        params = flatten({"method": config_to_dict(method_config)})
        params.update({"method": space.method, "ablation": space.name, "dataset": settings.dataset, "scale": scale,
                       "seed": settings.seed, "categories": config.get("category") or ",".join(categories),
                       "trial.workers": settings.trial.workers, "trial.cpus": settings.trial.cpus, "trial.gpus": settings.trial.gpus})
        if "condition" in config:
            params["condition"] = config["condition"]
        return params

    tags = {"ablation": space.name, "dataset": settings.dataset, "scale": scale, "method": space.method,
            "git_commit": tracking.git_commit(), "search": space.search, "selection_metric": space.metric,
            "method_overrides": " ".join(f"method.{k}={v}" for k, v in sorted(cli_method.items())) or "none"}
    parent = tracking.start_sweep_run(mlflow_client, experiment, sweep_name, tags,
                                      {**flatten({"settings": config_to_dict(settings)}), "categories": ",".join(categories),
                                       "skipped_points": "; ".join(skipped) or "none"}, resume=bool(resume_dir))
    space_file = spaces.SPACES_DIR / f"{space.name}.yaml"
    mlflow_client.log_artifact(parent, str(space_file), artifact_path="config")
    logger = tracking.MLflowTrialLogger(uri, experiment, parent, trial_params, {"ablation": space.name, "dataset": settings.dataset})

    # The trial function only drives Ray Train and waits; Train's workers and the
    # evaluation task hold the CPUs/GPUs. It must claim *no* CPU: even 0.01 CPU per
    # trial leaves 1.98 of 2 CPUs, and the second trial's 1-CPU worker never fits.
    # A bundle cannot be empty, so it claims 1 MiB of Ray's logical memory instead.
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec), {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if resume_dir:
        log.info("resuming sweep %s", resume_dir)
        tuner = tune.Tuner.restore(str(resume_dir), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=settings.num_samples or space.num_samples,
                                        max_concurrent_trials=settings.max_concurrent,
                                        # one trial-driver process serves trial after trial instead of
                                        # each paying a fresh process's imports (torch, diffusers, Ray Train)
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=sweep_name, storage_path=str(sweeps_root),
                                      failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                      callbacks=[logger]),
        )
    results = tuner.fit()
    failed = [r for r in results if r.error is not None]
    # Ctrl-C: Tune saved its state and returned; trials without a final test result are unfinished.
    unfinished = [r for r in results if r.error is None and "test_image_auroc" not in (r.metrics or {})]
    del claims
    if unfinished:
        tracking.finish_run(mlflow_client, parent, status="KILLED")
        print(f"\nsweep {sweep_name} interrupted: {len(unfinished)} of {len(results)} trials unfinished; "
              f"finish them with: python -m orchestrator.sweep {' '.join(t for t in tokens if not t.startswith('resume='))} resume=true")
        return {"sweep": sweep_name, "trials": len(results), "failed": len(failed), "unfinished": len(unfinished),
                "tracking_uri": uri, "reports": [], "parent_run_id": parent}
    tracking.finish_run(mlflow_client, parent, ok=not failed)
    written = report.write_reports(space.name, uri, Path("reports"))
    written += report.write_leaderboard(uri, Path("reports"))
    for path in written:
        mlflow_client.log_artifact(parent, str(path), artifact_path="report")
    summary = {"sweep": sweep_name, "trials": len(results), "failed": len(failed), "tracking_uri": uri,
               "reports": [str(p) for p in written], "parent_run_id": parent}
    print(f"\nsweep {sweep_name}: {len(results)} trials, {len(failed)} failed")
    for r in failed:
        print(f"  failed trial {r.path}: {str(r.error).splitlines()[0] if str(r.error) else type(r.error).__name__}")
    if written:
        print(f"report: {written[0]}")
    print(f"review the runs: mlflow ui --backend-store-uri {uri}")
    return summary


def _distribution(axis: spaces.Axis):
    from ray import tune

    low_high = axis.values
    if axis.kind == "uniform":
        return tune.uniform(*low_high)
    if axis.kind == "loguniform":
        return tune.loguniform(*low_high)
    if axis.kind == "int":
        return tune.randint(low_high[0], low_high[1] + 1)
    if axis.kind in ("choice", "grid"):
        return tune.choice(list(axis.values))
    raise ConfigError(f"unknown distribution {axis.kind!r}; valid: {', '.join(spaces.DISTRIBUTIONS)}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if summary.get("failed") or summary.get("unfinished") else 0


if __name__ == "__main__":
    sys.exit(main())
