"""MDPS equations pinned to hand-computed values on small tensors: Eq. 5 (target and
reduction), Eq. 18's η (the authors' 7 · max ratio, from calibrate()), Eq. 19 (average
over posterior samples) and Eq. 20 (threshold from calibration statistics).

mutations/mdps.yaml lists source mutations these tests must catch.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.mdps import (
    MDPS,
    DifferenceTerms,
    MDPSConfig,
    anomaly_mask,
    per_element_weight_decay,
    pixel_weight_from_maps,
    prior_loss,
)
from methods.base import TrainBatch


def linear_alpha_bar() -> torch.Tensor:
    """ᾱ of the DDPM linear schedule, computed independently of GaussianDiffusion."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)


class FakeBackbone(nn.Module):
    """Stages = average pools of the image at strides 4, 8, 16, 32 (deterministic, cheap)."""

    strides = (4, 8, 16, 32)
    channels = (3, 3, 3, 3)

    def forward(self, images: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        return [F.avg_pool2d(images, s) for s in self.strides[: num_stages or 4]]


class AffineEps(nn.Module):
    """ε_θ(x, t) = 0.5 x + t / 1000: the loss then has a closed form."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + t.float().view(-1, 1, 1, 1) / 1000


def config(**overrides) -> MDPSConfig:
    values = dict(
        image_size=16, crop_size=None, epochs=1, batch_size=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
        attention_resolutions=(), head_channels=8, norm_groups=4, noise_level=60, steps=3, num_samples=2, mask_num_samples=2,
        blur_sigma=0.0, perceptual_strides=(4, 8), backbone="efficientnet_lite0", feature_pool_size=1,
    )
    values.update(overrides)
    return MDPSConfig(**values)


def model(**overrides) -> MDPS:
    torch.manual_seed(0)
    return MDPS(config(**overrides), lambda name: FakeBackbone())


# ---------------------------------------------------------------------------- Eq. 5


def test_prior_loss_sums_over_chw_and_averages_over_the_batch() -> None:
    noise = torch.zeros(2, 3, 2, 2)
    prediction = torch.zeros(2, 3, 2, 2)
    prediction[0] = 1.0  # image 0: 12 unit errors -> ‖·‖² = 12
    prediction[1, 0, 0, 0] = 2.0  # image 1: one error of 2 -> ‖·‖² = 4
    assert prior_loss(prediction, noise).item() == pytest.approx((12 + 4) / 2)  # not the per-element mean 16/24
    assert prior_loss(noise, prediction).item() == pytest.approx(8.0)  # symmetric in its arguments


def test_training_step_regresses_the_noise_of_eq5() -> None:
    """forward(): t ~ U{0..T-1}, ε ~ N(0, I) drawn in that order from the global RNG,
    x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, loss = mean over the batch of ‖ε - ε_θ(x_t, t)‖²."""
    m = model()
    m.unet = AffineEps()
    x0 = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    batch = TrainBatch(x0, torch.ones(2, 1, 4, 4), x0, torch.zeros(2, dtype=torch.long))
    torch.manual_seed(3)
    got = m(batch).total
    torch.manual_seed(3)
    t = torch.randint(0, 1000, (2,))
    eps = torch.randn_like(x0)
    a = linear_alpha_bar()[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    prediction = 0.5 * x_t + t.float().view(-1, 1, 1, 1) / 1000
    expected = ((eps - prediction) ** 2).sum(dim=(1, 2, 3)).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def _step(m: MDPS, optimizer: torch.optim.Optimizer, images: torch.Tensor, seed: int, scale: float = 1.0) -> torch.Tensor:
    """One training step (loss x ``scale``) with the Eq. 5 draws seeded; returns the loss gradient."""
    torch.manual_seed(seed)
    loss = scale * m(TrainBatch(images, images[:, :1], images, torch.zeros(len(images), dtype=torch.long))).total
    optimizer.zero_grad()
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in m.unet.parameters()])
    optimizer.step()
    return gradient


def test_coupled_decay_on_the_summed_loss_is_a_per_element_decay_on_the_mean() -> None:
    """§5 / authors' code: torch.optim.Adam(weight_decay=wd) adds wd·θ to ∇ of the summed
    Eq. 5 loss. Adam ignores the scale of the whole gradient, so training is exactly Adam
    on the per-element mean loss with decay wd/(C·H·W) (eps scaled alike)."""
    m = model(weight_decay=0.05)
    twin = copy.deepcopy(m)
    optimizer = m.configure_optimizers().optimizer
    assert type(optimizer) is torch.optim.Adam and not optimizer.defaults.get("decoupled_weight_decay", False)
    assert optimizer.defaults["weight_decay"] == 0.05
    n = 3 * 16 * 16
    twin_optimizer = torch.optim.Adam(
        twin.unet.parameters(), lr=optimizer.defaults["lr"], eps=optimizer.defaults["eps"] / n, weight_decay=per_element_weight_decay(0.05, (3, 16, 16))
    )
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for seed in range(3):
        _step(m, optimizer, images, seed)
        _step(twin, twin_optimizer, images, seed, scale=1 / n)
    for a, b in zip(m.unet.parameters(), twin.unet.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_paper_weight_decay_is_nearly_none_at_paper_size() -> None:
    """What the paper preset does: at 3·224² the decay term 0.05·θ is ~1e-5 of the summed
    loss gradient (per element 0.05/150528 ≈ 3.3e-7); only a per-element mean loss would
    make 5e-2 a real decay (the term would be of the gradient's order)."""
    paper = MDPSConfig()
    assert (paper.weight_decay, paper.input_size) == (0.05, 224)
    assert per_element_weight_decay(paper.weight_decay, (3, 224, 224)) == pytest.approx(3.32e-7, rel=1e-2)
    small_unet = dict(base_channels=8, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(), norm_groups=4, head_channels=8, metric="pixel")
    torch.manual_seed(0)
    m = MDPS(dataclasses.replace(paper, **small_unet))
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gradient = _step(m, torch.optim.SGD(m.unet.parameters(), lr=0.0), images, 0)
    decay = paper.weight_decay * torch.cat([p.detach().flatten() for p in m.unet.parameters()])
    assert decay.norm() / gradient.norm() < 1e-4  # measured 5e-6
    assert decay.norm() / (gradient.norm() / (3 * 224 * 224)) > 0.1  # with the mean loss: ~0.8


def test_smoke_preset_keeps_the_paper_per_element_decay() -> None:
    """The smoke preset trains the paper's objective: its decay per element of the summed
    loss equals the paper preset's (0.05 at 3·224² is 0.05·(64/224)² at 3·64²)."""
    from orchestrator.config import resolve_method_config

    paper, smoke = resolve_method_config("mdps", "paper"), resolve_method_config("mdps", "smoke")
    shape = lambda c: (3, c.input_size, c.input_size)  # noqa: E731
    assert smoke.input_size == 64
    assert per_element_weight_decay(smoke.weight_decay, shape(smoke)) == pytest.approx(per_element_weight_decay(paper.weight_decay, shape(paper)), rel=1e-6)


# ---------------------------------------------------------------------------- Eq. 18 η


def test_pixel_weight_is_seven_times_the_ratio_of_the_maxima() -> None:
    pixel = torch.tensor([[[0.5, 2.0], [1.0, 0.0]], [[1.5, 0.1], [0.2, 0.3]]])  # max 2
    perceptual = torch.tensor([[[0.1, 0.2], [0.05, 0.5]], [[0.4, 0.3], [0.0, 0.25]]])  # max 0.5
    assert pixel_weight_from_maps(pixel, perceptual).item() == pytest.approx(7 * 0.5 / 2.0)


FIRST_PASS = DifferenceTerms(
    pixel=torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[3.0, 1.0], [2.0, 0.0]]]),  # max 4
    perceptual=torch.tensor([[[0.2, 0.1], [0.4, 0.0]], [[0.8, 0.6], [0.1, 0.1]]]),  # max 0.8
)


