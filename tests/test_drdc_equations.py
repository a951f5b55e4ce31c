"""DRDC Eq. 12 pinned to hand-computed values and to the refinement pass itself: the
training input x_t is the state inpaint() visits (refinement_state), whose masked region
keeps the noise of the fill forwarded to t_1, and the target is the noise ε̃ it holds.

mutations/drdc.yaml lists source mutations these tests must catch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from methods.drdc import DRDC, DRDCConfig, grid_partition, inpaint, known_masks, noised_condition, refinement_state
from methods.gaussian_diffusion import GaussianDiffusion
from tests.test_drdc import TINY, batch, tiny_factory


def alpha_bar(t: int) -> float:
    """ᾱ_t of the DDPM linear schedule (β from 1e-4 to 0.02 over 1000 steps), 0-based t,
    computed independently of methods/gaussian_diffusion.py."""
    return float(np.prod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64)[: t + 1]))


class Recorder(nn.Module):
    """z_θ that records its input and returns a fixed prediction."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.inputs.append((x.detach().clone(), t.clone()))
        return self.output


class Function(nn.Module):
    """A plain function standing in for a network."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def model(**overrides) -> DRDC:
    torch.manual_seed(0)
    return DRDC(DRDCConfig(**{**TINY, **overrides}), tiny_factory)


def one_pixel_case():
    """Two 1-channel-constant 2x2 images, the left column masked (known = 0 there)."""
    images = torch.tensor([0.5, -0.5]).view(2, 1, 1, 1).expand(2, 3, 2, 2).clone()
    known = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).expand(2, 1, 2, 2).clone()
    fill = torch.full((2, 3, 2, 2), 2.0)
    noise = torch.full((2, 3, 2, 2), 1.0)
    return images, known, noised_condition(images, known, fill), noise


# ---------------------------------------------------------------------------- Eq. 12 input


def test_eq12_input_is_the_state_the_refinement_visits_by_hand() -> None:
    """t_1 = 200 (TINY). At t = 99 < t_1 the masked pixel holds ε̃ = ε + √(ᾱ_200/(1-ᾱ_200)) (n - x)
    (n = 2, ε = 1): x_t = √ᾱ_99 x + √(1-ᾱ_99) ε̃; at t = 250 > t_1 the noise fill forwarded,
    √ᾱ_250 n + √(1-ᾱ_250) ε. Known pixels: √ᾱ_t x + √(1-ᾱ_t) ε; I_in in channels 3-5."""
    m = model()
    assert m.config.train_start_timestep == 200
    images, known, condition, noise = one_pixel_case()
    net = Recorder(torch.zeros(2, 3, 2, 2))
    m.unet = net
    m.inpainting_loss(images, condition, torch.tensor([99, 250]), noise)
    x_in, t_in = net.inputs[0]
    assert t_in.tolist() == [99, 250]
    a, a1 = alpha_bar(99), alpha_bar(200)
    eps_tilde = 1.0 + (a1 / (1 - a1)) ** 0.5 * (2.0 - 0.5)
    assert x_in[0, 0, 0, 0].item() == pytest.approx(a**0.5 * 0.5 + (1 - a) ** 0.5 * eps_tilde, abs=1e-5)
    assert x_in[0, 0, 0, 1].item() == pytest.approx(a**0.5 * 0.5 + (1 - a) ** 0.5, abs=1e-5)
    a = alpha_bar(250)
    assert x_in[1, 0, 0, 0].item() == pytest.approx(a**0.5 * 2.0 + (1 - a) ** 0.5, abs=1e-5)
    assert x_in[1, 0, 0, 1].item() == pytest.approx(a**0.5 * -0.5 + (1 - a) ** 0.5, abs=1e-5)
    torch.testing.assert_close(x_in[:, 3:], condition)


def test_eq12_training_input_matches_the_refinement_pass_statistics() -> None:
    """The deterministic pass (η = 0) with a perfect inpainter keeps the noise of the fill:
    at every later step its masked region holds ε̃ = (x_t - √ᾱ_t x)/√(1-ᾱ_t) with std
    1/√(1-ᾱ_{t_1}) = 1.71 given x (not 1 as in q(x_t | x)), a -κ x part and a +κ n part,
    κ = √(ᾱ_{t_1}/(1-ᾱ_{t_1})) = 1.38. Training must feed the same distribution."""
    timesteps = (200, 100, 40)
    m = model(train_start_timestep=timesteps[0])
    diffusion = m.diffusion
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16, generator=g) * 2 - 1
    known = known_masks(grid_partition(32, 16, 16, 1, 2, g), 2)[0]
    fill = torch.randn(x.shape, generator=g)
    masked = (1 - known).expand_as(x).bool()

    def oracle(inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # predicts x̃_0 = x exactly
        return diffusion.predict_eps_from_x0(inputs[:, :3], t, x)

    trajectory = inpaint(oracle, diffusion, x, known, fill, timesteps, model_condition=True, test_time_condition=True, clip_denoised=True, generator=g)
    kappa = (alpha_bar(200) / (1 - alpha_bar(200))) ** 0.5
    condition = noised_condition(x, known, fill)
    for step, visited in zip(timesteps[1:], trajectory.states[1:]):
        net = Recorder(torch.zeros_like(x))
        m.unet = net
        m.inpainting_loss(x, condition, torch.full((32,), step), torch.randn(x.shape, generator=g))
        trained = net.inputs[0][0][:, :3]
        a = alpha_bar(step)
        for state in (visited, trained):
            eps_tilde = ((state - a**0.5 * x) / (1 - a) ** 0.5)[masked]
            given_x = eps_tilde + kappa * x[masked]
            assert given_x.std().item() == pytest.approx(1 / (1 - alpha_bar(200)) ** 0.5, rel=0.03), step
            assert (given_x * fill[masked]).mean().item() == pytest.approx(kappa, rel=0.05), step  # the n part, read from I_in
            assert given_x.mean().item() == pytest.approx(0.0, abs=0.05), step


def test_refinement_state_is_an_exact_ddim_path_with_x0_fixed() -> None:
    """Eq. 9 on every state returns the normal image, and the DDIM step (η = 0) from the
    state at t lands on the state at t' with the same ε̃."""
    diffusion = GaussianDiffusion(1000)
    images, known, condition, noise = one_pixel_case()
    t, t_next = torch.tensor([180, 120]), torch.tensor([90, 20])
    here = refinement_state(diffusion, images, condition, t, 200, noise)
    there = refinement_state(diffusion, images, condition, t_next, 200, noise)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(here.x_t, t, here.eps), images, atol=1e-4, rtol=0)
    torch.testing.assert_close(diffusion.ddim_step(here.x_t, t, t_next, here.eps), there.x_t, atol=1e-4, rtol=0)
    torch.testing.assert_close(known * here.eps, known * noise)  # known pixels: plain ε of q(x_t | x_0)


