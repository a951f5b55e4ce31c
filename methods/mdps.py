"""MDPS: Masked Diffusion Posterior Sampling (Wu et al., IJCAI 2024).

A test image y is treated as a masked noisy observation of a normal image x_0 (Eq. 7):
equal to x_0 where the mask m is 0, x_0 plus Gaussian noise where m is 1. Normal
reconstructions are drawn from p(x_0 | y) with a DDIM whose prior ε_θ was trained on
normal images only (Eq. 5): outside the mask the noise is known exactly (Eq. 10), inside
it the prior is steered towards y by a DPS-style likelihood gradient (Eq. 16). N_s
posterior samples are compared with y by a pixel + perceptual distance (Eq. 18) and the
distances are averaged (Eq. 19). The mask itself comes from a first, unmasked pass
(Eq. 20).

Notation (code name -> paper symbol):

    images, y                  y              test image [B, 3, H, W] in [-1, 1]
    mask                       m              1 = anomalous region (sampled), 0 = normal (kept) [B, 1, H, W]
    unet(x_t, t)               ε_θ(x_t, t)    the prior's noise prediction (Eq. 5)
    alpha_bar_t                α_t            cumulative product of (1 - β) (the paper's α is ᾱ)
    x0_prior                   x̂_0^prior      Eq. 13
    eps_posterior              ε_φ            the masked posterior denoiser (Eq. 17)
    config.rho                 ρ              guidance scale (Eq. 16)
    config.noise_level         T              noise level the sampler starts from (Alg. 1)
    config.steps               N              DDIM steps (Alg. 1)
    config.num_samples         N_s            posterior samples per image (Eq. 19)
    config.mask_threshold      λ              Eq. 20
    config.pixel_weight        η              Eq. 18 (None: 7·max ratio from calibrate())
    config.perceptual_strides  𝒥              backbone stages of Eq. 18, given by stride

Timesteps are 0-based as in methods/gaussian_diffusion.py: the paper's t ∈ {1..1000}
is index t - 1, and the paper's "s = 0" (the clean image) is index -1.

Deviations and choices (each is a config field so it can be ablated):

* Eq. 16 prints ∇‖y − x̂_0‖²₂; the authors' code differentiates the unsquared norm ‖·‖₂
  (as DPS does), and ρ = 100 is calibrated for that: with the square the guidance is
  ~100x too strong at 224² and the sampler diverges. ``guidance_norm`` picks either;
  the default is the code's ``l2``.
* The perceptual backbone is the paper's WideResNet-101-2 (stages 1-3 = strides 4, 8,
  16), loaded where torchvision and its weights are present; the smoke preset (and
  ``method.backbone=efficientnet_lite0``) uses the offline EfficientNet-Lite0 at the same
  strides (as DRDC's paper EfficientNet-B4 and its smoke Lite0).
* 3x3 mean pooling of the features and a σ = 4 Gaussian blur of the final map are from
  the authors' code (the paper is silent); both can be switched off.
* Eq. 20's min/max: λ = 0.12 is the authors' value for a min/max taken over the whole
  test set's first-pass maps, which would leak test information; per image it masks
  nearly all of a defect-free map. By default (``mask_threshold_scope=validation``) they
  are taken over the first-pass maps of the held-out validation normals, computed once
  by :meth:`MDPS.calibrate`; ``per_image`` and ``batch`` (one predict call) remain.
* η of Eq. 18 is not given in the paper; the authors' code sets η = 7 · max(perceptual
  term) / max(pixel term). ``pixel_weight=None`` computes that ratio in
  :meth:`MDPS.calibrate` over the validation normals' first-pass maps; a number fixes η.
* Eq. 5's ‖·‖² is summed over C·H·W (and averaged over the batch), as printed and as in
  the authors' code (``.square().sum(dim=(1, 2, 3)).mean(dim=0)``), and the optimiser is
  theirs: ``torch.optim.Adam(lr, weight_decay=0.05)``, which adds wd·θ to the gradient
  (coupled L2, not AdamW). Adam is invariant to the scale of the whole gradient, so
  this is L_mean + (wd / (C·H·W))/2 ‖θ‖² with L_mean the per-element mean: §5's 5e-2 is
  a decay of 0.05 / (3·224²) ≈ 3.3e-7 per element, i.e. almost no regularisation (at
  paper size the decay term is ~1e-5 of the loss gradient's norm). We keep exactly
  that (the published numbers were obtained with it); the smoke preset scales wd by its
  pixel count so that its per-element decay is the paper preset's
  (:func:`per_element_weight_decay`). A mean loss with wd = 0.05 would instead be a
  strong decay the authors never ran.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.backbones import backbone_strides
from methods.base import AnomalyMethod, BackboneFactory, Losses, MethodConfig, Optimizers, Prediction, TrainBatch, check, infer_field, train_field
from methods.gaussian_diffusion import BetaSchedule, GaussianDiffusion
from methods.scoring import gaussian_blur, scaled_top_k, top_k_mean
from methods.unet import UNet

log = logging.getLogger(__name__)

NoiseFn = Callable[[], torch.Tensor]


class Metric(str, Enum):
    """Which terms of Eq. 18 the difference map uses (Table 4)."""

    PIXEL = "pixel"  # η‖y_k − x_k‖₁ only
    PERCEPTUAL = "perceptual"  # Σ_i (1 − cos) of backbone features only
    BOTH = "both"  # the paper's Eq. 18


class GuidanceNorm(str, Enum):
    """The data-fidelity term whose gradient guides the anomalous region (Eq. 16)."""

    L2 = "l2"  # ‖y − x̂_0‖₂, as the authors' code (and DPS) differentiate it
    SQUARED_L2 = "squared_l2"  # ‖y − x̂_0‖²₂, Eq. 16 as printed


class ThresholdScope(str, Enum):
    """Over which images Eq. 20 takes min D̄ and max D̄."""

    VALIDATION = "validation"  # the range over the validation normals' first-pass maps (MDPS.calibrate)
    PER_IMAGE = "per_image"  # each image's own range
    BATCH = "batch"  # the range over all images of one predict() call (the authors' code: the whole test set)


PIXEL_WEIGHT_RATIO = 7.0  # authors' code: η = 7 · max(perceptual) / max(pixel)


@dataclass(frozen=True)
class MDPSConfig(MethodConfig):
    """MDPS hyperparameters; defaults are the paper's (§5), or the authors' code where
    the paper is silent (noted per field)."""

    # --- data and training of the prior (§5) ----------------------------------------
    image_size: int = train_field(256, "resize side in pixels (§5: 256)")
    crop_size: int | None = train_field(224, "centre crop side after resizing; None = no crop (§5: 224 for MVTec, none for BTAD)")
    epochs: int = train_field(2000, "training epochs of the prior (§5: 2000)")
    batch_size: int = train_field(8, "global batch size (§5: 8)")
    learning_rate: float = train_field(1e-4, "Adam learning rate (§5: 1e-4; the authors' config uses 3e-4)")
    weight_decay: float = train_field(
        0.05, "coupled Adam weight decay on the summed Eq. 5 loss (§5 and authors' code: 5e-2, i.e. 5e-2/(C·H·W) per element: nearly none)"
    )
    num_timesteps: int = train_field(1000, "diffusion steps of the prior (§5: 1000)")
    beta_schedule: BetaSchedule = train_field(BetaSchedule.LINEAR, "β schedule of the prior (authors' code: linear 1e-4..0.02)")
    base_channels: int = train_field(64, "UNet base width (authors' code: 64)")
    channel_mult: tuple[int, ...] = train_field((1, 1, 2, 2, 4, 4), "UNet width multipliers per level (authors' code: 64/64/128/128/256/256)")
    layers_per_block: int = train_field(2, "residual blocks per UNet level (ADM: 2)")
    attention_resolutions: tuple[int, ...] = train_field((28, 14, 7), "UNet resolutions (pixels) with self-attention (ADM's 32/16/8 at 256² = 1/8, 1/16, 1/32: 28/14/7 at 224²)")
    head_channels: int = train_field(64, "channels per attention head (ADM: 64; the authors' code uses 4 heads)")
    norm_groups: int = train_field(32, "GroupNorm groups in the UNet (ADM: 32)")
    dropout: float = train_field(0.0, "UNet dropout (authors' code: 0)")

    # --- posterior sampling (Alg. 1, Eqs. 10-17) --------------------------------------
    rho: float = infer_field(100.0, "ρ: guidance scale of Eq. 16 (§5.2: 100; 0 = 'w/o posterior', prior sampling)")
    noise_level: int = infer_field(200, "T: noise level the sampler starts from, of num_timesteps (§5: 200)")
    steps: int = infer_field(10, "N: DDIM steps from T to 0 (§5: 10)")
    num_samples: int = infer_field(16, "N_s: posterior samples per image averaged by Eq. 19 (Table 1/5: 16; 1 is the cheap setting)")
    ddim_eta: float = infer_field(1.0, "scale of σ_t (1 = Eq. 4, the paper; 0 = deterministic DDIM)")
    guidance_norm: GuidanceNorm = infer_field(GuidanceNorm.L2, "data term of Eq. 16: l2 (‖·‖₂, authors' code, what ρ=100 is for) | squared_l2 (‖·‖²₂ as printed)")
    sample_chunk: int | None = infer_field(None, "posterior samples drawn at once per image (None = all N_s batched, 1 = sequential); results do not depend on it, memory does")

    # --- mask generation (Eq. 20) -----------------------------------------------------
    use_mask: bool = infer_field(True, "two passes with the Eq. 20 mask; False = 'w/o mask' (m ≡ 1, one pass)")
    mask_threshold: float = infer_field(0.12, "λ of Eq. 20, in [0, 1] (not in the paper; authors' config for bottle: 0.12, for a min/max over the test set)")
    mask_threshold_scope: ThresholdScope = infer_field(
        ThresholdScope.VALIDATION,
        "min/max of Eq. 20: validation (over the validation normals' first-pass maps, from calibrate(); the authors took the test set's) | per_image | batch (over one predict call)",
    )
    mask_num_samples: int | None = infer_field(None, "posterior samples of the first (m ≡ 1) pass; None = num_samples (authors' code: 1)")

    # --- anomaly scoring (Eqs. 18-19) ----------------------------------------------------
    metric: Metric = infer_field(Metric.BOTH, "difference map of Eq. 18: pixel | perceptual | both (Table 4)")
    pixel_weight: float | None = infer_field(
        None, "η of Eq. 18 (not given in the paper): None = the authors' 7·max(perceptual)/max(pixel) over the validation normals (calibrate()); a number = fixed η"
    )
    backbone: str = infer_field(
        "wide_resnet101_2",
        "perceptual backbone: wide_resnet101_2 (§4.3, the paper's; needs torchvision + weights) | efficientnet_lite0 (offline, the smoke preset) | efficientnet_b4",
    )
    perceptual_strides: tuple[int, ...] = infer_field((4, 8, 16), "backbone stages of Eq. 18 by stride (§4.3: WRN-101-2 stages 1-3 = strides 4, 8, 16)")
    calibration_batch_size: int = infer_field(8, "validation images per first-pass call in calibrate() (memory; the random draws follow it)")
    feature_pool_size: int = infer_field(3, "mean-pooling window on features before the cosine (authors' code: 3; 1 = none)")
    blur_sigma: float = infer_field(4.0, "σ in pixels of the Gaussian blur of the final map (authors' code: 4; 0 = none)")
    top_k: int = infer_field(500, "S: image score = mean of the S largest pixel scores (§4.3: 500)")
    top_k_reference_size: int | None = infer_field(224, "S is given at this side and scaled by pixel count (500 at 224²); None = S as is")

    @property
    def uses_backbone(self) -> bool:
        return self.metric is not Metric.PIXEL

    @property
    def calibrates_pixel_weight(self) -> bool:
        """η is computed from the validation normals (only both terms of Eq. 18 need it)."""
        return self.pixel_weight is None and self.metric is Metric.BOTH

    @property
    def calibrates_threshold(self) -> bool:
        """Eq. 20's min/max come from the validation normals."""
        return self.use_mask and self.mask_threshold_scope is ThresholdScope.VALIDATION

    def validate(self) -> None:
        super().validate()
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.num_timesteps >= 2, f"num_timesteps must be >= 2, got {self.num_timesteps}")
        levels = len(self.channel_mult)
        check(levels >= 1 and self.input_size % 2 ** (levels - 1) == 0, f"input size {self.input_size} must be divisible by 2^{levels - 1} for channel_mult={self.channel_mult}")
        check(self.base_channels >= 1 and self.layers_per_block >= 1 and self.head_channels >= 1, "base_channels, layers_per_block and head_channels must be >= 1")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.rho >= 0, f"rho must be >= 0 (0 = w/o posterior), got {self.rho}")
        check(1 <= self.noise_level <= self.num_timesteps, f"noise_level T must be in [1, num_timesteps={self.num_timesteps}], got {self.noise_level}")
        check(1 <= self.steps <= self.noise_level, f"steps N must be in [1, noise_level T={self.noise_level}], got {self.steps}")
        check(self.num_samples >= 1, f"num_samples N_s must be >= 1, got {self.num_samples}")
        check(self.mask_num_samples is None or self.mask_num_samples >= 1, f"mask_num_samples must be None or >= 1, got {self.mask_num_samples}")
        check(self.sample_chunk is None or self.sample_chunk >= 1, f"sample_chunk must be None or >= 1, got {self.sample_chunk}")
        check(0.0 <= self.ddim_eta <= 1.0, f"ddim_eta must be in [0, 1], got {self.ddim_eta}")
        check(0.0 <= self.mask_threshold <= 1.0, f"mask_threshold λ must be in [0, 1], got {self.mask_threshold}")
        check(self.pixel_weight is None or self.pixel_weight >= 0, f"pixel_weight η must be None (calibrated) or >= 0, got {self.pixel_weight}")
        check(self.metric is not Metric.PIXEL or self.pixel_weight is None or self.pixel_weight > 0, "metric=pixel needs pixel_weight > 0 (or None)")
        check(self.calibration_batch_size >= 1, f"calibration_batch_size must be >= 1, got {self.calibration_batch_size}")
        strides = backbone_strides(self.backbone)  # ValueError naming the valid backbones
        check(
            len(self.perceptual_strides) > 0 and all(s in strides for s in self.perceptual_strides) and len(set(self.perceptual_strides)) == len(self.perceptual_strides),
            f"perceptual_strides must be distinct strides of {self.backbone}'s stages {strides}, got {self.perceptual_strides}",
        )
        check(self.feature_pool_size >= 1 and self.feature_pool_size % 2 == 1, f"feature_pool_size must be odd and >= 1, got {self.feature_pool_size}")
        check(self.blur_sigma >= 0, f"blur_sigma must be >= 0, got {self.blur_sigma}")
        check(self.top_k >= 1, f"top_k S must be >= 1, got {self.top_k}")
        check(self.top_k_reference_size is None or self.top_k_reference_size >= 1, f"top_k_reference_size must be None or >= 1, got {self.top_k_reference_size}")


