"""Metrics against an independent per-threshold AUPRO, hand-computed curves and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from orchestrator.metrics import Metrics, aupro, evaluate, image_auroc, pixel_ap, pixel_auroc, pro_curve


# ----------------------------------------------------------------- slow reference


def slow_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct score as a threshold: binarise, per-region overlap, FPR over normals."""
    regions = []  # (image index, bool region mask)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        fprs.append(np.logical_and(positive, normal).sum() / normal.sum())
        pros.append(np.mean([positive[i][region].mean() for i, region in regions]))
    return np.array(fprs), np.array(pros)


def without_horizontal_interiors(fprs: np.ndarray, pros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop points whose PRO equals both neighbours' (they lie on a horizontal segment)."""
    interior = np.zeros(len(pros), dtype=bool)
    interior[1:-1] = (pros[1:-1] == pros[:-2]) & (pros[1:-1] == pros[2:])
    return fprs[~interior], pros[~interior]


def slow_integrate(fprs: np.ndarray, pros: np.ndarray, limit: float) -> float:
    """Walk the curve segment by segment, stop at ``limit`` with a linearly interpolated end."""
    area = 0.0
    for j in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[j - 1], fprs[j], pros[j - 1], pros[j]
        if x0 >= limit:
            break
        if x1 > limit:
            y_end = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_end) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed: int, n_images: int = 5, size: int = 14, levels: int | None = 6) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks with several regions per image, two good images, scores correlated with
    the masks; ``levels`` quantises the scores so that many pixels tie."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n_images, size, size)), sigma=(0, 1.2, 1.2))
    masks = (noise > 0.7 * noise.std()).astype(np.uint8)
    masks[:2] = 0  # good images: they contribute normal pixels only
    maps = masks * 0.8 + rng.normal(scale=0.6, size=masks.shape)
    if levels is not None:
        maps = np.round((maps - maps.min()) / np.ptp(maps) * (levels - 1)) / (levels - 1)
    return masks, maps.astype(np.float32)


# ----------------------------------------------------------------- AUPRO vs reference


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [3, 6, 40, None])
def test_pro_curve_and_aupro_match_slow_reference(seed: int, levels: int | None) -> None:
    masks, maps = random_case(seed, levels=levels)
    regions = sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert regions >= 3 and (masks.reshape(len(masks), -1).max(1) == 0).sum() == 2

    fpr_ref, pro_ref = slow_pro_curve(masks, maps)
    assert len(fpr_ref) == len(np.unique(maps)) + 1  # one point per distinct score, plus (0, 0)
    fpr, pro = pro_curve(masks, maps)
    # The same polyline; pro_curve leaves out the interior points of horizontal runs.
    fpr_kept, pro_kept = without_horizontal_interiors(fpr_ref, pro_ref)
    assert fpr.shape == fpr_kept.shape
    np.testing.assert_allclose(fpr, fpr_kept, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, pro_kept, rtol=0, atol=1e-12)

    for limit in (0.3, 0.05, 0.5, 1.0):
        expected = slow_integrate(fpr_ref, pro_ref, limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-10)
    labels = masks.reshape(len(masks), -1).max(1)
    shared_sweep = evaluate(labels, maps.max(axis=(1, 2)), masks, maps)
    assert shared_sweep.aupro == pytest.approx(slow_integrate(fpr_ref, pro_ref, 0.3), abs=1e-10)


def test_heavy_ties_really_collapse_points() -> None:
    masks, maps = random_case(7, levels=3)
    assert len(np.unique(maps)) == 3
    fpr, pro = pro_curve(masks, maps)
    # Three thresholds: at most three points after (0, 0), however many pixels tie.
    assert 2 <= len(fpr) <= 4
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_continuous_scores_and_signed_zeros_match_slow_reference(dtype: type) -> None:
    masks, maps = random_case(8, levels=None)
    maps = maps.astype(dtype)
    maps.reshape(-1)[np.flatnonzero(masks == 1)[:3]] = 0.0  # anomalous pixels tie with normal ones
    maps.reshape(-1)[::7] = -0.0  # -0.0 and +0.0 are one threshold
    maps.reshape(-1)[::11] = 0.0
    fpr_ref, pro_ref = slow_pro_curve(masks, maps)
    fpr, pro = pro_curve(masks, maps)
    assert len(fpr) < len(fpr_ref)  # horizontal runs left out
    np.testing.assert_allclose(np.array(without_horizontal_interiors(fpr_ref, pro_ref)), np.array([fpr, pro]), atol=1e-12)
    assert aupro(masks, maps) == pytest.approx(slow_integrate(fpr_ref, pro_ref, 0.3), abs=1e-10)


