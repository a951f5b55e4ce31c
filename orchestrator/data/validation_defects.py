"""Validation anomalies from a defect family that no method trains on and no test split draws.

Sweeps select configurations on the validation split, so its anomalies must predict how a
model does on unseen defects. Made by a method's own training synthesis (Perlin-shaped
regions filled with a texture or with the image's shuffled patches,
``methods/anomaly_synthesis.py``), they would only measure whether a model finds its own
augmentation. The defects here instead change an image's geometry, sharpness or tone
inside a disk centred on a foreground pixel; none paints a foreign appearance into the
image, and none is a scratch, crack, stain, spot, hole or missing part (the embedded
synthetic test split's defects):

    swirl_warp        the disk's pixels rotated about its centre by an angle that falls to
                      zero at its rim: a local twist of the structure (elastic deformation)
    patch_transplant  a square from elsewhere in the same image, rotated or mirrored,
                      pasted into the disk: misplaced or misoriented structure
    local_defocus     the disk Gaussian-blurred with a soft rim: an out-of-focus area
    local_gamma       the disk's tone curve bent (x^γ) with signal-dependent shot noise: a
                      local exposure / sensor fault

This module imports nothing from ``methods`` nor from ``orchestrator.data.synthetic`` so
that the families stay apart by construction; ``tests/test_validation_defects.py`` checks
that, and that the generator names are disjoint from what methods declare they train on
(``AnomalyMethod.training_synthesis``) and from the synthetic test defect types.

Masks are exact: a pixel is anomalous iff it changed by at least ``CHANGE_TOLERANCE`` grey
levels in some channel and lies in the foreground. Smaller changes (and any change outside
the foreground) are undone, so every unmasked pixel equals the normal image's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import ndimage

VALIDATION_DEFECTS: tuple[str, ...] = ("swirl_warp", "patch_transplant", "local_defocus", "local_gamma")
CHANGE_TOLERANCE = 6  # grey levels (of 255): a smaller change is invisible and is undone, not labelled
MIN_ANOMALY_FRACTION = 1 / 256  # a draw changing less of the image (64 px at 128²) is too faint: drawn again
RADIUS = (0.08, 0.16)  # disk radius as a fraction of the image side (10-20 px at 128²)
MAX_DRAWS = 100
WIDEN_AFTER = 50  # later draws ignore the foreground, so a tiny foreground estimate cannot stall the split


class ValidationAnomalies(NamedTuple):
    images: np.ndarray  # uint8 [V, 3, H, W]: each normal with one defect
    masks: np.ndarray  # uint8 {0, 1} [V, H, W]: exactly the changed pixels
    defects: list[str]  # the generator (a VALIDATION_DEFECTS name) of each image


# ---------------------------------------------------------------------------- geometry helpers


def _pick_pixel(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly drawn (y, x) with region[y, x] True."""
    ys, xs = np.nonzero(region)
    k = rng.integers(len(ys))
    return int(ys[k]), int(xs[k])


def _radius(side: int, rng: np.random.Generator) -> float:
    return max(2.0, rng.uniform(*RADIUS) * side)


