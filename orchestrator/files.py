"""Atomic publication of files and folders: a reader sees all of it or nothing.

Every writer of something other processes read (the dataset cache, the synthetic
dataset, the model store, an evaluation hand-off) writes into a temporary sibling and
renames it into place. When two processes publish the same folder at once (both copies
are identical, being seeded), the first rename wins and the other copy is discarded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def publish_folder(target: Path, fill: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> bool:
    """Fill a temporary sibling of ``target`` with ``fill(folder)`` and rename it to
    ``target``. An incomplete ``target`` (left by a crash) is replaced; a complete one
    published meanwhile by another process is kept. Returns True if ours was published."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        if target.exists() and not is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
            return True
        except OSError:
            if not is_complete(target):
                raise
            log.info("%s was published concurrently by another process; using that copy", target)
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: Path, write: Callable[[object], None]) -> None:
    """Write a file through ``write(handle)`` (binary) into a temporary sibling renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_file(path, lambda handle: handle.write(text.encode()))
