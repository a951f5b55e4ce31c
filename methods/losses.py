"""Losses shared by the discriminative methods (TransFusion Eqs. 5-6, DiffusionAD Eq. 10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim


def ssim_loss(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """1 - SSIM with the standard 11x11 Gaussian window, σ = 1.5 (Wang et al. 2004).

    Inputs [B, C, H, W]; ``data_range`` is the span of the values (2 for [-1, 1]).
    Images smaller than the window use the largest odd window that fits.
    """
    win = min(11, min(prediction.shape[-2:]) // 2 * 2 - 1)
    return 1 - ssim(prediction, target, data_range=data_range, size_average=True, win_size=win, win_sigma=1.5)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on logits (Lin et al. 2017), mean over pixels:
    FL = -α_t (1 - p_t)^γ log p_t with p_t the probability of the true class."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


def smooth_l1_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (Huber with δ = 1), mean over elements."""
    return F.smooth_l1_loss(prediction, target)
