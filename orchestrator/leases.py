"""Leases on the storage itself: who trains which model, across every sweep and every Ray
cluster that shares a ``storage_path``, and which sweeps are alive — no Ray, no server.

A lease is a small JSON record ``<storage>/leases/<name>.json`` (a folder or an object
store: orchestrator/storage.py) holding its owner, an expiry time and a *fencing token*.
Every change is a conditional write, so two processes can never both believe they hold it:

* acquire: create the record if absent (``If-None-Match: *``; an exclusive create on a
  folder), or replace an expired or released one if it is still the record just read
  (``If-Match: <etag>``; compare-and-swap on a folder), with the token one higher;
* renew (a heartbeat thread): replace the record if it is still this holder's last write.
  A renewal that finds the record changed means a successor took over: the lease is
  *lost* and the holder must not act on it any more (``Lease.lost``);
* release: replace it with an expired copy, if it is still ours.

The token goes with whatever the holder writes under the lease: the model store moves a
model's ``current`` pointer only to a version whose token is at least the pointer's
(orchestrator/model_store.py), so a holder that was paused past its expiry cannot publish over
its successor. A lease whose expiry has passed, or whose owner's process on this host is
gone, belongs to nobody.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from orchestrator.storage import Storage

log = logging.getLogger(__name__)

LEASE_SECONDS = float(os.environ.get("DIFFAD_LEASE_SECONDS", 60.0))  # a lease not renewed for this long is taken over
HEARTBEAT_SECONDS = 10.0


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    expires: float  # time.time() after which the lease may be taken over (0: released)
    host: str
    pid: int
    token: int = 0  # one higher at every acquisition: fences what an earlier holder writes

    @property
    def expired(self) -> bool:
        """Released, not renewed in time, or held by a process of this host that no longer exists."""
        return time.time() > self.expires or (self.host == socket.gethostname() and not pid_alive(self.pid))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """One named lease under ``<storage>/leases``; ``acquire`` is non-blocking."""

    def __init__(self, storage: Storage, name: str, owner: str, seconds: float = LEASE_SECONDS):
        self.storage, self.rel = storage, f"leases/{name}.json"
        self.owner, self.seconds = owner, seconds
        self.token = 0  # this holder's fencing token, once acquired
        self.lost = False  # a successor took it over while we held it
        self._tag: str | None = None  # the etag of our last write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return self.storage.join(self.rel)

    def _body(self, token: int, expires: float) -> bytes:
        return json.dumps(asdict(LeaseInfo(self.owner, expires, socket.gethostname(), os.getpid(), token))).encode()

    def _read(self) -> tuple[LeaseInfo, str] | None:
        found = self.storage.read_tagged(self.rel)
        if found is None:
            return None
        data, tag = found
        try:
            raw = json.loads(data)
            return LeaseInfo(raw["owner"], float(raw["expires"]), raw.get("host", "?"), int(raw.get("pid", 0)), int(raw.get("token", 0))), tag
        except (ValueError, KeyError, TypeError):
            return LeaseInfo("?", 0.0, "?", 0, 0), tag  # unreadable: treated as released

    def read(self) -> LeaseInfo | None:
        found = self._read()
        return found[0] if found else None

    def alive(self) -> bool:
        """Whether someone holds this lease and keeps it renewed."""
        current = self.read()
        return current is not None and not current.expired

    def acquire(self) -> bool:
        """Take the lease if it is free, released or expired; True if this owner holds it now."""
        found = self._read()
        if found is None:
            tag = self.storage.create(self.rel, self._body(1, time.time() + self.seconds))
            token = 1
        else:
            current, tag = found
            if current.owner == self.owner and not current.expired and current.token == self.token:
                return self.renew()
            if not current.expired:
                return False
            token = current.token + 1
            if current.expires > 0:
                log.warning("lease %s of %s (host %s, pid %d) expired; taking it over", self.rel, current.owner, current.host, current.pid)
            tag = self.storage.swap(self.rel, self._body(token, time.time() + self.seconds), tag)
        if tag is None:  # another taker won the race
            return False
        self.token, self._tag, self.lost = token, tag, False
        return True

    def renew(self) -> bool:
        """Extend our lease; False (and ``lost``) when someone else has written it since."""
        tag = self.storage.swap(self.rel, self._body(self.token, time.time() + self.seconds), self._tag) if self._tag else None
        if tag is None:
            self.lost = True
            return False
        self._tag = tag
        return True

    def hold(self) -> "Lease":
        """Renew in a background thread until :meth:`release` (or until the lease is lost).
        A storage hiccup is retried at the next beat: the lease outlives a few of them."""
        def beat() -> None:
            while not self._stop.wait(min(HEARTBEAT_SECONDS, self.seconds / 3)):
                try:
                    if not self.renew():
                        holder = self.read()
                        log.error("lease %s was taken over by %s (token %s): this holder (token %d) stops acting on it",
                                  self.rel, holder.owner if holder else "nobody", holder.token if holder else "?", self.token)
                        return
                except Exception as exc:  # noqa: BLE001 - keep beating; the expiry is the real deadline
                    log.warning("lease %s: renewal failed (%s); retrying", self.rel, str(exc).splitlines()[0])

        self._thread = threading.Thread(target=beat, name=f"lease-{self.rel}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and mark the lease free, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tag is not None and not self.lost:
            try:
                self.storage.swap(self.rel, self._body(self.token, 0.0), self._tag)
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("lease %s: release failed (%s); it expires in %.0f s", self.rel, str(exc).splitlines()[0], self.seconds)
        self._tag = None