# --------------------------------------------------------------------------------------
# Training of the prior (Eq. 5).


def per_element_weight_decay(weight_decay: float, image_shape: tuple[int, ...]) -> float:
    """The L2 coefficient that coupled Adam decay ``weight_decay`` on the summed Eq. 5 loss
    (MDPS §5) amounts to on the per-element mean loss: Adam ignores the scale of the whole
    gradient ∇L_sum + wd·θ = C·H·W (∇L_mean + wd/(C·H·W)·θ), so wd / (C·H·W).
    image_shape = (C, H, W)."""
    return weight_decay / math.prod(image_shape)


def prior_loss(eps_prediction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """‖ε − ε_θ(x_t, t)‖² of MDPS Eq. 5: the squared norm summed over C·H·W per image
    (as printed, and as the authors' code), averaged over the batch. [B, C, H, W] -> scalar."""
    return (noise - eps_prediction).pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------------------
# Posterior sampling (Algorithm 1).


def sampling_timesteps(noise_level: int, steps: int) -> list[tuple[int, int]]:
    """The (t, s) pairs of Algorithm 1 line 4, 0-based: t = T n / N, s = T (n − 1) / N for
    n = N..1, as indices t − 1 (the last s is −1, the clean image). Rounded when N ∤ T."""
    if not 1 <= steps <= noise_level:
        raise ValueError(f"steps N must be in [1, noise_level T={noise_level}], got {steps}")
    levels = [round(noise_level * n / steps) for n in range(steps, -1, -1)]  # paper's t, T..0
    return [(t - 1, s - 1) for t, s in zip(levels, levels[1:])]


def normal_region_eps(x_t: torch.Tensor, y: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """ε in the normal region, known exactly from y (MDPS Eq. 10):
    ε = (x_t − √α_t y) / √(1 − α_t)."""
    return (x_t - alpha_bar_t.sqrt() * y) / (1 - alpha_bar_t).sqrt()


def prior_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x̂_0^prior = (x_t − √(1 − α_t) ε_θ(x_t, t)) / √α_t (MDPS Eq. 13)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


def data_fidelity(y: torch.Tensor, x0: torch.Tensor, norm: GuidanceNorm) -> torch.Tensor:
    """Σ over the batch of ‖y − x̂_0‖ (or its square) per image: summing per-image terms
    keeps each image's gradient its own (MDPS Eq. 16's data term)."""
    squared = (y - x0).flatten(1).pow(2).sum(1)
    return squared.sum() if norm is GuidanceNorm.SQUARED_L2 else squared.sqrt().sum()


def guided_prior_eps(
    unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, alpha_bar_t: torch.Tensor, rho: float, norm: GuidanceNorm
) -> torch.Tensor:
    """ε in the anomalous region (MDPS Eq. 16):
    ε_θ(x_t, t) + ρ √(1 − α_t) ∇_{x_t} ‖y − x̂_0^prior‖, the gradient taken through the
    network. With ρ = 0 it is ε_θ alone and no gradient is computed."""
    if rho == 0:
        with torch.no_grad():
            return unet(x_t, t)
    with torch.enable_grad():
        x_in = x_t.detach().requires_grad_(True)
        eps = unet(x_in, t)
        fidelity = data_fidelity(y, prior_x0(x_in, eps, alpha_bar_t), norm)
        (grad,) = torch.autograd.grad(fidelity, x_in)
    return eps.detach() + rho * (1 - alpha_bar_t).sqrt() * grad


def posterior_eps(eps_normal: torch.Tensor, eps_anomalous: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ε_φ = (1 − m) ⊙ ε_φ^m̄ + m ⊙ ε_φ^m (MDPS Eq. 17)."""
    return (1 - mask) * eps_normal + mask * eps_anomalous


def posterior_sample(
    unet: nn.Module,
    diffusion: GaussianDiffusion,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    rho: float,
    noise_level: int,
    steps: int,
    noise: NoiseFn,
    ddim_eta: float = 1.0,
    norm: GuidanceNorm = GuidanceNorm.L2,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One masked diffusion posterior sample per image (MDPS Algorithm 1).

    y [B, 3, H, W] in [-1, 1]; mask [B, 1, H, W] (1 = anomalous); ``noise()`` returns a
    fresh standard normal [B, 3, H, W] (called once for x_T, then once per step).
    ``on_step(t, x_t)`` sees every state before its update (t as a 0-based index).
    Returns x_0 [B, 3, H, W].
    """
    t_start = sampling_timesteps(noise_level, steps)[0][0]
    batch = y.shape[0]
    alpha_T = diffusion.alpha_bar(torch.full((batch,), t_start, device=y.device), y.shape)
    x = alpha_T.sqrt() * y + (1 - alpha_T).sqrt() * noise()  # line 2
    guided = bool(mask.any())  # an all-normal mask needs no network at all
    for t_index, s_index in sampling_timesteps(noise_level, steps):
        if on_step is not None:
            on_step(t_index, x)
        t = torch.full((batch,), t_index, device=y.device, dtype=torch.long)
        s = torch.full((batch,), s_index, device=y.device, dtype=torch.long)
        alpha_t = diffusion.alpha_bar(t, y.shape)
        eps_normal = normal_region_eps(x, y, alpha_t)  # line 7
        eps_anomalous = guided_prior_eps(unet, x, t, y, alpha_t, rho, norm) if guided else eps_normal  # lines 5-6
        eps = posterior_eps(eps_normal, eps_anomalous, mask)  # line 8
        # Lines 9-11: x̂_0 from ε_φ, then x_s = √α_s x̂_0 + √(1 − α_s − σ_t²) ε_φ + σ_t ε_t,
        # σ_t of Eq. 4 (scaled by ddim_eta).
        z = noise() if ddim_eta > 0 else None
        x = diffusion.ddim_step(x, t, s, eps, eta=ddim_eta, noise=z)
    return x


# --------------------------------------------------------------------------------------
# Anomaly scoring (Eqs. 18-20).


def pixel_distance(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖y_k − (x_0)_k‖₁ over the colour channels at every pixel k (MDPS Eq. 18, pixel
    term). [B, 3, H, W] x2 -> [B, H, W]."""
    return (y - x0).abs().sum(1)


def perceptual_distance(features_x0: list[torch.Tensor], features_y: list[torch.Tensor], size: tuple[int, int], pool_size: int = 1) -> torch.Tensor:
    """Σ_i (1 − cos(F_i^(k)(x_0), F_i^(k)(y))) at every pixel k (MDPS Eq. 18, perceptual
    term): per stage, optional pool_size² mean pooling, cosine over channels, bilinear
    upsampling to ``size``, summed over stages. -> [B, H, W]."""
    total = None
    for fx, fy in zip(features_x0, features_y):
        if pool_size > 1:
            fx = F.avg_pool2d(fx, pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
            fy = F.avg_pool2d(fy, pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
        distance = 1 - F.cosine_similarity(fx, fy, dim=1, eps=1e-6)  # [B, h, w]
        distance = F.interpolate(distance[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        total = distance if total is None else total + distance
    assert total is not None, "at least one backbone stage"
    return total


def difference_map(pixel: torch.Tensor, perceptual: torch.Tensor, pixel_weight: torch.Tensor | float) -> torch.Tensor:
    """[D]_k of MDPS Eq. 18 from its two terms: η · pixel + perceptual (Table 4's single
    metrics pass zeros for the other term). Linear, so on the sample-averaged terms it
    is D̄ of Eq. 19. [B, H, W] x2 -> [B, H, W]."""
    return pixel_weight * pixel + perceptual


class DifferenceTerms(NamedTuple):
    """The Eq. 18 terms of D̄, each averaged over the posterior samples (Eq. 19)."""

    pixel: torch.Tensor  # [B, H, W] mean of ‖y_k − (x_0)_k‖₁
    perceptual: torch.Tensor  # [B, H, W] mean of Σ_i (1 − cos)


def pixel_weight_from_maps(pixel: torch.Tensor, perceptual: torch.Tensor, ratio: float = PIXEL_WEIGHT_RATIO) -> torch.Tensor:
    """η of MDPS Eq. 18 as the authors' code sets it: ratio · max(perceptual term) /
    max(pixel term), maxima over all maps given (here: the validation normals' first-pass
    maps, each term averaged over the samples as in Eq. 19). [N, H, W] x2 -> scalar."""
    return ratio * perceptual.max() / pixel.max().clamp_min(1e-12)


def score_range(score_map: torch.Tensor, scope: ThresholdScope) -> tuple[torch.Tensor, torch.Tensor]:
    """(min D̄, max D̄) of Eq. 20 per image [B] (``per_image``) or over all images of
    ``score_map`` (``batch``; also how calibrate() takes them over the validation normals)."""
    flat = score_map.flatten(1)
    if scope is ThresholdScope.PER_IMAGE:
        return flat.min(1).values, flat.max(1).values
    return flat.min().expand(flat.shape[0]), flat.max().expand(flat.shape[0])


def anomaly_mask(score_map: torch.Tensor, threshold: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """m = (D̄ > T_th), T_th = min D̄ + λ (max D̄ − min D̄) (MDPS Eq. 20); ``low``/``high``
    are the min/max (scalars, or [B] per image). [B, H, W] -> float {0, 1} [B, 1, H, W]."""
    cut = low + threshold * (high - low)
    return (score_map > cut.reshape(-1, 1, 1)).float()[:, None]


# --------------------------------------------------------------------------------------
# The model.


class MDPS(AnomalyMethod):
    """An unconditional DDPM prior (Eq. 5) and masked diffusion posterior sampling at test
    time (Algorithm 1, Eqs. 18-20). Single-class: one prior per category (§5)."""

    Config: ClassVar[type[MethodConfig]] = MDPSConfig
    paper_seconds_per_image = 0.5  # Table 3: MDPS (N_s = 1), per image
    paper_speed = "0.5 s/image"
    paper_parameters = "not stated (official code ~33 M)"  # checked in ../shared/papers/; official-code count from FACTS.md
    paper_backbone = "wide_resnet101_2"  # §4.3
    # Inference fields along the paper's own ablation axes; declared 2026-12-07, before any measurement on the generality set v2.
    selection_grid = ({}, {"metric": "perceptual"}, {"metric": "pixel"}, {"use_mask": False}, {"blur_sigma": 4.0})
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        # CPU minutes: 64 px, a ~0.27 M-parameter UNet trained 40 epochs, T = 400 of 1000
        # with N = 5 steps, N_s = 2 (1 for the mask pass). Training is short, so the
        # learning rate is raised; blur σ = 4 at 256² becomes 1. Weight decay: the paper
        # preset's per-element decay, 0.05 / (3·224²), on the 3·64² summed loss.
        "smoke": {
            "image_size": 64,
            "crop_size": None,
            "epochs": 40,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "weight_decay": 0.05 * (64 / 224) ** 2,  # ≈ 4.1e-3: per_element_weight_decay equal to the paper preset's
            "base_channels": 16,
            "channel_mult": (1, 2, 2),
            "layers_per_block": 1,
            "attention_resolutions": (),
            "head_channels": 32,
            "norm_groups": 8,
            "noise_level": 400,
            "steps": 5,
            "num_samples": 2,
            "mask_num_samples": 1,
            "blur_sigma": 1.0,
            "backbone": "efficientnet_lite0",  # offline; strides 4, 8, 16 like the paper's WRN-101-2 stages 1-3
        },
    }

    @classmethod
    def minimal_sampling(cls, config: MethodConfig) -> dict[str, Any]:
        return {"steps": 1, "num_samples": 1, "mask_num_samples": 1}  # N = 1, N_s = 1 in both passes (Table 3's cheap setting is N_s = 1)

    def __init__(self, config: MDPSConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__(config, backbone_factory)
        c = config
        self.diffusion = GaussianDiffusion(c.num_timesteps, c.beta_schedule)
        self.unet = UNet.from_config(c, in_channels=3, out_channels=3)
        self._backbone: nn.Module | None = None
        self._stage_indices: list[int] = []
        if c.uses_backbone:
            if backbone_factory is None:
                raise ValueError(f"metric={c.metric.value} needs a backbone_factory (name -> feature extractor) for the perceptual term")
            backbone = backbone_factory(c.backbone)
            strides = tuple(backbone.strides)
            self._stage_indices = [strides.index(s) for s in c.perceptual_strides]
            # Kept out of the module tree (so out of state_dict and DDP): the backbone is
            # an inference-only choice, and a stored prior must load under any backbone.
            object.__setattr__(self, "_backbone", backbone)
            log.info("MDPS perceptual backbone: %s, strides %s", c.backbone, c.perceptual_strides)
        # Set by calibrate() from the validation normals (NaN = not calibrated). Not
        # persistent: evaluation-time statistics, not trained weights, so a stored prior
        # loads whatever the inference settings.
        self.register_buffer("calibrated_pixel_weight", torch.tensor(float("nan")), persistent=False)  # η of Eq. 18
        self.register_buffer("threshold_low", torch.tensor(float("nan")), persistent=False)  # min D̄ of Eq. 20
        self.register_buffer("threshold_high", torch.tensor(float("nan")), persistent=False)  # max D̄ of Eq. 20

    # ---------------------------------------------------------------- training (Eq. 5)

    def forward(self, batch: TrainBatch) -> Losses:
        """L(θ) = E‖ε − ε_θ(√α_t x_0 + √(1 − α_t) ε, t)‖² over t ~ U{0..T−1} (MDPS Eq. 5)."""
        x0 = batch.images
        t = torch.randint(0, self.config.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        loss = prior_loss(self.unet(self.diffusion.q_sample(x0, t, noise), t), noise)
        return Losses(loss, {"L_theta": loss.detach()})

    def configure_optimizers(self) -> Optimizers:
        """Adam with coupled weight decay (§5, the authors' torch.optim.Adam), no LR schedule;
        on the summed loss the decay is per_element_weight_decay (see the module docstring)."""
        return Optimizers(torch.optim.Adam(self.unet.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay), None)

    # ---------------------------------------------------------------- calibration

    @torch.no_grad()
    def calibrate(self, normal_images: torch.Tensor, category: torch.Tensor | None = None) -> None:
        """η of Eq. 18 and the min/max of Eq. 20 from the validation normals [N, 3, H, W].

        Runs the first pass of :meth:`infer` (m ≡ 1, ``mask_num_samples`` samples) on
        them, in chunks of ``calibration_batch_size``, with a generator seeded 0. η =
        7 · max(perceptual) / max(pixel) over those maps (authors' code) unless
        ``pixel_weight`` is fixed; then min/max of the blurred D̄ (Eq. 19) over all of
        them. Only what the config needs is computed; the test set is never seen."""
        c = self.config
        if not (c.calibrates_pixel_weight or c.calibrates_threshold):
            return
        if normal_images.shape[0] == 0:
            raise ValueError("MDPS.calibrate needs at least one validation normal image (set data.val_fraction > 0, or mask_threshold_scope=per_image and a numeric pixel_weight)")
        was_training = self.training
        self.eval()
        try:
            generator = torch.Generator(device=normal_images.device).manual_seed(0)
            num_samples = c.mask_num_samples or c.num_samples
            pixel, perceptual = [], []
            for lo in range(0, normal_images.shape[0], c.calibration_batch_size):
                y = normal_images[lo : lo + c.calibration_batch_size]
                terms = self.difference_terms(y, torch.ones_like(y[:, :1]), num_samples, generator)
                pixel.append(terms.pixel)
                perceptual.append(terms.perceptual)
            pixel_maps, perceptual_maps = torch.cat(pixel), torch.cat(perceptual)  # [N, H, W] each
            if c.calibrates_pixel_weight:
                self.calibrated_pixel_weight.copy_(pixel_weight_from_maps(pixel_maps, perceptual_maps))
                log.info("MDPS calibrated η = %.4g", self.calibrated_pixel_weight.item())
            if c.calibrates_threshold:
                first = gaussian_blur(difference_map(pixel_maps, perceptual_maps, self.eta()), c.blur_sigma)  # D̄ of the first pass
                low, high = score_range(first, ThresholdScope.BATCH)
                self.threshold_low.copy_(low[0])
                self.threshold_high.copy_(high[0])
        finally:
            self.train(was_training)

    def eta(self) -> torch.Tensor | float:
        """η of Eq. 18: the config's number, the calibrated ratio, or 1 where only one
        term is used (then η only rescales the map, which neither Eq. 20 nor a ranking sees)."""
        c = self.config
        if c.pixel_weight is not None:
            return c.pixel_weight
        if not c.calibrates_pixel_weight:
            return 1.0
        if torch.isnan(self.calibrated_pixel_weight):
            raise ValueError("MDPS pixel_weight=None needs calibrate() on validation normals before predict (or set a numeric pixel_weight)")
        return self.calibrated_pixel_weight

    # ---------------------------------------------------------------- inference

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        """Anomaly map D̄ of the masked pass [B, H, W] and the top-S image score [B] (§4.3).

        With ``use_mask`` a first pass (m ≡ 1, ``mask_num_samples`` samples) gives the
        Eq. 20 mask, its min/max from :meth:`calibrate` (or per image / per call); the
        second pass samples with it. Randomness comes only from ``generator``."""
        c = self.config
        features_y = self._features(images)
        ones = torch.ones_like(images[:, :1])
        if c.use_mask:
            first = self.score_map(images, ones, c.mask_num_samples or c.num_samples, generator, features_y)
            if c.calibrates_threshold:
                if torch.isnan(self.threshold_low):
                    raise ValueError("MDPS mask_threshold_scope=validation needs calibrate() on validation normals before predict (or mask_threshold_scope=per_image)")
                low, high = self.threshold_low, self.threshold_high
            else:
                low, high = score_range(first, c.mask_threshold_scope)
            mask = anomaly_mask(first, c.mask_threshold, low, high)
        else:
            mask = ones
        final = self.score_map(images, mask, c.num_samples, generator, features_y)
        k = scaled_top_k(c.top_k, c.top_k_reference_size, *final.shape[-2:])
        return Prediction(final, top_k_mean(final, k))

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """N_s posterior samples per image: [B, 3, H, W] -> [N_s, B, 3, H, W].

        Sample j draws all its noise from its own generator, seeded from ``generator``,
        so the result is the same whether samples run batched or in chunks."""
        c = self.config
        seeds = torch.randint(0, 2**62, (num_samples,), generator=generator, device=generator.device).tolist()
        chunk = c.sample_chunk or num_samples
        out = []
        for lo in range(0, num_samples, chunk):
            sample_seeds = seeds[lo : lo + chunk]
            n = len(sample_seeds)
            generators = [torch.Generator(device=generator.device).manual_seed(s) for s in sample_seeds]

            def noise(generators: list[torch.Generator] = generators) -> torch.Tensor:
                draws = [torch.randn(images.shape, generator=g, device=g.device) for g in generators]
                return torch.cat(draws).to(images.device)  # sample-major: [n * B, 3, H, W]

            x0 = posterior_sample(
                self.unet,
                self.diffusion,
                images.repeat(n, 1, 1, 1),
                mask.repeat(n, 1, 1, 1),
                rho=c.rho,
                noise_level=c.noise_level,
                steps=c.steps,
                noise=noise,
                ddim_eta=c.ddim_eta,
                norm=c.guidance_norm,
            )
            out.append(x0.view(n, *images.shape))
        return torch.cat(out)

    def difference_terms(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        num_samples: int,
        generator: torch.Generator,
        features_y: list[torch.Tensor] | None = None,
    ) -> DifferenceTerms:
        """The two terms of Eq. 18, each averaged over N_s posterior samples (Eq. 19 is
        linear in them); a term the metric does not use is zeros. -> [B, H, W] each"""
        c = self.config
        samples = self.reconstruct(images, mask, num_samples, generator)  # [N_s, B, 3, H, W]
        if c.uses_backbone and features_y is None:
            features_y = self._features(images)
        pixel = torch.zeros(images.shape[0], *images.shape[-2:], device=images.device)
        perceptual = torch.zeros_like(pixel)
        for x0 in samples:
            if c.metric is not Metric.PERCEPTUAL:
                pixel += pixel_distance(x0, images)
            if c.uses_backbone:
                perceptual += perceptual_distance(self._features(x0), features_y, tuple(images.shape[-2:]), c.feature_pool_size)
        return DifferenceTerms(pixel / num_samples, perceptual / num_samples)

    def score_map(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        num_samples: int,
        generator: torch.Generator,
        features_y: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """D̄ = (1/N_s) Σ_j D(x_0^(j), y) (MDPS Eq. 19) with D = η · pixel + perceptual
        (Eq. 18), then the optional blur. -> [B, H, W]"""
        terms = self.difference_terms(images, mask, num_samples, generator, features_y)
        return gaussian_blur(difference_map(terms.pixel, terms.perceptual, self.eta()), self.config.blur_sigma)

    def _features(self, images: torch.Tensor) -> list[torch.Tensor] | None:
        """The backbone stages used by Eq. 18, or None for the pixel-only metric."""
        if self._backbone is None:
            return None
        backbone = self._backbone.to(images.device)
        stages = backbone(images, num_stages=max(self._stage_indices) + 1)
        return [stages[i] for i in self._stage_indices]
