"""The ``generality`` dataset: real photographs, defects of kinds no method trains or selects on.

A frozen test of generality (``bench.generality``): does a method find defects it never saw
during training, nor during selection? Three texture categories cut from the real
photographs scikit-image ships (``brick``, ``grass``, ``gravel``: grey, untinted, 192-px
crops resized to 128 px), MVTec AD layout, exact masks.

Clean by construction (v2):

* **No shared source.** None of the three photos is in the texture bank methods paste
  anomalies from (orchestrator/data/textures.py; ``grass`` was, until v2) or anything the
  validation split draws on: :func:`near_duplicates` compares downscaled crops of every
  photo with every bank image by content, not by name (tests/test_generality.py).
* **Disjoint regions.** Training normals (and so the validation normals held out of them)
  are cut from the top 320 rows of each 512-row photo, test images (normal or defective)
  from the bottom 192: no test pixel was ever a training pixel (:func:`crop_box`).
* **Defects of other kinds.** Every category has the same three defect types:

      thread  thin curvilinear strokes (1-3 px) of one dark or light grey: fine structure
              *added*; no generator adds sub-5-px curves (training paste-ins are wide
              Perlin blobs, DRDC's noise fills grid cells, validation warps, transplants,
              blurs or re-grades a disk)
      void    an elliptic region emptied to one flat dark grey: texture *removed* and the
              level dropped (defocus keeps the structure's mean, gamma keeps the texture,
              paste-ins and transplants bring texture in)
      tear    a band whose pixels are shifted several pixels along a cut: a *discontinuous*
              displacement (the validation swirl is a smooth, continuous warp)

  ``tests/test_generality.py`` checks the names are disjoint from every other family's and
  that this module imports none of their code.

Frozen: ``FROZEN_DIGEST`` is the SHA-256 of the generated files (pixels). ``bench.generality``
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
from orchestrator.paths import default_cache_dir

log = logging.getLogger(__name__)

VERSION = "v2"  # part of the folder name: bump (and re-freeze) whenever generation changes
SEED = 0
SIZE = 128
CROP = 192
N_TRAIN = 100
N_TEST_GOOD = 24
N_TEST_PER_DEFECT = 12
CATEGORIES = ("brick", "grass", "gravel")
GENERALITY_DEFECTS: tuple[str, ...] = ("thread", "void", "tear")
TRAIN_ROWS, TEST_ROWS = (0, 320), (320, 512)  # the photos' rows training and test crops come from (disjoint)
CHANGE_TOLERANCE = 6  # grey levels of 255
MIN_PIXELS = 40  # a draw changing fewer pixels is drawn again (too faint to count as a defect)
FROZEN_DIGEST = "308044bfb18ba6d3412d113983ff06e4666827a2fee9629fe7143af2069fc625"  # v2, frozen 2026-12-07, before any measurement on it


def dataset_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "generality" / f"{VERSION}-seed{SEED}"


def load_photos() -> dict[str, np.ndarray]:
    from skimage import data as skdata

    return {"brick": skdata.brick(), "grass": skdata.grass(), "gravel": skdata.gravel()}


def crop_box(split: str, photo_shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) of a CROP-px crop inside the rows of ``split`` ("train" or "test")."""
    low, high = TRAIN_ROWS if split == "train" else TEST_ROWS
    assert high <= photo_shape[0] and high - low >= CROP, (photo_shape, split)
    top = int(rng.integers(low, high - CROP + 1))
    left = int(rng.integers(0, photo_shape[1] - CROP + 1))
    return top, left


def normal_image(photo: np.ndarray, rng: np.random.Generator, split: str = "train") -> np.ndarray:
    """A random CROP-px crop of a grey photo from ``split``'s rows, resized to SIZE, grey
    RGB float in [0, 1]."""
    top, left = crop_box(split, photo.shape, rng)
    crop = Image.fromarray(photo[top : top + CROP, left : left + CROP]).resize((SIZE, SIZE), Image.BILINEAR)
    grey = np.asarray(crop, dtype=np.float64) / 255
    return np.repeat(grey[..., None], 3, axis=2)