# ----------------------------------------------------------------- hand-computed cases


def test_one_by_four_hand_curve_with_interpolation_at_limit() -> None:
    # pixels:  p0 (region)  p1 (region)  p2 (normal)  p3 (normal)
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.6, 0.1]]], dtype=np.float32)
    fpr, pro = pro_curve(masks, maps)
    # t=0.9: {p0}; t=0.6: +p2 (normal); t=0.4: +p1; t=0.1: everything
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    # Only (0,0) and (0,0.5) lie below FPR 0.3: the whole area comes from the interpolated
    # piece (0, 0.5) -> (0.3, 0.5), so dropping the interpolation would give 0.
    assert aupro(masks, maps) == pytest.approx(0.5 * 0.3 / 0.3)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_three_by_four_hand_curve_with_ties_and_diagonal_region() -> None:
    masks = np.array([[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]])  # regions: diagonal pair, single
    maps = np.array([[[0.9, 0.5, 0.1, 0.1], [0.1, 0.5, 0.1, 0.1], [0.1, 0.1, 0.1, 0.5]]], dtype=np.float32)
    fpr, pro = pro_curve(masks, maps)
    # t=0.9: half of the pair -> PRO (1/2 + 0)/2; t=0.5 (three tied pixels, one normal of
    # nine): both regions full; t=0.1: everything.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 9, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 1, 1])
    expected = (0.5 * (0.25 + 1) * (1 / 9) + 1.0 * (0.3 - 1 / 9)) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected)


def test_diagonal_pixels_are_one_region() -> None:
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # touching at a corner only
    masks[0, 3, 3] = True  # a separate region
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    _, pro = pro_curve(masks, maps)
    # 8-connected: regions {pair, single} -> (1/2 + 0) / 2. With 4-connectivity it would be 1/3.
    assert pro[1] == pytest.approx(0.25)


def test_good_images_count_in_the_fpr_denominator() -> None:
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.6, 0.1]]], dtype=np.float32)
    good_masks = np.concatenate([masks, np.zeros_like(masks)])
    good_maps = np.concatenate([maps, np.zeros_like(maps)])  # four more normal pixels, all lowest
    fpr, pro = pro_curve(good_masks, good_maps)
    # Official points (0,0) (0,.5) (1/6,.5) (1/6,1) (2/6,1) (1,1); (2/6,1) is interior to
    # the final horizontal run and left out.
    np.testing.assert_allclose(fpr, [0, 0, 1 / 6, 1 / 6, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1])
    assert aupro(good_masks, good_maps) == pytest.approx((0.5 * (1 / 6) + 1.0 * (0.3 - 1 / 6)) / 0.3)


def test_limit_exactly_on_a_curve_point_needs_no_interpolation() -> None:
    masks = np.array([[[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]]])  # ten normal pixels
    maps = np.array([[[0.5, 0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]]], dtype=np.float32)
    # FPR 0.1, 0.2, 0.3 with PRO 0, then PRO jumps to 1 at FPR 0.3 (vertical segment).
    assert aupro(masks, maps) == pytest.approx(0.0, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.4) == pytest.approx(0.1 / 0.4)


def test_perfect_map_scores_one_everywhere() -> None:
    masks, _ = random_case(3, levels=None)
    rng = np.random.default_rng(0)
    maps = np.where(masks == 1, 2.0 + rng.random(masks.shape), rng.random(masks.shape)).astype(np.float32)
    labels = masks.reshape(len(masks), -1).max(1)
    result = evaluate(labels, maps.max(axis=(1, 2)), masks, maps)
    assert (result.image_auroc, result.pixel_auroc, result.pixel_ap) == (1.0, 1.0, 1.0)
    assert result == Metrics(image_auroc=1.0, pixel_auroc=1.0, aupro=1.0, pixel_ap=1.0)
    assert aupro(masks, maps) == 1.0


def test_inverted_map_has_zero_aupro() -> None:
    masks, _ = random_case(4, levels=None)
    maps = (1 - masks).astype(np.float32)
    assert aupro(masks, maps) == 0.0
    assert pixel_auroc(masks, maps) == 0.0


# ----------------------------------------------------------------- AUROC / AP


