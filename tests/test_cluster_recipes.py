"""The cluster recipes (clusters/*.yaml) carry what a cluster run needs, and every sweep
command they name plans.

Checked per recipe: torch hub's cache (TORCH_HOME) on the shared volume on every node, the
MLflow server reaching the sweep's driver through its environment, no open dashboard, the
launcher's rsync excludes; then each `python -m orchestrator.sweep ...` (a RayJob's
entrypoint, or the command a recipe's header tells a person to submit) runs in-process with
`dry_run=true` against a tiny fake copy of the data it names. The recipes' own paths are on
/shared, which this machine does not have, and their MLflow servers are not reachable from
here: the dry run gets temporary paths (data.root, data.cache_dir, storage_path) and a local
tracking store instead, after separate tests checked the recipe's own values.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator import sweep
from test_datasets import build_mvtec_like

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"
RECIPES = ("kuberay-rayjob.yaml", "kuberay-raycluster.yaml", "aws-launcher.yaml")
KUBERAY = ("kuberay-rayjob.yaml", "kuberay-raycluster.yaml")
SHARED = "/shared/"
# What `ray up` must not copy to the nodes (local venvs, caches, the local MLflow store, outputs).
RSYNC_EXCLUDES = {".venv", ".cache", "mlruns", "mlflow.db", "ray_results", "reports"}
# Datasets in MVTec AD's layout, and the category a fake tree gets when a command names none.
MVTEC_LAYOUT = {"mvtec_ad": "bottle", "mpdd": "bracket_black"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def cluster_spec(recipe: dict) -> dict:
    """The RayCluster spec: a RayCluster's own, or the one a RayJob creates."""
    spec = recipe["spec"]
    return spec["rayClusterSpec"] if recipe["kind"] == "RayJob" else spec


def ray_containers(recipe: dict) -> list[dict]:
    """The head's and every worker group's Ray container (the first of each pod)."""
    spec = cluster_spec(recipe)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"]["containers"][0] for group in groups]


def container_env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def start_env(command: str) -> dict[str, str]:
    """The variables an `env K=V ... ray start` launcher command sets."""
    words = shlex.split(command)
    assert words[0] == "env" and "ray" in words, f"not an `env ... ray start` command: {command}"
    return dict(word.split("=", 1) for word in words[1:words.index("ray")])


def launcher_start_commands(recipe: dict) -> dict[str, str]:
    """The `ray start` line of the head and of the workers."""
    return {role: next(c for c in recipe[f"{role}_start_ray_commands"] if "ray start" in c) for role in ("head", "worker")}


def driver_env(name: str) -> dict[str, str]:
    """The environment the sweep's driver gets from the recipe."""
    recipe = load(name)
    if name == "kuberay-rayjob.yaml":
        return yaml.safe_load(recipe["spec"]["runtimeEnvYAML"])["env_vars"]
    if name == "kuberay-raycluster.yaml":  # `ray job submit` drivers run on the head pod
        return container_env(ray_containers(recipe)[0])
    return start_env(launcher_start_commands(recipe)["head"])


def sweep_commands(name: str) -> list[list[str]]:
    """Every `python -m orchestrator.sweep ...` of a recipe, as override tokens: a RayJob's
    entrypoint, and the commands in its header comments (shell continuations joined)."""
    text = (CLUSTERS / name).read_text()
    comments = "\n".join(line.strip()[1:] for line in text.splitlines() if line.strip().startswith("#"))
    sources = [comments.replace("\\\n", " ")]
    entrypoint = load(name).get("spec", {}).get("entrypoint")
    if entrypoint:
        sources.append(entrypoint)
    pattern = re.compile(r"python -m orchestrator\.sweep ([^\n]+)")
    return [shlex.split(match.group(1)) for source in sources for match in pattern.finditer(source)]


def overrides(tokens: list[str]) -> dict[str, str]:
    return dict(token.split("=", 1) for token in tokens)


