"""Evaluation metrics: image AUROC, pixel AUROC, pixel AP and AUPRO (MVTec AD protocol).

AUPRO follows MVTec AD's official evaluation (``mvtec_ad_evaluation``, ``compute_pro``
and ``trapezoid``; Bergmann et al., IJCV 2021, Sec. 5.2):

* every ground-truth mask is split into 8-connected components ("regions");
* at a threshold t a pixel is positive when its score >= t;
  FPR(t) = positive normal pixels / all normal pixels of all test images (good images
  included); PRO(t) = mean over all regions of all images of the region's positive
  fraction, i.e. the sum over positive anomalous pixels p of 1 / (n_regions * |region(p)|);
* one curve point per distinct score (ties collapsed), the curve starts at (0, 0);
* the curve is integrated with the trapezoid rule up to FPR = ``fpr_limit`` (PRO
  interpolated linearly at exactly that FPR) and divided by ``fpr_limit``.

How it is computed without a loop over thresholds: PRO and TPR change only at the scores
of anomalous pixels, which are also the only thresholds where AP takes a step. So the
anomalous pixels are sorted (argsort, with their
region labels), their cumulative sums taken at the last pixel of each run of equal scores,
and the normal pixels are sorted once (plain sort) to count, by binary search, how many
of them lie at or above each of those scores. Notation (code -> official evaluation):

    t_j                        the distinct scores of anomalous pixels, descending (j = 1..J)
    anomalous_above[j]         anomalous pixels with score >= t_j   (TPR * n_anomalous)
    normal_above[j]            normal pixels with score >= t_j      (FPR(t_j) * n_normal)
    normal_strictly_above[j]   normal pixels with score >  t_j      (FPR just before t_j)
    pro_above[j]               PRO(t_j)

Between t_{j-1} and t_j only normal pixels enter, so the official curve runs horizontally
from (normal_above[j-1], PRO(t_{j-1})) to (normal_strictly_above[j], PRO(t_{j-1})) and then
takes one (tie-collapsed) step to (normal_above[j], PRO(t_j)). Those vertices are the
official curve without the interior points of its horizontal runs, which lie on the
segments joining their neighbours: same polyline, same area, same interpolation at
``fpr_limit``. Counts are exact integers and PRO is a float64 cumulative sum normalised to
end at exactly 1 (the official code casts FPR to float32; on synthetic 60-image categories
its AUPRO and this one differed by ~1e-10).
``evaluate`` shares one sweep between pixel AUROC, pixel AP and AUPRO; ``aupro`` alone
sorts only the normal pixels that can matter below ``fpr_limit`` (:func:`_top_normal_scores`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# scipy and scikit-learn are imported where used: the metric names below are read by the
# command line, which must answer a bad key before these (seconds) load.

logger = logging.getLogger(__name__)

# 8-connectivity inside each image and none across images: labelling the whole
# [N, H, W] stack at once with this structure gives every region of every image its own
# label in one call.
_IN_PLANE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8_CONNECTED[1] = True

AUPRO_FPR_LIMIT = 0.3  # MVTec AD protocol: integrate the PRO curve up to FPR 0.3


@dataclass(frozen=True)
class Metrics:
    """The four detection/segmentation metrics of one test split (all in [0, 1])."""

    image_auroc: float  # ROC AUC of image scores vs image labels
    pixel_auroc: float  # ROC AUC of all pixels' scores vs the ground-truth masks
    aupro: float  # area under the PRO curve up to FPR 0.3, divided by 0.3
    pixel_ap: float  # average precision of all pixels' scores vs the masks

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """``{"<prefix>image_auroc": ..., ...}`` (e.g. prefix ``"test/"`` for MLflow)."""
        return {f"{prefix}{name}": float(value) for name, value in asdict(self).items()}


# --------------------------------------------------------------------------- inputs


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device/dtype) or nested list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()  # bfloat16 has no numpy dtype; float32 holds it exactly
        return tensor.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}") from err


def _scores_array(value: Any, name: str) -> np.ndarray:
    """Scores as float32 (float64 kept as is: down-casting could create new ties)."""
    array = _to_numpy(value, name)
    if array.dtype != np.float64:
        array = array.astype(np.float32, copy=False)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; fix the method's output (NaN has no rank)")
    return array


def _binary_array(value: Any, name: str) -> np.ndarray:
    """{0, 1} (or bool) values as a bool array; anything else is an error, not a cast."""
    array = _to_numpy(value, name)
    if array.dtype != bool:
        if ((array != 0) & (array != 1)).any():
            found = np.unique(array)[:5]
            raise ValueError(f"{name} must contain only 0 and 1, found values {found.tolist()}; binarise it (e.g. mask > 0)")
        array = array != 0
    return array


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ([N, H, W] bool masks, [N, H, W] float scores)."""
    masks_np = _binary_array(masks, "masks")
    maps_np = _scores_array(maps, "maps")
    if masks_np.ndim != 3 or masks_np.shape != maps_np.shape:
        raise ValueError(
            f"masks and maps must both be [N, H, W] with equal shapes, got masks {tuple(masks_np.shape)} "
            f"and maps {tuple(maps_np.shape)}; squeeze channel axes and resize maps to the mask size"
        )
    return masks_np, maps_np


