"""The ``generality`` dataset: real photographs, defects from a family no method trains on.

A frozen test of generality (``bench.generality``): does a method find defects it never saw
during training, nor during selection? Three texture categories cut from the real
photographs scikit-image ships (``brick``, ``grass``, ``gravel``: grey, untinted, 192-px
crops resized to 128 px; the embedded ``synthetic`` set tints 256-px crops and has no
grass), MVTec AD layout, exact masks. Every category has the same three defect types, a
fourth family that shares no code and no defect type with the others:

    glare   a specular highlight: an anisotropic Gaussian lobe of light added to the
            surface (a reflection, a wet or polished spot)
    dent    a shallow bump or pit lit from one side: the shading of a Gaussian height
            field's slope darkens one flank and lightens the other (an impact mark)
    mosaic  a convex polygon of the image replaced by its block means (6-10 px blocks):
            structure lost to a block-shaped smear (a print or sensor artefact)

The other families, for comparison: methods train on Perlin-shaped texture or shuffled-patch
paste-ins (``methods/anomaly_synthesis.py``) and DRDC on grid-cell noise and feature jitter;
the validation split uses swirl, patch transplant, defocus and gamma inside a disk
(``validation_defects.py``); the ``synthetic`` test split draws cracks, scratches, stains,
spots, holes and missing parts. ``tests/test_generality.py`` checks the names are disjoint
and that this module imports none of those modules.

Frozen: ``FROZEN_DIGEST`` is the SHA-256 of the generated files. ``bench.generality``
refuses to measure on anything else, and a test regenerates the set and compares, so a
change to the generator cannot slip in after the numbers were taken (change it only with
a new ``VERSION``, a new digest and a new measurement).

Masks are exact: a pixel is anomalous iff the defect changed it by at least
``CHANGE_TOLERANCE`` grey levels in some channel; smaller changes are undone.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from orchestrator.data.mvtec import MVTecLayout
from orchestrator.errors import DatasetError
from orchestrator.files import publish_folder

log = logging.getLogger(__name__)

VERSION = "v1"  # part of the folder name: bump (and re-freeze) whenever generation changes
SEED = 0
SIZE = 128
CROP = 192
N_TRAIN = 100
N_TEST_GOOD = 24
N_TEST_PER_DEFECT = 12
CATEGORIES = ("brick", "grass", "gravel")
GENERALITY_DEFECTS: tuple[str, ...] = ("glare", "dent", "mosaic")
CHANGE_TOLERANCE = 6  # grey levels of 255
MIN_PIXELS = 40  # a draw changing fewer pixels is drawn again (too faint to count as a defect)
FROZEN_DIGEST = "b5da1accd369c0a339d831a90202b1087a198586294c8033ffa853ee2edd36c4"  # frozen 2026-12-03, before any measurement


def dataset_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "generality" / f"{VERSION}-seed{SEED}"


def load_photos() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    return {"brick": skdata.brick(), "grass": skdata.grass(), "gravel": skdata.gravel()}


def normal_image(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random CROP-px crop of a grey photo, resized to SIZE, grey RGB float in [0, 1]."""
    top, left = rng.integers(0, photo.shape[0] - CROP), rng.integers(0, photo.shape[1] - CROP)
    crop = Image.fromarray(photo[top : top + CROP, left : left + CROP]).resize((SIZE, SIZE), Image.BILINEAR)
    grey = np.asarray(crop, dtype=np.float64) / 255
    return np.repeat(grey[..., None], 3, axis=2)


# ---------------------------------------------------------------------------- the defect family


def _centre(rng: np.random.Generator, margin: int = 20) -> tuple[float, float]:
    return tuple(rng.uniform(margin, SIZE - margin, 2))


