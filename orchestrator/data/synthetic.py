"""The embedded `synthetic` dataset: generated deterministically into the cache on first use.

Three categories in the MVTec AD layout, 128 px PNGs, exact ground-truth masks:

* ``brick``  (texture) — crops of scikit-image's real brick-wall photo, tinted;
  defects: crack, stain, hole.
* ``gravel`` (texture) — crops of scikit-image's real gravel photo, tinted;
  defects: scratch, stain, missing (a patch replaced by a flat filler).
* ``washer`` (object)  — a coloured ring on a uniform, noisy background with pose
  jitter; defects: scratch, spot, missing_piece (a wedge of the ring gone).

Defects are drawn through a mask, then the image is changed only inside it, so the mask
is exact. Sizes are chosen to be visible but not trivial (a mean-intensity detector is
not perfect).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import draw

from orchestrator.data.mvtec import MVTecLayout
from orchestrator.errors import DatasetError
from orchestrator.files import publish_folder
from orchestrator.paths import default_cache_dir

log = logging.getLogger(__name__)

VERSION = "v2"  # part of the folder name: bump whenever generation changes
SEED = 0  # the embedded dataset is one fixed dataset; a run's `seed` varies its split and training, not the data
SIZE = 128
N_TRAIN = 100
N_TEST_GOOD = 24
N_TEST_PER_DEFECT = 12
CATEGORIES = {"brick": ("crack", "stain", "hole"), "gravel": ("scratch", "stain", "missing"), "washer": ("scratch", "spot", "missing_piece")}
TEXTURES = frozenset({"brick", "gravel"})
# Every test defect type, so validation defects can be checked to be none of them
# (tests/test_validation_defects.py).
TEST_DEFECTS: frozenset[str] = frozenset(d for defects in CATEGORIES.values() for d in defects)


def dataset_root(cache_dir: str | Path, seed: int = SEED) -> Path:
    """``<cache_dir>/synthetic/<version>-seed<seed>``: where :func:`generate` writes."""
    return Path(cache_dir) / "synthetic" / f"{VERSION}-seed{seed}"


# ---------------------------------------------------------------------------- normal images


def _texture_sample(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 256-px crop of a grayscale photo, resized to SIZE, tinted: float [H, W, 3] in [0, 1]."""
    top, left = rng.integers(0, photo.shape[0] - 256), rng.integers(0, photo.shape[1] - 256)
    crop = Image.fromarray(photo[top : top + 256, left : left + 256]).resize((SIZE, SIZE), Image.BILINEAR)
    grey = np.asarray(crop, dtype=np.float64) / 255
    tint = np.array([0.85, 0.55, 0.4]) + rng.normal(0, 0.03, 3)  # a warm, slightly varying colour
    brightness = rng.uniform(0.9, 1.1)
    return np.clip(grey[..., None] * tint * brightness * 1.3, 0, 1)


