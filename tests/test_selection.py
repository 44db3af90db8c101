"""Tests for keras_drnet.selection: the sub-task's settings as one
validated, serialisable object, and its mask (shared by `combine`,
`SubtaskModel` and `export_dynamic`)."""

import numpy as np
import pytest

import keras_drnet as kd
from _hand_civs import SIZES
from _hand_civs import make_civs

def test_selection_equals_the_keywords_and_round_trips():
    civs = make_civs()
    selection = kd.Selection(budget=0.5, budget_scope="model",
                             empty_gates="allow")
    by_object = kd.combine(civs, ["cat", "dog"], selection=selection)
    by_keywords = kd.combine(civs, ["cat", "dog"], budget=0.5,
                             budget_scope="model", empty_gates="allow")
    np.testing.assert_array_equal(by_object.mask, by_keywords.mask)
    assert kd.Selection.from_config(selection.get_config()) == selection
    per_gate = kd.Selection(budget=[0.5] * len(SIZES))
    assert kd.Selection.from_config(per_gate.get_config()) == per_gate


def test_selection_default_scope_is_per_gate():
    civs = make_civs()
    np.testing.assert_array_equal(
        kd.combine(civs, ["cat"], budget=0.5).mask,
        kd.combine(civs, ["cat"], budget=0.5, budget_scope="gate").mask,
    )


def test_selection_replace_swaps_threshold_and_budget():
    selection = kd.Selection(budget=0.3)
    assert selection.replace(threshold=0.1) == kd.Selection(threshold=0.1)
    assert selection.replace(method=None) == selection
    assert kd.Selection(threshold=0.1).replace(budget=0.2).budget == 0.2


@pytest.mark.parametrize(
    "settings, match",
    [
        ({}, "exactly one of"),
        ({"budget": 0.3, "threshold": 0.1}, "exactly one of"),
        ({"budget": 1.5}, "budget"),
        ({"threshold": float("nan")}, "threshold"),
        ({"budget": 0.3, "budget_scope": "layer"}, "budget_scope"),
        ({"budget": 0.3, "method": "and"}, "method"),
        ({"budget": 0.3, "empty_gates": "never"}, "empty_gates"),
    ],
)
def test_selection_refuses_bad_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        kd.Selection(**settings)


def test_combine_refuses_a_selection_and_keywords_together():
    with pytest.raises(ValueError, match="not both"):
        kd.combine(make_civs(), ["cat"], budget=0.5,
                   selection=kd.Selection(budget=0.3))
    with pytest.raises(TypeError, match="Selection"):
        kd.combine(make_civs(), ["cat"], selection={"budget": 0.3})
