"""Tests for keras_drnet.reconstruction: CIVs -> CCIV (DRNet sec. 3.2).

Union set (formula 3): channel j runs iff max_c civ[c, j] >= union_thr.
XOR set (formula 4): channel j runs iff |civ[a, j] - civ[b, j]| >= xor_thr.
A budget keeps the round(budget * total) highest scores, ties broken by
channel order. All CIVs here are made by hand, with values that are exact
in binary so that ties with the threshold are exact.
"""

import warnings

import numpy as np
import pytest

import keras_drnet as kd
from _hand_civs import LAYOUT
from _hand_civs import NAMES
from _hand_civs import SIZES
from _hand_civs import TOTAL
from _hand_civs import expected_budget_mask
from _hand_civs import gate_slices
from _hand_civs import make_civs
from _hand_civs import nonempty_per_gate

# ---------------------------------------------------------------------------
# Formulas.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.375, 0.8125, 0.875])
def test_union_is_max_over_classes_at_or_above_threshold(threshold):
    civs = make_civs()
    classes = ["cat", "bird", "ship"]
    cciv = kd.combine(
        civs, classes, "union", threshold=threshold, empty_gates="allow"
    )
    rows = civs.vectors[[0, 2, 4]]
    expected = (rows.max(axis=0) >= threshold).astype("float32")
    # The threshold hits some scores exactly: ">=" is what is tested.
    assert np.any(rows.max(axis=0) == threshold)
    np.testing.assert_array_equal(cciv.mask, expected)
    np.testing.assert_array_equal(cciv.scores, rows.max(axis=0))
    assert cciv.mask.dtype == np.float32
    assert cciv.method == "union"
    assert cciv.threshold == threshold
    assert cciv.classes == (0, 2, 4)


def test_union_of_one_class_is_its_civ_thresholded():
    civs = make_civs()
    cciv = kd.combine(civs, ["frog"], threshold=0.5, empty_gates="allow")
    np.testing.assert_array_equal(
        cciv.mask, (civs.vectors[3] >= 0.5).astype("float32")
    )


@pytest.mark.parametrize("threshold", [0.125, 0.3125, 0.5])
def test_xor_is_absolute_difference_at_or_above_threshold(threshold):
    civs = make_civs()
    cciv = kd.combine(
        civs, ["dog", "frog"], "xor", threshold=threshold, empty_gates="allow"
    )
    difference = np.abs(civs.vectors[1] - civs.vectors[3])
    assert np.any(difference == threshold)
    np.testing.assert_array_equal(
        cciv.mask, (difference >= threshold).astype("float32")
    )
    np.testing.assert_array_equal(cciv.scores, difference)
    assert cciv.method == "xor"


def test_xor_is_symmetric_in_its_two_classes():
    civs = make_civs()
    a = kd.combine(civs, ["dog", "frog"], "xor", threshold=0.25)
    b = kd.combine(civs, ["frog", "dog"], "xor", threshold=0.25)
    np.testing.assert_array_equal(a.mask, b.mask)


def test_xor_keeps_channels_where_classes_differ_not_where_both_high():
    # Channel 0: both important (union keeps it, XOR drops it);
    # channel 1: only cat; channel 2: only dog; channel 3: neither.
    vectors = np.zeros((len(NAMES), TOTAL))
    vectors[0, :4] = [1.0, 1.0, 0.0, 0.0]
    vectors[1, :4] = [1.0, 0.0, 1.0, 0.0]
    civs = make_civs(vectors)
    xor = kd.combine(civs, ["cat", "dog"], "xor", 0.5, empty_gates="allow")
    union = kd.combine(civs, ["cat", "dog"], "union", 0.5, empty_gates="allow")
    np.testing.assert_array_equal(xor.mask[:4], [0, 1, 1, 0])
    np.testing.assert_array_equal(union.mask[:4], [1, 1, 1, 0])


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75, 0.9, 1.0])
def test_budget_keeps_round_budget_times_total_highest_scores(budget):
    civs = make_civs()
    # Make every gate's first channel the best of all, so no gate is empty.
    vectors = civs.vectors.copy()
    for s in gate_slices():
        vectors[:, s.start] = 2.0 + s.start / 100
    civs = make_civs(vectors)
    cciv = kd.combine(civs, ["cat", "dog"], budget=budget,
                      budget_scope="model")
    scores = vectors[[0, 1]].max(axis=0)
    expected = expected_budget_mask(scores, budget)
    assert nonempty_per_gate(expected)
    assert cciv.mask.sum() == round(budget * TOTAL)
    np.testing.assert_array_equal(cciv.mask, expected)
    assert cciv.kept_fraction == pytest.approx(round(budget * TOTAL) / TOTAL)


