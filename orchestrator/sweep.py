"""Run an ablation sweep: Ray Tune over a search space, every trial in MLflow, then the report.

    python -m orchestrator.sweep ablation=transfusion_steps
    python -m orchestrator.sweep ablation=transfusion_lambda num_samples=12 max_concurrent=2
    python -m orchestrator.sweep ablation=transfusion_steps scale=paper dataset=mvtec_ad \\
        data.root=/data/mvtec categories=[bottle,carpet] trial.gpus=1 trial.workers=2
    python -m orchestrator.sweep ablation=transfusion_steps resume=true   # finish an interrupted sweep
    python -m orchestrator.sweep ablation=transfusion_steps dry_run=true  # print the plan, start nothing
    ray job submit --working-dir . -- python -m orchestrator.sweep ablation=transfusion_steps
    python -m orchestrator.sweep --help

Without RAY_ADDRESS an embedded local Ray is started; with it (or inside ``ray job
submit``) the sweep runs on that cluster.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import search_space as spaces
from orchestrator.config import build_settings, config_to_dict, describe_method_fields, flatten, parse_overrides, redact_uri, settings_keys
from orchestrator.errors import ConfigError, UserError

if TYPE_CHECKING:  # imported in run(), after the command line is read: --help and a bad key answer before torch loads
    from orchestrator.plan import SweepPlan
    from orchestrator.storage import Storage

log = logging.getLogger("orchestrator.sweep")


def print_help(ablation: str | None) -> None:
    print(__doc__)
    print("ablations:\n  " + "\n  ".join(f"{n}: {spaces.description(n)}" for n in spaces.available()))
    print("keys:\n  " + ", ".join(settings_keys()) + ", method.<field>")
    if ablation:
        method = spaces.load(ablation).method
        print(f"method fields of {method} (train = changing it trains a new model):")
        print("\n".join(describe_method_fields(method)))


def prepare_data(sweep: SweepPlan) -> dict[str, dict[str, int]]:
    """Decode and cache every category once, here, before trials start: errors surface
    before Ray does, and concurrent trials never race to build the same cache. Returns
    the split sizes per category (for the runs' MLflow dataset input)."""
    from orchestrator.training import load_datas

    configs = [p.config for p in sweep.points] or [sweep.default_config]
    splits: dict[str, dict[str, int]] = {}
    for size in sorted({(c.image_size, c.crop_size) for c in configs}, key=str):  # a benchmark's methods differ in size
        config = next(c for c in configs if (c.image_size, c.crop_size) == size)
        datas = load_datas(sweep.data, sweep.categories, config)
        sweep.data.texture_bank(datas[0].train_images.shape[-1])
        splits = {d.category: {"train": len(d.train_images), "val": len(d.val_images), "test": len(d.test_images)} for d in datas}
    return splits


def dry_run_cluster():
    """The cluster a dry run describes: the one RAY_ADDRESS names (connecting starts
    nothing), else this machine as an embedded Ray would see it."""
    if os.environ.get("RAY_ADDRESS"):
        from orchestrator import ray_backend

        ray_backend.connect()
        return ray_backend.cluster(False)
    from orchestrator.plan import local_cluster

    return local_cluster()


def sweep_tags(sweep: SweepPlan, git_commit: str) -> dict[str, str]:
    return {"ablation": sweep.space.name, "dataset": sweep.settings.dataset, "scale": sweep.scale, "method": ",".join(sweep.methods),
            "git_commit": git_commit, "search": sweep.space.search, "selection_metric": sweep.space.metric,
            "objectives": ",".join(name for name, _ in sweep.objectives), "default_label": sweep.default_label,
            "method_overrides": " ".join(f"method.{k}={v}" for k, v in sorted(sweep.method_overrides.items())) or "none"}


def run(tokens: list[str]) -> dict[str, Any]:
    values, method_overrides = parse_overrides(tokens)
    if values.get("help") or "ablation" not in values:
        print_help(values.get("ablation"))
        if not values.get("help"):
            raise ConfigError(f"missing ablation=<name>; valid: {', '.join(spaces.available())}")
        return {}

    build_settings(values)  # a mistyped or out-of-range setting: one line, before the planner's imports

    # 1. plan: every trial's method config resolved and checked before anything starts
    from orchestrator.leases import Lease
    from orchestrator.plan import plan, sweep_prefix
    from orchestrator.storage import Storage

    sweep = plan(values, method_overrides)
    if sweep.settings.dry_run:
        print("\n".join(sweep.describe(dry_run_cluster())))
        return {"dry_run": True}
    for reason in sweep.skipped:
        log.warning("skipping grid point %s", reason)
    # 2. data: decoded and cached once
    splits = prepare_data(sweep)

    # Ray and MLflow are imported only now: a bad command line fails in a second.
    from orchestrator import ray_backend

    s = sweep.settings
    storage = Storage(s.storage_path)
    storage.check_conditional_writes()  # leases are conditional writes: a store that ignores them stops here
    # A local folder must be one that every node of the cluster sees.
    ray_backend.connect()
    ray_backend.check_shared_storage(storage)
    prefix = sweep_prefix(sweep.space.name, s.dataset)
    resumed = ray_backend.latest_sweep(storage, prefix) if s.resume else None
    if s.resume and resumed is None:
        raise ConfigError(f"resume=true but no restorable sweep {prefix}-* under {storage.join('sweeps')}; run without resume=true")
    # The sweep's lease says its driver is alive (a second driver of the same sweep is
    # refused); runs of sweeps on this storage whose lease expired (SIGKILL) are closed.
    owner = f"{socket.gethostname()}/{os.getpid()}"
    if resumed:
        sweep_name, lease = resumed, Lease(storage, f"sweep-{resumed}", owner=owner)
        if not lease.acquire():
            holder = lease.read()
            raise ConfigError(f"sweep {sweep_name} is running (driver {holder.host if holder else '?'} pid {holder.pid if holder else '?'}); "
                              "wait for it or stop it first")
    else:
        # A new sweep takes the first free name of its second: another cluster on this
        # storage may have started the same ablation in the same second (-2, -3, ... sort after it).
        stamp = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 100):
            sweep_name = stamp if n == 1 else f"{stamp}-{n}"
            lease = Lease(storage, f"sweep-{sweep_name}", owner=owner)
            if lease.acquire():
                break
        else:
            raise ConfigError(f"99 sweeps named {stamp}* are running on {s.storage_path}; wait a second and submit again")
    lease.hold()
    try:
        return run_sweep(sweep, tokens, storage, sweep_name, resumed is not None, splits)
    finally:
        lease.release()