def _require_both_classes(n_normal: int, n_anomalous: int, what: str) -> None:
    if n_anomalous == 0:
        raise ValueError(f"cannot compute {what}: the masks contain no anomalous pixel; evaluate on a split with defective images")
    if n_normal == 0:
        raise ValueError(f"cannot compute {what}: the masks contain no normal pixel; evaluate on a split with normal pixels")


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class _Sweep:
    """Cumulative counts at the distinct anomalous scores t_1 > ... > t_J (module notation).

    anomalous_above, normal_above, normal_strictly_above: [J] int64
    pro_above: [J] float64 (PRO(t_J) == 1 when complete), or None when regions were not
               labelled
    normal_at_end: FPR * n_normal of the curve's last point: n_normal when complete, else
               the normal pixels at or above the lowest threshold the sweep looked at
    complete:  every pixel entered; otherwise only thresholds up to the first curve point
               past an FPR limit (see :func:`_top_normal_scores`)
    """

    anomalous_above: np.ndarray
    normal_above: np.ndarray
    normal_strictly_above: np.ndarray
    pro_above: np.ndarray | None
    normal_at_end: int
    n_normal: int
    n_anomalous: int
    complete: bool


def _top_normal_scores(normal_scores: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, float]:
    """(the normal scores >= cut, cut): cut is the k-th highest normal score with
    k = ceil(fpr_limit * n_normal) + 1. Any threshold above the cut has FPR < fpr_limit and
    the threshold at the cut has FPR > fpr_limit (the +1 keeps that strict under float
    rounding), so the curve up to the limit needs no other normal pixel."""
    n_normal = normal_scores.size
    k = min(n_normal, math.ceil(fpr_limit * n_normal) + 1)
    normal_scores.partition(n_normal - k)  # in place: the caller's array is a fresh copy
    cut = normal_scores[n_normal - k]
    return normal_scores[normal_scores >= cut], cut  # ties at the cut included