def test_budget_breaks_ties_by_channel_order():
    # All 12 scores equal: a budget of 0.5 keeps exactly channels 0..5.
    vectors = np.full((len(NAMES), TOTAL), 0.5)
    civs = make_civs(vectors)
    cciv = kd.combine(civs, ["cat", "dog"], budget=0.5, empty_gates="allow",
                      budget_scope="model")
    np.testing.assert_array_equal(cciv.mask, [1] * 6 + [0] * 6)


def test_budget_ties_at_the_cut_keep_the_earlier_channels():
    # Scores: 0.9 on channels 3 and 10; 0.5 on channels 1, 5, 8, 11; rest 0.
    # A budget of 4/12 keeps both 0.9s and the first two 0.5s (1 and 5).
    vectors = np.zeros((len(NAMES), TOTAL))
    vectors[2, [3, 10]] = 0.9
    vectors[2, [1, 5, 8, 11]] = 0.5
    civs = make_civs(vectors)
    cciv = kd.combine(civs, ["bird"], budget=4 / 12, empty_gates="allow",
                      budget_scope="model")
    np.testing.assert_array_equal(np.flatnonzero(cciv.mask), [1, 3, 5, 10])
    assert cciv.threshold == 0.5


def test_budget_with_xor_ranks_absolute_differences():
    civs = make_civs()
    vectors = civs.vectors
    cciv = kd.combine(
        civs, ["ship", "cat"], "xor", budget=0.5, empty_gates="allow",
        budget_scope="model",
    )
    expected = expected_budget_mask(np.abs(vectors[4] - vectors[0]), 0.5)
    np.testing.assert_array_equal(cciv.mask, expected)


def test_budget_threshold_is_the_lowest_kept_score():
    civs = make_civs(np.random.default_rng(3).uniform(0, 1, (5, TOTAL)))
    cciv = kd.combine(civs, ["cat", "frog"], budget=0.5, empty_gates="allow",
                      budget_scope="model")
    kept = cciv.scores[cciv.mask == 1]
    assert cciv.threshold == pytest.approx(float(kept.min()))
    assert np.all(cciv.scores[cciv.mask == 0] < cciv.threshold)


def test_threshold_zero_keeps_every_channel():
    civs = make_civs()
    cciv = kd.combine(civs, ["cat", "dog"], threshold=0.0)
    np.testing.assert_array_equal(cciv.mask, np.ones(TOTAL))
    assert cciv.kept_fraction == 1.0


# ---------------------------------------------------------------------------
# Classes by name or index.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["union", "xor"])
def test_classes_by_names_and_by_indices_give_the_same_cciv(method):
    civs = make_civs()
    by_name = kd.combine(civs, ["dog", "ship"], method, threshold=0.5)
    by_index = kd.combine(civs, [1, 4], method, threshold=0.5)
    mixed = kd.combine(civs, [np.int64(1), "ship"], method, threshold=0.5)
    for other in (by_index, mixed):
        np.testing.assert_array_equal(by_name.mask, other.mask)
        np.testing.assert_array_equal(by_name.scores, other.scores)
        assert set(other.classes) == {1, 4}


def test_class_order_does_not_change_the_union():
    civs = make_civs()
    a = kd.combine(civs, ["ship", "cat", "dog"], budget=0.5)
    b = kd.combine(civs, ["cat", "dog", "ship"], budget=0.5)
    np.testing.assert_array_equal(a.mask, b.mask)


# ---------------------------------------------------------------------------
# Empty gates.
# ---------------------------------------------------------------------------


def _civs_with_weak_middle_gate():
    # Gate conv2 (channels 3..6) scores at most 0.25, its best channel is 5.
    vectors = np.full((len(NAMES), TOTAL), 0.75)
    vectors[:, 3:7] = [0.0, 0.125, 0.25, 0.0]
    vectors[1, 3:7] = [0.125, 0.0, 0.0, 0.0]
    return make_civs(vectors)


def test_keep_best_keeps_the_best_channel_of_a_gate_that_would_be_empty():
    civs = _civs_with_weak_middle_gate()
    cciv = kd.combine(civs, ["cat", "dog"], threshold=0.5)
    per_gate = cciv.per_gate()
    np.testing.assert_array_equal(per_gate["conv2_gate"], [0, 0, 1, 0])
    np.testing.assert_array_equal(per_gate["conv1_gate"], [1, 1, 1])
    np.testing.assert_array_equal(per_gate["fc1_gate"], [1] * 5)
    assert cciv.mask.sum() == 9


