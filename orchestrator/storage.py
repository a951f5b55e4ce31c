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
atomic by itself.

Conditional writes, which the leases and the model store's ``current`` pointer rely on
(:meth:`Storage.read_tagged`, :meth:`Storage.create`, :meth:`Storage.swap`): on a folder,
an exclusive create (a hard link, which fails when the name exists, on local disks and NFS
alike) and a compare-and-swap under an ``flock`` of a sibling lock file; on S3, PutObject
with ``If-None-Match: *`` and ``If-Match: <etag>`` sent by boto3 (pyarrow sends neither).
boto3 rather than obstore: it is what MLflow itself uses for S3 artifacts (one client, one
set of credentials and endpoint variables), and its conditional puts are documented API.
GCS is refused for these (``check_conditional_writes``): its preconditions are another API
that no test here exercises.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import urllib.parse
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
        self._client = None  # boto3, for conditional writes on S3

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

    # ------------------------------------------------------------------ conditional writes

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        """The file's bytes and its tag (an S3 ETag; a content digest on a folder), or None."""
        if self.remote:
            client, bucket, key = self._s3(rel)
            try:
                reply = client.get_object(Bucket=bucket, Key=key)
            except client.exceptions.NoSuchKey:
                return None
            return reply["Body"].read(), reply["ETag"]
        try:
            data = self.local(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return data, _digest(data)

    def create(self, rel: str, data: bytes) -> str | None:
        """Write ``rel`` only if it does not exist; its tag, or None when it existed."""
        if self.remote:
            return self._put_if(rel, data, IfNoneMatch="*")
        path = self.local(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # atomic, and fails when the name exists (local disks and NFS)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return _digest(data)

    def swap(self, rel: str, data: bytes, tag: str) -> str | None:
        """Replace ``rel`` only if its tag is still ``tag``; the new tag, or None when it changed."""
        if self.remote:
            return self._put_if(rel, data, IfMatch=tag)
        path = self.local(rel)
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # every swap of this file holds it: compare and replace as one step
            try:
                if _digest(path.read_bytes()) != tag:
                    return None
            except FileNotFoundError:
                return None
            write_file(path, lambda handle: handle.write(data))
        return _digest(data)

    def check_conditional_writes(self) -> None:
        """Leases need a store that refuses a second create and a stale swap; one that
        ignores the conditions would let two owners hold a lease, so it stops the sweep here."""
        if self.uri.startswith(("gs://", "gcs://")):
            raise ConfigError(f"storage_path {self.uri}: leases need conditional writes, which this project does on S3 and shared folders "
                              "only; use s3:// (GCS answers S3 requests at storage.googleapis.com with HMAC keys) or a shared folder")
        name = f".conditional-probe-{uuid.uuid4().hex[:8]}"
        try:
            first = self.create(name, b"1")
            second = self.create(name, b"2")
            stale = self.swap(name, b"3", '"not-the-tag"') if first else None
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - an S3 server that rejects the headers outright
            raise ConfigError(f"storage_path {self.uri}: conditional writes failed ({str(exc).splitlines()[0]}); leases need a store that "
                              "honours If-None-Match and If-Match (AWS S3, MinIO, SeaweedFS >= 3.97)") from None
        finally:
            self.delete(name)
        if not first or second is not None or stale is not None:
            raise ConfigError(f"storage_path {self.uri}: the store ignores conditional writes (a second create or a stale swap "
                              "succeeded); leases would not be exclusive: use a store that honours If-None-Match and If-Match "
                              "(AWS S3, MinIO, SeaweedFS >= 3.97) or a shared folder")

    def _s3(self, rel: str):
        """A boto3 S3 client for this storage, its bucket and the object key of ``rel``."""
        if self._client is None:
            import boto3  # only object-store storage needs it

            parts = urllib.parse.urlsplit(self.uri)
            query = dict(urllib.parse.parse_qsl(parts.query))
            endpoint = (f"{query.get('scheme', 'https')}://{query['endpoint_override']}" if "endpoint_override" in query
                        else os.environ.get("AWS_ENDPOINT_URL"))
            user, _, secret = parts.username or "", None, parts.password
            credentials = {"aws_access_key_id": urllib.parse.unquote(user), "aws_secret_access_key": urllib.parse.unquote(secret)} if secret else {}
            self._client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region") or os.environ.get("AWS_DEFAULT_REGION"),
                                        **credentials)
        parts = urllib.parse.urlsplit(self.uri)
        return self._client, parts.hostname or parts.netloc.rsplit("@", 1)[-1], posixpath.join(parts.path.lstrip("/"), rel)

    def _put_if(self, rel: str, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        client, bucket, key = self._s3(rel)
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as exc:
            # 412: the condition failed; 409: a concurrent conditional write won the race
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return None
            raise

    def probe(self) -> None:
        """Write and remove a small object: a storage we cannot write stops the sweep now."""
        name = f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(name, b"")
            self.delete(name)
        except Exception as exc:  # noqa: BLE001 - OSError locally; pyarrow's S3 errors are OSError too, but be sure
            raise ConfigError(f"storage_path {self.uri} is not writable ({str(exc).splitlines()[0]}); "
                              "set storage_path= to a folder or bucket you can write to (and the AWS_* variables)") from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
