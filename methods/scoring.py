"""Anomaly-map post-processing and image scores shared by several methods.

MDPS (§4.3) and PatchCore (§3.3, σ = 4) smooth their maps with a Gaussian blur.

DiffusionAD (§IV-C, top 50 pixels at 256²) and MDPS (§4.3, top S = 500 pixels at 224²)
both score an image by the mean of its k largest pixel scores, with k given for one map
size; at other sizes k is scaled by the pixel count so it covers the same image area.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_top_k(top_k: int, reference_size: int | None, height: int, width: int) -> int:
    """k for a height x width map: ``top_k`` pixels at reference_size² scaled by the pixel
    ratio (50 at 256² -> 3 at 64²; 500 at 224² -> 41 at 64²), at least 1 and at most every
    pixel. ``reference_size=None`` uses ``top_k`` as is (still capped)."""
    k = top_k if reference_size is None else round(top_k * height * width / reference_size**2)
    return int(min(max(k, 1), height * width))


def top_k_mean(score_map: torch.Tensor, k: int) -> torch.Tensor:
    """Image score = mean of the k largest pixel scores. [B, H, W] -> [B]."""
    return score_map.flatten(1).topk(k, dim=1).values.mean(1)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps, truncated at 4σ (radius ⌊4σ + ½⌋ as in
    scipy/scikit-image), mirror padding (replicate where the map is smaller than the radius)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(maps[:, None], (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]
