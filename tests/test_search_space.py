"""Search spaces: every shipped file loads; bad files fail with a message naming the problem."""

import pytest

from orchestrator import search_space as spaces
from orchestrator.config import resolve_method_config
from orchestrator.errors import ConfigError


@pytest.mark.parametrize("name", spaces.available())
def test_every_shipped_space_loads_and_has_a_valid_default(name):
    space = spaces.load(name)
    assert space.metric.startswith("val_"), "tuning must optimise a validation metric"
    resolve_method_config(space.method, space.scale, space.fixed)
    assert space.grid_points() or space.search == "optuna"


def test_shipped_transfusion_spaces_exist():
    for name in ("steps", "schedule", "inputs", "losses", "final_mask", "lambda"):
        assert f"transfusion_{name}" in spaces.available()


def base(**extra):
    raw = {"method": "transfusion", "axes": {"steps": {"grid": [5, 10]}}}
    raw.update(extra)
    return raw


def test_grid_points_are_the_cartesian_product():
    space = spaces.parse("t", base(axes={"steps": {"grid": [5, 10]}, "epochs": {"grid": [1, 2, 3]}}))
    assert len(space.grid_points()) == 6
    assert {"steps": 10, "epochs": 3} in space.grid_points()


def test_conditions_start_with_the_default_row():
    space = spaces.parse("t", {"method": "transfusion", "default_label": "full", "conditions": [{"name": "short", "set": {"steps": 5}}]})
    assert space.condition_names() == ["full", "short"]
    assert space.condition("short") == {"steps": 5} and space.condition("full") == {}


@pytest.mark.parametrize(
    "raw, message",
    [
        (base(metric="test_image_auroc"), "validation metric"),
        (base(axes={"stepz": {"grid": [1]}}), "stepz"),
        (base(axes={"steps": {"normal": [1, 2]}}), "exactly one of"),
        (base(search="optuna", axes={"steps": {"int": [10, 5]}}), "low < high"),
        (base(search="random"), "grid or optuna"),
        (base(colour="red"), "unknown key"),
        ({"method": "nope"}, "method must be one of"),
        ({"method": "transfusion"}, "exactly one of 'axes' or 'conditions'"),
        (base(axes={"steps": {"uniform": [1, 2]}}), "grid search takes only"),
    ],
)
def test_invalid_spaces_fail_clearly(raw, message):
    with pytest.raises(ConfigError, match=message):
        spaces.parse("bad", raw, "bad.yaml")


def test_unknown_ablation_lists_valid_ones():
    with pytest.raises(ConfigError) as err:
        spaces.load("no_such_ablation")
    assert "transfusion_steps" in str(err.value)