def _distance(shape: tuple[int, int], cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(yy - cy, xx - cx)


def _soft_disk(shape: tuple[int, int], cy: float, cx: float, radius: float) -> np.ndarray:
    """Weight [H, W, 1]: 1 inside 0.7 radius, falling linearly to 0 at the rim, so a tone
    or focus change has no drawn edge."""
    weight = np.clip((radius - _distance(shape, cy, cx)) / (0.3 * radius), 0, 1)
    return weight[..., None]


def _square_symmetry(array: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square (k = 0 is the identity): k % 4 quarter turns,
    mirrored when k >= 4."""
    out = np.rot90(array, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


# ---------------------------------------------------------------------------- generators
# Each takes a float image [H, W, 3] in [0, 1] and the region its disk may be centred in
# (bool [H, W]); it returns the changed float image. Which pixels count as changed is
# decided afterwards, by :func:`keep_visible_changes`.


def swirl_warp(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate the disk's content about its centre by θ(d) = θ_max (1 - d/r)², d the
    distance to the centre: structure twists, colours stay the image's own."""
    h, w = image.shape[:2]
    cy, cx = _pick_pixel(region, rng)
    radius = _radius(min(h, w), rng)
    strength = rng.uniform(2.0, 4.0) * rng.choice([-1.0, 1.0])  # θ_max, radians
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    angle = strength * np.clip(1 - np.hypot(dy, dx) / radius, 0, None) ** 2
    cos, sin = np.cos(angle), np.sin(angle)
    # Each output pixel reads from its position rotated back by θ (identity outside the disk).
    source = [cy + cos * dy - sin * dx, cx + sin * dy + cos * dx]
    return np.stack([ndimage.map_coordinates(image[..., c], source, order=1, mode="reflect") for c in range(3)], axis=-1)


def patch_transplant(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste into a disk a square cut from elsewhere in the same image, turned or mirrored
    by a non-identity symmetry of the square. Only source foreground lands on target
    foreground: background pasted onto an object would be a missing part, a test defect."""
    h, w = image.shape[:2]
    r = round(_radius(min(h, w), rng))
    inside = np.zeros_like(region)  # centres whose (2r+1)² square fits in the image
    inside[r : h - r, r : w - r] = region[r : h - r, r : w - r]
    if not inside.any():
        return image
    ty, tx = _pick_pixel(inside, rng)
    elsewhere = inside & (_distance((h, w), ty, tx) > 2 * r)  # source and target squares do not overlap
    if not elsewhere.any():
        return image
    sy, sx = _pick_pixel(elsewhere, rng)
    k = int(rng.integers(1, 8))
    patch = _square_symmetry(image[sy - r : sy + r + 1, sx - r : sx + r + 1], k)
    patch_foreground = _square_symmetry(region[sy - r : sy + r + 1, sx - r : sx + r + 1], k)
    paste = (_distance((2 * r + 1, 2 * r + 1), r, r) <= r) & patch_foreground
    out = image.copy()
    out[ty - r : ty + r + 1, tx - r : tx + r + 1][paste] = patch[paste]
    return out


def local_defocus(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend a Gaussian blur of σ = U[2, 4] px (at 128², scaled with the side) into a
    soft disk: fine detail and edges are lost, nothing is added."""
    h, w = image.shape[:2]
    cy, cx = _pick_pixel(region, rng)
    radius = _radius(min(h, w), rng)
    sigma = max(0.7, rng.uniform(2.0, 4.0) * min(h, w) / 128)
    blurred = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="reflect")
    weight = _soft_disk((h, w), cy, cx, radius)
    return weight * blurred + (1 - weight) * image


def local_gamma(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bend the tone curve in a soft disk, x -> x^γ with γ in [0.45, 0.7] (brighter) or
    [1.5, 2.2] (darker), and add shot noise of std 0.02 √x as a different exposure would:
    texture and hue are kept, only intensity statistics change."""
    h, w = image.shape[:2]
    cy, cx = _pick_pixel(region, rng)
    radius = _radius(min(h, w), rng)
    gamma = rng.uniform(0.45, 0.7) if rng.random() < 0.5 else rng.uniform(1.5, 2.2)
    toned = image**gamma
    exposed = np.clip(toned + 0.02 * np.sqrt(toned) * rng.standard_normal(image.shape), 0, 1)
    weight = _soft_disk((h, w), cy, cx, radius)
    return weight * exposed + (1 - weight) * image


GENERATORS: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "swirl_warp": swirl_warp,
    "patch_transplant": patch_transplant,
    "local_defocus": local_defocus,
    "local_gamma": local_gamma,
}
assert tuple(GENERATORS) == VALIDATION_DEFECTS


# ---------------------------------------------------------------------------- masks and the split


def keep_visible_changes(normal: np.ndarray, changed: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """normal uint8 [3, H, W], changed float [H, W, 3] in [0, 1], region bool [H, W] ->
    (image uint8 [3, H, W], mask uint8 {0, 1} [H, W]) where the mask is exactly the pixels
    that differ from ``normal``: changes below CHANGE_TOLERANCE or outside the region are undone."""
    candidate = (np.clip(changed, 0, 1) * 255).round().astype(np.uint8).transpose(2, 0, 1)
    difference = np.abs(candidate.astype(np.int16) - normal.astype(np.int16)).max(axis=0)
    mask = (difference >= CHANGE_TOLERANCE) & region
    return np.where(mask[None], candidate, normal), mask.astype(np.uint8)


def draw_defect(name: str, normal: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``name`` defect on ``normal`` (uint8 [3, H, W]) within ``foreground`` (bool
    [H, W]), redrawn until it changes at least MIN_ANOMALY_FRACTION of the pixels.
    Returns (image uint8 [3, H, W], mask uint8 {0, 1} [H, W])."""
    if name not in GENERATORS:
        raise ValueError(f"unknown validation defect {name!r}; valid: {', '.join(VALIDATION_DEFECTS)}")
    h, w = normal.shape[1:]
    image = normal.transpose(1, 2, 0).astype(np.float64) / 255
    min_pixels = max(1, int(MIN_ANOMALY_FRACTION * h * w))
    everywhere = np.ones((h, w), bool)
    for attempt in range(MAX_DRAWS):
        region = foreground if attempt < WIDEN_AFTER and foreground.any() else everywhere
        out, mask = keep_visible_changes(normal, GENERATORS[name](image, region, rng), region)
        if mask.sum() >= min_pixels:
            return out, mask
    raise RuntimeError(f"could not draw a visible {name} defect in {MAX_DRAWS} draws (is the image flat?)")


def make_validation_anomalies(normals: np.ndarray, foreground: np.ndarray, seed: int, salt: int = 0) -> ValidationAnomalies:
    """One defect per normal: normals uint8 [V, 3, H, W], foreground uint8 {0, 1}
    [V, 1, H, W]. The generators take turns (each used ⌊V/4⌋ or ⌈V/4⌉ times, in a seeded
    order); image i draws from its own generator seeded by (seed, salt, i), so the split is
    a function of the seed and the category salt alone."""
    order = np.random.default_rng([seed, salt, 2]).permutation(np.resize(np.arange(len(VALIDATION_DEFECTS)), len(normals)))
    images, masks, defects = [], [], []
    for i, kind in enumerate(order):
        name = VALIDATION_DEFECTS[kind]
        image, mask = draw_defect(name, normals[i], foreground[i, 0].astype(bool), np.random.default_rng([seed, salt, 2, i]))
        images.append(image)
        masks.append(mask)
        defects.append(name)
    h, w = normals.shape[2:]
    if not images:
        return ValidationAnomalies(np.zeros((0, 3, h, w), np.uint8), np.zeros((0, h, w), np.uint8), [])
    return ValidationAnomalies(np.stack(images), np.stack(masks), defects)
