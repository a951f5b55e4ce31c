"""MDPS: the sampler (Algorithm 1, Eqs. 10-17), the scoring (Eqs. 18-20) and the model
contract. Tiny networks only; the learning test is tests/test_mdps_learning.py."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from methods.backbones import FeatureExtractor
from methods.base import TrainBatch, field_docs
from methods.gaussian_diffusion import GaussianDiffusion
from methods.mdps import (
    MDPS,
    GuidanceNorm,
    MDPSConfig,
    Metric,
    ThresholdScope,
    anomaly_mask,
    data_fidelity,
    difference_map,
    gaussian_blur,
    guided_prior_eps,
    perceptual_distance,
    pixel_distance,
    posterior_sample,
    sampling_timesteps,
    score_range,
)
from methods.scoring import scaled_top_k, top_k_mean
from orchestrator.config import resolve_method_config

# ---------------------------------------------------------------------------- helpers


def linear_alpha_bar() -> torch.Tensor:
    """ᾱ of the DDPM linear schedule, computed independently of GaussianDiffusion."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return torch.tensor(np.cumprod(1 - betas))


class TinyEps(nn.Module):
    """A small nonlinear stand-in for ε_θ(x_t, t) (depends on t, differentiable)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.conv(x)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


class LinearEps(nn.Module):
    """ε_θ(x) = c · x, for a closed-form guidance gradient."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.c * x


