"""Synthetic anomalies for discriminative training (DRAEM / MemSeg style).

Used by TransFusion (§3.3, anomalies from MemSeg [38]), DiffusionAD (§IV-D, Eq. 12) and
the orchestrator's validation split; :func:`synthesize_nonempty_anomalies` is the one
loop that redraws the samples whose mask came out empty. An anomaly is a Perlin-noise mask M (random scale
2^U{0..5} per axis, random rotation, thresholded), restricted to the foreground, filled
with an appearance A taken either from a texture source image or from the image itself
with its 8x8 grid of patches shuffled, blended with opacity β:

    I = (1 - β M) ⊙ x + β M ⊙ A

All functions are batched tensor functions driven by an explicit ``torch.Generator``
(``None`` uses torch's global generator, as training steps do).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class SyntheticAnomalies(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W] in [-1, 1], anomalies blended in
    masks: torch.Tensor  # [B, 1, H, W] float {0, 1}
    appearance: torch.Tensor  # [B, 3, H, W] anomaly appearance A
    noise: torch.Tensor  # [B, 1, H, W] Perlin map the mask was thresholded from (rotated)


class NonEmptyAnomalies(NamedTuple):
    images: torch.Tensor  # [B, 3, H, W]; the input image where no draw succeeded
    masks: torch.Tensor  # [B, 1, H, W] float {0, 1}; zero where no draw succeeded
    found: torch.Tensor  # [B] bool: the sample got a mask of at least min_pixels pixels


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def perlin_noise(height: int, width: int, res_y: int, res_x: int, generator: torch.Generator) -> torch.Tensor:
    """2-D gradient (Perlin) noise [H, W] with res_y x res_x lattice cells, values ~[-0.7, 0.7].

    Computed on a canvas padded up to a multiple of the lattice, then cropped, so any
    image size works.
    """
    cell_y, cell_x = math.ceil(height / res_y), math.ceil(width / res_x)
    canvas_h, canvas_w = cell_y * res_y, cell_x * res_x
    angles = 2 * math.pi * torch.rand((res_y + 1, res_x + 1), generator=generator)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)  # [ry+1, rx+1, 2]

    # Position of every pixel inside its cell, in [0, 1).
    fy = (torch.arange(canvas_h) % cell_y).float() / cell_y
    fx = (torch.arange(canvas_w) % cell_x).float() / cell_x
    iy = torch.arange(canvas_h) // cell_y
    ix = torch.arange(canvas_w) // cell_x
    fy, fx = torch.meshgrid(fy, fx, indexing="ij")
    iy, ix = torch.meshgrid(iy, ix, indexing="ij")

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[iy + dy, ix + dx]  # [H, W, 2]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    uy, ux = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), ux)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), ux)
    noise = math.sqrt(2) * torch.lerp(top, bottom, uy)
    return noise[:height, :width]


def rotate(images: torch.Tensor, degrees: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """Rotate each image [B, C, H, W] about its centre by degrees[b] (bilinear)."""
    radians = degrees.to(images.dtype) * math.pi / 180
    cos, sin = torch.cos(radians), torch.sin(radians)
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), -1), torch.stack((sin, cos, zero), -1)), 1)  # [B, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def perlin_masks(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    threshold: float = 0.5,
    max_scale_exponent: int = 5,
    two_sided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perlin anomaly masks: lattice 2^U{0..max} per axis, rotated by U(-90°, 90°), thresholded.

    Returns (masks [B, 1, H, W] float {0, 1}, noise [B, 1, H, W]). ``two_sided``
    thresholds |noise| instead of noise (the TransFusion code does this).
    """
    noises = []
    for _ in range(batch):
        res_y, res_x = (2 ** int(e) for e in torch.randint(0, max_scale_exponent + 1, (2,), generator=generator))
        noises.append(perlin_noise(height, width, res_y, res_x, generator))
    noise = torch.stack(noises)[:, None]
    noise = rotate(noise, _uniform(generator, (batch,), -90.0, 90.0))
    value = noise.abs() if two_sided else noise
    return (value > threshold).float(), noise


def shuffled_patches(images: torch.Tensor, generator: torch.Generator, grid: int = 8) -> torch.Tensor:
    """The image itself with its grid x grid patches randomly permuted (MemSeg's
    self-augmentation source). H and W need not divide evenly: the remainder is left as is."""
    out = images.clone()
    b, c, h, w = images.shape
    ph, pw = h // grid, w // grid
    core = images[:, :, : ph * grid, : pw * grid]
    patches = core.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(b)])
    patches = patches[torch.arange(b)[:, None], order]
    core = patches.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * grid, pw * grid)
    out[:, :, : ph * grid, : pw * grid] = core
    return out