def run_sweep(sweep: SweepPlan, tokens: list[str], storage: Storage, sweep_name: str, resume: bool,
              splits: dict[str, dict[str, int]]) -> dict[str, Any]:
    from orchestrator import ray_backend, report, tracking
    from orchestrator.leases import Lease
    from orchestrator.plan import resolve_trial_resources
    from orchestrator.schedule import costs

    s = sweep.settings
    # Ray: `auto` resources resolved against the cluster; a trial the cluster can never hold
    # stops the sweep here, before MLflow is written
    ray_backend.connect()
    where = ray_backend.cluster(s.autoscaling)
    resources = resolve_trial_resources(s, where)
    for note in resources.notes:
        log.info("%s", note)
    ray_backend.check_resources(resources, where, s.drivers, s.autoscaling)
    # 3. the parent run (after closing the runs of dead sweeps on this storage). From here
    # every MLflow write goes through the sweep's writer thread: an outage delays the runs,
    # never the trials; what MLflow cannot take is spooled under storage_path and replayed.
    uri = tracking.resolve_uri(s.tracking_uri)
    for name in tracking.close_dead_sweeps(uri, sweep.space.name, storage.uri,
                                           alive=lambda other: Lease(storage, f"sweep-{other}", "").alive()):
        log.warning("sweep %s had died (its lease expired): its RUNNING runs are marked KILLED", name)
    parent = tracking.SweepRun(uri, sweep.space.name, storage, sweep_name)
    parent.open({**sweep_tags(sweep, tracking.git_commit()), "storage": storage.uri},
                {**{k: redact_uri(v) for k, v in flatten({"settings": config_to_dict(s)}).items()}, "categories": ",".join(sweep.categories),
                 "skipped_points": "; ".join(sweep.skipped) or "none", "resolved.trial.gpus": resources.gpus,
                 "resolved.max_concurrent": resources.max_concurrent}, resume=resume)
    parent.log_artifact(sweep.space.source, "config")
    recorder = tracking.TrialRecorder(parent, {"ablation": sweep.space.name, "dataset": s.dataset},
                                      tracking.dataset_description(s.dataset, s.data.root, splits, seed=s.seed,
                                                                   val_fraction=s.data.val_fraction, foreground=s.data.foreground))

    # 4. Tune, with the sweep's scheduler and its training pipeline
    context = ray_backend.TrialContext(plan=sweep, resources=resources, sweep_name=sweep_name, storage_path=storage.uri)
    started = time.time()
    outcome = ray_backend.run_sweep(context, recorder, where, resume=resume)
    outcomes = outcome.trials

    # 5. what the sweep cost, and its schedule (also what bench.cluster_schedule reads)
    unit = "GPU" if resources.gpus else "CPU"
    spent = costs(outcome.records, unit)
    for trial_id, hours in spent.per_trial.items():
        recorder.log_numbers(f"{sweep_name}/{trial_id}", {f"cost_{unit.lower()}_hours": hours, "cost_share": spent.share(trial_id)})
    trained = sum(r.kind == "train" and r.trial is None for r in outcome.records) + sum(o.models_trained for o in outcomes)
    parent.log_numbers({"models_trained": trained, f"cost_{unit.lower()}_hours": spent.total_hours,
                        f"cost_training_{unit.lower()}_hours": spent.training_hours,
                        f"cost_evaluation_{unit.lower()}_hours": spent.evaluation_hours, "cost_wall_seconds": time.time() - started})
    schedule_file = f"artifacts/{sweep_name}/schedule.json"
    storage.write_text(schedule_file, json.dumps([dataclasses.asdict(r) for r in outcome.records]))

    # 6. summary: an interrupted sweep (Ctrl-C or SIGTERM: Tune saved its state) is resumable.
    # Writes MLflow could not take during an outage are replayed first (waiting a while for it).
    writer = parent.writer
    if writer.down:
        log.warning("MLflow at %s is not answering; waiting up to %.0f s to replay %d spooled writes",
                    redact_uri(uri), s.tracking_wait_s, writer.spooled - writer.replayed)
    reachable = writer.drain(timeout=s.tracking_wait_s)
    states = dict(recorder.states)
    if reachable and any(o.trial_id not in states for o in outcomes):  # trials a resumed sweep finished before
        states = {**parent.trial_states(), **states}
    failed = [o for o in outcomes if o.error or states.get(o.trial_id) == "failed"]
    unfinished = [o for o in outcomes if o not in failed and states.get(o.trial_id) not in ("finished", "stopped")]
    stopped = [o for o in outcomes if states.get(o.trial_id) == "stopped"]
    summary = {"sweep": sweep_name, "trials": len(outcomes), "failed": len(failed), "unfinished": len(unfinished),
               "stopped_early": len(stopped), "tracking_uri": uri, "reports": [], "schedule": storage.join(schedule_file),
               "max_concurrent": resources.max_concurrent, "models_trained": trained}
    if unfinished:
        parent.finish("KILLED")
        print(f"\nsweep {sweep_name} interrupted: {len(unfinished)} of {len(outcomes)} trials unfinished; "
              f"finish them with: python -m orchestrator.sweep {' '.join(t for t in tokens if not t.startswith('resume='))} resume=true")
        return close_tracking(summary, writer, parent)
    parent.finish("FAILED" if failed else "FINISHED")
    print(f"\nsweep {sweep_name}: {len(outcomes)} trials, {len(failed)} failed, {len(stopped)} stopped early by the scheduler; "
          f"{spent.total_hours:.3f} {unit}-hours")
    for o in failed:
        print(f"  failed trial {o.path}: {o.error}")
    if not writer.drain(timeout=s.tracking_wait_s if reachable else 0):
        print(f"MLflow at {redact_uri(uri)} is not answering: {writer.spooled - writer.replayed} writes wait in "
              f"{storage.join(writer.spool_rel)}; `resume=true` replays them, then `python -m orchestrator.report` writes the report")
        return close_tracking(summary, writer, parent)
    written = report.write_reports(sweep.space, uri, Path("reports")) + report.write_leaderboard(uri, Path("reports"))
    for path in written:
        parent.log_artifact(path, "report")
    summary["reports"] = [str(p) for p in written]
    if written:
        print(f"report: {written[0]}")
    for line in report.agreement_lines(sweep.space, uri, sweep_name):
        print(f"selection check, {line}")
    site = Path("reports") / "site" / "index.html"
    if site.exists():
        print(f"report site: {site.resolve()}")
    close_tracking(summary, writer, parent)
    print(tracking.review_hint(uri, parent.experiment, parent.run_id))
    return summary


def close_tracking(summary: dict[str, Any], writer, parent) -> dict[str, Any]:
    """Wait for the sweep's MLflow writes (written, or kept in the spool) and say what an
    outage cost: writes spooled, replayed, refused."""
    writer.flush(timeout=600)  # what is still queued is written, or spooled for a later replay
    summary.update(parent_run_id=parent.run_id, mlflow_spooled=writer.spooled, mlflow_replayed=writer.replayed,
                   mlflow_refused=writer.dead)
    if writer.spooled:
        log.info("MLflow writes during the sweep: %d spooled, %d replayed", writer.spooled, writer.replayed)
    return summary


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
