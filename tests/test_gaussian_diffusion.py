"""Gaussian diffusion building blocks (methods/gaussian_diffusion.py) against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from methods.gaussian_diffusion import BetaSchedule, GaussianDiffusion, beta_schedule, extract


def _t(value: int, batch: int = 2) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.long)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(1000, BetaSchedule.LINEAR)


def test_linear_schedule_matches_closed_form() -> None:
    for T in (1000, 100):
        betas = beta_schedule("linear", T).numpy()
        scale = 1000 / T
        expected = scale * 1e-4 + (scale * 0.02 - scale * 1e-4) * np.arange(T) / (T - 1)
        np.testing.assert_allclose(betas, expected, rtol=1e-12)
    d = GaussianDiffusion(1000, "linear")
    # ᾱ_t = exp(Σ log(1 - β_s)), computed independently in float64.
    expected_bar = np.exp(np.cumsum(np.log1p(-beta_schedule("linear", 1000).numpy())))
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), expected_bar, rtol=1e-5)
    # Known anchors of the DDPM linear schedule.
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-7)
    assert 3e-5 < d.alphas_cumprod[-1].item() < 5e-5


def test_cosine_schedule_matches_closed_form() -> None:
    T = 1000
    betas = beta_schedule("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    alpha_bar = torch.cumprod(1 - betas, 0).numpy()
    unclipped = (betas < 0.999).numpy()  # the telescoping product holds until the clamp
    ts = np.arange(T)[unclipped]
    expected = np.array([f(t + 1) / f(0) for t in ts])
    np.testing.assert_allclose(alpha_bar[unclipped], expected, rtol=1e-9)
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas > 0).all()


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError):
        beta_schedule("quadratic-ish", 10)


def test_x0_from_true_eps_recovers_x0(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 8, 8, generator=g)
    for t in (0, 1, 200, 400, 999):
        tt = _t(t, 4)
        x_t = diffusion.q_sample(x0, tt, eps)
        x0_hat = diffusion.predict_x0_from_eps(x_t, tt, eps)
        # 1/√ᾱ_999 ≈ 160 amplifies float32 rounding; the tolerance scales with it.
        tol = 1e-5 / diffusion.sqrt_alphas_cumprod[t].item()
        torch.testing.assert_close(x0_hat, x0, atol=tol, rtol=0)
        torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, tt, x0), eps, atol=1e-3, rtol=0)


def test_q_sample_moments_match_eq1(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000, 1, 1, 1), 0.6)
    t = _t(300, 20000)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    a = diffusion.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(a) * 0.6, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - a, rel=0.03)


def test_alpha_bar_at_minus_one_is_clean(diffusion: GaussianDiffusion) -> None:
    shape = torch.Size((3, 1, 1, 1))
    assert torch.equal(diffusion.alpha_bar(torch.tensor([-1, -1, -1]), shape), torch.ones(shape))
    torch.testing.assert_close(diffusion.alpha_bar(torch.tensor([0, 5, 999]), shape).flatten(), diffusion.alphas_cumprod[[0, 5, 999]])


def test_extract_broadcasts_per_sample() -> None:
    values = torch.tensor([10.0, 20.0, 30.0])
    out = extract(values, torch.tensor([2, 0]), torch.Size((2, 3, 4, 4)))
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [30.0, 10.0]


def test_posterior_matches_bayes_rule(diffusion: GaussianDiffusion) -> None:
    """q(x_{t-1} | x_t, x_0) as the product of the prior q(x_{t-1} | x_0) and the one-step
    likelihood q(x_t | x_{t-1}), precision-weighted (independent of the code's coefficients)."""
    x0 = torch.tensor([0.3, -0.7]).reshape(2, 1, 1, 1)
    x_t = torch.tensor([1.1, 0.2]).reshape(2, 1, 1, 1)
    for t in (1, 50, 500, 999):
        a_bar_prev = diffusion.alphas_cumprod[t - 1].double().item()
        beta = diffusion.betas[t].double().item()
        prior_var, like_var = 1 - a_bar_prev, beta
        # x_t | x_{t-1} ~ N(√α x_{t-1}, β): a likelihood for x_{t-1} with mean x_t/√α, var β/α.
        alpha = 1 - beta
        precision = 1 / prior_var + alpha / like_var
        var = 1 / precision
        mean = var * (math.sqrt(a_bar_prev) * x0.double() / prior_var + math.sqrt(alpha) * x_t.double() / like_var)
        got_mean, got_var = diffusion.q_posterior_mean_variance(x0, x_t, _t(t))
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-4, atol=1e-5)
        assert got_var.flatten()[0].item() == pytest.approx(var, rel=1e-4)


