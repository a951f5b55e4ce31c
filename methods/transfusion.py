"""TransFusion: a transparency-based diffusion model for anomaly detection
(Fučka, Zavrtanik, Skočaj, ECCV 2024; paper §3, official code MaticFuc/ECCV_TransFusion).

An image is a composition of a normal appearance n, an anomaly appearance ε and an
anomaly mask M; the forward process makes the anomaly more opaque (β_t grows from 0 to
1), the reverse process makes it transparent again while localising it. One UNet with
three heads predicts (ε_t, n_t, M_t) at every step.

Notation (code name -> paper symbol):

    images, x          x             the (anomaly-free) training image / the test image
    anomaly            ε             anomaly appearance, M ⊙ A (zero outside the mask)
    normal             n             normal appearance (= x during training)
    mask               M             binary anomaly mask
    betas[t]           β_t           transparency schedule, β_0 = 0 < ... < β_T = 1
    x_t                x_t           image at step t (Eq. 2)
    previous_mask      M_{t+1}       mask estimate of the previous reverse step (input)
    Heads.anomaly      ε̂ (or β_t ε̂)  anomaly-appearance head (see AnomalyTarget)
    Heads.normal       n̂             normal-appearance head
    Heads.mask_logits  logit M̂_t     mask head (σ gives M̂_t)
    steps              T             number of reverse steps
    disc_weight        λ             weight of M_disc in M_final (Eq. 10)
    filter_size        n             side of the mean filter f_n (Eq. 10)

Timesteps run t = T, ..., 1 at inference; training samples t ~ U{1..T}. (The official
code uses β_t = t / (T-1) over t = 0..T-1 and starts inference one step below β = 1; we
follow the paper's indexing, β_0 = 0 and β_T = 1 with T reverse steps.)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.anomaly_synthesis import rotate, synthesize_anomalies
from methods.base import AnomalyMethod, BackboneFactory, Losses, MethodConfig, Optimizers, Prediction, TrainBatch, check, infer_field, train_field
from methods.losses import focal_loss, smooth_l1_loss, ssim_loss
from methods.unet import UNet

log = logging.getLogger(__name__)

# Training binarises the predicted mask at this fixed value for L_c (official code); the
# inference threshold is the config's ``mask_threshold``.
TRAIN_MASK_THRESHOLD = 0.5
# Focal-loss parameters of the official code (torchvision's sigmoid_focal_loss defaults).
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
# Perlin threshold that turns |noise| into the anomaly mask (official code, two-sided).
PERLIN_THRESHOLD = 0.5


class TransparencySchedule(str, Enum):
    """How β_t rises from β_0 = 0 to β_T = 1 (paper §4.6, Table 4)."""

    LINEAR = "linear"  # β_t = t / T (the paper's default)
    QUADRATIC = "quadratic"  # β_t = (t / T)²
    ROOT = "root"  # β_t = √(t / T)


class PreviousMask(str, Enum):
    """What the previous-mask input channel carries during training (paper §3.3, Table 4)."""

    SIMULATED = "simulated"  # Perlin map re-thresholded (shrunk / exact / grown) or dropped
    EXACT = "exact"  # the true mask M, no imperfection and no drop
    NONE = "none"  # no previous-mask channel at all ("w/o Simulated Mask")


class AnomalyTarget(str, Enum):
    """What the anomaly-appearance head regresses in L_a (Eq. 7)."""

    SCALED = "scaled"  # β_t ⊙ ε, the anomaly as visible in x_t (official code)
    APPEARANCE = "appearance"  # ε itself (Eq. 7 read literally)


class ConsistencyMask(str, Enum):
    """Which mask estimate Eq. 4 uses when L_c (Eq. 8) builds the predicted x_{t-1}.

    The paper (§3.2) builds x_{t-1} from "the estimated M_t" and does not say it is
    binarised in training; the official code binarises it, so the default follows the code.
    Table 4's "w/o L_m" row needs SOFT: with BINARY no loss reaches the mask head once L_m
    is off, the head stays at its initialisation and M_disc (95 % of M_final, Eq. 10) is
    noise, yet the paper loses only 1.5-3.2 p.p. there, so its mask head was still trained,
    and L_c through Eq. 4 is the only remaining term that can train it. ``validate`` therefore
    rejects mask_loss = false with a binary (or absent) L_c.
    """

    BINARY = "binary"  # σ(M̂) > 0.5, as at inference; no L_c gradient reaches the mask head (official code)
    SOFT = "soft"  # σ(M̂); L_c also trains the mask head (Table 4 "w/o L_m")


class FinalMask(str, Enum):
    """Which maps form the final anomaly map (Eq. 10, Table 4 "Final mask calc.")."""

    COMBINED = "combined"  # λ M_disc + (1 - λ) M_recon (Eq. 10)
    LAST = "last"  # only M_1, the mask estimate of the last reverse step
    DISC = "disc"  # only M_disc, the mean mask over the reverse process
    RECON = "recon"  # only M_recon, the reconstruction error


@dataclass(frozen=True)
class TransFusionConfig(MethodConfig):
    """TransFusion hyperparameters; defaults are the paper's (§3, §4.3) and its code's."""

    # Data and schedule of training (§4.3).
    image_size: int = train_field(256, "resize side in pixels (§4.3: 256)")
    crop_size: int | None = train_field(224, "centre-crop side after resizing, None = no crop (§4.3: 224)")
    epochs: int = train_field(1500, "training epochs (§4.3: 1500)")
    batch_size: int = train_field(8, "global batch size (§4.3: 8)")
    learning_rate: float = train_field(1e-5, "AdamW learning rate (§4.3: 1e-5)")
    weight_decay: float = train_field(0.01, "AdamW weight decay (official code: PyTorch's default 0.01)")
    lr_decay_epoch: int = train_field(800, "epoch period of the step LR decay (§4.3: x0.1 after 800 epochs)")
    lr_decay_factor: float = train_field(0.1, "factor of the step LR decay (§4.3: 0.1)")
    # Transparency diffusion (§3.1, §4.6).
    steps: int = train_field(20, "number of diffusion steps T (§4.3: 20; Table 4: 5/10/20/50)")
    schedule: TransparencySchedule = train_field(TransparencySchedule.LINEAR, "transparency schedule β_t: linear | quadratic | root (Table 4)")
    # Network (§3.2; official code: base 64, mults 1,2,2,2, 2 blocks, attention at the two lowest levels).
    base_channels: int = train_field(64, "UNet width of the first level")
    channel_mult: tuple[int, ...] = train_field((1, 2, 4, 8), "UNet width multiplier per level (official: 64/128/256/512)")
    layers_per_block: int = train_field(2, "residual blocks per UNet level")
    attention_resolutions: tuple[int, ...] = train_field((56, 28), "resolutions (pixels) with self-attention: the two lowest levels of a 224 input")
    head_channels: int = train_field(64, "channels per attention head")
    norm_groups: int = train_field(32, "GroupNorm groups in the UNet")
    dropout: float = train_field(0.0, "dropout in the UNet residual blocks")
    # Inputs (§3.2, §3.3, Table 4 "Input strategies").
    positional_encoding: bool = train_field(True, "input the 2-D sinusoidal positional encoding PE (Table 4: w/o PE)")
    positional_encoding_channels: int = train_field(1, "PE channels; 1 = sin(row index), the official code's encoding")
    previous_mask: PreviousMask = train_field(PreviousMask.SIMULATED, "previous-mask input: simulated | exact | none (Table 4: w/o Simulated Mask = none)")
    mask_drop_probability: float = train_field(0.25, "share of training samples whose simulated previous mask is dropped (§3.3: 25%)")
    # Synthetic anomalies and augmentation (§3.3, §4.3).
    anomaly_fraction: float = train_field(0.5, "share of each batch that gets a synthetic anomaly (§4.3: half)")
    texture_probability: float = train_field(0.5, "probability that an anomaly's appearance is a texture rather than shuffled patches")
    rotation_degrees: float = train_field(20.0, "rotation augmentation range ±degrees (official code: 20)")
    rotation_probability: float = train_field(0.3, "probability of the rotation augmentation (official code: 0.3)")
    # Losses (Eqs. 5-9, Table 4 "Loss Function").
    normal_loss: bool = train_field(True, "use L_n = SSIM + L1 on the normal appearance (Eq. 5)")
    mask_loss: bool = train_field(True, "use L_m = α focal + smooth L1 on the mask (Eq. 6)")
    anomaly_loss: bool = train_field(True, "use L_a = L2 on the anomaly appearance (Eq. 7)")
    consistency_loss: bool = train_field(True, "use L_c = L2 on the next step x_{t-1} (Eq. 8)")
    mask_focal_weight: float = train_field(5.0, "α, weight of the focal term in L_m (Eq. 6: 5)")
    anomaly_target: AnomalyTarget = train_field(AnomalyTarget.SCALED, "L_a target: scaled (β_t ε, official code) | appearance (ε)")
    consistency_mask: ConsistencyMask = train_field(
        ConsistencyMask.BINARY, "mask used in L_c's Eq. 4: binary (official code; the paper is silent) | soft (needed without L_m, see ConsistencyMask)"
    )
    # Inference (§3.4, Table 4 "Final mask calc.").
    final_mask: FinalMask = infer_field(FinalMask.COMBINED, "final map: combined (Eq. 10) | last (M_1) | disc (M_disc) | recon (M_recon)")
    disc_weight: float = infer_field(0.95, "λ, weight of M_disc against M_recon in Eq. 10 (0.95)")
    filter_size: int = infer_field(7, "side n of the mean filter f_n in Eq. 10 (7), odd")
    mask_threshold: float = infer_field(0.5, "threshold that binarises the mask fed to the next reverse step")

    def validate(self) -> None:
        super().validate()
        for name in ("steps", "base_channels", "layers_per_block", "head_channels", "norm_groups", "lr_decay_epoch"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult), f"channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        size = self.input_size
        factor = 2 ** (len(self.channel_mult) - 1)
        check(size % factor == 0, f"input size {size} (crop_size or image_size) must be divisible by 2^(len(channel_mult)-1) = {factor}")
        widths = [self.base_channels * m for m in self.channel_mult]
        check(all(w % self.norm_groups == 0 for w in widths), f"norm_groups={self.norm_groups} must divide every UNet width {widths}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 < self.lr_decay_factor <= 1, f"lr_decay_factor must be in (0, 1], got {self.lr_decay_factor}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.positional_encoding_channels >= 1, f"positional_encoding_channels must be >= 1, got {self.positional_encoding_channels}")
        for name in ("mask_drop_probability", "anomaly_fraction", "texture_probability", "rotation_probability", "disc_weight"):
            check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        check(0 <= self.rotation_degrees <= 180, f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")
        check(self.mask_focal_weight >= 0, f"mask_focal_weight must be >= 0, got {self.mask_focal_weight}")
        check(self.filter_size >= 1 and self.filter_size % 2 == 1, f"filter_size must be an odd integer >= 1, got {self.filter_size}")
        check(0 < self.mask_threshold < 1, f"mask_threshold must be in (0, 1), got {self.mask_threshold}")
        check(
            self.normal_loss or self.mask_loss or self.anomaly_loss or self.consistency_loss,
            "at least one of normal_loss, mask_loss, anomaly_loss, consistency_loss must be true",
        )
        check(
            self.mask_loss or (self.consistency_loss and self.consistency_mask is ConsistencyMask.SOFT),
            "mask_loss=false leaves the mask head untrained unless L_c reaches it: set consistency_loss=true and consistency_mask=soft (Table 4 w/o L_m)",
        )

    @property
    def input_channels(self) -> int:
        """x_t (3) + previous mask (1, unless none) + PE channels (if on)."""
        mask = 0 if self.previous_mask is PreviousMask.NONE else 1
        return 3 + mask + (self.positional_encoding_channels if self.positional_encoding else 0)


# --------------------------------------------------------------------------------------
# The transparency-based diffusion process (§3.1)
# --------------------------------------------------------------------------------------


def transparency_schedule(kind: TransparencySchedule | str, steps: int) -> torch.Tensor:
    """β_0..β_T as float64 [T + 1] with β_0 = 0 and β_T = 1, strictly increasing
    (TransFusion §3.1; linear β_t = t/T, quadratic (t/T)², root √(t/T) from §4.6)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    kind = TransparencySchedule(kind)
    s = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind is TransparencySchedule.QUADRATIC:
        return s**2
    if kind is TransparencySchedule.ROOT:
        return s.sqrt()
    return s


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1] broadcastable against ``like``; scalars pass through."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1))) if value.dim() == 1 else value