def recorded_noise(shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    draws: list[torch.Tensor] = []

    def noise() -> torch.Tensor:
        draws.append(torch.randn(shape, generator=g))
        return draws[-1]

    return noise, draws


def half_mask(batch: int, size: int) -> torch.Tensor:
    """m = 1 on the left half (anomalous), 0 on the right half (normal)."""
    mask = torch.zeros(batch, 1, size, size)
    mask[..., : size // 2] = 1
    return mask


# ---------------------------------------------------------------------------- Algorithm 1


def test_sampling_timesteps_follow_algorithm_1() -> None:
    # T = 200, N = 10: t = 200, 180, ..., 20 and s = t - 20, 0-based (s = 0 -> index -1).
    pairs = sampling_timesteps(200, 10)
    assert pairs == [(199 - 20 * i, 179 - 20 * i) for i in range(10)]
    assert pairs[-1] == (19, -1)
    assert sampling_timesteps(10, 3) == [(9, 6), (6, 2), (2, -1)]  # rounded when N does not divide T
    assert sampling_timesteps(1, 1) == [(0, -1)]
    with pytest.raises(ValueError, match="steps N"):
        sampling_timesteps(5, 6)


@pytest.mark.parametrize("rho", [0.0, 50.0])
def test_normal_region_stays_on_the_forward_noised_path_of_y(rho: float) -> None:
    """With σ = 0 (ddim_eta = 0) the normal region is exactly √ᾱ_t y + √(1 − ᾱ_t) ε at
    every step, for the initial ε, and the sample equals y there at the end."""
    torch.manual_seed(0)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = half_mask(2, 16)
    diffusion = GaussianDiffusion(1000)
    noise, draws = recorded_noise(tuple(y.shape))
    states: list[tuple[int, torch.Tensor]] = []
    x0 = posterior_sample(TinyEps(), diffusion, y, mask, rho=rho, noise_level=200, steps=10, noise=noise, ddim_eta=0.0,
                          on_step=lambda t, x: states.append((t, x.clone())))
    assert len(draws) == 1 and len(states) == 10
    alpha_bar = linear_alpha_bar()
    normal = mask[:, 0] == 0
    for t, x_t in states:
        expected = alpha_bar[t].sqrt() * y + (1 - alpha_bar[t]).sqrt() * draws[0]
        torch.testing.assert_close(x_t.permute(0, 2, 3, 1)[normal], expected.float().permute(0, 2, 3, 1)[normal], atol=1e-5, rtol=0)
    torch.testing.assert_close(x0.permute(0, 2, 3, 1)[normal], y.permute(0, 2, 3, 1)[normal], atol=1e-5, rtol=0)
    # ... while the anomalous region was actually resampled.
    assert (x0 - y).permute(0, 2, 3, 1)[~normal].abs().mean() > 0.05


def test_normal_region_with_eq4_noise_follows_the_ddim_update_of_eq10() -> None:
    """With σ_t of Eq. 4 the normal region moves by x_s = √α_s y + √(1 − α_s − σ²) ε_t + σ z
    with ε_t = (x_t − √α_t y)/√(1 − α_t) (Eqs. 10 and 4), and ends exactly at y."""
    torch.manual_seed(0)
    y = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = half_mask(1, 16)
    noise, draws = recorded_noise(tuple(y.shape))
    states: list[tuple[int, torch.Tensor]] = []
    x0 = posterior_sample(TinyEps(), GaussianDiffusion(1000), y, mask, rho=100.0, noise_level=100, steps=4, noise=noise, ddim_eta=1.0,
                          on_step=lambda t, x: states.append((t, x.clone())))
    a = linear_alpha_bar()
    normal = mask[:, 0] == 0
    path = [x for _, x in states] + [x0]
    for i, (t, s) in enumerate(sampling_timesteps(100, 4)):
        a_t, a_s = a[t], (a[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64))
        sigma = ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        eps = (path[i] - a_t.sqrt() * y) / (1 - a_t).sqrt()
        expected = a_s.sqrt() * y + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps + sigma * draws[i + 1]
        torch.testing.assert_close(path[i + 1].permute(0, 2, 3, 1)[normal], expected.float().permute(0, 2, 3, 1)[normal], atol=1e-5, rtol=0)
    torch.testing.assert_close(x0.permute(0, 2, 3, 1)[normal], y.permute(0, 2, 3, 1)[normal], atol=1e-5, rtol=0)


def test_rho_zero_and_full_mask_is_plain_ddim_from_noised_y() -> None:
    """'vanilla DDIM' (ρ = 0, m ≡ 1) equals a DDIM reverse pass (Eq. 4) from y noised to T,
    written here from the equations with an independently computed schedule."""
    torch.manual_seed(0)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    net = TinyEps()
    noise, _ = recorded_noise(tuple(y.shape), seed=3)
    got = posterior_sample(net, GaussianDiffusion(1000), y, torch.ones(2, 1, 16, 16), rho=0.0, noise_level=200, steps=10, noise=noise)

    ref_noise, _ = recorded_noise(tuple(y.shape), seed=3)
    a = linear_alpha_bar().float()
    x = a[199].sqrt() * y + (1 - a[199]).sqrt() * ref_noise()
    for paper_t in range(200, 0, -20):
        t, s = paper_t - 1, paper_t - 21
        a_t = a[t]
        a_s = a[s] if s >= 0 else torch.tensor(1.0)
        with torch.no_grad():
            eps = net(x, torch.full((2,), t))
        x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt()
        x = a_s.sqrt() * x0_hat + (1 - a_s - sigma**2).clamp(min=0).sqrt() * eps + sigma * ref_noise()
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_zero_mask_returns_y_without_calling_the_network() -> None:
    net = TinyEps()
    y = torch.rand(1, 3, 8, 8) * 2 - 1
    noise, _ = recorded_noise(tuple(y.shape))
    out = posterior_sample(net, GaussianDiffusion(1000), y, torch.zeros(1, 1, 8, 8), rho=100.0, noise_level=50, steps=5, noise=noise)
    assert net.calls == 0
    torch.testing.assert_close(out, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", list(GuidanceNorm))
def test_guidance_matches_the_closed_form_gradient_of_eq16(norm: GuidanceNorm) -> None:
    """For ε_θ = c x: x̂_0 = k x with k = (1 − c√(1−ᾱ))/√ᾱ, so ∇‖y − kx‖ = −k r/‖r‖ and
    ∇‖y − kx‖² = −2k r with r = y − kx, per image."""
    torch.manual_seed(0)
    c, rho = 0.3, 7.0
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    alpha = torch.tensor(0.6, dtype=torch.float64).view(1, 1, 1, 1)
    got = guided_prior_eps(LinearEps(c), x, torch.zeros(2, dtype=torch.long), y, alpha, rho, norm)
    k = (1 - c * (1 - alpha).sqrt()) / alpha.sqrt()
    r = y - k * x
    if norm is GuidanceNorm.L2:
        grad = -k * r / r.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        grad = -2 * k * r
    torch.testing.assert_close(got, c * x + rho * (1 - alpha).sqrt() * grad)
    # Each image's gradient is its own: the first image alone gives the same result.
    alone = guided_prior_eps(LinearEps(c), x[:1], torch.zeros(1, dtype=torch.long), y[:1], alpha, rho, norm)
    torch.testing.assert_close(alone, got[:1])


def test_posterior_guidance_pulls_the_sample_towards_y() -> None:
    """A prior that knows nothing about y (ε_θ = 0 predicts x̂_0 = x_t/√ᾱ) drifts away;
    with ρ > 0 the anomalous region ends closer to the observation."""
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    ones = torch.ones(2, 1, 16, 16)
    zero_prior = LinearEps(0.0)
    errors = {}
    for rho in (0.0, 30.0):
        noise, _ = recorded_noise(tuple(y.shape), seed=5)
        x0 = posterior_sample(zero_prior, GaussianDiffusion(1000), y, ones, rho=rho, noise_level=400, steps=8, noise=noise)
        errors[rho] = (x0 - y).abs().mean().item()
    assert errors[30.0] < 0.7 * errors[0.0]


def test_data_fidelity_sums_per_image_norms() -> None:
    y = torch.zeros(2, 1, 1, 2)
    x0 = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 1.0]]]])
    assert data_fidelity(y, x0, GuidanceNorm.L2).item() == pytest.approx(5.0 + 1.0)
    assert data_fidelity(y, x0, GuidanceNorm.SQUARED_L2).item() == pytest.approx(25.0 + 1.0)