def test_training_step_feeds_the_inpainting_loss() -> None:
    """forward() with the model condition: t ~ U{0..train_max_timestep}, I_in from a grid mask."""
    m = model(train_max_timestep=0)
    seen = []
    m.inpainting_loss = lambda images, condition, t, noise: seen.append((images, condition, t)) or torch.zeros(())
    b = batch()
    m(b)
    images, condition, t = seen[0]
    assert t.tolist() == [0, 0, 0, 0] and torch.equal(images, b.images)
    kept = (condition == images).all(dim=1)
    assert 0 < kept.float().mean() < 1  # one of the n_s sets replaced by noise


def test_training_timesteps_are_drawn_from_zero_to_the_largest() -> None:
    """t ~ U{0, ..., train_max_timestep}: with the largest t = 0 every sample is at t = 0."""
    m = model(train_max_timestep=0)
    net = Recorder(torch.zeros(4, 3, 32, 32))
    m.unet = net
    m(batch())
    assert net.inputs[0][1].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------- Eq. 12 loss


def test_eq12_loss_is_the_unweighted_regression_of_the_held_noise() -> None:
    """z_θ ≡ 0: mean(ε̃²), ε̃ = 1 on known pixels and 1 + κ_200 (2 - x) on masked ones
    (half the pixels) at t ≤ t_1; z_θ = ε̃ gives 0; the plain ε of q(x_t | x) does not."""
    m = model()
    images, known, condition, noise = one_pixel_case()
    t = torch.tensor([5, 150])
    m.unet = Recorder(torch.zeros(2, 3, 2, 2))
    a1 = alpha_bar(200)
    masked = [(1 + (a1 / (1 - a1)) ** 0.5 * (2.0 - x)) ** 2 for x in (0.5, -0.5)]
    expected = (0.5 * 1.0 + 0.5 * sum(masked) / 2)
    assert m.inpainting_loss(images, condition, t, noise).item() == pytest.approx(expected, rel=1e-4)
    target = refinement_state(m.diffusion, images, condition, t, 200, noise).eps
    m.unet = Recorder(target)
    assert m.inpainting_loss(images, condition, t, noise).item() < 1e-10
    torch.testing.assert_close(m.diffusion.predict_x0_from_eps(refinement_state(m.diffusion, images, condition, t, 200, noise).x_t, t, target), images, atol=1e-4, rtol=0)
    m.unet = Recorder(noise)  # ε of q(x_t | x): returns x̃_0 ≠ x on the masked pixels
    assert m.inpainting_loss(images, condition, t, noise).item() > 0.5


