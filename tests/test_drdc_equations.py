"""DRDC Eq. 12 pinned to hand-computed values: the training input x_t (the forward state
of the normal image, or of the noise fill I_in for the first reverse step), the target
and the (1 - ᾱ_t) weighting of the masked pixels of the noise-fill state.

mutations/drdc.yaml lists source mutations these tests must catch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from methods.drdc import DRDC, DRDCConfig, noised_condition
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


def test_eq12_input_is_the_forward_state_of_the_normal_image() -> None:
    """noise_fill False: x_t = √ᾱ_t x + √(1-ᾱ_t) ε everywhere, I_in in channels 3-5."""
    m = model()
    images, known, condition, noise = one_pixel_case()
    t = torch.tensor([0, 199])
    net = Recorder(torch.zeros(2, 3, 2, 2))
    m.unet = net
    m.inpainting_loss(images, condition, known, t, noise, torch.tensor([False, False]))
    x_in, t_in = net.inputs[0]
    for i, step in enumerate((0, 199)):
        a = alpha_bar(step)
        expected = a**0.5 * images[i] + (1 - a) ** 0.5 * 1.0  # the masked column too: no noise fill
        torch.testing.assert_close(x_in[i, :3], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_in[:, 3:], condition)
    assert t_in.tolist() == [0, 199]


def test_eq12_input_of_the_first_step_forwards_the_noise_fill() -> None:
    """noise_fill True: x_t = √ᾱ_t I_in + √(1-ᾱ_t) ε (what inpaint() feeds at t_1)."""
    m = model()
    images, known, condition, noise = one_pixel_case()
    t = torch.tensor([99, 99])
    net = Recorder(torch.zeros(2, 3, 2, 2))
    m.unet = net
    m.inpainting_loss(images, condition, known, t, noise, torch.tensor([True, False]))
    x_in, _ = net.inputs[0]
    a = alpha_bar(99)
    masked = a**0.5 * 2.0 + (1 - a) ** 0.5  # the fill value 2 forwarded
    assert x_in[0, 0, 0, 0].item() == pytest.approx(masked, abs=1e-5)
    assert x_in[0, 0, 0, 1].item() == pytest.approx(a**0.5 * 0.5 + (1 - a) ** 0.5, abs=1e-5)  # known pixel
    assert x_in[1, 0, 0, 0].item() == pytest.approx(a**0.5 * -0.5 + (1 - a) ** 0.5, abs=1e-5)  # sample 1: forward state


def test_training_step_draws_the_noise_fill_share() -> None:
    """forward(): the share of noise-fill samples follows train_noise_fill_fraction."""
    for fraction, fills in ((0.0, 0), (1.0, 4)):
        m = model(train_noise_fill_fraction=fraction)
        seen = []
        m.inpainting_loss = lambda images, condition, known, t, noise, noise_fill: seen.append(noise_fill) or torch.zeros(())
        m(batch())
        assert int(seen[0].sum()) == fills


def test_training_timesteps_are_drawn_from_zero_to_the_largest() -> None:
    """t ~ U{0, ..., train_max_timestep}: with the largest t = 0 every sample is at t = 0."""
    m = model(train_max_timestep=0)
    net = Recorder(torch.zeros(4, 3, 32, 32))
    m.unet = net
    m(batch())
    assert net.inputs[0][1].tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------- Eq. 12 loss


def test_eq12_loss_on_the_forward_state_is_the_plain_noise_regression() -> None:
    """Target ε, unweighted: z_θ ≡ 0 gives mean(ε²) = 1; z_θ ≡ 0.5 gives 0.25."""
    m = model()
    images, known, condition, noise = one_pixel_case()
    fill = torch.tensor([False, False])
    m.unet = Recorder(torch.zeros(2, 3, 2, 2))
    assert m.inpainting_loss(images, condition, known, torch.tensor([5, 250]), noise, fill).item() == pytest.approx(1.0, abs=1e-6)
    m.unet = Recorder(torch.full((2, 3, 2, 2), 0.5))
    assert m.inpainting_loss(images, condition, known, torch.tensor([5, 250]), noise, fill).item() == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("step", [10, 150, 600])
def test_eq12_noise_fill_loss_weights_masked_pixels_by_one_minus_alpha_bar(step: int) -> None:
    """On the noise-fill state, with z_θ ≡ 0: known pixels contribute ε² = 1; masked ones
    (1-ᾱ_t) ε*², ε* = ε + √(ᾱ_t/(1-ᾱ_t)) (n - x). Half the pixels are masked."""
    m = model()
    images, known, condition, noise = one_pixel_case()
    m.unet = Recorder(torch.zeros(2, 3, 2, 2))
    got = m.inpainting_loss(images, condition, known, torch.tensor([step, step]), noise, torch.tensor([True, True])).item()
    a = alpha_bar(step)
    per_image = []
    for x in (0.5, -0.5):
        eps_star = 1.0 + (a / (1 - a)) ** 0.5 * (2.0 - x)
        per_image.append(0.5 * 1.0 + 0.5 * (1 - a) * eps_star**2)
    assert got == pytest.approx(sum(per_image) / 2, rel=1e-4)
    if step == 150:  # the schedule itself, by hand: ᾱ_150 = Π_{s≤150} (1 - β_s) ≈ 0.78589
        assert a == pytest.approx(0.78589, abs=1e-4)


def test_eq12_noise_fill_target_makes_eq9_return_the_normal_image() -> None:
    m = model()
    images, known, condition, noise = one_pixel_case()
    t = torch.tensor([40, 300])
    x_t = m.diffusion.q_sample(condition, t, noise)
    target = m.diffusion.predict_eps_from_x0(x_t, t, images)
    m.unet = Recorder(target)
    assert m.inpainting_loss(images, condition, known, t, noise, torch.tensor([True, True])).item() < 1e-8
    m.unet = Recorder(noise)  # the literal ε of q(x_t | I_in) returns the fill: penalised on masked pixels
    assert m.inpainting_loss(images, condition, known, t, noise, torch.tensor([True, True])).item() > 0.1


# ---------------------------------------------------------------------------- Eq. 19


def test_eq19_gamma_weights_the_diffusion_heatmap() -> None:
    """H_out = (1 - γ) H_base / C_feat + γ H_diff / C_img: 0.1 · 544/272 + 0.9 · 3/3 = 1.1."""
    from methods.drdc import fuse_heatmaps

    base, diff = torch.full((1, 2, 2), 544.0), torch.full((1, 2, 2), 3.0)
    torch.testing.assert_close(fuse_heatmaps(base, diff, 0.9, feature_channels=272, image_channels=3), torch.full((1, 2, 2), 1.1))
    torch.testing.assert_close(fuse_heatmaps(base, diff, 1.0, feature_channels=272), torch.full((1, 2, 2), 1.0))  # diffusion map only