# ---------------------------------------------------------------------------- Eqs. 18-20


def test_pixel_distance_is_the_l1_norm_over_channels() -> None:
    y = torch.zeros(1, 3, 2, 2)
    x0 = torch.zeros(1, 3, 2, 2)
    x0[0, :, 0, 1] = torch.tensor([0.5, -0.25, 1.0])
    expected = torch.zeros(1, 2, 2)
    expected[0, 0, 1] = 1.75
    torch.testing.assert_close(pixel_distance(x0, y), expected)


def test_perceptual_distance_is_one_minus_cosine_summed_over_stages() -> None:
    f = torch.randn(2, 8, 4, 4)
    same = perceptual_distance([f, f[:, :, ::2, ::2]], [f, f[:, :, ::2, ::2]], (16, 16))
    assert same.shape == (2, 16, 16) and same.abs().max() < 1e-5
    opposite = perceptual_distance([f, f], [-f, -f], (8, 8))
    torch.testing.assert_close(opposite, torch.full((2, 8, 8), 4.0), atol=1e-5, rtol=0)  # (1 - (-1)) x 2 stages
    # Orthogonal channels at one position only: distance 1 there before upsampling.
    a, b = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    a[0, 0], b[0, 1] = 1.0, 1.0
    torch.testing.assert_close(perceptual_distance([a], [b], (3, 3)), torch.ones(1, 3, 3))


def test_perceptual_pooling_averages_features_before_the_cosine() -> None:
    fx, fy = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    pooled = perceptual_distance([fx], [fy], (5, 5), pool_size=3)
    # Centre pixel: the mean of the 3x3 neighbourhood on each side.
    mx, my = fx[0, :, 1:4, 1:4].mean((1, 2)), fy[0, :, 1:4, 1:4].mean((1, 2))
    expected = 1 - torch.dot(mx, my) / (mx.norm() * my.norm())
    assert pooled[0, 2, 2].item() == pytest.approx(expected.item(), abs=1e-5)


def test_difference_map_modes_of_table_4() -> None:
    torch.manual_seed(0)
    y, x0 = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    fy, fx = [torch.randn(2, 4, 4, 4)], [torch.randn(2, 4, 4, 4)]
    pixel, perceptual = pixel_distance(x0, y), perceptual_distance(fx, fy, (8, 8))
    zeros = torch.zeros_like(pixel)
    torch.testing.assert_close(difference_map(pixel, zeros, 2.5), 2.5 * pixel)  # pixel-only
    torch.testing.assert_close(difference_map(zeros, perceptual, 2.5), perceptual)  # perceptual-only
    torch.testing.assert_close(difference_map(pixel, perceptual, 2.5), 2.5 * pixel + perceptual)


