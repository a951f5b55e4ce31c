"""Refactors leave every model as it was: seeded initial weights (exact), weights after two
training steps and one anomaly map (to float tolerance) equal tests/data/model_fingerprints.json,
recorded before the house-keeping refactors (tests/model_fingerprints.py re-records it when
a change is meant to alter a model)."""

import json

import pytest

from methods import METHODS
from tests import model_fingerprints

RECORDED = json.loads(model_fingerprints.RECORD.read_text())


def test_every_recorded_method_still_exists():
    # A method added later has no fingerprint until someone records one; one removed must
    # leave the record too.
    assert set(RECORDED) <= set(METHODS)


@pytest.mark.parametrize("method", sorted(RECORDED))
def test_the_model_is_the_one_recorded(method):
    now, then = model_fingerprints.fingerprint(method), RECORDED[method]
    assert now["initial"] == then["initial"], "initial state_dict changed"
    assert set(now["trained"]) == set(then["trained"]), "the state_dict's names changed"
    for name, values in then["trained"].items():
        assert now["trained"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
    assert now["map"] == pytest.approx(then["map"], rel=1e-3, abs=1e-4)
    assert now["score"] == pytest.approx(then["score"], rel=1e-3, abs=1e-4)