def compose(normal: torch.Tensor, anomaly: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """x_t = M̄ ⊙ n + β_t (M ⊙ ε) + (1 − β_t)(M ⊙ n) (TransFusion Eq. 2; Eq. 3 at t − 1).

    normal, anomaly: [B, 3, H, W]; mask: [B, 1, H, W]; beta: [B] or a scalar.
    """
    beta = _per_sample(beta, normal)
    return (1 - mask) * normal + beta * (mask * anomaly) + (1 - beta) * (mask * normal)


def reverse_step(
    x_t: torch.Tensor,
    anomaly: torch.Tensor,
    normal: torch.Tensor,
    mask: torch.Tensor,
    beta_t: torch.Tensor | float,
    beta_prev: torch.Tensor | float,
) -> torch.Tensor:
    """x_{t−1} = x_t − (β_t − β_{t−1})(M_t ⊙ ε_t) + (β_t − β_{t−1})(M_t ⊙ n_t) (TransFusion Eq. 4).

    anomaly is the appearance ε_t itself (not β_t ε_t); shapes as in :func:`compose`.
    """
    step = _per_sample(beta_t, x_t) - _per_sample(beta_prev, x_t)
    return x_t - step * (mask * anomaly) + step * (mask * normal)


# --------------------------------------------------------------------------------------
# Losses (§3.2, Eqs. 5-9)
# --------------------------------------------------------------------------------------


def normal_appearance_loss(normal_pred: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L_n = SSIM(n_t, x) + L1(n_t, x) (TransFusion Eq. 5), SSIM as 1 − SSIM on [-1, 1]."""
    return ssim_loss(normal_pred, images, data_range=2.0) + F.l1_loss(normal_pred, images)


def mask_loss(mask_logits: torch.Tensor, mask: torch.Tensor, focal_weight: float = 5.0) -> torch.Tensor:
    """L_m = α L_foc(M_t, M) + L_1Smooth(M_t, M) (TransFusion Eq. 6, α = 5); the focal term
    on logits, the smooth L1 on σ(logits)."""
    focal = focal_loss(mask_logits, mask, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA)
    return focal_weight * focal + smooth_l1_loss(torch.sigmoid(mask_logits), mask)


def anomaly_appearance_loss(anomaly_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_a = L2(ε_t, ε) (TransFusion Eq. 7), mean squared error."""
    return F.mse_loss(anomaly_pred, target)


def consistency_loss(next_pred: torch.Tensor, next_true: torch.Tensor) -> torch.Tensor:
    """L_c = L2(x_{t−1}, x̃_{t−1}) (TransFusion Eq. 8), mean squared error."""
    return F.mse_loss(next_pred, next_true)


# --------------------------------------------------------------------------------------
# Anomaly maps (§3.4, Eqs. 10-11)
# --------------------------------------------------------------------------------------


def mean_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """maps [B, H, W] convolved with the n×n mean filter f_n, zero padding, same size
    (the official code's scipy ``convolve2d(mode="same")``)."""
    if size == 1:
        return maps
    return F.avg_pool2d(maps[:, None], size, stride=1, padding=size // 2, count_include_pad=True)[:, 0]


def reconstruction_error(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """M_recon [B, H, W]: squared error between the input and the final reconstruction x_0,
    both mapped to [0, 1] (reconstruction clipped), averaged over channels (§3.4)."""
    x = images / 2 + 0.5
    x0 = (reconstruction / 2 + 0.5).clamp(0, 1)
    return ((x - x0) ** 2).mean(dim=1)


def final_anomaly_map(m_disc: torch.Tensor, m_recon: torch.Tensor, disc_weight: float, filter_size: int) -> torch.Tensor:
    """M_final = (λ M_disc + (1 − λ) M_recon) * f_n (TransFusion Eq. 10); maps [B, H, W]."""
    return mean_filter(disc_weight * m_disc + (1 - disc_weight) * m_recon, filter_size)


def anomaly_score(final_map: torch.Tensor) -> torch.Tensor:
    """AS = max(M_final) (TransFusion Eq. 11): [B, H, W] -> [B]."""
    return final_map.flatten(1).amax(dim=1)


# --------------------------------------------------------------------------------------
# Inputs: positional encoding and the simulated previous mask (§3.2, §3.3)
# --------------------------------------------------------------------------------------


def sinusoidal_position_encoding(height: int, width: int, channels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """2-D sinusoidal positional encoding [channels, H, W] (Wang & Liu 2021, TransFusion
    ref. [34]): the first d = 2⌈channels/4⌉ slots are sin/cos (interleaved) of the row
    index at frequencies 10000^(−2i/d), the next d the same for the column; the first
    ``channels`` slots are kept. channels = 1 gives sin(row), the official encoding."""
    d = 2 * math.ceil(channels / 4)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)

    def encode(length: int) -> torch.Tensor:  # [length, d], sin and cos interleaved
        angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq
        return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)

    rows = encode(height)[:, None, :].expand(height, width, d)
    cols = encode(width)[None, :, :].expand(height, width, d)
    return torch.cat((rows, cols), dim=-1)[..., :channels].permute(2, 0, 1).contiguous()


def simulate_previous_mask(noise: torch.Tensor, foreground: torch.Tensor, drop_probability: float) -> torch.Tensor:
    """Simulated previous mask estimate (TransFusion §3.3, official thresholds): the Perlin
    map that produced M is re-thresholded, |noise| > τ, with τ per sample from

        dropped (all zero)        w.p. p_drop            (§3.3: 25%)
        τ ~ U(0.5, 1)  shrunk     w.p. (1 − p_drop) / 3
        τ = 0.5        exact M    w.p. (1 − p_drop) / 3
        τ ~ U(0, 0.5)  grown      w.p. (1 − p_drop) / 3

    and restricted to the foreground. noise, foreground: [B, 1, H, W]; uses the global RNG.
    """
    b = noise.shape[0]
    u = torch.rand(b)
    kind = torch.where(u < drop_probability, 0, 1 + ((u - drop_probability) / max(1 - drop_probability, 1e-12) * 3).long().clamp(max=2))
    tau = torch.where(kind == 1, 0.5 + 0.5 * torch.rand(b), torch.where(kind == 2, torch.full((b,), PERLIN_THRESHOLD), 0.5 * torch.rand(b)))
    tau = tau.to(noise.device, noise.dtype).reshape(b, 1, 1, 1)
    keep = (kind != 0).to(noise.device, noise.dtype).reshape(b, 1, 1, 1)
    return (noise.abs() > tau).to(noise.dtype) * foreground * keep


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


class Heads(NamedTuple):
    anomaly: torch.Tensor  # [B, 3, H, W] ε̂ (β_t ε̂ under AnomalyTarget.SCALED)
    normal: torch.Tensor  # [B, 3, H, W] n̂
    mask_logits: torch.Tensor  # [B, 1, H, W] logits of M̂_t


class TransFusionNet(nn.Module):
    """The shared ADM-style UNet trunk with TransFusion's three heads (§3.2, official code):
    ε̂ = GroupNorm → SiLU → conv, n̂ = conv, M̂ = BatchNorm → SiLU → conv (3×3 convs)."""

    def __init__(self, config: TransFusionConfig):
        super().__init__()
        c = config.base_channels
        self.trunk = UNet.from_config(config, in_channels=config.input_channels, out_channels=1)
        # The heads need the trunk's last features, before its single output layer: the
        # shared UNet has one ε-style head, so its post-processing is dropped here.
        self.trunk.net.conv_norm_out = nn.Identity()
        self.trunk.net.conv_act = nn.Identity()
        self.trunk.net.conv_out = nn.Identity()
        self.anomaly_head = nn.Sequential(nn.GroupNorm(math.gcd(8, c), c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))
        self.normal_head = nn.Conv2d(c, 3, 3, padding=1)
        self.mask_head = nn.Sequential(nn.BatchNorm2d(c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Heads:
        features = self.trunk(x, t)  # [B, base_channels, H, W]
        return Heads(self.anomaly_head(features), self.normal_head(features), self.mask_head(features))


class TrainingSample(NamedTuple):
    """One training batch after augmentation, anomaly synthesis and the forward process."""

    images: torch.Tensor  # [B, 3, H, W] x (rotated where augmented), the target n
    anomaly: torch.Tensor  # [B, 3, H, W] ε = M ⊙ A (zero for normal samples)
    mask: torch.Tensor  # [B, 1, H, W] M (zero for normal samples)
    previous_mask: torch.Tensor | None  # [B, 1, H, W] network input M_{t+1}; None without that channel
    t: torch.Tensor  # [B] long in 1..T
    x_t: torch.Tensor  # [B, 3, H, W] Eq. 2


class ReverseProcess(NamedTuple):
    reconstruction: torch.Tensor  # [B, 3, H, W] x_0
    mean_mask: torch.Tensor  # [B, H, W] M_disc, mean of σ(M̂_t) over t = T..1
    last_mask: torch.Tensor  # [B, H, W] M_1, σ(M̂) of the last step


class TransFusion(AnomalyMethod):
    """TransFusion behind the project's method interface (see methods/base.py)."""

    Config = TransFusionConfig
    PRESETS = {
        "paper": {},
        # CPU minutes on 64 px. Smoke-only choices, tuned on the synthetic washer category:
        # a 4-level UNet of width 16 (16/32/64/64, attention at 8 px and in the middle,
        # 1 block per level; ~0.75 GFLOP per step of the reverse process), batch 4 for
        # twice the updates per epoch, learning rate 1e-3 (the paper's 1e-5 needs its
        # 1500 epochs) decayed x0.1 after 20 of 30 epochs, and the mean filter scaled with
        # the image (the paper's 7 px at 224 px is 2 px at 64 px; odd -> 3).
        "smoke": {
            "image_size": 64,
            "crop_size": None,
            "epochs": 30,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "lr_decay_epoch": 20,
            "base_channels": 16,
            "channel_mult": (1, 2, 4, 4),
            "layers_per_block": 1,
            "attention_resolutions": (8,),
            "head_channels": 16,
            "norm_groups": 8,
            "filter_size": 3,
        },
    }
    multi_class = False
    training_synthesis = ("perlin_texture", "perlin_shuffled_patches")  # §3.3 via methods/anomaly_synthesis.py
    paper_seconds_per_image = 0.34  # Table 5: one image on an NVIDIA A100
    paper_speed = "0.34 s/image (A100)"
    paper_parameters = "not stated (official code ~55 M)"  # checked in ../shared/papers/; official-code count from FACTS.md
    # Inference fields along the paper's own ablation axes; declared 2026-12-07, before any measurement on the generality set v2.
    selection_grid = ({}, {"final_mask": "disc"}, {"final_mask": "recon"}, {"disc_weight": 0.5}, {"filter_size": 7})

    @classmethod
    def minimal_sampling(cls, config: MethodConfig) -> dict[str, Any]:
        return {}  # T is a training field: the reverse process always runs its T steps

    def __init__(self, config: TransFusionConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__(config, backbone_factory)
        self.config: TransFusionConfig = config
        self.net = TransFusionNet(config)
        self.register_buffer("betas", transparency_schedule(config.schedule, config.steps).float(), persistent=False)
        log.debug("TransFusion: %.1fM parameters", sum(p.numel() for p in self.parameters()) / 1e6)

    # ---- inputs -------------------------------------------------------------------

    def network_input(self, x_t: torch.Tensor, previous_mask: torch.Tensor | None) -> torch.Tensor:
        """Channel-wise concatenation [x_t, M_{t+1}, PE] (§3.2) -> [B, input_channels, H, W]."""
        parts = [x_t]
        if self.config.previous_mask is not PreviousMask.NONE:
            if previous_mask is None:
                raise ValueError("this TransFusion config has a previous-mask channel: pass previous_mask")
            parts.append(previous_mask)
        if self.config.positional_encoding:
            b, _, h, w = x_t.shape
            pe = sinusoidal_position_encoding(h, w, self.config.positional_encoding_channels, x_t.device)
            parts.append(pe.to(x_t.dtype).expand(b, -1, -1, -1))
        return torch.cat(parts, dim=1)

    def appearance(self, anomaly_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ε_t for Eq. 4 from the anomaly head: undo the β_t scaling of the official target."""
        if self.config.anomaly_target is AnomalyTarget.SCALED:
            return anomaly_pred / _per_sample(self.betas[t], anomaly_pred)
        return anomaly_pred

    # ---- training -----------------------------------------------------------------

    def training_sample(self, batch: TrainBatch) -> TrainingSample:
        """Augment, synthesise anomalies on a share of the batch and apply Eq. 2 (§3.2-3.3).
        Randomness comes from torch's global RNG (the orchestrator seeds it)."""
        cfg = self.config
        images, foreground, textures = batch.images, batch.foreground, batch.textures
        b, _, h, w = images.shape
        device = images.device

        # Rotation augmentation (DRAEM; official: ±20° w.p. 0.3). The clean image and its
        # foreground mask turn together, before synthesis, so anomalies still land on the
        # object; the foreground is re-binarised after bilinear resampling.
        rotated = torch.rand(b) < cfg.rotation_probability
        if cfg.rotation_degrees > 0 and bool(rotated.any()):
            angles = (2 * torch.rand(b) - 1) * cfg.rotation_degrees
            angles = torch.where(rotated, angles, torch.zeros_like(angles)).to(device)
            chosen = rotated.to(device).reshape(b, 1, 1, 1)
            images = torch.where(chosen, rotate(images, angles), images)
            turned = (rotate(foreground, angles) > 0.5).to(foreground.dtype)
            foreground = torch.where(chosen, turned, foreground)

        mask = torch.zeros(b, 1, h, w, device=device, dtype=images.dtype)
        anomaly = torch.zeros_like(images)
        noise = torch.zeros_like(mask)
        k = min(b, max(1, int(b * cfg.anomaly_fraction))) if cfg.anomaly_fraction > 0 else 0
        if k > 0:
            synthetic = synthesize_anomalies(
                images[:k],
                textures[:k],
                foreground[:k],
                generator=None,
                texture_probability=cfg.texture_probability,
                threshold=PERLIN_THRESHOLD,
                two_sided=True,
            )
            mask[:k] = synthetic.masks
            anomaly[:k] = synthetic.masks * synthetic.appearance  # ε = M ⊙ A
            noise[:k] = synthetic.noise

        t = torch.randint(1, cfg.steps + 1, (b,), device=device)
        x_t = compose(images, anomaly, mask, self.betas[t])

        previous_mask: torch.Tensor | None
        if cfg.previous_mask is PreviousMask.NONE:
            previous_mask = None
        else:
            if cfg.previous_mask is PreviousMask.SIMULATED:
                previous_mask = simulate_previous_mask(noise, foreground, cfg.mask_drop_probability)
            else:
                previous_mask = mask.clone()
            previous_mask[k:] = 0  # normal samples: nothing to localise
            # The reverse process starts from an all-zero mask at t = T (§3.4).
            previous_mask = previous_mask * (t != cfg.steps).to(previous_mask.dtype).reshape(b, 1, 1, 1)
        return TrainingSample(images, anomaly, mask, previous_mask, t, x_t)

    def training_losses(self, sample: TrainingSample, heads: Heads) -> Losses:
        """The enabled terms of L = L_n + L_m + L_a + L_c (TransFusion Eq. 9)."""
        cfg = self.config
        beta_t, beta_prev = self.betas[sample.t], self.betas[sample.t - 1]
        terms: dict[str, torch.Tensor] = {}
        if cfg.normal_loss:
            terms["L_n"] = normal_appearance_loss(heads.normal, sample.images)
        if cfg.mask_loss:
            terms["L_m"] = mask_loss(heads.mask_logits, sample.mask, cfg.mask_focal_weight)
        if cfg.anomaly_loss:
            target = sample.anomaly
            if cfg.anomaly_target is AnomalyTarget.SCALED:
                target = _per_sample(beta_t, target) * target
            terms["L_a"] = anomaly_appearance_loss(heads.anomaly, target)
        if cfg.consistency_loss:
            probability = torch.sigmoid(heads.mask_logits)
            if cfg.consistency_mask is ConsistencyMask.BINARY:
                probability = (probability > TRAIN_MASK_THRESHOLD).to(probability.dtype)
            next_pred = reverse_step(sample.x_t, self.appearance(heads.anomaly, sample.t), heads.normal, probability, beta_t, beta_prev)
            next_true = compose(sample.images, sample.anomaly, sample.mask, beta_prev)  # Eq. 3
            terms["L_c"] = consistency_loss(next_pred, next_true)
        total = sum(terms.values())
        # Keep every head in the autograd graph so DDP (without find_unused_parameters)
        # sees a gradient for each parameter even when an ablation leaves a head unused.
        soft_c = cfg.consistency_loss and cfg.consistency_mask is ConsistencyMask.SOFT
        unused = [
            head
            for head, used in (
                (heads.anomaly, cfg.anomaly_loss or cfg.consistency_loss),
                (heads.normal, cfg.normal_loss or cfg.consistency_loss),
                (heads.mask_logits, cfg.mask_loss or soft_c),
            )
            if not used
        ]
        for head in unused:
            total = total + 0.0 * head.sum()
        return Losses(total, {name: value.detach() for name, value in terms.items()})

    def forward(self, batch: TrainBatch) -> Losses:
        sample = self.training_sample(batch)
        heads = self.net(self.network_input(sample.x_t, sample.previous_mask), sample.t)
        return self.training_losses(sample, heads)

    def configure_optimizers(self) -> Optimizers:
        """AdamW, learning rate × lr_decay_factor every lr_decay_epoch epochs (§4.3)."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.config.lr_decay_epoch, gamma=self.config.lr_decay_factor)
        return Optimizers(optimizer, scheduler)

    # ---- inference ----------------------------------------------------------------

    @torch.no_grad()
    def reverse_process(self, images: torch.Tensor) -> ReverseProcess:
        """The reverse process of §3.4: from the test image and an all-zero mask, T steps of
        Eq. 4 with the mask binarised and fed back at every step. Deterministic."""
        cfg = self.config
        b, _, h, w = images.shape
        x = images
        previous = None if cfg.previous_mask is PreviousMask.NONE else images.new_zeros(b, 1, h, w)
        mask_sum = images.new_zeros(b, h, w)
        probability = images.new_zeros(b, 1, h, w)
        for step in range(cfg.steps, 0, -1):
            t = torch.full((b,), step, device=images.device, dtype=torch.long)
            heads = self.net(self.network_input(x, previous), t)
            probability = torch.sigmoid(heads.mask_logits)  # M̂_t [B, 1, H, W]
            mask_sum += probability[:, 0]
            binary = (probability > cfg.mask_threshold).to(images.dtype)
            x = reverse_step(x, self.appearance(heads.anomaly, t), heads.normal, binary, self.betas[step], self.betas[step - 1])
            if previous is not None:
                previous = binary
        return ReverseProcess(x, mask_sum / cfg.steps, probability[:, 0])

    def anomaly_map(self, images: torch.Tensor, result: ReverseProcess) -> torch.Tensor:
        """The final anomaly map [B, H, W] for the configured final-mask mode (Eq. 10)."""
        cfg = self.config
        if cfg.final_mask is FinalMask.LAST:
            return mean_filter(result.last_mask, cfg.filter_size)
        if cfg.final_mask is FinalMask.DISC:
            return mean_filter(result.mean_mask, cfg.filter_size)
        m_recon = reconstruction_error(images, result.reconstruction)
        if cfg.final_mask is FinalMask.RECON:
            return mean_filter(m_recon, cfg.filter_size)
        return final_anomaly_map(result.mean_mask, m_recon, cfg.disc_weight, cfg.filter_size)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        """Anomaly map M_final [B, H, W] and score AS [B] (Eqs. 10-11). The reverse process
        is deterministic, so ``generator`` is not used (and no RNG is touched)."""
        result = self.reverse_process(images)
        final = self.anomaly_map(images, result)
        return Prediction(final, anomaly_score(final))