def test_allow_keeps_the_formula_exactly_even_if_a_gate_is_empty():
    civs = _civs_with_weak_middle_gate()
    cciv = kd.combine(civs, ["cat", "dog"], threshold=0.5, empty_gates="allow")
    np.testing.assert_array_equal(
        cciv.mask, (civs.vectors[[0, 1]].max(0) >= 0.5).astype("float32")
    )
    assert not cciv.per_gate()["conv2_gate"].any()


def test_keep_best_adds_one_channel_per_empty_gate_to_a_budget():
    # Scores: conv1 and fc1 high, conv2 all below: a budget of 0.25 (3
    # channels) lands in conv1; conv2 and fc1 each get their best channel.
    vectors = np.zeros((len(NAMES), TOTAL))
    vectors[0] = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.0, 0.5, 0.6, 0.4, 0.55, 0.6]
    civs = make_civs(vectors)
    allow = kd.combine(civs, ["cat"], budget=0.25, empty_gates="allow",
                       budget_scope="model")
    keep = kd.combine(civs, ["cat"], budget=0.25, budget_scope="model")
    np.testing.assert_array_equal(np.flatnonzero(allow.mask), [0, 1, 2])
    # fc1's best is channel 8 (0.6, first of the tie with 11).
    np.testing.assert_array_equal(np.flatnonzero(keep.mask), [0, 1, 2, 5, 8])


def test_keep_best_changes_nothing_when_no_gate_is_empty():
    civs = make_civs()
    allow = kd.combine(civs, ["cat", "dog"], threshold=0.25, empty_gates="allow")
    assert nonempty_per_gate(allow.mask)
    keep = kd.combine(civs, ["cat", "dog"], threshold=0.25)
    np.testing.assert_array_equal(allow.mask, keep.mask)


# ---------------------------------------------------------------------------
# CCIV helpers.
# ---------------------------------------------------------------------------


def test_per_gate_splits_the_mask_in_layout_order():
    civs = make_civs()
    cciv = kd.combine(civs, ["cat", "dog"], threshold=0.5, empty_gates="allow")
    per_gate = cciv.per_gate()
    assert list(per_gate) == ["conv1_gate", "conv2_gate", "fc1_gate"]
    assert [m.size for m in per_gate.values()] == SIZES
    np.testing.assert_array_equal(
        np.concatenate(list(per_gate.values())), cciv.mask
    )
    np.testing.assert_array_equal(np.asarray(cciv), cciv.mask)
    assert cciv.kept_fraction == pytest.approx(cciv.mask.sum() / TOTAL)


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the fix.
# ---------------------------------------------------------------------------


def test_unknown_class_name_suggests_the_closest():
    with pytest.raises(ValueError, match=r"Unknown class name 'dgo'.*Did you mean 'dog'"):
        kd.combine(make_civs(), ["cat", "dgo"], threshold=0.5)


def test_duplicate_classes_are_refused():
    with pytest.raises(ValueError, match=r"same class more than once: \[1\]"):
        kd.combine(make_civs(), ["dog", 1], threshold=0.5)
    with pytest.raises(ValueError, match="more than once"):
        kd.combine(make_civs(), ["cat", "cat"], threshold=0.5)


def test_empty_class_list_is_refused():
    with pytest.raises(ValueError, match="`classes` is empty.*at least one"):
        kd.combine(make_civs(), [], threshold=0.5)


def test_single_class_name_string_is_refused():
    with pytest.raises(TypeError, match=r"list of class names.*\['cat', 'dog'\]"):
        kd.combine(make_civs(), "cat", threshold=0.5)


def test_class_index_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range.*5 classes"):
        kd.combine(make_civs(), [0, 5], threshold=0.5)


def test_class_missing_from_the_civs_is_refused():
    vectors = np.random.default_rng(0).uniform(0, 1, (5, TOTAL))
    vectors[3] = np.nan
    civs = make_civs(vectors, counts=[4, 4, 4, 0, 4])
    with pytest.raises(ValueError, match="'frog' has no CIV.*Dissect a dataset"):
        kd.combine(civs, ["cat", "frog"], threshold=0.5)
    # The other classes still combine.
    assert kd.combine(civs, ["cat", "ship"], threshold=0.5).classes == (0, 4)


@pytest.mark.parametrize(
    "kwargs", [{}, {"threshold": 0.5, "budget": 0.3}], ids=["neither", "both"]
)
def test_exactly_one_of_threshold_and_budget(kwargs):
    with pytest.raises(ValueError, match="exactly one of `threshold`.*`budget`"):
        kd.combine(make_civs(), ["cat", "dog"], **kwargs)