def glare(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cy, cx = _centre(rng)
    sigma_long, sigma_short = rng.uniform(7, 13), rng.uniform(3, 6)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    lobe = np.exp(-0.5 * ((u / sigma_long) ** 2 + (v / sigma_short) ** 2))
    return np.clip(image + rng.uniform(0.3, 0.55) * lobe[..., None], 0, 1)


def dent(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cy, cx = _centre(rng)
    sigma = rng.uniform(5, 9)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    height = np.exp(-0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / sigma**2) * rng.choice([-1.0, 1.0])
    dy, dx = np.gradient(height)
    light = rng.uniform(0, 2 * np.pi)
    slope = (dx * np.cos(light) + dy * np.sin(light)) * sigma  # ≈ ±0.6 at the flanks, independent of sigma
    shading = 1 + rng.uniform(0.6, 0.9) * slope
    return np.clip(image * shading[..., None], 0, 1)


def mosaic(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cy, cx = _centre(rng)
    radius = rng.uniform(10, 18)
    angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 8))))
    rr, cc = draw.polygon(cy + radius * np.sin(angles), cx + radius * np.cos(angles), shape=(SIZE, SIZE))
    polygon = np.zeros((SIZE, SIZE), bool)
    polygon[rr, cc] = True
    block = int(rng.integers(6, 11))
    columns = -(-SIZE // block)
    labels = (np.arange(SIZE)[:, None] // block) * columns + np.arange(SIZE)[None, :] // block
    out = image.copy()
    for channel in range(3):
        means = ndimage.mean(image[..., channel], labels=labels, index=np.arange(labels.max() + 1))
        out[..., channel] = np.where(polygon, means[labels], image[..., channel])
    return out


DRAW = {"glare": glare, "dent": dent, "mosaic": mosaic}


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def draw_defect(defect: str, normal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image, bool mask): ``normal`` (float) with one ``defect``; the mask is exactly
    the pixels that changed by CHANGE_TOLERANCE or more, every other pixel is the normal's."""
    before = to_uint8(normal)
    for _ in range(50):
        after = to_uint8(DRAW[defect](normal, rng))
        mask = (np.abs(after.astype(np.int16) - before).max(axis=2) >= CHANGE_TOLERANCE)
        if mask.sum() >= MIN_PIXELS:
            return np.where(mask[..., None], after, before), mask
    raise RuntimeError(f"{defect}: no visible draw in 50 tries")  # internal: parameters give visible defects


# ---------------------------------------------------------------------------- generation


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def digest(root: Path) -> str:
    """SHA-256 over every image's relative path and decoded pixels, in sorted order (pixels,
    not file bytes, so another PNG encoder gives the same digest)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*.png")):
        h.update(path.relative_to(root).as_posix().encode())
        with Image.open(path) as image:
            h.update(np.asarray(image).tobytes())
    return h.hexdigest()


def generate(root: Path) -> Path:
    """Write the dataset under ``root`` (MVTec AD layout) unless already there; deterministic.
    Published by renaming a finished temporary folder, so readers never see a partial set."""
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"{root} exists but is not a complete generality dataset (no .complete marker); delete that folder to regenerate it")
    log.info("generating the generality dataset in %s", root)

    def fill(tmp: Path) -> None:
        photos = load_photos()
        for index, category in enumerate(CATEGORIES):
            rng = np.random.default_rng([SEED, index])
            folder = tmp / category
            plan = [("train", "good", N_TRAIN), ("test", "good", N_TEST_GOOD)] + [("test", d, N_TEST_PER_DEFECT) for d in GENERALITY_DEFECTS]
            for split, defect, count in plan:
                (folder / split / defect).mkdir(parents=True)
                if defect != "good":
                    (folder / "ground_truth" / defect).mkdir(parents=True)
                for i in range(count):
                    normal = normal_image(photos[category], rng)
                    if defect == "good":
                        _save_png(folder / split / defect / f"{i:03d}.png", to_uint8(normal))
                        continue
                    image, mask = draw_defect(defect, normal, rng)
                    _save_png(folder / split / defect / f"{i:03d}.png", image)
                    _save_png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
        (tmp / ".complete").write_text(f"{VERSION} seed {SEED}\n")

    publish_folder(root, fill, is_complete=lambda f: (f / ".complete").is_file())
    return root


@dataclass(frozen=True)
class GeneralityDataset(MVTecLayout):
    """Generated (once) into ``<cache_dir>/generality/`` when no ``data.root`` is given."""

    name: str = "generality"
    textures: frozenset[str] = frozenset(CATEGORIES)

    def resolve_root(self, root: str | Path | None, cache_dir: str | Path | None) -> Path:
        if root is not None:
            return super().resolve_root(root, cache_dir)
        if cache_dir is None:
            from orchestrator.config import default_cache_dir

            cache_dir = default_cache_dir()
        return generate(dataset_root(Path(cache_dir).expanduser()))