@pytest.mark.parametrize("sigma", [1.0, 1.5, 4.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    maps = torch.rand(2, 40, 40, dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-10)
    assert gaussian_blur(maps, 0.0) is maps


def test_anomaly_mask_eq20_per_image_and_per_batch() -> None:
    score = torch.tensor([[[0.0, 1.0], [2.0, 10.0]], [[5.0, 6.0], [7.0, 8.0]]])
    per_image = anomaly_mask(score, 0.5, *score_range(score, ThresholdScope.PER_IMAGE))
    # image 0: cut 0 + 0.5·10 = 5 -> only 10; image 1: cut 5 + 0.5·3 = 6.5 -> 7, 8
    assert per_image.shape == (2, 1, 2, 2)
    assert per_image[:, 0].tolist() == [[[0, 0], [0, 1]], [[0, 0], [1, 1]]]
    batch = anomaly_mask(score, 0.5, *score_range(score, ThresholdScope.BATCH))  # cut 0 + 0.5·10 = 5 for both
    assert batch[:, 0].tolist() == [[[0, 0], [0, 1]], [[0, 1], [1, 1]]]
    assert anomaly_mask(score, 0.0, *score_range(score, ThresholdScope.PER_IMAGE))[:, 0].sum().item() == 6  # all but each minimum
    # calibrated scalars (the validation scope): one cut for every image
    assert anomaly_mask(score, 0.25, torch.tensor(2.0), torch.tensor(10.0))[:, 0].tolist() == [[[0, 0], [0, 1]], [[1, 1], [1, 1]]]


def test_image_score_is_the_mean_of_the_top_s_pixels() -> None:
    assert scaled_top_k(500, 224, 224, 224) == 500
    assert scaled_top_k(500, 224, 64, 64) == 41
    assert scaled_top_k(500, None, 8, 8) == 64  # capped at every pixel
    assert scaled_top_k(500, 224, 2, 2) == 1
    score = torch.arange(16.0).view(1, 4, 4)
    assert top_k_mean(score, 3).item() == pytest.approx((15 + 14 + 13) / 3)


# ---------------------------------------------------------------------------- config


def small_config(**overrides) -> MDPSConfig:
    values = dict(
        image_size=16, crop_size=None, epochs=1, batch_size=2, base_channels=8, channel_mult=(1, 2), layers_per_block=1,
        attention_resolutions=(), head_channels=8, norm_groups=4, noise_level=60, steps=3, num_samples=2, mask_num_samples=1,
        blur_sigma=1.0, perceptual_strides=(4, 8), backbone="efficientnet_lite0",
        # fixed η and per-image Eq. 20 statistics: these tests need no calibrate() (tests/test_mdps_equations.py covers it)
        pixel_weight=1.0, mask_threshold_scope="per_image",
    )
    values.update(overrides)
    return MDPSConfig(**values)


def test_config_defaults_are_the_paper() -> None:
    c = MDPSConfig()
    assert (c.rho, c.noise_level, c.steps, c.num_samples, c.top_k) == (100.0, 200, 10, 16, 500)
    assert (c.image_size, c.crop_size, c.epochs, c.batch_size, c.num_timesteps) == (256, 224, 2000, 8, 1000)
    assert c.metric is Metric.BOTH and c.use_mask and c.perceptual_strides == (4, 8, 16)
    assert c.backbone == "wide_resnet101_2"  # §4.3
    assert c.pixel_weight is None and c.mask_threshold_scope is ThresholdScope.VALIDATION  # calibrated on validation normals


def test_config_declares_inference_only_axes() -> None:
    docs = field_docs(MDPSConfig)
    inference = {"rho", "noise_level", "steps", "num_samples", "mask_threshold", "pixel_weight", "metric", "use_mask",
                 "mask_threshold_scope", "backbone", "perceptual_strides", "top_k", "ddim_eta", "guidance_norm", "sample_chunk",
                 "calibration_batch_size"}
    training = {"image_size", "crop_size", "epochs", "batch_size", "learning_rate", "weight_decay", "num_timesteps", "base_channels", "channel_mult"}
    assert all(not docs[name][0] for name in inference)
    assert all(docs[name][0] for name in training)
    assert all(doc for _, doc in docs.values())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"steps": 61}, "steps N"),
        ({"noise_level": 1001}, "noise_level T"),
        ({"rho": -1.0}, "rho"),
        ({"mask_threshold": 1.5}, "mask_threshold"),
        ({"num_samples": 0}, "num_samples"),
        ({"metric": "lpips"}, "lpips"),
        ({"backbone": "resnet18"}, "unknown backbone"),
        ({"perceptual_strides": (2,), "backbone": "wide_resnet101_2"}, "perceptual_strides"),
        ({"metric": "pixel", "pixel_weight": 0.0}, "pixel_weight"),
        ({"pixel_weight": -1.0}, "pixel_weight"),
        ({"calibration_batch_size": 0}, "calibration_batch_size"),
        ({"mask_threshold_scope": "test"}, "mask_threshold_scope"),
        ({"feature_pool_size": 2}, "feature_pool_size"),
        ({"channel_mult": (1, 2, 2, 2, 2, 2)}, "divisible"),
    ],
)
def test_config_rejects_invalid_values(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_presets_resolve() -> None:
    smoke = resolve_method_config("mdps", "smoke")
    paper = resolve_method_config("mdps", "paper")
    assert smoke.image_size == 64 and smoke.input_size == 64
    assert smoke.backbone == "efficientnet_lite0" and paper.backbone == "wide_resnet101_2"  # offline stand-in at smoke scale
    assert paper == MDPSConfig()


# ---------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def backbone() -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0")  # random weights: shapes and plumbing only


def make_model(backbone, **overrides) -> MDPS:
    torch.manual_seed(0)
    return MDPS(small_config(**overrides), lambda name: backbone)


def test_training_step_is_eq5_noise_regression(backbone) -> None:
    model = make_model(backbone)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batch = TrainBatch(images, torch.ones(2, 1, 16, 16), images, torch.zeros(2, dtype=torch.long))
    losses = model(batch)
    assert set(losses.terms) == {"L_theta"} and losses.total.ndim == 0 and not losses.terms["L_theta"].requires_grad
    losses.total.backward()
    assert all(p.grad is not None for p in model.unet.parameters())
    optimizers = model.configure_optimizers()
    assert optimizers.scheduler is None and optimizers.optimizer.defaults["weight_decay"] == model.config.weight_decay


def test_predict_map_is_a_distance_and_the_score_its_top_s_mean(backbone) -> None:
    model = make_model(backbone)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    first = model.predict(images, generator=torch.Generator().manual_seed(0))
    assert (first.anomaly_map >= 0).all()
    other = model.predict(images, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other.anomaly_map, first.anomaly_map)
    k = scaled_top_k(500, 224, 16, 16)
    torch.testing.assert_close(first.image_score, top_k_mean(first.anomaly_map, k))


def test_sample_chunks_do_not_change_the_result(backbone) -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    batched = make_model(backbone, num_samples=3).predict(images, generator=torch.Generator().manual_seed(0))
    sequential = make_model(backbone, num_samples=3, sample_chunk=1).predict(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sequential.anomaly_map, batched.anomaly_map, atol=1e-4, rtol=1e-4)


def test_predict_is_two_passes_with_the_eq20_mask(backbone) -> None:
    """predict = score map with m ≡ 1 -> Eq. 20 mask -> score map with that mask."""
    model = make_model(backbone, mask_threshold=0.5)
    model.eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    got = model.predict(images, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        first = model.score_map(images, torch.ones(2, 1, 16, 16), 1, g)
        mask = anomaly_mask(first, 0.5, *score_range(first, ThresholdScope.PER_IMAGE))
        assert 0 < mask.mean() < 1
        final = model.score_map(images, mask, 2, g)
    torch.testing.assert_close(got.anomaly_map, final)


def test_without_mask_is_one_unmasked_pass(backbone) -> None:
    calls = []
    model = make_model(backbone, use_mask=False)
    model.unet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    model.predict(torch.rand(2, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert calls == [2 * 2] * 3  # N = 3 steps, the N_s = 2 samples of 2 images batched, one pass
    calls.clear()
    masked = make_model(backbone, mask_threshold=0.0)
    masked.unet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    masked.predict(torch.rand(2, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert calls == [2] * 3 + [4] * 3  # the mask pass (1 sample) then the masked pass (2 samples)


def test_backbone_is_not_part_of_the_stored_model(backbone) -> None:
    """The backbone is an inference choice: a prior stored under one metric/backbone loads
    into a model configured with another (and the pixel metric needs no backbone)."""
    model = make_model(backbone)
    state = model.state_dict()
    assert all(key.startswith("unet.") for key in state)
    pixel_only = MDPS(small_config(metric="pixel"), None)
    pixel_only.load_state_dict(state)
    out = pixel_only.predict(torch.rand(1, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert out.anomaly_map.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="backbone_factory"):
        MDPS(small_config(), None)