def calibrated(monkeypatch, **overrides) -> tuple[MDPS, list]:
    """A model calibrated on two 2x2 'validation normals' whose first-pass terms are FIRST_PASS."""
    m = model(image_size=2, channel_mult=(1,), perceptual_strides=(4,), **overrides)
    calls = []

    def terms(images, mask, num_samples, generator, features_y=None):
        calls.append((images.shape[0], mask.clone(), num_samples))
        return DifferenceTerms(FIRST_PASS.pixel[: images.shape[0]], FIRST_PASS.perceptual[: images.shape[0]])

    monkeypatch.setattr(m, "difference_terms", terms)
    m.calibrate(torch.zeros(2, 3, 2, 2), None)
    return m, calls


def test_calibrate_sets_eta_from_the_validation_first_pass(monkeypatch) -> None:
    m, calls = calibrated(monkeypatch)
    assert m.eta().item() == pytest.approx(7 * 0.8 / 4.0)  # 1.4
    assert [(n, samples) for n, _, samples in calls] == [(2, 2)]  # one chunk, mask_num_samples samples
    assert bool((calls[0][1] == 1).all())  # the first pass: m ≡ 1


def test_calibrate_takes_eq20_min_max_of_the_validation_maps(monkeypatch) -> None:
    m, _ = calibrated(monkeypatch)
    eta = 7 * 0.8 / 4.0
    maps = eta * FIRST_PASS.pixel + FIRST_PASS.perceptual  # D̄ = η · pixel + perceptual (blur σ = 0)
    # by hand: image 0: 1.6, 2.9, 0.4, 5.6; image 1: 5.0, 2.0, 2.9, 0.1 -> min 0.1 (image 1), max 5.6 (image 0)
    assert maps.min().item() == pytest.approx(0.1) and maps.max().item() == pytest.approx(5.6)
    assert m.threshold_low.item() == pytest.approx(0.1)  # over all validation maps, not one image's
    assert m.threshold_high.item() == pytest.approx(5.6)