@pytest.mark.parametrize(
    "budget", [0.0, -0.2, 1.01, 5, float("nan"), float("inf"), "0.5", True])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(ValueError, match=r"`budget`.*in \(0, 1\]"):
        kd.combine(make_civs(), ["cat", "dog"], budget=budget)


@pytest.mark.parametrize(
    "threshold", [-0.1, float("nan"), float("inf"), "0.1", [0.1], True])
def test_threshold_that_is_not_a_finite_number_is_refused(threshold):
    with pytest.raises(ValueError, match=r"`threshold` must be a finite "
                       r"number >= 0.*Received: threshold="):
        kd.combine(make_civs(), ["cat", "dog"], threshold=threshold)


@pytest.mark.parametrize("classes", [["cat"], ["cat", "dog", "ship"]])
def test_xor_needs_exactly_two_classes(classes):
    with pytest.raises(ValueError, match="exactly two classes.*method='union'"):
        kd.combine(make_civs(), classes, "xor", threshold=0.5)


def test_unknown_method_and_empty_gates_are_refused():
    with pytest.raises(ValueError, match=r"`method` must be one of \['union', 'xor'\]"):
        kd.combine(make_civs(), ["cat"], "intersection", threshold=0.5)
    with pytest.raises(ValueError, match="`empty_gates` must be one of"):
        kd.combine(make_civs(), ["cat"], threshold=0.5, empty_gates="drop")


def test_non_civs_argument_is_refused_clearly():
    vectors = make_civs().vectors
    with pytest.raises(TypeError, match="CIVs"):
        kd.combine(vectors, ["cat", "dog"], threshold=0.5)


# ---------------------------------------------------------------------------
# A threshold that the paper's top-1 resets make meaningless.
# ---------------------------------------------------------------------------


def _civs_with_resets(policy):
    # "dog": 2 of 20 images reset -> every channel >= 2/20 = 0.1.
    vectors = np.full((len(NAMES), TOTAL), 0.01)
    vectors[1] += 0.1
    return kd.CIVs(vectors, NAMES, [20] * 5, LAYOUT, "fp",
                   {"on_top1_change": policy}, top1_changed=[0, 2, 0, 0, 0])


def test_threshold_below_the_reset_floor_warns():
    with pytest.warns(UserWarning, match=r"2 of the 20 images of class 'dog'"
                      r".*adds 0.1 to every channel.*threshold=0.05"):
        cciv = kd.combine(_civs_with_resets("reset"), ["cat", "dog"],
                          threshold=0.05)
    assert cciv.mask.all()


@pytest.mark.parametrize(
    "policy, classes, threshold",
    [("reset", ["cat", "dog"], 0.2), ("reset", ["cat", "bird"], 0.05),
     ("keep_best", ["cat", "dog"], 0.05), ("exclude", ["cat", "dog"], 0.05)],
)
def test_no_reset_warning_when_resets_do_not_decide(policy, classes, threshold):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kd.combine(_civs_with_resets(policy), classes, threshold=threshold)
        kd.combine(_civs_with_resets(policy), classes, budget=0.5)


# ---------------------------------------------------------------------------
# budget_scope="gate": every gate keeps the fraction of its own channels.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.75, 1.0])
def test_gate_budget_keeps_that_fraction_of_every_gate(budget):
    civs = make_civs()
    cciv = kd.combine(civs, ["cat", "dog"], budget=budget,
                      budget_scope="gate")
    scores = civs.vectors[:2].max(axis=0)
    for span, size in zip(gate_slices(), SIZES):
        keep = max(1, int(round(budget * size)))
        expected = np.zeros(size, "float32")
        expected[np.argsort(-scores[span], kind="stable")[:keep]] = 1.0
        np.testing.assert_array_equal(cciv.mask[span], expected)


def test_gate_budget_does_not_starve_a_gate_with_low_scores():
    vectors = np.zeros((len(NAMES), TOTAL))
    vectors[:, :7] = 0.9  # conv1, conv2 high
    vectors[:, 7:] = np.linspace(0.01, 0.05, 5)  # fc1 low
    civs = make_civs(vectors)
    model_scope = kd.combine(civs, ["cat"], budget=0.5,
                             budget_scope="model")
    gate_scope = kd.combine(civs, ["cat"], budget=0.5, budget_scope="gate")
    assert model_scope.mask[7:].sum() == 1  # only the empty-gate rescue
    np.testing.assert_array_equal(gate_scope.mask[7:], [0, 0, 0, 1, 1])


def test_unknown_budget_scope_is_refused():
    with pytest.raises(ValueError, match="budget_scope.*Received.*'layer'"):
        kd.combine(make_civs(), ["cat"], budget=0.5, budget_scope="layer")
