"""The DRDC search spaces load, every row / grid point / Optuna bound resolves to a valid
DRDC config at both scales, and their ``paper:`` numbers are the paper's (Tables 2, 3, 5)."""

import pytest

from orchestrator.config import resolve_method_config
from orchestrator.search_space import load

SPACES = ("drdc_conditions", "drdc_fusion", "drdc_gamma")

# DRDC Table 5 (MVTec AD, unified): (image AUROC, pixel AUROC) per row; the final model
# is the last column. UniAD (the base model alone): Tables 2-3 averages.
TABLE5 = {
    "w/o model condition": (97.74, 98.02),
    "w/o test-time condition": (98.00, 97.82),
    "w/o spatio-temporal fusion": (97.80, 97.98),
    "+ multi-scale base heatmap": (97.56, 97.69),
    "final": (98.45, 98.05),
}


def points(space):
    if space.search == "optuna":
        out = [dict(p) for p in space.points_to_evaluate]
        for axis in space.axes:  # both ends of every range
            out += [{axis.name: v} for v in axis.values]
        return out
    return space.grid_points()


@pytest.mark.parametrize("scale", ["smoke", "paper"])
@pytest.mark.parametrize("name", SPACES)
def test_every_point_resolves_to_a_valid_config(name, scale):
    space = load(name)
    assert space.method == "drdc"
    for point in points(space):
        config = resolve_method_config("drdc", scale, space.fixed, point)
        for key, value in point.items():
            got = getattr(config, key)
            got = getattr(got, "value", got)
            assert got == (tuple(value) if isinstance(value, list) else value), (name, point)


def test_conditions_rows_are_table5():
    space = load("drdc_conditions")
    rows = space.paper["rows"]
    assert rows[space.default_label]["mvtec_ad"] == {"det": TABLE5["final"][0], "pixel_auroc": TABLE5["final"][1]}
    for row, (det, pix) in TABLE5.items():
        if row != "final":
            assert rows[row]["mvtec_ad"] == {"det": det, "pixel_auroc": pix}
    assert rows["base model only (gamma=0)"]["mvtec_ad"] == {"det": 96.5, "pixel_auroc": 96.8}  # UniAD, Tables 2-3
    # Each Table 5 row switches exactly the module its column removes (or adds).
    assert space.condition("w/o model condition") == {"model_condition": False}
    assert space.condition("w/o test-time condition") == {"test_time_condition": False}
    assert space.condition("w/o spatio-temporal fusion") == {"fusion": "none"}
    assert space.condition("+ multi-scale base heatmap") == {"multiscale_base": True}


def test_fusion_and_gamma_paper_numbers():
    fusion = load("drdc_fusion").paper["rows"]
    assert fusion["spatio-temporal fusion (preset)"]["mvtec_ad"] == {"det": 98.45, "pixel_auroc": 98.05}
    assert fusion["no fusion (final t, l=1)"]["mvtec_ad"] == {"det": 97.80, "pixel_auroc": 97.98}
    gamma = load("drdc_gamma")
    assert gamma.points_to_evaluate[0] == {"gamma": 0.9}  # §5
    assert gamma.paper["rows"]["gamma=0.9"]["mvtec_ad"] == {"det": 98.5, "pixel_auroc": 98.1}  # Tables 2-3 "Ours"