def _washer(rng: np.random.Generator) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A ring on a uniform background: float image and its geometry (cy, cx, r_in, r_out)."""
    image = np.full((SIZE, SIZE, 3), 0.18) + rng.normal(0, 0.015, (SIZE, SIZE, 3))
    cy, cx = SIZE / 2 + rng.uniform(-6, 6, 2)
    r_out, r_in = 42 + rng.uniform(-2, 2), 18 + rng.uniform(-1.5, 1.5)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    dist = np.hypot(yy - cy, xx - cx)
    ring = (dist <= r_out) & (dist >= r_in)
    base = np.array([0.75, 0.68, 0.35]) + rng.normal(0, 0.02, 3)
    shade = 1 - 0.25 * (dist - r_in) / (r_out - r_in)  # radial shading like a bevel
    metal = base * shade[..., None] + rng.normal(0, 0.02, (SIZE, SIZE, 3))
    image[ring] = metal[ring]
    return np.clip(image, 0, 1), (cy, cx, r_in, r_out)


# ---------------------------------------------------------------------------- defect masks


def _stroke(rng: np.random.Generator, width: float, length: float, wiggle: float, region: np.ndarray | None = None) -> np.ndarray:
    """A thick random-walk stroke (crack/scratch) as a boolean mask, inside ``region`` if given."""
    mask = np.zeros((SIZE, SIZE), bool)
    for _ in range(20):
        y, x = rng.uniform(20, SIZE - 20, 2)
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(length)):
            angle += rng.normal(0, wiggle)
            y, x = y + np.sin(angle), x + np.cos(angle)
            rr, cc = draw.disk((y, x), width / 2, shape=mask.shape)
            mask[rr, cc] = True
        if region is not None:
            mask &= region
        if mask.sum() >= 20:
            return mask
        mask[:] = False
    raise RuntimeError("could not place a stroke defect")  # internal: regions are large enough


def _blob(rng: np.random.Generator, radius: tuple[float, float], region: np.ndarray | None = None) -> np.ndarray:
    for _ in range(50):
        cy, cx = rng.uniform(16, SIZE - 16, 2)
        ry, rx = rng.uniform(*radius, 2)
        rr, cc = draw.ellipse(cy, cx, ry, rx, shape=(SIZE, SIZE), rotation=rng.uniform(0, np.pi))
        mask = np.zeros((SIZE, SIZE), bool)
        mask[rr, cc] = True
        if region is not None:
            if (mask & ~region).any():
                continue
        return mask
    raise RuntimeError("could not place a blob defect")


def _apply(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    noise = rng.normal(0, 0.03, image.shape)
    out[mask] = (1 - alpha) * image[mask] + alpha * (colour + noise[mask])
    return np.clip(out, 0, 1)


def _defect(category: str, defect: str, image: np.ndarray, geometry, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    region = None
    if category == "washer":
        cy, cx, r_in, r_out = geometry
        yy, xx = np.mgrid[:SIZE, :SIZE]
        dist = np.hypot(yy - cy, xx - cx)
        region = (dist <= r_out - 1) & (dist >= r_in + 1)
    if defect in ("crack", "scratch"):
        dark = defect == "crack"
        mask = _stroke(rng, width=rng.uniform(2.0, 3.5), length=rng.uniform(30, 60), wiggle=0.25 if dark else 0.05, region=region)
        colour = np.full(3, 0.08) if dark else np.full(3, 0.92)
        return _apply(image, mask, colour, rng.uniform(0.6, 0.85), rng), mask
    if defect in ("stain", "spot"):
        mask = _blob(rng, (4, 9) if defect == "spot" else (6, 12), region)
        colour = rng.choice([np.array([0.2, 0.45, 0.2]), np.array([0.15, 0.25, 0.55]), np.array([0.55, 0.15, 0.15])])
        return _apply(image, mask, colour, rng.uniform(0.45, 0.75), rng), mask
    if defect == "hole":
        mask = _blob(rng, (4, 8), region)
        return _apply(image, mask, np.full(3, 0.03), 0.9, rng), mask
    if defect == "missing":
        mask = _blob(rng, (7, 13), region)
        filler = image.reshape(-1, 3).mean(0)
        return _apply(image, mask, filler, 0.95, rng), mask
    if defect == "missing_piece":
        cy, cx, r_in, r_out = geometry
        yy, xx = np.mgrid[:SIZE, :SIZE]
        theta = np.arctan2(yy - cy, xx - cx)
        start, width = rng.uniform(-np.pi, np.pi), rng.uniform(0.35, 0.7)
        wedge = np.angle(np.exp(1j * (theta - start))) % (2 * np.pi) < width
        mask = wedge & (np.hypot(yy - cy, xx - cx) <= r_out + 0.5) & (np.hypot(yy - cy, xx - cx) >= r_in - 0.5)
        background = np.full(3, 0.18) + rng.normal(0, 0.015, (SIZE, SIZE, 3))
        out = image.copy()
        out[mask] = background[mask]
        return np.clip(out, 0, 1), mask
    raise ValueError(f"unknown defect {defect!r}")  # internal: CATEGORIES lists the valid ones


# ---------------------------------------------------------------------------- generation


@dataclass
class Sample:
    normal: np.ndarray  # float [H, W, 3] in [0, 1]: the image before any defect
    image: np.ndarray  # float [H, W, 3] in [0, 1]: with the defect (== normal for good samples)
    mask: np.ndarray  # bool [H, W]: exactly the pixels the defect was drawn into


def load_photos() -> dict[str, np.ndarray]:
    """The real grayscale texture photographs the texture categories are cut from."""
    from skimage import data as skdata

    return {"brick": skdata.brick(), "gravel": skdata.gravel()}


def make_sample(category: str, defect: str, rng: np.random.Generator, photos: dict[str, np.ndarray]) -> Sample:
    """One image of ``category``; ``defect`` is "good" or one of CATEGORIES[category]."""
    if category == "washer":
        normal, geometry = _washer(rng)
    else:
        normal, geometry = _texture_sample(photos[category], rng), None
    if defect == "good":
        return Sample(normal, normal, np.zeros(normal.shape[:2], bool))
    image, mask = _defect(category, defect, normal, geometry, rng)
    return Sample(normal, image, mask)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    # compress_level=1: encoding dominated generation time at the default level 6.
    Image.fromarray(array).save(path, compress_level=1)


def generate(root: Path, seed: int = SEED) -> Path:
    """Write the dataset under ``root`` in the MVTec AD layout, unless already there.
    Deterministic in ``seed`` (each category draws from its own generator). Written into
    a temporary sibling folder renamed to ``root`` at the end, so concurrent callers
    never see a partial dataset."""
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} exists but is not a complete synthetic dataset (no .complete marker); delete that folder to regenerate it")
    log.info("generating the synthetic dataset (seed %d) in %s", seed, root)

    def fill(tmp: Path) -> None:
        photos = load_photos()
        for index, (category, defects) in enumerate(CATEGORIES.items()):
            rng = np.random.default_rng([seed, index])
            folder = tmp / category
            plan = [("train", "good", N_TRAIN), ("test", "good", N_TEST_GOOD)] + [("test", d, N_TEST_PER_DEFECT) for d in defects]
            for split, defect, count in plan:
                (folder / split / defect).mkdir(parents=True)
                if defect != "good":
                    (folder / "ground_truth" / defect).mkdir(parents=True)
                for i in range(count):
                    sample = make_sample(category, defect, rng, photos)
                    _save_png(folder / split / defect / f"{i:03d}.png", to_uint8(sample.image))
                    if defect != "good":
                        _save_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", sample.mask.astype(np.uint8) * 255)
        (tmp / ".complete").write_text(f"{VERSION} seed {seed}\n")

    publish_folder(root, fill, is_complete=lambda f: (f / ".complete").is_file())
    return root


@dataclass(frozen=True)
class SyntheticDataset(MVTecLayout):
    """The embedded default dataset: with no ``data.root`` it is generated (once) into
    ``<cache_dir>/synthetic/``; an explicit root reads a copy like any MVTec tree."""

    name: str = "synthetic"
    textures: frozenset[str] = TEXTURES

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        if root is not None:
            return super().resolve_root(root, cache_dir)
        if cache_dir is None:
            cache_dir = default_cache_dir()
        return generate(dataset_root(Path(cache_dir).expanduser()), SEED)
