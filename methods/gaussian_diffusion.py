"""Gaussian diffusion (DDPM / DDIM) shared by DiffusionAD, MDPS and DRDC.

Notation (code name -> paper symbol, DDPM / DiffusionAD §III-A):

    betas                          β_t            noise variance at step t
    alphas_cumprod                 ᾱ_t = Π_{s<=t} (1 - β_s)
    sqrt_alphas_cumprod            √ᾱ_t
    sqrt_one_minus_alphas_cumprod  √(1 - ᾱ_t)
    posterior_variance             β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)

Timesteps are 0-based, t ∈ {0, ..., T-1}, as in guided-diffusion: x_t for t = 0 is
already one noise step away from x_0, and "t = -1" denotes the clean image (ᾱ = 1).
The schedule is computed once in float64 and stored as float32 buffers; the network is
never owned here: callers pass ε̂ in.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import nn


class BetaSchedule(str, Enum):
    LINEAR = "linear"  # DDPM: β from 1e-4 to 0.02 (scaled by 1000 / T)
    COSINE = "cosine"  # Nichol & Dhariwal (2021)


def beta_schedule(kind: BetaSchedule | str, num_timesteps: int) -> torch.Tensor:
    """β_1..β_T as float64 [T]."""
    kind = BetaSchedule(kind)
    if kind is BetaSchedule.LINEAR:
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)


def extract(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """values[t] reshaped to broadcast against a batch of the given shape ([B, 1, 1, 1])."""
    return values.gather(0, t.long()).reshape(-1, *([1] * (len(shape) - 1)))


class GaussianDiffusion(nn.Module):
    """The fixed forward process and the DDPM / DDIM reverse updates (buffers only)."""

    def __init__(self, num_timesteps: int = 1000, schedule: BetaSchedule | str = BetaSchedule.LINEAR):
        super().__init__()
        self.num_timesteps = num_timesteps
        betas = beta_schedule(schedule, num_timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef_x0": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def alpha_bar(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """ᾱ_t broadcastable to ``shape``; t = -1 gives 1 (the clean image)."""
        padded = torch.cat([torch.ones(1, device=self.alphas_cumprod.device), self.alphas_cumprod])
        return extract(padded, t.long() + 1, shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DiffusionAD Eq. 1, DDPM Eq. 4)."""
        return extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t - √(1 - ᾱ_t) ε̂) / √ᾱ_t (DiffusionAD Eq. 6)."""
        return extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t - √ᾱ_t x_0) / √(1 - ᾱ_t), the inverse of q_sample."""
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x0) / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM Eqs. 6-7)."""
        mean = extract(self.posterior_mean_coef_x0, t, x_t.shape) * x0 + extract(self.posterior_mean_coef_xt, t, x_t.shape) * x_t
        return mean, extract(self.posterior_variance, t, x_t.shape)

    def ddpm_step(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (DiffusionAD Eq. 3):
        x_{t-1} = 1/√α_t (x_t - β_t/√(1-ᾱ_t) ε̂) + σ_t z with σ_t² = β̃_t, and no noise at t = 0."""
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        mean, variance = self.q_posterior_mean_variance(x0, x_t, t)
        if noise is None:
            noise = torch.zeros_like(x_t)
        nonzero = (t > 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * variance.sqrt() * noise

    def ddim_sigma(self, t: torch.Tensor, t_prev: torch.Tensor, eta: float, shape: torch.Size) -> torch.Tensor:
        """σ_t(η) = η √((1-ᾱ_{t_prev})/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t_prev}) (DDIM Eq. 16)."""
        a_t, a_prev = self.alpha_bar(t, shape), self.alpha_bar(t_prev, shape)
        return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()

    def ddim_step(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        eps: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DDIM step x_t -> x_{t_prev} (DDIM Eq. 12; t_prev = -1 lands on x̂_0):

        x_{t_prev} = √ᾱ_{t_prev} x̂_0 + √(1 - ᾱ_{t_prev} - σ²) ε̂ + σ z.
        With η = 0 it is deterministic; ``noise`` is z (required when η > 0)."""
        a_prev = self.alpha_bar(t_prev, x_t.shape)
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        sigma = self.ddim_sigma(t, t_prev, eta, x_t.shape)
        out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs the noise z")
            out = out + sigma * noise
        return out

    def ddim_timesteps(self, start: int, num_steps: int) -> list[int]:
        """Evenly spaced timesteps from ``start`` down to 0 (num_steps of them, start first);
        a reverse pass walks them and finishes with t_prev = -1."""
        if not 1 <= num_steps <= start + 1:
            raise ValueError(f"num_steps must be in [1, {start + 1}] for start={start}, got {num_steps}")
        steps = torch.linspace(start, 0, num_steps).round().long().tolist()
        return list(dict.fromkeys(steps))