def _thumbnails(photo: np.ndarray, size: int = 32) -> np.ndarray:
    """The whole photo and its four quadrants, grey, ``size`` px, each zero-mean and unit-norm."""
    grey = photo if photo.ndim == 2 else photo[..., :3].mean(axis=2)
    h, w = grey.shape
    crops = [grey, grey[: h // 2, : w // 2], grey[: h // 2, w // 2 :], grey[h // 2 :, : w // 2], grey[h // 2 :, w // 2 :]]
    out = []
    for crop in crops:
        small = np.asarray(Image.fromarray(np.asarray(crop, dtype=np.float64).astype(np.float32)).resize((size, size), Image.BILINEAR),
                           dtype=np.float64).ravel()
        small = small - small.mean()
        out.append(small / (np.linalg.norm(small) or 1.0))
    return np.stack(out)


def near_duplicates(ours: dict[str, np.ndarray], others: dict[str, np.ndarray], threshold: float = 0.9) -> list[tuple[str, str, float]]:
    """(our name, their name, similarity) for every pair of images sharing content: the
    largest normalised correlation between any of their downscaled crops (whole image,
    quadrants) reaches ``threshold``. By content, not by name: a renamed or resized copy of
    a photo, or of one of its quadrants, is found."""
    found = []
    for a, image_a in ours.items():
        ta = _thumbnails(image_a)
        for b, image_b in others.items():
            similarity = float((ta @ _thumbnails(image_b).T).max())
            if similarity >= threshold:
                found.append((a, b, similarity))
    return found


# ---------------------------------------------------------------------------- the defect family


def _centre(rng: np.random.Generator, margin: int = 20) -> tuple[float, float]:
    return tuple(rng.uniform(margin, SIZE - margin, 2))


def thread(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1-3 curvilinear strokes, 1-3 px wide, of one grey far from the surface's mean."""
    out = image.copy()
    level = 0.05 if image.mean() > 0.5 else 0.95
    level = level if rng.random() < 0.7 else 1 - level
    for _ in range(int(rng.integers(1, 4))):
        y, x = _centre(rng)
        heading, points = rng.uniform(0, 2 * np.pi), []
        for _ in range(int(rng.integers(25, 60))):  # a random walk with a slowly turning heading
            points.append((y, x))
            heading += rng.normal(0, 0.25)
            y, x = y + np.sin(heading), x + np.cos(heading)
        stroke = np.zeros((SIZE, SIZE), bool)
        for (y0, x0), (y1, x1) in zip(points, points[1:]):
            rr, cc = draw.line(int(round(y0)), int(round(x0)), int(round(y1)), int(round(x1)))
            keep = (rr >= 0) & (rr < SIZE) & (cc >= 0) & (cc < SIZE)
            stroke[rr[keep], cc[keep]] = True
        if rng.random() < 0.5:  # 3 px wide instead of 1 (scipy dilates until nothing changes when iterations < 1)
            stroke = ndimage.binary_dilation(stroke, iterations=1)
        out[stroke] = level
    return out


def void(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An elliptic region emptied to one flat dark grey."""
    cy, cx = _centre(rng)
    rr, cc = draw.ellipse(cy, cx, rng.uniform(5, 12), rng.uniform(5, 12), shape=(SIZE, SIZE), rotation=rng.uniform(0, np.pi))
    out = image.copy()
    out[rr, cc] = rng.uniform(0.0, 0.12)
    return out


def tear(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A band (on one side of a straight cut) whose pixels are shifted along the cut."""
    cy, cx = _centre(rng, margin=30)
    angle = rng.uniform(0, np.pi)
    length, width, shift = rng.uniform(30, 60), rng.uniform(8, 16), rng.uniform(3, 7)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    band = (np.abs(along) < length / 2) & (across >= 0) & (across < width)
    source_y, source_x = yy - shift * np.sin(angle), xx - shift * np.cos(angle)  # read from `shift` px back along the cut
    out = image.copy()
    for channel in range(3):
        moved = ndimage.map_coordinates(image[..., channel], [source_y, source_x], order=1, mode="reflect")
        out[..., channel] = np.where(band, moved, image[..., channel])
    return out


DRAW = {"thread": thread, "void": void, "tear": tear}


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
                    normal = normal_image(photos[category], rng, split)
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
            cache_dir = default_cache_dir()
        return generate(dataset_root(Path(cache_dir).expanduser()))
