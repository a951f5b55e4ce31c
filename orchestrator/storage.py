"""``storage_path``: a local (or network-mounted) folder, or an object-store URI
(``s3://bucket/prefix``, ``gs://bucket/prefix``) — whatever must outlive a node lives
there: Tune and Train state, the model store, evaluation hand-offs, sample maps, the
MLflow spool and the leases.

Object stores are reached through pyarrow's filesystems, as Ray's own storage is, so
one URI works for both and the credentials come from the standard variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, and
``AWS_ENDPOINT_URL`` for an S3-compatible server such as SeaweedFS or MinIO).

Atomicity, which the model store and hand-offs rely on (a reader sees a whole file or
none): local writes go to a temporary sibling renamed into place; an object-store PUT is
atomic by itself. Object stores have no exclusive create that pyarrow exposes, so leases
on them are kept by the cluster's lease actor instead (see :mod:`orchestrator.leases`).
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

from pyarrow import fs as pafs

from orchestrator.errors import ConfigError
from orchestrator.files import write_file

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")


def is_remote(path: str | Path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the storage root, "/"-separated
    mtime: float


class Storage:
    """Files under one root, addressed by "/"-separated paths relative to it."""

    def __init__(self, root: str | Path):
        root = str(root)
        self.uri = root.rstrip("/") if is_remote(root) else str(Path(root).resolve())
        self._fs: tuple[pafs.FileSystem, str] | None = None

    @property
    def fs(self) -> pafs.FileSystem:
        return self._open()[0]

    @property
    def base(self) -> str:
        return self._open()[1]

    def _open(self) -> tuple[pafs.FileSystem, str]:
        """The filesystem, opened on first use (an S3 one resolves its bucket's region)."""
        if self._fs is None:
            if not self.remote:
                self._fs = (pafs.LocalFileSystem(), self.uri)
            else:
                try:
                    self._fs = pafs.FileSystem.from_uri(self.uri)
                except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad URI
                    raise ConfigError(f"storage_path {self.uri} cannot be opened ({str(exc).splitlines()[0]}); "
                                      "check the URI and the AWS_* variables (AWS_ENDPOINT_URL for a non-AWS server)") from None
        return self._fs

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def __reduce__(self):  # pyarrow filesystems travel to Ray tasks as their URI
        return Storage, (self.uri,)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def join(self, *parts: str) -> str:
        """The URI (or absolute local path) of ``parts``: what Ray's ``storage_path`` takes."""
        return "/".join([self.uri, *parts]) if self.remote else str(Path(self.uri, *parts))

    def local(self, *parts: str) -> Path:
        """A local path under the root (local storage only)."""
        assert not self.remote, "local() on object storage"
        return Path(self.uri, *parts)

    def _path(self, rel: str) -> str:
        return posixpath.join(self.base, rel) if rel else self.base

    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; FileNotFoundError when it does not exist."""
        if not self.exists(rel):
            raise FileNotFoundError(self.join(rel))
        with self.fs.open_input_stream(self._path(rel)) as handle:
            return handle.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers see the old file or the new one, never part of it."""
        if not self.remote:
            write_file(self.local(rel), lambda handle: handle.write(data))
            return
        with self.fs.open_output_stream(self._path(rel)) as handle:  # one PUT on close
            handle.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def upload(self, local_path: str | Path, rel: str) -> None:
        self.write_bytes(rel, Path(local_path).read_bytes())

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File

    def delete(self, rel: str) -> None:
        """Remove a file or a folder with everything in it; nothing if absent."""
        info = self.fs.get_file_info(self._path(rel))
        try:
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self._path(rel))
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self._path(rel))
        except FileNotFoundError:  # removed meanwhile (or an object store's stale folder entry)
            pass

    def list(self, rel: str = "", recursive: bool = False) -> list[Entry]:
        """Files and folders under ``rel`` (empty when it does not exist), sorted by path."""
        selector = pafs.FileSelector(self._path(rel), recursive=recursive, allow_not_found=True)
        prefix = self.base.rstrip("/") + "/"
        entries = [Entry(info.path[len(prefix):] if info.path.startswith(prefix) else info.path,
                         info.mtime.timestamp() if info.mtime is not None else 0.0)
                   for info in self.fs.get_file_info(selector)]
        return sorted(entries, key=lambda e: e.path)

    def probe(self) -> None:
        """Write and remove a small object: a storage we cannot write stops the sweep now."""
        name = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(name, b"")
            self.delete(name)
        except Exception as exc:  # noqa: BLE001 - OSError locally; pyarrow's S3 errors are OSError too, but be sure
            raise ConfigError(f"storage_path {self.uri} is not writable ({str(exc).splitlines()[0]}); "
                              "set storage_path= to a folder or bucket you can write to (and the AWS_* variables)") from None

