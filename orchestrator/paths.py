"""Where the orchestrator keeps files on this machine by default (stdlib only: the config,
the datasets and the model store all read it, and the command line stays fast)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> str:
    """Preprocessed datasets, generated synthetic data and file digests: ``$DIFFAD_CACHE``,
    else ``~/.cache/diffad_orchestrator``."""
    return os.environ.get("DIFFAD_CACHE", str(Path.home() / ".cache" / "diffad_orchestrator"))