def _threshold_sweep(
    masks: np.ndarray, maps: np.ndarray, what: str, with_pro: bool, fpr_limit: float | None = None
) -> _Sweep:
    """Two sorts (normal scores; anomalous scores with their regions), cumulative sums at
    the last pixel of each run of equal anomalous scores, binary search for the normals.

    ``with_pro`` labels the 8-connected regions of each mask (scipy.ndimage.label, 3x3
    ones). ``fpr_limit`` sorts only the normal pixels that matter up to that FPR (about
    that fraction of them) and stops the sweep at the first curve point past it.
    """
    scores = maps.reshape(-1)
    if with_pro:
        from scipy import ndimage

        labels, n_regions = ndimage.label(masks, structure=_IN_PLANE_8_CONNECTED)
        labels = labels.reshape(-1)
        anomalous = labels != 0
    else:
        anomalous = masks.reshape(-1)
    n_anomalous = int(np.count_nonzero(anomalous))
    n_normal = scores.size - n_anomalous
    _require_both_classes(n_normal, n_anomalous, what)

    normal_scores = scores[~anomalous]
    cut = None
    if fpr_limit is not None:
        normal_scores, cut = _top_normal_scores(normal_scores, fpr_limit)
    normal_sorted = np.sort(normal_scores)  # ascending
    del normal_scores
    anomalous_scores = scores[anomalous]
    order = np.argsort(anomalous_scores)[::-1]  # descending; order within ties is irrelevant
    anomalous_scores = anomalous_scores[order]
    # Ties collapsed: threshold t makes every pixel with score >= t positive, so the curve
    # point of a run of equal scores is the one after the run's last pixel.
    run_ends = np.flatnonzero(anomalous_scores[1:] != anomalous_scores[:-1])
    run_ends = np.append(run_ends, anomalous_scores.size - 1)

    pro_above = None
    if with_pro:
        region_sorted = labels[anomalous][order]  # region label of each sorted anomalous pixel
        area = np.bincount(region_sorted, minlength=n_regions + 1).astype(np.float64)
        # 1 / (n_regions * area) per pixel: a fully covered region adds 1 / n_regions.
        pixel_weight = np.zeros(n_regions + 1)
        pixel_weight[1:] = 1.0 / (n_regions * area[1:])
        covered = np.cumsum(pixel_weight[region_sorted])[run_ends]
        # Mathematically covered[-1] == 1; dividing makes it exactly 1 (and nothing above).
        pro_above = covered / covered[-1]

    thresholds = anomalous_scores[run_ends]  # t_j
    if cut is not None:
        # Below the cut the normal counts would be incomplete; those points lie past the limit.
        kept = int(np.count_nonzero(thresholds >= cut))
        run_ends, thresholds = run_ends[:kept], thresholds[:kept]
        pro_above = None if pro_above is None else pro_above[:kept]
    # normal_sorted holds every normal pixel scoring >= any kept t_j, so these are exact.
    normal_above = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="left")
    normal_strictly_above = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="right")
    return _Sweep(
        anomalous_above=run_ends + 1,
        normal_above=normal_above,
        normal_strictly_above=normal_strictly_above,
        pro_above=pro_above,
        normal_at_end=normal_sorted.size,
        n_normal=n_normal,
        n_anomalous=n_anomalous,
        complete=cut is None,
    )


def _pro_vertices(sweep: _Sweep) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro): (0, 0), then per t_j the corner (normal_strictly_above, PRO(t_{j-1})) and
    the point (normal_above, PRO(t_j)), then the end point (normal_at_end, PRO(t_J)), which
    is (1, 1) for a complete sweep; repeated points dropped."""
    assert sweep.pro_above is not None
    count = sweep.pro_above.size
    fpr = np.empty(2 * count + 2)
    pro = np.empty(2 * count + 2)
    fpr[0] = pro[0] = 0.0
    fpr[1:-1:2] = sweep.normal_strictly_above / sweep.n_normal
    pro[1:-1:2] = np.concatenate(([0.0], sweep.pro_above[:-1]))
    fpr[2:-1:2] = sweep.normal_above / sweep.n_normal
    pro[2:-1:2] = sweep.pro_above
    # Past t_J only normal pixels enter: a horizontal run to the end point.
    fpr[-1] = sweep.normal_at_end / sweep.n_normal
    pro[-1] = sweep.pro_above[-1] if count else 0.0
    keep = np.ones(fpr.size, dtype=bool)
    keep[1:] = (np.diff(fpr) != 0) | (np.diff(pro) != 0)
    return fpr[keep], pro[keep]


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under pro(fpr) on [0, fpr_limit], pro linearly interpolated at
    exactly ``fpr_limit`` (official ``trapezoid(x, y, x_max)``). ``fpr`` is non-decreasing
    and its last value is >= ``fpr_limit``."""
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:inside], pro[:inside]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])))
    if x[-1] != fpr_limit:
        # fpr[inside - 1] < limit < fpr[inside]: close the area with a partial trapezoid.
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += 0.5 * (y_limit + y0) * (fpr_limit - x0)
    return float(area)


def _aupro_from_sweep(sweep: _Sweep, fpr_limit: float) -> float:
    fpr, pro = _pro_vertices(sweep)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}; the MVTec AD protocol uses 0.3")
    return fpr_limit


def _roc_auc_from_sweep(sweep: _Sweep) -> float:
    """Area under the tie-collapsed ROC curve (what sklearn computes), as the Mann-Whitney
    statistic: each anomalous pixel scores 1 per normal pixel below it and 1/2 per tie."""
    assert sweep.complete
    at_threshold = np.diff(sweep.anomalous_above, prepend=0)  # anomalous pixels scoring t_j
    normal_below = sweep.n_normal - sweep.normal_above
    normal_tied = sweep.normal_above - sweep.normal_strictly_above
    twice_u = int(np.sum(at_threshold * (2 * normal_below + normal_tied)))  # exact in int64
    return twice_u / (2 * sweep.n_anomalous * sweep.n_normal)


