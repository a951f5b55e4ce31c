"""Sample anomaly-map images for MLflow: input | anomaly map | ground truth, one PNG each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image


def panel(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, low: float, high: float) -> np.ndarray:
    """[H, 3W, 3] uint8: the image (uint8 [3, H, W]), the map coloured with a fixed
    [low, high] range (so maps of one category compare), the mask in white."""
    rgb = np.transpose(image, (1, 2, 0))
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0, 1)
    heat = (colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)
    gt = np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
    return np.concatenate([rgb, heat, gt], axis=1)


def save_sample_maps(folder: Path, category: str, images: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                     labels: np.ndarray, count: int) -> list[str]:
    """Save up to ``count`` panels (anomalous images first, then normal ones); returns the paths."""
    if count <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    anomalous = np.flatnonzero(labels == 1)
    normal = np.flatnonzero(labels == 0)
    chosen = list(anomalous[: max(1, count - 1)]) + list(normal[:1])
    low, high = float(np.min(maps)), float(np.max(maps))
    paths = []
    for i in chosen[:count]:
        path = folder / f"{category}_{i:03d}_{'anomalous' if labels[i] else 'normal'}.png"
        Image.fromarray(panel(images[i], maps[i], masks[i], low, high)).save(path)
        paths.append(str(path))
    return paths
