"""Data path benchmark: one epoch of decoding PNGs vs one epoch from the .npy cache.

    python -m bench.data_loading [--images 200] [--size 256] [--repeats 3]

Builds a category of ``--images`` training PNGs at ``--size``² (crops of scikit-image's
photos, default PNG compression like MVTec AD) in a temporary folder, then times one
epoch of each path, as a trial sees it:

* decode: open + decode + resize each PNG (the loader's own ``load_image``), then scale
  to [-1, 1];
* cached: ``load_category`` on an already-prepared cache (memory-mapped .npy), then
  scale to [-1, 1], in batches of 16.

Prints the median over ``--repeats`` epochs of each and their ratio (goal: >= 10x).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.data import Preprocess, load_category, to_unit_range
from orchestrator.data.images import load_image

BATCH = 16


def build_category(root: Path, n_train: int, size: int) -> Path:
    """<root>/bench/{train/good, test/good}: n_train + 4 RGB PNGs of size² pixels."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), np.stack([skdata.brick()] * 3, -1)]
    rng = np.random.default_rng(0)
    folder = root / "bench"
    for split, count in (("train", n_train), ("test", 4)):
        (folder / split / "good").mkdir(parents=True)
        for i in range(count):
            photo = photos[i % len(photos)]
            side = int(rng.integers(size // 2, min(photo.shape[:2]) + 1))
            top, left = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
            crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
            crop.save(folder / split / "good" / f"{i:03d}.png")
    return root


def decode_epoch(files: list[Path], preprocess: Preprocess) -> float:
    start = time.perf_counter()
    for lo in range(0, len(files), BATCH):
        batch = np.stack([load_image(path, preprocess)[0] for path in files[lo : lo + BATCH]])
        to_unit_range(batch)
    return time.perf_counter() - start


def cached_epoch(root: Path, cache_dir: Path, preprocess: Preprocess) -> float:
    start = time.perf_counter()
    data = load_category("mvtec_ad", "bench", preprocess, root=root, cache_dir=cache_dir, val_fraction=0.01)
    # The cache holds the training images minus the held-out validation normals; scale
    # every cached image once (train + val) so both paths touch the same number of images.
    for images in (data.train_images, data.val_images[: len(data.val_images) // 2]):
        for lo in range(0, len(images), BATCH):
            to_unit_range(images[lo : lo + BATCH])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    preprocess = Preprocess(args.size)

    with tempfile.TemporaryDirectory() as tmp:
        root = build_category(Path(tmp) / "data", args.images, args.size)
        cache_dir = Path(tmp) / "cache"
        files = sorted((root / "bench" / "train" / "good").glob("*.png"))
        start = time.perf_counter()
        load_category("mvtec_ad", "bench", preprocess, root=root, cache_dir=cache_dir, val_fraction=0.01)
        prepare = time.perf_counter() - start

        decode = statistics.median(decode_epoch(files, preprocess) for _ in range(args.repeats))
        cached = statistics.median(cached_epoch(root, cache_dir, preprocess) for _ in range(args.repeats))

    print(f"category: {len(files)} training PNGs at {args.size}x{args.size}; one-time cache preparation {prepare:.2f} s")
    print(f"decode + resize + scale, one epoch (median of {args.repeats}): {decode:.3f} s ({len(files) / decode:.0f} images/s)")
    print(f"cached arrays + scale,   one epoch (median of {args.repeats}): {cached:.4f} s ({len(files) / cached:.0f} images/s)")
    print(f"speed-up: {decode / cached:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
