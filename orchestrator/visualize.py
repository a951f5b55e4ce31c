"""Sample anomaly-map images for MLflow: input | anomaly map | ground truth, one PNG each."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

from orchestrator.storage import Storage


def panel(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, low: float, high: float) -> np.ndarray:
    """[H, 3W, 3] uint8: the image (uint8 [3, H, W]), the map coloured with a fixed
    [low, high] range (so maps of one category compare), the mask in white."""
    rgb = np.transpose(image, (1, 2, 0))
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    heat = (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)
    gt = np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
    return np.concatenate([rgb, heat, gt], axis=1)


def save_sample_maps(folder: str | Path, category: str, images: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                     labels: np.ndarray, count: int) -> list[str]:
    """Save up to ``count`` panels (anomalous images first, then normal ones) in ``folder``
    (a local folder or an object-store URI); returns their paths."""
    if count <= 0:
        return []
    storage = Storage(folder)
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    chosen = list(anomalous[: max(1, count - 1)]) + list(normal[:1])
    low, high = float(np.min(maps)), float(np.max(maps))
    paths = []
    for i in chosen[:count]:
        name = f"{category}_{i:03d}_{'anomalous' if labels[i] else 'normal'}.png"
        png = io.BytesIO()
        Image.fromarray(panel(images[i], maps[i], masks[i], low, high)).save(png, format="PNG")
        storage.write_bytes(name, png.getvalue())
        paths.append(storage.join(name))
    return paths
