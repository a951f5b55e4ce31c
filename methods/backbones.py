"""Frozen ImageNet feature extractors (pure torch; the weights are passed in).

One class, :class:`FeatureExtractor`, wraps three architectures behind one contract:

    forward(images [B, 3, H, W] in [-1, 1]) -> [stage_1, stage_2, ...]   each [B, C_i, H/s_i, W/s_i]
    channels: tuple[int, ...]   C_i per stage
    strides:  tuple[int, ...]   s_i per stage

ImageNet normalisation is applied inside, and the module is frozen: no parameter needs a
gradient and it stays in eval mode (fixed BatchNorm statistics) even under ``.train()``.

=====================  ==============================  =========================  ==================
name                   architecture from               stages (end of ...)        strides
=====================  ==============================  =========================  ==================
efficientnet_lite0     efficientnet_lite_pytorch       block groups 1, 2, 3, 5, 7   2, 4, 8, 16, 32
wide_resnet101_2       torchvision (imported lazily)   layer1 .. layer4             4, 8, 16, 32
efficientnet_b4        torchvision (imported lazily)   features[1, 2, 3, 5, 7]      2, 4, 8, 16, 32
=====================  ==============================  =========================  ==================

Weight files are never read here: ``orchestrator/pretrained.py`` loads them and passes
the state dict in (``state_dict=None`` builds random weights, for tests only).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per backbone: (channels, strides) of its stages. Kept as data so configs can be
# validated (e.g. "is stride 4 available?") without building or importing anything.
BACKBONE_STAGES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "efficientnet_lite0": ((16, 24, 40, 112, 320), (2, 4, 8, 16, 32)),
    "wide_resnet101_2": ((256, 512, 1024, 2048), (4, 8, 16, 32)),
    "efficientnet_b4": ((24, 32, 56, 160, 448), (2, 4, 8, 16, 32)),
}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_STAGES)
TORCHVISION_BACKBONES: frozenset[str] = frozenset({"wide_resnet101_2", "efficientnet_b4"})
# torchvision's file names for the ImageNet weights, preferred first (IMAGENET1K_V1 is
# what the anomaly-detection literature used; V2 is accepted when it is the one present).
# Data only: reading the files is the caller's business (orchestrator/pretrained.py).
HUB_FILES: dict[str, tuple[str, ...]] = {
    "wide_resnet101_2": ("wide_resnet101_2-32ee1156.pth", "wide_resnet101_2-d733dc28.pth"),
    "efficientnet_b4": ("efficientnet_b4_rwightman-23ab8bcd.pth", "efficientnet_b4_rwightman-7eb33cd5.pth"),
}

# efficientnet-lite0 has 16 MBConv blocks in 7 groups; the groups that end at a new
# stride end at these block indices (groups 1, 2, 3, 5 and 7 of the official builder).
_LITE0_STAGE_ENDS = (0, 2, 4, 10, 15)
# torchvision's EfficientNet ``features``: 0 = stem, 1-7 = MBConv stages, 8 = head conv.
_B4_STAGE_ENDS = (1, 2, 3, 5, 7)

Stage = Callable[[torch.Tensor], torch.Tensor]


def backbone_strides(name: str) -> tuple[int, ...]:
    """Strides of the stages of ``name`` (raises ValueError naming the valid backbones)."""
    return _stage_table(name)[1]


def backbone_channels(name: str) -> tuple[int, ...]:
    """Channels of the stages of ``name``."""
    return _stage_table(name)[0]


def _stage_table(name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if name not in BACKBONE_STAGES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONE_STAGES[name]


class FeatureExtractor(nn.Module):
    """A frozen ImageNet CNN returning one feature map per stage (see the module docstring).

    ``forward(images, num_stages=None)`` computes only the first ``num_stages`` stages
    when given, so a caller that needs strides 4-16 does not pay for stride 32.
    """

    def __init__(self, name: str, state_dict: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.name = name
        self.channels, self.strides = _stage_table(name)
        builder = {"efficientnet_lite0": _efficientnet_lite0, "wide_resnet101_2": _wide_resnet101_2, "efficientnet_b4": _efficientnet_b4}[name]
        self.network, self._stages = builder(state_dict)
        if state_dict is None:
            log.warning("backbone %s built with random weights (no state dict given): its features are not ImageNet features", name)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always eval: the backbone is frozen, BatchNorm statistics stay ImageNet's."""
        return super().train(False)

    def forward(self, images: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> [B, C_i, H/s_i, W/s_i] for the first num_stages stages."""
        count = len(self._stages) if num_stages is None else num_stages
        if not 1 <= count <= len(self._stages):
            raise ValueError(f"num_stages must be in [1, {len(self._stages)}] for {self.name}, got {num_stages}")
        x = ((images + 1) / 2 - self.mean) / self.std
        features = []
        for stage in self._stages[:count]:
            x = stage(x)
            features.append(x)
        return features


def _load(network: nn.Module, state_dict: Mapping[str, torch.Tensor] | None, name: str, ignore: tuple[str, ...] = ()) -> None:
    """Strictly load ImageNet weights (classifier keys in ``ignore`` may be absent or extra)."""
    if state_dict is None:
        return
    state = {k: v for k, v in state_dict.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{name} state dict does not match the architecture: {str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith(ignore)]
    if missing or unexpected:
        raise ValueError(f"{name} state dict does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _efficientnet_lite0(state_dict: Mapping[str, Any] | None) -> tuple[nn.Module, list[Stage]]:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-"same" padding computed per input, so any H, W works.
    network = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    _load(network, state_dict, "efficientnet_lite0", ignore=("_fc.",))
    # The classifier head is never used for features.
    del network._conv_head, network._bn1, network._fc

    def stem(x: torch.Tensor) -> torch.Tensor:
        return network._swish(network._bn0(network._conv_stem(x)))

    def blocks(first: int, last: int, with_stem: bool) -> Stage:
        def run(x: torch.Tensor) -> torch.Tensor:
            if with_stem:
                x = stem(x)
            for block in network._blocks[first : last + 1]:
                x = block(x)  # eval mode: no drop-connect
            return x

        return run

    stages, first = [], 0
    for i, last in enumerate(_LITE0_STAGE_ENDS):
        stages.append(blocks(first, last, with_stem=i == 0))
        first = last + 1
    return network, stages


def _torchvision(name: str) -> Any:
    try:
        import torchvision  # noqa: F401  (lazy: it breaks the CPU torch build here)
        from torchvision import models
    except Exception as exc:  # ImportError, or an operator-registration failure on CPU builds
        raise ImportError(
            f"backbone {name!r} needs torchvision ({type(exc).__name__}: {exc}); install it on a CUDA machine, or use backbone=efficientnet_lite0 (offline)"
        ) from None
    return models


def _wide_resnet101_2(state_dict: Mapping[str, Any] | None) -> tuple[nn.Module, list[Stage]]:
    models = _torchvision("wide_resnet101_2")
    network = models.wide_resnet101_2(weights=None)
    _load(network, state_dict, "wide_resnet101_2", ignore=("fc.",))
    network.fc = nn.Identity()
    stem = nn.Sequential(network.conv1, network.bn1, network.relu, network.maxpool)
    layer1 = nn.Sequential(stem, network.layer1)
    return network, [layer1, network.layer2, network.layer3, network.layer4]


def _efficientnet_b4(state_dict: Mapping[str, Any] | None) -> tuple[nn.Module, list[Stage]]:
    models = _torchvision("efficientnet_b4")
    network = models.efficientnet_b4(weights=None)
    _load(network, state_dict, "efficientnet_b4", ignore=("classifier.",))
    network.classifier = nn.Identity()
    stages, first = [], 0
    for last in _B4_STAGE_ENDS:
        stages.append(nn.Sequential(*network.features[first : last + 1]))
        first = last + 1
    return network, stages
