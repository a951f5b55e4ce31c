"""Leases on the shared storage: who trains which model, across every sweep that shares
a ``storage_path``, and which sweeps are alive — no Ray, no server.

A lease is a small JSON file ``<storage>/leases/<name>.json`` holding its owner and an
expiry time. It is taken with an exclusive create (only one process can create the
file), kept alive by a heartbeat thread that rewrites the expiry, and released by
deleting it. A lease whose expiry has passed belongs to a dead owner (a killed driver or
node): the next taker moves it aside with one atomic rename — only one process wins the
rename — and creates its own. POSIX rename and O_EXCL are atomic on local and NFS
folders alike, which is what a ``storage_path`` every node sees is.

Object stores (an ``s3://`` storage_path) have no exclusive create that pyarrow exposes,
so there the leases live in the cluster's lease board: one detached Ray actor
(``diffad-leases``, created by orchestrator/ray_backend.py) holding the same records under
the same rules, with compare-and-swap for takeovers. Sweeps that share a bucket must then share the Ray cluster too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator.storage import REMOTE_SCHEMES

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a lease not renewed for this long is taken over
HEARTBEAT_SECONDS = 10.0


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    expires: float  # time.time() after which the lease may be taken over
    host: str
    pid: int

    @property
    def expired(self) -> bool:
        """Not renewed in time, or held by a process of this host that no longer exists."""
        return time.time() > self.expires or (self.host == socket.gethostname() and not pid_alive(self.pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseBoard:
    """The leases of an object-store storage_path. Runs as one detached Ray actor per
    cluster (orchestrator.ray_backend.ClusterLeaseBoard); records are the file leases'
    JSON bodies, keyed by path."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    def get(self, path: str) -> dict | None:
        return self.records.get(path)

    def create(self, path: str, body: dict) -> bool:
        if path in self.records:
            return False
        self.records[path] = body
        return True

    def put(self, path: str, body: dict) -> None:
        self.records[path] = body

    def take_over(self, path: str, expected_owner: str) -> None:
        """Drop the record if ``expected_owner`` still holds it (compare-and-swap)."""
        if self.records.get(path, {}).get("owner") == expected_owner:
            del self.records[path]

    def drop(self, path: str, owner: str) -> None:
        self.take_over(path, owner)


class Lease:
    """One named lease under ``folder`` (a local folder or an object-store URI, see the
    module's docstring); ``acquire`` is non-blocking."""

    def __init__(self, folder: str | Path, name: str, owner: str, seconds: float = LEASE_SECONDS, board=None):
        self.on_board = str(folder).startswith(REMOTE_SCHEMES)
        if self.on_board and board is None:
            raise ValueError(f"leases under {folder} (object storage) need the cluster's lease board")
        self.board = board  # a LeaseBoard (or its synchronous actor face) for object storage
        self.path = f"{str(folder).rstrip('/')}/{name}.json" if self.on_board else Path(folder) / f"{name}.json"
        self.owner, self.seconds = owner, seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"owner": self.owner, "expires": time.time() + self.seconds, "host": socket.gethostname(), "pid": os.getpid()}

    def _body(self) -> bytes:
        return json.dumps(self._record()).encode()

    def read(self) -> LeaseInfo | None:
        try:
            if self.on_board:
                raw = self.board.get(self.path)
                if raw is None:
                    return None
            else:
                raw = json.loads(self.path.read_text())
            return LeaseInfo(raw["owner"], float(raw["expires"]), raw.get("host", "?"), int(raw.get("pid", 0)))
        except (OSError, ValueError, KeyError):
            return None

    def alive(self) -> bool:
        """Whether someone holds this lease and keeps it renewed."""
        current = self.read()
        return current is not None and not current.expired

    def acquire(self) -> bool:
        """Take the lease if it is free or expired; True if this owner holds it now."""
        if self.on_board:
            return self._acquire_on_board()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        current = self.read()
        if current is not None and current.owner == self.owner:
            self.renew()
            return True
        if current is not None and current.expired:
            try:  # only one taker wins this rename; the others see the new lease next time
                os.rename(self.path, self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.expired"))
                log.warning("lease %s of %s (host %s, pid %d) expired; taking it over", self.path.name, current.owner, current.host, current.pid)
            except FileNotFoundError:
                pass
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._body())
        return True

    def _acquire_on_board(self) -> bool:
        current = self.read()
        if current is not None and current.owner == self.owner:
            self.renew()
            return True
        if current is not None and current.expired:
            log.warning("lease %s of %s (host %s, pid %d) expired; taking it over", self.path, current.owner, current.host, current.pid)
            self.board.take_over(self.path, current.owner)
        return self.board.create(self.path, self._record())

    def renew(self) -> None:
        if self.on_board:
            self.board.put(self.path, self._record())
            return
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(self._body())
        os.replace(tmp, self.path)

    def hold(self) -> "Lease":
        """Renew in a background thread until :meth:`release`."""
        def beat() -> None:
            while not self._stop.wait(min(HEARTBEAT_SECONDS, self.seconds / 3)):
                current = self.read()
                if current is None or current.owner != self.owner:
                    log.error("lease %s was taken over by %s", self.path, current.owner if current else "nobody")
                    return
                self.renew()

        self._thread = threading.Thread(target=beat, name=f"lease-{self.path}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = self.read()
        if current is not None and current.owner == self.owner:
            if self.on_board:
                self.board.drop(self.path, self.owner)
            else:
                self.path.unlink(missing_ok=True)