def test_ddpm_step_at_t0_returns_x0_estimate(diffusion: GaussianDiffusion) -> None:
    g = torch.Generator().manual_seed(2)
    x_t, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = diffusion.ddpm_step(x_t, _t(0), eps, noise=z)  # no noise is added at t = 0
    torch.testing.assert_close(out, diffusion.predict_x0_from_eps(x_t, _t(0), eps), atol=1e-5, rtol=0)


def test_ddpm_step_matches_eq3(diffusion: GaussianDiffusion) -> None:
    """DiffusionAD Eq. 3: x_{t-1} = (x_t - (1-α_t)/√(1-ᾱ_t) ε̂)/√α_t + √β̃_t z."""
    g = torch.Generator().manual_seed(3)
    x_t, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = 420
    beta = diffusion.betas[t].double()
    a_bar, a_bar_prev = diffusion.alphas_cumprod[t].double(), diffusion.alphas_cumprod[t - 1].double()
    beta_tilde = (1 - a_bar_prev) / (1 - a_bar) * beta
    expected = (x_t.double() - beta / (1 - a_bar).sqrt() * eps.double()) / (1 - beta).sqrt() + beta_tilde.sqrt() * z.double()
    torch.testing.assert_close(diffusion.ddpm_step(x_t, _t(t), eps, noise=z).double(), expected, atol=1e-4, rtol=1e-4)


def test_ddim_eta1_single_step_equals_ddpm_step(diffusion: GaussianDiffusion) -> None:
    """DDIM with η = 1 and t_prev = t - 1 is the DDPM ancestral step (DDIM §4.1)."""
    g = torch.Generator().manual_seed(4)
    x_t, eps, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    for t in (1, 100, 700):
        ddim = diffusion.ddim_step(x_t, _t(t), _t(t - 1), eps, eta=1.0, noise=z)
        ddpm = diffusion.ddpm_step(x_t, _t(t), eps, noise=z)
        torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)


def test_ddim_eta0_is_deterministic_and_exact_with_oracle_eps(diffusion: GaussianDiffusion) -> None:
    """With the true ε of a known x_0 every DDIM (η = 0) step stays on the same
    trajectory, so the walk from any x_t ends exactly at x_0, and two walks agree bit for bit
    regardless of the global RNG."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    x_start = diffusion.q_sample(x0, _t(400), torch.randn(x0.shape, generator=g))

    def walk() -> torch.Tensor:
        x = x_start
        steps = diffusion.ddim_timesteps(400, 10)
        for i, t in enumerate(steps):
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            eps = diffusion.predict_eps_from_x0(x, _t(t), x0)  # oracle
            torch.randn(100)  # perturb the global RNG: η = 0 must not use it
            x = diffusion.ddim_step(x, _t(t), _t(t_prev), eps, eta=0.0)
        return x

    first, second = walk(), walk()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, x0, atol=2e-4, rtol=0)


def test_ddim_sigma(diffusion: GaussianDiffusion) -> None:
    shape = torch.Size((2, 1, 1, 1))
    assert torch.equal(diffusion.ddim_sigma(_t(500), _t(400), 0.0, shape), torch.zeros(shape))
    # t_prev = -1 (landing on x_0): σ = 0 for any η.
    assert torch.equal(diffusion.ddim_sigma(_t(500), _t(-1), 1.0, shape), torch.zeros(shape))
    # η = 1, t_prev = t - 1: σ² is the DDPM posterior variance β̃_t (float32 cancellation
    # in 1 - ᾱ_t/ᾱ_{t-1} limits the precision to ~1e-3 relative).
    for t in (10, 300):
        sigma = diffusion.ddim_sigma(_t(t), _t(t - 1), 1.0, shape)
        _, variance = diffusion.q_posterior_mean_variance(torch.zeros(shape), torch.zeros(shape), _t(t))
        torch.testing.assert_close(sigma**2, variance, rtol=1e-3, atol=0)


def test_ddim_step_with_eta_needs_noise(diffusion: GaussianDiffusion) -> None:
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        diffusion.ddim_step(x, _t(10), _t(5), x, eta=0.5)


def test_ddim_timesteps(diffusion: GaussianDiffusion) -> None:
    assert diffusion.ddim_timesteps(400, 1) == [400]
    assert diffusion.ddim_timesteps(4, 5) == [4, 3, 2, 1, 0]
    steps = diffusion.ddim_timesteps(400, 30)
    assert len(steps) == 30 and steps[0] == 400 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.ddim_timesteps(4, 6)
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.ddim_timesteps(4, 0)


def test_buffers_move_with_module() -> None:
    d = GaussianDiffusion(10).to(torch.float64)
    assert d.betas.dtype == torch.float64
    assert "betas" not in d.state_dict()  # schedules are rebuilt, never checkpointed