COMMANDS = [(name, i) for name in RECIPES for i in range(len(sweep_commands(name)))]


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_names_a_sweep_on_shared_storage(name):
    commands = sweep_commands(name)
    assert commands, f"{name}: no `python -m orchestrator.sweep ...` command found"
    for tokens in commands:
        keys = overrides(tokens)
        # Object storage is not supported by storage_path yet: a path every node mounts.
        for key in ("storage_path", "data.cache_dir", "data.root"):
            assert keys.get(key, "").startswith(SHARED), f"{name}: {key} must be on the shared volume: {shlex.join(tokens)}"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_torch_home_on_the_shared_volume(name):
    recipe = load(name)
    for container in ray_containers(recipe):
        assert container_env(container).get("TORCH_HOME", "").startswith(SHARED), f"{name}: {container['name']} lacks TORCH_HOME on /shared"
        assert "/shared" in [m["mountPath"] for m in container.get("volumeMounts", [])], f"{name}: {container['name']} does not mount /shared"


def test_launcher_torch_home_on_the_shared_file_system():
    recipe = load("aws-launcher.yaml")
    for role, command in launcher_start_commands(recipe).items():
        assert start_env(command).get("TORCH_HOME", "").startswith(SHARED), f"{role}: {command}"
    assert any("mount" in c and "/shared" in c for c in recipe["setup_commands"]), "the shared file system is not mounted"


@pytest.mark.parametrize("name", RECIPES)
def test_mlflow_tracking_uri_reaches_the_driver(name):
    uri = driver_env(name).get("MLFLOW_TRACKING_URI", "")
    assert re.match(r"https?://", uri), f"{name}: the driver gets no MLflow server URI ({uri!r})"