def test_calibration_takes_min_max_of_the_blurred_maps(monkeypatch) -> None:
    """Eq. 20 cuts the σ-blurred D̄ of the test image (score_map), so its min/max come from
    the validation maps blurred alike, not from the raw ones."""
    from methods.scoring import gaussian_blur

    m, _ = calibrated(monkeypatch, blur_sigma=1.0)
    raw = 7 * 0.8 / 4.0 * FIRST_PASS.pixel + FIRST_PASS.perceptual
    blurred = gaussian_blur(raw, 1.0)
    assert blurred.max() < raw.max() - 1 and blurred.min() > raw.min() + 1  # the blur moves both ends
    assert m.threshold_low.item() == pytest.approx(blurred.min().item())
    assert m.threshold_high.item() == pytest.approx(blurred.max().item())


def test_a_fixed_pixel_weight_is_used_as_given(monkeypatch) -> None:
    m, _ = calibrated(monkeypatch, pixel_weight=2.0)
    assert m.eta() == 2.0 and torch.isnan(m.calibrated_pixel_weight)
    assert m.threshold_high.item() == pytest.approx(max((2 * FIRST_PASS.pixel + FIRST_PASS.perceptual).flatten()).item())  # 8.0


def test_calibrate_chunks_the_validation_images(monkeypatch) -> None:
    _, calls = calibrated(monkeypatch, calibration_batch_size=1)
    assert [n for n, _, _ in calls] == [1, 1]


def test_predict_needs_calibration_by_default() -> None:
    with pytest.raises(ValueError, match="calibrate"):
        model().predict(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="calibrate"):
        model(pixel_weight=1.0).predict(torch.zeros(1, 3, 16, 16))  # Eq. 20's statistics still missing
    model(pixel_weight=1.0, mask_threshold_scope="per_image").predict(torch.zeros(1, 3, 16, 16))  # needs none


def test_calibrate_is_a_no_op_when_nothing_is_calibrated() -> None:
    m = model(pixel_weight=1.0, mask_threshold_scope="per_image")
    m.unet = None  # would fail if a posterior pass ran
    m.calibrate(torch.zeros(2, 3, 16, 16), None)
    assert torch.isnan(m.threshold_low)


def test_calibration_is_not_stored_with_the_prior(monkeypatch) -> None:
    m, _ = calibrated(monkeypatch)
    assert all(key.startswith("unet.") for key in m.state_dict())


# ---------------------------------------------------------------------------- Eq. 19