def _average_precision_from_sweep(sweep: _Sweep) -> float:
    """AP = sum_j (R_j - R_{j-1}) P_j over the tie-collapsed thresholds (sklearn's
    definition, no interpolation); thresholds without anomalous pixels add nothing."""
    assert sweep.complete
    at_threshold = np.diff(sweep.anomalous_above, prepend=0)  # R_j - R_{j-1} = this / n_anomalous
    precision = sweep.anomalous_above / (sweep.anomalous_above + sweep.normal_above)
    return float(np.sum(at_threshold * precision) / sweep.n_anomalous)


# --------------------------------------------------------------------------- public API


def image_auroc(labels: Any, scores: Any) -> float:
    """ROC AUC of image scores [N] against image labels [N] (1 = anomalous)."""
    labels_np = _binary_array(labels, "labels").reshape(-1)
    scores_np = _scores_array(scores, "scores").reshape(-1)
    if labels_np.shape != scores_np.shape:
        raise ValueError(f"labels and scores must have the same length, got {labels_np.size} and {scores_np.size}")
    n_anomalous = int(labels_np.sum())
    if n_anomalous in (0, labels_np.size):
        only = "anomalous" if n_anomalous else "normal"
        raise ValueError(f"image AUROC is undefined: all {labels_np.size} images are {only}; evaluate on a split with both classes")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels_np, scores_np))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC AUC of every pixel's score in maps [N, H, W] against masks [N, H, W] {0, 1}."""
    masks_np, maps_np = _pixel_inputs(masks, maps)
    return _roc_auc_from_sweep(_threshold_sweep(masks_np, maps_np, "pixel AUROC", with_pro=False))


def pixel_ap(masks: Any, maps: Any) -> float:
    """Average precision of every pixel's score in maps [N, H, W] against masks [N, H, W]."""
    masks_np, maps_np = _pixel_inputs(masks, maps)
    return _average_precision_from_sweep(_threshold_sweep(masks_np, maps_np, "pixel AP", with_pro=False))


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve (fpr, pro), float64, from (0, 0) to (1, 1), thresholds
    descending, ties collapsed to one point (MVTec AD official evaluation ``compute_pro``;
    Bergmann et al., IJCV 2021, Sec. 5.2).

    Interior points of horizontal runs (thresholds at which only normal pixels change) are
    left out: they lie on the segment between their neighbours, so the polyline is the
    official one with far fewer points (see the module docstring).
    """
    masks_np, maps_np = _pixel_inputs(masks, maps)
    return _pro_vertices(_threshold_sweep(masks_np, maps_np, "the PRO curve", with_pro=True))


def aupro(masks: Any, maps: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to FPR ``fpr_limit`` for masks [N, H, W] {0, 1}
    and maps [N, H, W] (MVTec AD protocol: trapezoid rule, PRO interpolated at exactly
    ``fpr_limit``, area divided by ``fpr_limit``). Builds the curve only up to its first
    point past ``fpr_limit``: the same area as the complete curve, for a third of the sort."""
    fpr_limit = _check_fpr_limit(fpr_limit)
    masks_np, maps_np = _pixel_inputs(masks, maps)
    return _aupro_from_sweep(_threshold_sweep(masks_np, maps_np, "AUPRO", with_pro=True, fpr_limit=fpr_limit), fpr_limit)


def evaluate(labels: Any, scores: Any, masks: Any, maps: Any) -> Metrics:
    """All four metrics of a test split from image labels [N], image scores [N],
    masks [N, H, W] {0, 1} and anomaly maps [N, H, W]; one sweep serves the pixel metrics."""
    image = image_auroc(labels, scores)
    masks_np, maps_np = _pixel_inputs(masks, maps)
    sweep = _threshold_sweep(masks_np, maps_np, "pixel metrics", with_pro=True)
    metrics = Metrics(
        image_auroc=image,
        pixel_auroc=_roc_auc_from_sweep(sweep),
        aupro=_aupro_from_sweep(sweep, AUPRO_FPR_LIMIT),
        pixel_ap=_average_precision_from_sweep(sweep),
    )
    logger.debug("evaluated %d pixels at %d anomalous thresholds: %s", maps_np.size, sweep.anomalous_above.size, metrics)
    return metrics