def test_rayjob_passes_its_environment_through_the_runtime_env():
    env = yaml.safe_load(load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert {"MLFLOW_TRACKING_URI", "TORCH_HOME"} <= set(env)


def test_launcher_does_not_copy_local_state_to_the_nodes():
    excluded = set(load("aws-launcher.yaml").get("rsync_exclude") or [])
    assert RSYNC_EXCLUDES <= excluded, f"rsync_exclude lacks {sorted(RSYNC_EXCLUDES - excluded)}"


def test_launcher_dashboard_only_on_localhost():
    head = launcher_start_commands(load("aws-launcher.yaml"))["head"]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, head


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_dashboard_behind_token_auth_or_localhost(name):
    spec = cluster_spec(load(name))
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host")
    mode = (spec.get("authOptions") or {}).get("mode")
    assert host == "127.0.0.1" or mode == "token", f"{name}: dashboard on {host} without token authentication"


@pytest.mark.parametrize(("name", "index"), COMMANDS, ids=[f"{n}-{i}" for n, i in COMMANDS])
def test_recipe_sweep_command_plans(name, index, tmp_path, monkeypatch, capsys):
    tokens = sweep_commands(name)[index]
    keys = overrides(tokens)
    replaced = {"storage_path": str(tmp_path / "ray_results"), "data.cache_dir": str(tmp_path / "cache")}
    dataset = keys.get("dataset", "synthetic")
    if "data.root" in keys:
        assert dataset in MVTEC_LAYOUT, f"{name}: add a fake tree for dataset={dataset} to this test"
        named = keys.get("categories", "").strip("[]")
        categories = [c.strip() for c in named.split(",") if c.strip()] or [MVTEC_LAYOUT[dataset]]
        root = tmp_path / dataset
        for category in categories:
            build_mvtec_like(root, category)
        replaced["data.root"] = str(root)
    # The plan checks that an MLflow server answers: the recipe's (placeholder or in-cluster)
    # server is never contacted from here, a local store stands in for it.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    replaced["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [f"{key}={replaced[key]}" if key in replaced else token for token in tokens for key in [token.split("=", 1)[0]]]
    args += [f"{key}={value}" for key, value in replaced.items() if key not in keys]
    assert sweep.run(args + ["dry_run=true"]) == {"dry_run": True}
    out = capsys.readouterr().out
    assert f"sweep {keys['ablation']}:" in out and f"on {dataset}" in out, out
    assert f"storage: {replaced['storage_path']}" in out, out
    if "trial.gpus" in keys:
        assert f"+ {float(keys['trial.gpus']):g} GPU" in out, out
    else:  # auto: sized to the cluster the dry run sees (this machine)
        assert "trial.gpus=auto -> " in out and "max_concurrent=auto -> " in out, out


def worker_groups(recipe: dict) -> list[dict]:
    return cluster_spec(recipe)["workerGroupSpecs"]


def pod_specs(recipe: dict) -> list[dict]:
    spec = cluster_spec(recipe)
    return [group["template"]["spec"] for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pods_run_one_image_pinned_by_digest(name):
    images = {container["image"] for container in ray_containers(load(name))}
    assert len(images) == 1, f"{name}: pods run different images {images}"
    assert "@sha256:" in images.pop(), f"{name}: a tag (e.g. :latest) can point at other code on a node that pulls later; use @sha256:<digest>"


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_pods_have_shared_memory(name):
    for pod in pod_specs(load(name)):
        memory_volumes = {v["name"] for v in pod.get("volumes", []) if (v.get("emptyDir") or {}).get("medium") == "Memory"}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}
        assert mounts.get("/dev/shm") in memory_volumes, f"{name}: {pod['containers'][0]['name']} has no in-memory /dev/shm"


def scales_from_zero(name: str) -> bool:
    recipe = load(name)
    if name == "aws-launcher.yaml":
        return any(t.get("min_workers", 0) == 0 for n, t in recipe["available_node_types"].items() if n != recipe["head_node_type"])
    return any(group.get("minReplicas", 0) == 0 or group.get("replicas", 0) == 0 for group in worker_groups(recipe))


@pytest.mark.parametrize("name", RECIPES)
def test_a_cluster_that_starts_without_workers_grows_and_the_sweep_waits(name):
    recipe = load(name)
    if not scales_from_zero(name):  # a fixed-size cluster: the sweep sizes itself (auto)
        group_sizes = [(g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in worker_groups(recipe)]
        assert all(len(set(sizes)) == 1 for sizes in group_sizes), f"{name}: replicas, minReplicas and maxReplicas differ"
        for tokens in sweep_commands(name):
            assert not {"trial.gpus", "max_concurrent"} & set(overrides(tokens)), f"{name}: leave trial.gpus and max_concurrent auto"
        return
    if name == "aws-launcher.yaml":
        head = launcher_start_commands(recipe)["head"]
        assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head, f"the launcher's head must run the autoscaler: {head}"
        workers = [t for n, t in recipe["available_node_types"].items() if n != recipe["head_node_type"]]
        assert all(t.get("resources", {}).get("GPU") for t in workers), "the autoscaler must know what a worker node offers"
    else:
        assert cluster_spec(recipe).get("enableInTreeAutoscaling"), f"{name}: zero-replica workers without an autoscaler never start"
    for tokens in sweep_commands(name):
        keys = overrides(tokens)
        assert keys.get("autoscaling") == "true", f"{name}: without autoscaling=true the sweep refuses a cluster with no GPU yet"
        # the autoscaler's maximum may not be published: the command states the cap
        assert {"trial.gpus", "max_concurrent"} <= set(keys), f"{name}: state trial.gpus and max_concurrent for a growing cluster"


@pytest.mark.parametrize("name", RECIPES)
def test_job_stop_leaves_the_sweep_time_to_stop_cleanly(name):
    """`ray job stop` SIGKILLs the driver 3 s after SIGTERM unless the head says otherwise:
    too soon to save Tune's state, mark the runs KILLED and release the leases."""
    recipe = load(name)
    head = (launcher_start_commands(recipe)["head"] if name == "aws-launcher.yaml" else None)
    env = start_env(head) if head else container_env(ray_containers(recipe)[0])
    assert int(env.get("RAY_JOB_STOP_WAIT_TIME_S", "3")) >= 60, f"{name}: set RAY_JOB_STOP_WAIT_TIME_S on the head"
