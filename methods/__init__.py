"""The four diffusion methods and the training-free PatchCore reference behind one
interface (see methods/base.py).

``METHODS`` maps a method name (the ``method=`` config key, the MLflow param and the
report column) to ``module:Class``; modules are imported on first use so that a user
of one method never pays for another's imports.
"""

from __future__ import annotations

import importlib

METHODS: dict[str, str] = {
    "transfusion": "methods.transfusion:TransFusion",
    "diffusionad": "methods.diffusionad:DiffusionAD",
    "mdps": "methods.mdps:MDPS",
    "drdc": "methods.drdc:DRDC",
    "patchcore": "methods.patchcore:PatchCore",  # training-free reference (the floor to beat)
}


def get_method(name: str):
    """The AnomalyMethod subclass registered under ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
