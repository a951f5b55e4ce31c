"""Ray heads and nodes of a test's own: `ray start` on loopback, each with its own temp
folder and ports, stopped by killing exactly their processes (found by that folder, with
every worker they started), never by `ray stop`, which kills every Ray process on the
machine — another test's, or a user's sweep beside the tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from services import free_ports

RAY = str(Path(sys.executable).with_name("ray"))


def ray_cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def processes_of(marker: str) -> set[int]:
    """Every process whose command line names ``marker`` (a node's temp folder), and their descendants."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.add(int(entry))
            except OSError:
                continue
    tree, todo = _children(), list(found)
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class RayNode:
    """One `ray start` of this test: its processes are the ones that name its temp folder."""

    def __init__(self, args: list[str], env: dict[str, str], gcs: str | None = None):
        self.temp = Path("/tmp") / f"rt{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths are length-limited
        self.env = env
        # Ray processes that look their cluster up by themselves (Ray Train's placement-group
        # cleaner, the State API) read <RAY_TMPDIR>/ray/ray_current_cluster, else scan the
        # machine: with two clusters up (two tests, a bench) they would reach the other one
        # and leave placement groups behind. RAY_TMPDIR reaches the raylet and its workers.
        # Ports Ray would otherwise take at fixed defaults (the dashboard agent's HTTP port
        # 52365, the client server's 10001): a second head on the machine could not bind them,
        # and its job API would answer "No available agent to submit job" for ever.
        agent, agent_grpc, metrics, runtime_env_agent, client = free_ports(5)
        ports = [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                 f"--runtime-env-agent-port={runtime_env_agent}", *([f"--ray-client-server-port={client}"] if "--head" in args else [])]
        started = ray_cli("start", *args, *ports, "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}", "--disable-usage-stats",
                          env={**env, "RAY_TMPDIR": str(self.temp)})
        if started.returncode != 0:
            self.stop()
            raise AssertionError(f"ray start failed: {started.stderr[-2000:]}")
        if gcs is not None:
            written = self.temp / "ray_current_cluster"  # what `ray start --head --temp-dir` wrote, if it did
            (self.temp / "ray").mkdir(exist_ok=True)
            (self.temp / "ray" / "ray_current_cluster").write_text(written.read_text() if written.is_file() else gcs)

    def pids(self) -> set[int]:
        return processes_of(str(self.temp))

    def kill(self) -> None:
        """The node is lost (a reclaimed spot instance): every process of it dies at once."""
        signal_all(self.pids(), signal.SIGKILL)

    def stop(self, grace: float = 10.0) -> None:
        signal_all(self.pids(), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        signal_all(self.pids(), signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


class RayHead(RayNode):
    """A head on loopback with its dashboard (the job API); ``env`` reaches it (RAY_ADDRESS)."""

    def __init__(self, cpus: int, env: dict[str, str], resources: str | None = None):
        self.port, self.dashboard_port = free_ports(2)
        env = {**env, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        super().__init__(["--head", f"--num-cpus={cpus}", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={self.dashboard_port}", *([f"--resources={resources}"] if resources else [])], env,
                         gcs=f"127.0.0.1:{self.port}")
        self.nodes: list[RayNode] = []
        self.job_env = {**env, "RAY_ADDRESS": self.dashboard}

    @property
    def dashboard(self) -> str:
        """The job and state API; name it explicitly: without an address Ray's clients look for
        /tmp/ray/ray_current_cluster, which another (dead) cluster may have left behind."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add_node(self, cpus: int, resources: str | None = None) -> RayNode:
        """A worker node with a temp folder of its own, as on a machine of its own."""
        node = RayNode([f"--address={self.gcs}", f"--num-cpus={cpus}", *([f"--resources={resources}"] if resources else [])], self.env,
                       gcs=self.gcs)
        self.nodes.append(node)
        return node

    def wait_for_jobs(self, timeout: float = 180.0) -> None:
        """Until the head takes a job (right after `ray start` it may answer "No available
        agent to submit job" while its job agent starts)."""
        deadline = time.monotonic() + timeout
        while True:
            done = ray_cli("job", "submit", "--", "true", env=self.job_env, timeout=120)
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, f"the head takes no job: {done.stdout[-1000:]}{done.stderr[-1000:]}"
            time.sleep(2)

    def submit(self, args: list[str], runtime_env: str | None = None, wait: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
        """`ray job submit` of this checkout: the sweep command ``args`` (blocking unless ``wait`` is False)."""
        root = str(Path(__file__).resolve().parent.parent)
        options = ["--working-dir", root, "--entrypoint-num-cpus=0", *(["--runtime-env-json", runtime_env] if runtime_env else []),
                   *([] if wait else ["--no-wait"])]
        return ray_cli("job", "submit", *options, "--", sys.executable, "-m", "orchestrator.sweep", *args, env=self.job_env,
                       timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(grace)
        super().stop(grace)
