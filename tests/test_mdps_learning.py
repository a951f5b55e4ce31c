"""MDPS learns on the embedded synthetic dataset at the smoke scale (in-process, no Ray).

The prior (a ~0.27 M-parameter UNet, 40 epochs at 64 px) is trained on the normal
`washer` images only; masked posterior sampling must then separate defective from good
test images and localise the defects. About 2-3 minutes on 2 CPU cores.
"""

import pytest

from orchestrator.data import list_categories
from orchestrator.local import run_local

CATEGORY = "washer"


@pytest.mark.slow
def test_mdps_smoke_detects_and_localises_synthetic_defects(cache_dir):
    assert CATEGORY in list_categories("synthetic", None, cache_dir=cache_dir)
    result = run_local(method="mdps", categories=[CATEGORY], scale="smoke", dataset="synthetic", cache_dir=cache_dir, seed=0)
    test, val = result.test[CATEGORY], result.val[CATEGORY]
    # Seed 0 reached image AUROC 0.99 and pixel AUROC 0.96 with a per-image Eq. 20 mask
    # threshold; with the paper's threshold statistics taken over the validation normals
    # (calibrate(), the default since) 0.93 and 0.79. A prior that does not learn, or a
    # sampler that copies the defects, stays near 0.5.
    assert test.image_auroc >= 0.85, test
    assert test.pixel_auroc >= 0.75, test
    assert val.image_auroc >= 0.7, val  # synthetic validation anomalies, a different kind of defect
    assert result.train_seconds > 0 and result.predict_seconds > 0
