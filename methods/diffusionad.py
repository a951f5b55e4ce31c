"""DiffusionAD: norm-guided one-step denoising diffusion for anomaly detection.

Zhang et al., "DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly
Detection" (official code HuiZhang0812/DiffusionAD). A reconstruction
sub-network (an ε-prediction diffusion UNet) turns the input into an anomaly-free
image x̂_0 ("noise-to-norm"), and a segmentation sub-network (DRAEM-style U-Net on the
6-channel concatenation [x_0, x̂_0]) predicts the pixel anomaly map. Both are trained
jointly on normal images and synthetic anomalies.

Notation (code name -> paper symbol):

    images / x0        x_0       input image (normal, or with a synthetic anomaly)
    t_s, t_b           t_s, t_b  small / big noise scale (0-based timesteps)
    tau                τ         split of the timesteps: S = [0, τ), B = [τ, T)
    eps_s, eps_b       ε_{t_s}   the Gaussian noise added by Eq. 1
    eps_hat_s          ε_θ(x_{t_s})
    x0_b / guide       x̂_{0_b} = n   one-step reconstruction from t_b (Eq. 6)
    n_ts               n_{t_s}   n re-noised to t_s with the *predicted* noise ε_θ(x_{t_s})
    w                  w         guidance scale (Eq. 7)
    x0_g               x̂_{0_g}  norm-guided reconstruction (Eq. 8)
    normal             1 - y     1 for normal samples, 0 for synthetic anomalies
    gamma              γ         weight of the focal term of L_mask (Eq. 10)
    beta_range         β         Eq. 12 opacity: the weight of the NORMAL image inside M

Timesteps are 0-based indices into a T-step schedule, as in the official code
(t_s = 200 indexes ᾱ_200). The linear schedule is rescaled by 1000 / T, so a timestep
is really a fraction t / T of the schedule: with a different T, scale t_s, t_b, τ and
t_single by T / 1000 to keep the same noise levels.

Denoising paradigms (Tables VII and VIII), for training and inference separately:

    one_step     Eq. 6 once, from x_{t_single}                     1 network evaluation
    norm_guided  Eqs. 6-8 from x_{t_s}, guided by x̂_{0_b} from t_b  2 evaluations
    iterative    k ancestral steps of Eq. 3 from t_single (k = t_single + 1 visits
                 every timestep: the paper's "Iterative-400"; smaller k respaces the
                 chain evenly, Nichol & Dhariwal 2021)              k evaluations
    ddim         k deterministic DDIM steps (η = 0) from t_single   k evaluations

Whatever the paradigm, x̂_0 is clipped to [-1, 1] (the official code does this) and
the segmentation network sees [x_0, x̂_0]. During training the segmentation loss
back-propagates into the UNet through the network evaluation that produces x̂_0
(for iterative / ddim only through the last one: earlier steps run without gradient,
otherwise memory grows with k). The noise loss (Eq. 9) is always taken at t_s ~ U(S)
and t_b ~ U(B) on the normal samples only, whatever the training paradigm.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, NamedTuple

import torch

from methods.anomaly_synthesis import synthesize_nonempty_anomalies
from methods.base import TRAIN, AnomalyMethod, BackboneFactory, Losses, MethodConfig, Optimizers, Prediction, TrainBatch, check, infer_field, train_field
from methods.gaussian_diffusion import BetaSchedule, GaussianDiffusion, extract
from methods.losses import focal_loss, smooth_l1_loss
from methods.scoring import scaled_top_k, top_k_mean
from methods.segmentation import SegmentationUNet
from methods.unet import UNet

log = logging.getLogger(__name__)

# Resampling rounds for synthetic masks that came out empty (Perlin peaks outside the
# foreground); the official code retries up to 50 times per sample.
_MASK_RETRIES = 5


class SegmentationSchedule(str, Enum):
    """Learning-rate schedule of the segmentation network's optimiser. The paper (§V-A)
    names none; the official train.py wraps the segmentation Adam in
    CosineAnnealingLR(T_max=10, eta_min=0) stepped after every batch (the UNet's LR stays
    constant), so its LR follows a cosine wave with a period of 2 T_max = 20 steps."""

    COSINE = "cosine"  # lr_seg · (1 + cos(π s / T_max)) / 2 at optimiser step s (official code)
    CONSTANT = "constant"  # lr_seg throughout


class Paradigm(str, Enum):
    """How x̂_0 is obtained from x_0 (DiffusionAD Tables VII and VIII)."""

    ONE_STEP = "one_step"
    NORM_GUIDED = "norm_guided"
    ITERATIVE = "iterative"
    DDIM = "ddim"


@dataclass(frozen=True)
class DiffusionADConfig(MethodConfig):
    """DiffusionAD hyperparameters; defaults are the paper's (§V-A) and official code's."""

    # Data and schedule of training (crop_size: the base's None, no crop).
    image_size: int = train_field(256, "input resolution (images resized to image_size², §V-A)")
    epochs: int = train_field(3000, "training epochs (§V-A)")
    batch_size: int = train_field(16, "global batch: normal + synthetic samples (§V-A: 8 + 8)")
    learning_rate: float = train_field(1e-4, "Adam learning rate of the reconstruction UNet (§V-A)")
    segmentation_learning_rate: float = train_field(1e-5, "Adam learning rate of the segmentation network (official code)")
    segmentation_schedule: SegmentationSchedule = train_field(
        SegmentationSchedule.COSINE, "segmentation LR schedule: cosine (official code; the paper names none) | constant"
    )
    segmentation_cosine_steps: int = train_field(10, "T_max of the cosine schedule, in optimiser steps (official code: 10, stepped every batch)")

    # Diffusion process.
    num_timesteps: int = train_field(1000, "T, diffusion steps (§V-A)")
    beta_schedule: BetaSchedule = train_field(BetaSchedule.LINEAR, "noise schedule: linear (paper) | cosine")

    # Reconstruction sub-network (guided-diffusion UNet, §V-A).
    base_channels: int = train_field(128, "UNet base width (§V-A: 128)")
    channel_mult: tuple[int, ...] = train_field((1, 1, 2, 2, 4, 4), "UNet width multiplier per level (official code)")
    layers_per_block: int = train_field(2, "UNet residual blocks per level")
    attention_resolutions: tuple[int, ...] = train_field((32, 16, 8), "UNet self-attention at these feature sizes in pixels (§V-A)")
    num_heads: int | None = train_field(4, "attention heads per layer at every width (§V-A: 4; official num_heads=4, num_head_channels=-1); None = head_channels wide heads")
    head_channels: int = train_field(64, "width of each attention head, used only when num_heads is None")
    norm_groups: int = train_field(32, "GroupNorm groups in the UNet")
    dropout: float = train_field(0.0, "UNet dropout (official code: 0)")

    # Segmentation sub-network (DRAEM discriminative U-Net, §IV-A).
    seg_base_channels: int = train_field(64, "segmentation U-Net base width (official code: 64)")
    seg_channel_mult: tuple[int, ...] = train_field((1, 2, 4, 8, 8, 8), "segmentation U-Net width multiplier per level (DRAEM)")

    # Training recipe (§IV-B, §IV-C, §IV-D).
    tau: int = train_field(300, "τ: training draws t_s ~ U[0, τ) and t_b ~ U[τ, T) (§IV-B, §V-A)")
    train_paradigm: Paradigm = train_field(Paradigm.NORM_GUIDED, "paradigm producing the segmentation input in training (Table VIII)")
    train_paradigm_steps: int = train_field(30, "k for a training paradigm iterative / ddim (Table VIII: 400 / 30)")
    train_t_single: int = train_field(
        400,
        "noise scale the single-scale training paradigms start from; Table VIII gives only step counts (One-step 1, DDIM 30, Iterative 400): "
        "400 is our choice, the start of Iterative-400 (Table VII, Fig. 8) and the largest t at which one-step matches iterative (§IV-A, Fig. 4)",
    )
    train_w: float = train_field(1.0, "guidance scale w of norm-guided training (official code: 1)")
    gamma: float = train_field(5.0, "γ, weight of the focal term in L_mask (Eq. 10, §V-A: 5)")
    focal_alpha: float = train_field(0.5, "focal loss α (official code: 0.5)")
    focal_gamma: float = train_field(4.0, "focal loss focusing exponent (official code: 4)")
    anomaly_fraction: float = train_field(0.5, "share of each batch turned into synthetic anomalies (§V-A: 8 of 16)")
    beta_range: tuple[float, float] = train_field(
        (0.2, 0.8), "Eq. 12 opacity β ~ U[lo, hi): the weight of the normal image inside the anomaly mask"
    )
    texture_probability: float = train_field(0.5, "probability that the anomaly appearance is a texture image rather than self-augmentation (§IV-D)")

    # Inference (§IV-C): none of these needs retraining.
    paradigm: Paradigm = infer_field(Paradigm.NORM_GUIDED, "inference denoising paradigm (Table VII)")
    t_s: int = infer_field(200, "small noise scale t_s of norm-guided inference (§IV-C: 200)")
    t_b: int = infer_field(400, "big noise scale t_b of norm-guided inference (§IV-C: 400)")
    w: float = infer_field(1.0, "guidance scale w of norm-guided inference (Eq. 7, Fig. 10: 1)")
    t_single: int = infer_field(
        400, "noise scale of the single-scale paradigms one_step / iterative / ddim (Iterative-400 of Tables VII-VIII starts at t = 400, Fig. 8; one-step and DDIM rows give no t, so they share it)"
    )
    paradigm_steps: int = infer_field(30, "k for inference paradigm iterative / ddim (Table VII: Iterative-400 = k 401 from 400, DDIM-30)")
    top_k: int = infer_field(50, "image score = mean of the top-k pixels of the anomaly map (§V-A: 50 at 256²)")
    top_k_reference_size: int | None = infer_field(
        256, "top_k counts pixels of a reference_size² map; other sizes scale k by the pixel ratio (None = use top_k as is)"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("num_timesteps", "base_channels", "layers_per_block", "head_channels", "norm_groups", "seg_base_channels", "top_k"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.segmentation_learning_rate > 0, f"segmentation_learning_rate must be > 0, got {self.segmentation_learning_rate}")
        check(self.segmentation_cosine_steps >= 1, f"segmentation_cosine_steps must be >= 1, got {self.segmentation_cosine_steps}")
        size = self.input_size
        for name, mult in (("channel_mult", self.channel_mult), ("seg_channel_mult", self.seg_channel_mult)):
            check(len(mult) >= 2 and all(m >= 1 for m in mult), f"{name} needs >= 2 positive multipliers, got {mult}")
            factor = 2 ** (len(mult) - 1)
            check(size % factor == 0, f"input size {size} (crop_size or image_size) must be divisible by {factor}, the downsampling of {name}={mult}")
        widths = [self.base_channels * m for m in self.channel_mult]
        check(all(c % self.norm_groups == 0 for c in widths), f"norm_groups={self.norm_groups} must divide every UNet width {widths}")
        check(
            self.num_heads is None or (self.num_heads >= 1 and all(c % self.num_heads == 0 for c in widths)),
            f"num_heads must be None or >= 1 and divide every UNet width {widths}, got {self.num_heads}",
        )
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        T = self.num_timesteps
        check(0 < self.tau < T, f"tau must be in (0, num_timesteps={T}), got {self.tau}")
        check(0 <= self.t_s < self.t_b < T, f"need 0 <= t_s < t_b < num_timesteps={T}, got t_s={self.t_s}, t_b={self.t_b}")
        for name in ("t_single", "train_t_single"):
            check(0 <= getattr(self, name) < T, f"{name} must be in [0, num_timesteps={T}), got {getattr(self, name)}")
        for paradigm, steps, start, prefix in (
            (self.paradigm, self.paradigm_steps, self.t_single, ""),
            (self.train_paradigm, self.train_paradigm_steps, self.train_t_single, "train_"),
        ):
            check(
                paradigm not in (Paradigm.ITERATIVE, Paradigm.DDIM) or 1 <= steps <= start + 1,
                f"{prefix}paradigm_steps must be in [1, {prefix}t_single + 1 = {start + 1}] for {paradigm.value}, got {steps}",
            )
        for name in ("w", "train_w"):
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")
        check(
            self.gamma >= 0 and self.focal_gamma >= 0 and 0 <= self.focal_alpha <= 1,
            f"need gamma >= 0, focal_gamma >= 0 and 0 <= focal_alpha <= 1, got {self.gamma}, {self.focal_gamma}, {self.focal_alpha}",
        )
        check(0.0 <= self.anomaly_fraction <= 1.0, f"anomaly_fraction must be in [0, 1], got {self.anomaly_fraction}")
        check(
            len(self.beta_range) == 2 and 0.0 <= self.beta_range[0] <= self.beta_range[1] <= 1.0,
            f"beta_range must be (lo, hi) with 0 <= lo <= hi <= 1, got {self.beta_range}",
        )
        check(0.0 <= self.texture_probability <= 1.0, f"texture_probability must be in [0, 1], got {self.texture_probability}")
        check(
            self.top_k_reference_size is None or self.top_k_reference_size >= 1,
            f"top_k_reference_size must be >= 1 or None, got {self.top_k_reference_size}",
        )


# --------------------------------------------------------------------------------------
# The paper's equations as tensor functions.


def one_step_x0(diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """One-step denoising x̂_0 = (x_t - √(1-ᾱ_t) ε_θ(x_t)) / √ᾱ_t, clipped to [-1, 1]
    (DiffusionAD Eq. 6). Shapes [B, C, H, W], t [B]."""
    return diffusion.predict_x0_from_eps(x_t, t, eps_hat).clamp(-1, 1)


def norm_guided_noise(
    diffusion: GaussianDiffusion,
    x_ts: torch.Tensor,
    t_s: torch.Tensor,
    eps_hat_s: torch.Tensor,
    guide: torch.Tensor,
    w: float,
) -> torch.Tensor:
    """Norm-guided noise ε_θ(x_{t_s}, n_{t_s}) = ε_θ(x_{t_s}) - √(1-ᾱ_{t_s}) w (n_{t_s} - x_{t_s})
    (DiffusionAD Eq. 7), where n = x̂_{0_b} (``guide``) is re-noised to t_s with the
    *predicted* noise: n_{t_s} = √ᾱ_{t_s} n + √(1-ᾱ_{t_s}) ε_θ(x_{t_s}) (Eq. 1)."""
    n_ts = diffusion.q_sample(guide, t_s, eps_hat_s)
    return eps_hat_s - extract(diffusion.sqrt_one_minus_alphas_cumprod, t_s, x_ts.shape) * w * (n_ts - x_ts)


def norm_guided_x0(
    diffusion: GaussianDiffusion,
    x_ts: torch.Tensor,
    t_s: torch.Tensor,
    eps_hat_s: torch.Tensor,
    x_tb: torch.Tensor,
    t_b: torch.Tensor,
    eps_hat_b: torch.Tensor,
    w: float,
) -> torch.Tensor:
    """Norm-guided one-step reconstruction x̂_{0_g} (DiffusionAD Eq. 8): Eq. 6 at t_s with
    the noise of Eq. 7, guided by n = x̂_{0_b}, the Eq. 6 reconstruction from t_b.

    Algebraically x̂_{0_g} = x̂_{0_s} + w (1-ᾱ_{t_s}) (x̂_{0_b} - x̂_{0_s}) before clipping:
    the guidance pulls the small-scale reconstruction towards the big-scale one."""
    guide = one_step_x0(diffusion, x_tb, t_b, eps_hat_b)
    eps_guided = norm_guided_noise(diffusion, x_ts, t_s, eps_hat_s, guide, w)
    return one_step_x0(diffusion, x_ts, t_s, eps_guided)


def noise_loss(
    eps_s: torch.Tensor,
    eps_hat_s: torch.Tensor,
    eps_b: torch.Tensor,
    eps_hat_b: torch.Tensor,
    normal: torch.Tensor,
) -> torch.Tensor:
    """L_noise = (1-y) (‖ε_{t_s} - ε_θ(x_{t_s})‖² + ‖ε_{t_b} - ε_θ(x_{t_b})‖²) / 2
    (DiffusionAD Eq. 9), squared norms as per-pixel means, averaged over the normal
    samples (``normal`` [B] = 1 - y). Zero, with a graph, when the batch has none."""
    per_sample = ((eps_hat_s - eps_s) ** 2).flatten(1).mean(1) + ((eps_hat_b - eps_b) ** 2).flatten(1).mean(1)
    return (per_sample * normal).sum() / (2 * normal.sum().clamp(min=1))


class MaskLoss(NamedTuple):
    total: torch.Tensor
    smooth_l1: torch.Tensor
    focal: torch.Tensor


def mask_loss(logits: torch.Tensor, masks: torch.Tensor, gamma: float, focal_alpha: float, focal_gamma: float) -> MaskLoss:
    """L_mask = SmoothL1(M, M̂) + γ L_focal(M, M̂) (DiffusionAD Eq. 10); M̂ = σ(logits).
    logits, masks [B, 1, H, W]."""
    smooth = smooth_l1_loss(torch.sigmoid(logits), masks)
    focal = focal_loss(logits, masks, alpha=focal_alpha, gamma=focal_gamma)
    return MaskLoss(smooth + gamma * focal, smooth, focal)


def opacity_from_beta(beta_range: tuple[float, float]) -> tuple[float, float]:
    """Eq. 12 writes S = β (M⊙N) + (1-β)(M⊙A) + M̄⊙N: β weights the NORMAL image inside
    M. ``synthesize_anomalies`` blends with the APPEARANCE's opacity o = 1 - β, so
    β ~ U[lo, hi) maps to o ~ U(1 - hi, 1 - lo]."""
    lo, hi = beta_range
    return (1.0 - hi, 1.0 - lo)


class SyntheticBatch(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W] x_0: the first B - n_synthetic untouched, the rest with anomalies
    masks: torch.Tensor  # [B, 1, H, W] ground truth M (zeros for normal samples)
    normal: torch.Tensor  # [B] float: 1 - y


def synthesize_batch(batch: TrainBatch, anomaly_fraction: float, beta_range: tuple[float, float], texture_probability: float) -> SyntheticBatch:
    """DiffusionAD §IV-D / Eq. 12: turn the last round(B · anomaly_fraction) images of the
    batch into synthetic anomalies (Perlin mask × foreground, texture or self-augmented
    appearance, opacity β). Uses torch's global RNG (training randomness). A sample
    whose mask stays empty after resampling is unchanged and counts as normal (y = 0)."""
    images = batch.images
    b = images.shape[0]
    first = b - int(round(b * anomaly_fraction))
    synthetic = synthesize_nonempty_anomalies(
        images[first:],
        batch.textures[first:],
        batch.foreground[first:],
        None,
        max_rounds=_MASK_RETRIES,
        opacity=opacity_from_beta(beta_range),
        texture_probability=texture_probability,
    )
    out = torch.cat((images[:first], synthetic.images))
    masks = torch.cat((torch.zeros_like(images[:first, :1]), synthetic.masks))
    normal = (masks.flatten(1).amax(1) == 0).float()
    return SyntheticBatch(out, masks, normal)


def network_evaluations(paradigm: Paradigm | str, steps: int) -> int:
    """UNet evaluations per image of a paradigm (the cost Table VII's FPS reflects)."""
    paradigm = Paradigm(paradigm)
    return {Paradigm.ONE_STEP: 1, Paradigm.NORM_GUIDED: 2}.get(paradigm, steps)


# --------------------------------------------------------------------------------------
# The model.

NoiseFn = Callable[[torch.Size], torch.Tensor]


class DiffusionAD(AnomalyMethod):
    """Reconstruction UNet (ε-prediction) + segmentation U-Net on [x_0, x̂_0]."""

    Config: ClassVar[type[MethodConfig]] = DiffusionADConfig
    training_synthesis: ClassVar[tuple[str, ...]] = ("perlin_texture", "perlin_shuffled_patches")  # §IV-D via methods/anomaly_synthesis.py
    paper_seconds_per_image = 1 / 23.5  # Table V: 23.5 FPS, one-step norm-guided paradigm
    paper_speed = "23.5 FPS = 0.043 s/image"
    paper_parameters = "not stated (official code: UNet ~132 M + segmentation net)"  # checked in ../shared/papers/; FACTS.md
    # Inference fields along the paper's own ablation axes; declared 2026-12-07, before any measurement on the generality set v2.
    selection_grid = ({}, {"paradigm": "one_step"}, {"top_k": 10}, {"top_k": 200}, {"t_s": 100, "t_b": 200})
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        # CPU minutes: 64 px, a ~0.37 M-parameter UNet and a ~0.23 M segmentation net.
        # T, t_s, t_b, τ and t_single keep the paper's values (same noise levels).
        # Learning rates are raised because a few hundred steps replace 3000 epochs;
        # batch 8 (4 normal + 4 synthetic) gives 400 steps over 80 images: on the
        # synthetic brick category it reached test image AUROC 0.93 where batch 16
        # (200 steps, same compute) reached 0.87 (tests/test_diffusionad_learning.py).
        # top_k = 50 at 256² becomes 3 pixels at 64².
        "smoke": {
            "image_size": 64,
            "epochs": 40,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "segmentation_learning_rate": 1e-3,
            "base_channels": 16,
            "channel_mult": (1, 2, 2, 2),
            "layers_per_block": 1,
            "attention_resolutions": (),
            "head_channels": 32,
            "num_heads": None,  # 32-wide heads: one head at the 32-channel middle block
            "segmentation_schedule": SegmentationSchedule.CONSTANT,  # the raised 1e-3 LR was tuned without the cosine
            "norm_groups": 8,
            "seg_base_channels": 16,
            "seg_channel_mult": (1, 2, 4, 4),
        },
    }

    @classmethod
    def minimal_sampling(cls, config: MethodConfig) -> dict[str, Any]:
        return {"paradigm": "one_step"}  # one UNet evaluation instead of norm-guided's 2 (Table VII's cheapest paradigm)

    def __init__(self, config: DiffusionADConfig, backbone_factory: BackboneFactory | None = None):
        super().__init__(config, backbone_factory)
        c = config
        self.diffusion = GaussianDiffusion(c.num_timesteps, c.beta_schedule)
        self.unet = UNet.from_config(c, in_channels=3, out_channels=3)
        self.segmentation = SegmentationUNet(in_channels=6, out_channels=1, base_channels=c.seg_base_channels, channel_mult=c.seg_channel_mult)

    # ---- configuration ---------------------------------------------------------------

    def reconfigure_inference(self, **changes: Any) -> None:
        """Change inference fields (paradigm, t_s, t_b, w, ...) of this trained model;
        naming a training field is an error because the weights would not match it."""
        training = [f.name for f in dataclasses.fields(self.config) if f.metadata.get(TRAIN, True)]
        bad = sorted(set(changes) & set(training))
        if bad:
            raise ValueError(f"{', '.join(bad)} affect training; only inference fields can change on a trained model")
        self.config = dataclasses.replace(self.config, **changes)

    # ---- reconstruction ----------------------------------------------------------------

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t)

    def _timesteps(self, value: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.to(device=device, dtype=torch.long)
        return torch.full((batch,), int(value), dtype=torch.long, device=device)

    def reconstruct_norm_guided(
        self, x0: torch.Tensor, t_s: torch.Tensor, t_b: torch.Tensor, w: float, noise: NoiseFn
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm-guided one-step reconstruction (Eqs. 1, 6-8) with one batched UNet call on
        [x_{t_s}; x_{t_b}]. Returns (x̂_{0_g}, ε_s, ε̂_s, ε_b, ε̂_b) so training can reuse
        the predictions for L_noise (Eq. 9)."""
        eps_s, eps_b = noise(x0.shape), noise(x0.shape)
        x_ts = self.diffusion.q_sample(x0, t_s, eps_s)
        x_tb = self.diffusion.q_sample(x0, t_b, eps_b)
        eps_hat_s, eps_hat_b = self._eps(torch.cat((x_ts, x_tb)), torch.cat((t_s, t_b))).chunk(2)
        x0_g = norm_guided_x0(self.diffusion, x_ts, t_s, eps_hat_s, x_tb, t_b, eps_hat_b, w)
        return x0_g, eps_s, eps_hat_s, eps_b, eps_hat_b

    def reconstruct_single_scale(
        self, x0: torch.Tensor, paradigm: Paradigm, t_start: int, steps: int, noise: NoiseFn
    ) -> torch.Tensor:
        """x̂_0 from x_{t_start} by one_step (Eq. 6), iterative (Eq. 3, ancestral) or ddim
        (η = 0). Intermediate x̂_0 are clipped and ε re-derived from them (guided-diffusion's
        clip_denoised), as the official iterative sampler does. Only the last network
        evaluation keeps its gradient."""
        diffusion = self.diffusion
        b = x0.shape[0]
        t = self._timesteps(t_start, b, x0.device)
        x_t = diffusion.q_sample(x0, t, noise(x0.shape))
        if paradigm is Paradigm.ONE_STEP:
            return one_step_x0(diffusion, x_t, t, self._eps(x_t, t))
        if paradigm not in (Paradigm.ITERATIVE, Paradigm.DDIM):
            raise ValueError(f"single-scale paradigm must be one_step, iterative or ddim, got {paradigm.value}")
        schedule = diffusion.ddim_timesteps(t_start, steps)
        for i, step in enumerate(schedule):
            t = self._timesteps(step, b, x0.device)
            last = i == len(schedule) - 1
            with torch.set_grad_enabled(torch.is_grad_enabled() and last):
                eps_hat = self._eps(x_t, t)
            x0_hat = one_step_x0(diffusion, x_t, t, eps_hat)
            if last:
                return x0_hat
            eps_hat = diffusion.predict_eps_from_x0(x_t, t, x0_hat)
            t_prev = self._timesteps(schedule[i + 1], b, x0.device)
            if paradigm is Paradigm.DDIM:
                x_t = diffusion.ddim_step(x_t, t, t_prev, eps_hat, eta=0.0)
            elif schedule[i + 1] == step - 1:
                x_t = diffusion.ddpm_step(x_t, t, eps_hat, noise(x0.shape))  # Eq. 3 exactly
            else:
                # Respaced ancestral step: DDIM with η = 1 is the DDPM posterior step of
                # the respaced chain (and equals Eq. 3 when t_prev = t - 1).
                x_t = diffusion.ddim_step(x_t, t, t_prev, eps_hat, eta=1.0, noise=noise(x0.shape))
        raise AssertionError("unreachable: ddim_timesteps is never empty")

    def reconstruct(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x̂_0 [B, 3, H, W] by the configured inference paradigm (no grad); every noise
        draw comes from ``generator``."""
        c = self.config
        noise = _generator_noise(generator, x0.device)
        with torch.no_grad():
            if c.paradigm is Paradigm.NORM_GUIDED:
                b = x0.shape[0]
                t_s, t_b = self._timesteps(c.t_s, b, x0.device), self._timesteps(c.t_b, b, x0.device)
                return self.reconstruct_norm_guided(x0, t_s, t_b, c.w, noise)[0]
            return self.reconstruct_single_scale(x0, c.paradigm, c.t_single, c.paradigm_steps, noise)

    # ---- the AnomalyMethod interface ---------------------------------------------------

    def forward(self, batch: TrainBatch) -> Losses:
        """One joint training step (DiffusionAD §IV-C): L_total = L_noise + L_mask (Eq. 11)."""
        c = self.config
        synthetic = synthesize_batch(batch, c.anomaly_fraction, c.beta_range, c.texture_probability)
        x0 = synthetic.images
        b, device = x0.shape[0], x0.device
        t_s = torch.randint(0, c.tau, (b,), device=device)
        t_b = torch.randint(c.tau, c.num_timesteps, (b,), device=device)

        def noise(shape: torch.Size) -> torch.Tensor:
            return torch.randn(shape, device=device)

        x0_g, eps_s, eps_hat_s, eps_b, eps_hat_b = self.reconstruct_norm_guided(x0, t_s, t_b, c.train_w, noise)
        l_noise = noise_loss(eps_s, eps_hat_s, eps_b, eps_hat_b, synthetic.normal)
        if c.train_paradigm is Paradigm.NORM_GUIDED:
            x0_hat = x0_g
        else:
            x0_hat = self.reconstruct_single_scale(x0, c.train_paradigm, c.train_t_single, c.train_paradigm_steps, noise)
        logits = self.segmentation(torch.cat((x0, x0_hat), dim=1))
        l_mask = mask_loss(logits, synthetic.masks, c.gamma, c.focal_alpha, c.focal_gamma)
        total = l_noise + l_mask.total
        terms = {
            "L_noise": l_noise.detach(),
            "L_mask": l_mask.total.detach(),
            "L_smooth_l1": l_mask.smooth_l1.detach(),
            "L_focal": l_mask.focal.detach(),
        }
        return Losses(total, terms)

    def infer(self, images: torch.Tensor, category: torch.Tensor | None, generator: torch.Generator) -> Prediction:
        """Anomaly map σ(seg([x_0, x̂_0])) [B, H, W] and the top-k image score [B] (§IV-C)."""
        x0_hat = self.reconstruct(images, generator)
        anomaly_map = torch.sigmoid(self.segmentation(torch.cat((images, x0_hat), dim=1)))[:, 0]
        k = scaled_top_k(self.config.top_k, self.config.top_k_reference_size, *anomaly_map.shape[-2:])
        return Prediction(anomaly_map, top_k_mean(anomaly_map, k))

    def configure_optimizers(self) -> Optimizers:
        """Adam, 1e-4 for the UNet (§V-A) and 1e-5 for the segmentation net (official code);
        the UNet's LR is constant, the segmentation LR follows ``segmentation_schedule``
        (official: a cosine over T_max optimiser steps, stepped every batch)."""
        optimizer = torch.optim.Adam(
            [
                {"params": self.unet.parameters(), "lr": self.config.learning_rate},
                {"params": self.segmentation.parameters(), "lr": self.config.segmentation_learning_rate},
            ]
        )
        if self.config.segmentation_schedule is SegmentationSchedule.CONSTANT:
            return Optimizers(optimizer, None)
        period = self.config.segmentation_cosine_steps
        # CosineAnnealingLR's closed form with η_min = 0, applied to the segmentation group only.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, lambda s: (1 + math.cos(math.pi * s / period)) / 2])
        return Optimizers(optimizer, scheduler, scheduler_per_batch=True)


def _generator_noise(generator: torch.Generator, device: torch.device) -> NoiseFn:
    """Standard normal draws from ``generator``, never from torch's global RNG, moved to
    ``device``."""

    def noise(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)

    return noise
