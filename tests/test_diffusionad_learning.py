"""DiffusionAD learns on the embedded synthetic dataset at the smoke scale (in-process, no Ray).

The reconstruction UNet (~0.37 M parameters) and the segmentation U-Net (~0.23 M) are
trained jointly at 64 px (L_noise + L_mask, Eq. 11; half of each batch synthetic, Eq. 12)
on the normal training images of one category; norm-guided one-step inference
(t_s=200, t_b=400, w=1, Eqs. 6-8) and the top-k image score must then separate the
category's hand-made test defects — a kind of defect never synthesised in training —
from good test images, and localise them.

MEASURED
"""

import pytest

from orchestrator.data import list_categories
from orchestrator.training import run_local

CATEGORY = "CAT"


@pytest.mark.slow
def test_diffusionad_smoke_detects_and_localises_synthetic_defects(cache_dir):
    assert CATEGORY in list_categories("synthetic", None, cache_dir=cache_dir)
    result = run_local(method="diffusionad", categories=[CATEGORY], scale="smoke", dataset="synthetic", cache_dir=cache_dir, seed=0)
    test, val = result.test[CATEGORY], result.val[CATEGORY]
    # Detection of real (not synthetic) defects the model never saw in training; an
    # untrained or broken model stays near 0.5.
    assert test.image_auroc >= 0.9, test
    # Localisation sanity: the segmentation map is informative at pixel level.
    assert test.pixel_auroc >= PIX, test
    assert result.train_seconds > 0 and result.predict_seconds > 0