@pytest.mark.parametrize("levels", [4, None])
def test_pixel_auroc_and_ap_match_sklearn(levels: int | None) -> None:
    masks, maps = random_case(11, n_images=6, size=20, levels=levels)
    truth, flat = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(truth, flat), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(truth, flat), abs=1e-12)
    labels = masks.reshape(len(masks), -1).max(1)
    both = evaluate(labels, maps.mean(axis=(1, 2)), masks, maps)
    assert both.pixel_auroc == pytest.approx(roc_auc_score(truth, flat), abs=1e-12)
    assert both.pixel_ap == pytest.approx(average_precision_score(truth, flat), abs=1e-12)
    assert both.image_auroc == pytest.approx(roc_auc_score(labels, maps.mean(axis=(1, 2))))


def test_auroc_and_ap_hand_values() -> None:
    # scores 0.8 (anomalous), 0.6 (normal), 0.6 (anomalous), 0.2 (normal)
    masks = np.array([[[1, 0, 1, 0]]])
    maps = np.array([[[0.8, 0.6, 0.6, 0.2]]], dtype=np.float32)
    # ROC points (0,0), (0,.5), (.5,1), (1,1): area 0.5*0.75 + 0.5*1
    assert pixel_auroc(masks, maps) == pytest.approx(0.875)
    # AP: recall 0.5 at precision 1, then recall 1 at precision 2/3
    assert pixel_ap(masks, maps) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert image_auroc([0, 1, 1, 0], [0.1, 0.7, 0.3, 0.3]) == pytest.approx(0.875)


def test_torch_tensors_and_low_precision_maps_are_accepted() -> None:
    masks, maps = random_case(5, levels=None)
    expected = aupro(masks, maps.astype(np.float32))
    assert aupro(torch.from_numpy(masks).bool(), torch.from_numpy(maps)) == expected
    half = torch.from_numpy(maps).to(torch.bfloat16)
    assert aupro(masks, half) == aupro(masks, half.float().numpy())
    labels = torch.tensor(masks.reshape(len(masks), -1).max(1))
    result = evaluate(labels, torch.from_numpy(maps).amax(dim=(1, 2)), torch.from_numpy(masks), torch.from_numpy(maps))
    assert result.aupro == expected


def test_metrics_as_dict() -> None:
    result = Metrics(image_auroc=0.9, pixel_auroc=0.8, aupro=0.7, pixel_ap=0.6)
    assert result.as_dict("test/") == {"test/image_auroc": 0.9, "test/pixel_auroc": 0.8, "test/aupro": 0.7, "test/pixel_ap": 0.6}
    assert list(result.as_dict()) == ["image_auroc", "pixel_auroc", "aupro", "pixel_ap"]


# ----------------------------------------------------------------- errors


def test_errors_are_one_line_value_errors() -> None:
    masks, maps = random_case(0)
    cases = [
        (lambda: aupro(masks, maps[:, :-1]), "equal shapes"),
        (lambda: aupro(masks[0], maps[0]), r"\[N, H, W\]"),
        (lambda: aupro(np.zeros_like(masks), maps), "no anomalous pixel"),
        (lambda: aupro(np.ones_like(masks), maps), "no normal pixel"),
        (lambda: pixel_auroc(np.zeros_like(masks), maps), "no anomalous pixel"),
        (lambda: pixel_ap(np.ones_like(masks), maps), "no normal pixel"),
        (lambda: aupro(masks, np.where(masks == 1, np.nan, maps)), "NaN"),
        (lambda: aupro(masks * 255, maps), "only 0 and 1"),
        (lambda: aupro(masks, maps, fpr_limit=0.0), "fpr_limit"),
        (lambda: aupro(masks, maps, fpr_limit=1.5), "fpr_limit"),
        (lambda: image_auroc([1, 1, 1], [0.1, 0.2, 0.3]), "all 3 images are anomalous"),
        (lambda: image_auroc([0, 0], [0.1, 0.2]), "all 2 images are normal"),
        (lambda: image_auroc([0, 1], [0.1, float("nan")]), "NaN"),
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), "same length"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("levels", [None, 50])
def test_partial_sweep_of_aupro_equals_the_complete_curve(levels: int | None) -> None:
    # aupro() sorts only the top normal scores; its area must equal integrating the full
    # curve (pro_curve / evaluate) at any limit, ties at the cut included.
    masks, maps = random_case(21, n_images=8, size=64, levels=levels)
    fpr, pro = pro_curve(masks, maps)
    labels = masks.reshape(len(masks), -1).max(1)
    assert aupro(masks, maps) == pytest.approx(evaluate(labels, maps.max(axis=(1, 2)), masks, maps).aupro, abs=1e-14)
    for limit in (0.3, 0.01, 0.2, 0.999, 1.0):
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(slow_integrate(fpr, pro, limit), abs=1e-12)