def test_score_map_averages_the_difference_over_the_samples(monkeypatch) -> None:
    """D̄ = (1/N_s) Σ_j D(x_0^(j), y) with D = η‖y - x_0‖₁ + Σ_i (1 - cos) (Eqs. 18-19)."""
    m = model(num_samples=2, pixel_weight=3.0, perceptual_strides=(4, 8))
    y = torch.zeros(1, 3, 16, 16)
    y[:, 0] = 0.5
    y[:, 1, :8] = -0.5
    x1 = torch.zeros(1, 3, 16, 16)  # |y - x1| summed over channels: 1.0 on the top half, 0.5 below
    x2 = torch.full((1, 3, 16, 16), 0.5)  # |y - x2|: 0 + 1 + 0.5 = 1.5 on top, 0 + 0.5 + 0.5 = 1.0 below
    x2[:, 2] = -0.5
    monkeypatch.setattr(m, "reconstruct", lambda images, mask, n, g: torch.stack([x1, x2])[:n])
    got = m.score_map(y, torch.ones(1, 1, 16, 16), 2, torch.Generator())
    pixel = torch.where(torch.arange(16).view(16, 1) < 8, torch.tensor(1.25), torch.tensor(0.75)).expand(16, 16)  # (1+1.5)/2, (0.5+1)/2
    fb = FakeBackbone()
    size = (16, 16)
    stages = (0, 1)  # strides 4, 8

    def perceptual(x):
        fx, fy = fb(x, 2), fb(y, 2)
        total = 0
        for i in stages:
            cos = F.cosine_similarity(fx[i], fy[i], dim=1, eps=1e-6)
            total = total + F.interpolate((1 - cos)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return total

    expected = 3.0 * pixel + (perceptual(x1) + perceptual(x2)) / 2
    torch.testing.assert_close(got, expected.expand_as(got), atol=1e-5, rtol=1e-5)


def test_score_map_of_identical_samples_is_one_sample_map(monkeypatch) -> None:
    m = model(metric="pixel", pixel_weight=1.0)
    y = torch.zeros(1, 3, 16, 16)
    x = torch.full((1, 3, 16, 16), 0.25)
    monkeypatch.setattr(m, "reconstruct", lambda images, mask, n, g: x.expand(n, -1, -1, -1, -1))
    for n in (1, 4):
        torch.testing.assert_close(m.score_map(y, torch.ones(1, 1, 16, 16), n, torch.Generator()), torch.full((1, 16, 16), 0.75))


# ---------------------------------------------------------------------------- Eq. 20


def test_predict_masks_with_the_calibrated_threshold(monkeypatch) -> None:
    """m = (D̄ > min + λ (max - min)) with min/max from calibrate(), not from the test image."""
    m = model(mask_threshold=0.25, pixel_weight=1.0, top_k=1, top_k_reference_size=None)
    m.threshold_low.fill_(2.0)
    m.threshold_high.fill_(10.0)  # T_th = 2 + 0.25 · 8 = 4
    first = torch.tensor([1.0, 3.9, 4.1, 12.0]).view(1, 1, 4).expand(1, 4, 4).repeat(1, 4, 4)  # [1, 16, 16]
    seen = []

    def score_map(images, mask, num_samples, generator, features_y=None):
        seen.append(mask.clone())
        return first if len(seen) == 1 else torch.zeros(1, 16, 16)

    monkeypatch.setattr(m, "score_map", score_map)
    m.predict(torch.zeros(1, 3, 16, 16))
    assert bool((seen[0] == 1).all())  # first pass: m ≡ 1
    torch.testing.assert_close(seen[1], (first > 4.0).float()[:, None])
    assert 0 < seen[1].mean().item() < 1
    # per image the same map would be cut at 1 + 0.25 · 11 = 3.75: 3.9 would be masked too
    torch.testing.assert_close(anomaly_mask(first, 0.25, torch.tensor(2.0), torch.tensor(10.0)), seen[1])


def test_zero_and_full_lambda() -> None:
    score = torch.tensor([[[0.0, 1.0], [5.0, 9.0]]])
    low, high = torch.tensor(1.0), torch.tensor(9.0)
    assert anomaly_mask(score, 0.0, low, high).sum().item() == 2  # > 1
    assert anomaly_mask(score, 1.0, low, high).sum().item() == 0  # > 9
    assert anomaly_mask(score, 0.5, low, high)[0, 0].tolist() == [[0, 0], [0, 1]]  # > 5