# ---------------------------------------------------------------------------- Eq. 19


def test_eq19_gamma_weights_the_diffusion_heatmap() -> None:
    """H_out = (1 - γ) H_base / C_feat + γ H_diff / C_img: 0.1 · 544/272 + 0.9 · 3/3 = 1.1."""
    from methods.drdc import fuse_heatmaps

    base, diff = torch.full((1, 2, 2), 544.0), torch.full((1, 2, 2), 3.0)
    torch.testing.assert_close(fuse_heatmaps(base, diff, 0.9, feature_channels=272, image_channels=3), torch.full((1, 2, 2), 1.1))
    torch.testing.assert_close(fuse_heatmaps(base, diff, 1.0, feature_channels=272), torch.full((1, 2, 2), 1.0))  # diffusion map only


# ---------------------------------------------------------------------------- Eqs. 1, 2, 11


def test_eq1_reconstructs_the_clean_features_from_jittered_ones() -> None:
    """L_feat = ‖F_in - F_out‖² / (H W): the target is the clean F_in, the jitter only
    perturbs the transformer's input. With F_out ≡ 0 the loss is ‖F_in‖² per position."""
    m = model(feature_jitter_scale=20.0, feature_jitter_prob=1.0)
    seen = []
    m.reconstructor = Function(lambda features, category: seen.append(features) or torch.zeros_like(features))
    b = batch()
    losses = m(b)
    features = m.extract_features(b.images)
    assert not torch.allclose(seen[0], features)  # the input was jittered ...
    assert losses.terms["L_feat"].item() == pytest.approx(features.pow(2).sum(1).mean().item(), rel=1e-5)  # ... the target was not


def test_eq2_multiscale_base_heatmap_is_the_mean_of_the_eq16_maps() -> None:
    from methods.drdc import base_heatmap, distance_map

    g = torch.Generator().manual_seed(0)
    features, reconstruction = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    expected = sum(distance_map(features, reconstruction, s) for s in (1, 2, 4)) / 3
    torch.testing.assert_close(base_heatmap(features, reconstruction, (1, 2, 4)), expected)


def test_eq11_a_perfect_inpainter_leaves_no_diffusion_heatmap() -> None:
    """H_diff^{t,c} = ‖I_ori - I_out^{t,c}‖₂ with I_out built from x̃_0 (Eqs. 9-11): a z_θ that
    predicts x̃_0 = I_ori at every step gives a zero map at every timestep, grid and scale."""
    m = model(mean_filter_size=1).eval()
    images = batch(2).images
    n_s = m.config.num_sets

    def oracle(inputs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return m.diffusion.predict_eps_from_x0(inputs[:, :3], t, images.repeat(n_s, 1, 1, 1))

    m.unet = Function(oracle)
    heat = m.diffusion_heatmap(images, torch.Generator().manual_seed(0))
    assert heat.shape == (2, 32, 32) and heat.abs().max() < 1e-3