def jitter_appearance(source: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and channel order, as DRAEM's augmenters vary the
    texture source so that anomalies do not share one colour statistic."""
    b = source.shape[0]
    contrast = _uniform(generator, (b, 1, 1, 1), 0.5, 1.5)
    brightness = _uniform(generator, (b, 1, 1, 1), -0.3, 0.3)
    mean = source.mean(dim=(1, 2, 3), keepdim=True)
    out = (source - mean) * contrast + mean + brightness
    order = torch.stack([torch.randperm(3, generator=generator) for _ in range(b)])
    out = out[torch.arange(b)[:, None], order]
    return out.clamp(-1, 1)


def synthesize_anomalies(
    images: torch.Tensor,
    textures: torch.Tensor,
    foreground: torch.Tensor,
    generator: torch.Generator | None,
    opacity: tuple[float, float] = (1.0, 1.0),
    texture_probability: float = 0.5,
    threshold: float = 0.5,
    max_scale_exponent: int = 5,
    two_sided: bool = False,
) -> SyntheticAnomalies:
    """Blend a Perlin-shaped anomaly into every image (DiffusionAD Eq. 12 with β ~ U[opacity]).

    images, textures: [B, 3, H, W] in [-1, 1]; foreground [B, 1, H, W] {0, 1}. The
    appearance is the (jittered) texture with probability ``texture_probability``, else
    the image's own shuffled patches. Masks can come out empty for a few samples
    (small noise peaks outside the foreground); :func:`synthesize_nonempty_anomalies`
    redraws those.
    """
    b, _, h, w = images.shape
    device = images.device
    masks, noise = perlin_masks(b, h, w, generator, threshold, max_scale_exponent, two_sided)
    masks, noise = masks.to(device), noise.to(device)
    masks = masks * foreground

    use_texture = (torch.rand((b, 1, 1, 1), generator=generator) < texture_probability).to(device)
    from_texture = jitter_appearance(textures.cpu(), generator).to(device)
    from_self = shuffled_patches(images.cpu(), generator).to(device)
    appearance = torch.where(use_texture, from_texture, from_self)

    beta = _uniform(generator, (b, 1, 1, 1), *opacity).to(device)
    blended = (1 - beta * masks) * images + beta * masks * appearance
    return SyntheticAnomalies(blended, masks, appearance, noise)


def synthesize_nonempty_anomalies(
    images: torch.Tensor,
    textures: torch.Tensor,
    foreground: torch.Tensor,
    generator: torch.Generator | None,
    *,
    min_pixels: int = 1,
    max_rounds: int = 5,
    texture_pool: bool = False,
    widen_after: int | None = None,
    **synthesis: Any,
) -> NonEmptyAnomalies:
    """:func:`synthesize_anomalies` for every image, redrawing (only) the samples whose
    mask has fewer than ``min_pixels`` pixels, for at most ``max_rounds`` rounds.

    images [B, 3, H, W] in [-1, 1]; foreground [B, 1, H, W] {0, 1}; ``synthesis`` goes to
    :func:`synthesize_anomalies` (opacity, texture_probability, threshold, ...).
    ``textures`` is one texture per image [B, 3, H, W], or with ``texture_pool`` a pool
    [N, 3, H, W] from which every round first draws one texture per pending sample
    (uniformly, from ``generator``). With ``widen_after`` = r, rounds r, r + 1, ... ignore
    the foreground, so that a tiny (or missing) foreground estimate cannot stall.

    Random draws happen in a fixed order (per round: the texture pick, then the
    synthesis of the pending samples), so a seeded generator gives the same anomalies.
    A sample that never succeeds keeps its image, gets an all-zero mask and
    ``found = False``; the caller decides whether that is an error.
    """
    out_images = images.clone()
    out_masks = torch.zeros_like(images[:, :1])
    todo = torch.arange(images.shape[0], device=images.device)
    for round_index in range(max_rounds):
        if todo.numel() == 0:
            break
        if texture_pool:
            source = textures[torch.randint(0, len(textures), (len(todo),), generator=generator)]
        else:
            source = textures[todo]
        region = foreground[todo]
        if widen_after is not None and round_index >= widen_after:
            region = torch.ones_like(region)
        result = synthesize_anomalies(images[todo], source, region, generator, **synthesis)
        ok = (result.masks > 0.5).flatten(1).sum(1) >= min_pixels
        out_images[todo[ok]], out_masks[todo[ok]] = result.images[ok], result.masks[ok]
        todo = todo[~ok]
    found = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    found[todo] = False
    return NonEmptyAnomalies(out_images, out_masks, found)
