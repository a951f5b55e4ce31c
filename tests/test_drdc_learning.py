"""DRDC learns on the embedded synthetic dataset at the smoke scale (in-process, no Ray).

One unified model (the multi-class setting) is trained on the normal images of all
synthetic categories (brick, gravel, washer) and evaluated per category.

STATUS (not yet passing; see the issue-6 report): measured on a shared, overloaded
2-core machine, seed 0, smoke preset (UNet base 16, 30 epochs, base_lr 3e-3, the
inpainting-consistent Eq. 12 objective): mean test image AUROC 0.74 (brick 0.80,
gravel 0.62, washer 0.80), mean pixel AUROC 0.82; ~145 s training + ~25 s prediction
of single-thread CPU time (wall time not measurable here: load 6-9 on 2 cores). Base
map alone (γ=0) 0.70, diffusion map alone (γ=1) 0.71. The first implementation's
objective gave 0.52. Seed 1 not measured. The 0.85 bar is the task's target.
"""

import pytest

from orchestrator.data import list_categories
from orchestrator.training import run_local


@pytest.mark.slow
def test_drdc_smoke_detects_synthetic_defects_with_one_model(cache_dir):
    categories = list_categories("synthetic", None, cache_dir=cache_dir)
    assert set(categories) == {"brick", "gravel", "washer"}
    result = run_local(method="drdc", categories=categories, scale="smoke", dataset="synthetic", cache_dir=cache_dir, seed=0)
    assert list(result.models) == ["+".join(categories)]  # one model for all categories
    image = {c: result.test[c].image_auroc for c in categories}
    pixel = {c: result.test[c].pixel_auroc for c in categories}
    assert sum(image.values()) / len(image) >= 0.85, image
    assert min(image.values()) >= 0.5, image  # no category left behind
    assert sum(pixel.values()) / len(pixel) >= 0.7, pixel
    assert result.train_seconds > 0 and result.predict_seconds > 0
