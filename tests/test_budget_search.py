"""Tests for keras_drnet.smallest_subtask: the budget search.

The crafted case: an untrained chain CNN, hand-made CIVs, validation labels
equal to the full network's own answers (full-net accuracy 100%), and
budgets over which the drop, computed by brute force with `kd.subtask` and
`kd.evaluate_subtask`, falls monotonically: the smallest budget within a
bound is then known, and the search must find it.
"""

import keras
import numpy as np
import pytest

import _subtask_models as sm
import keras_drnet as kd

BUDGETS = (0.1, 0.8, 0.9, 1.0)


@pytest.fixture(scope="module")
def case():
    model = sm.chain_cnn("logits", seed=0)
    civs = sm.hand_civs(model, np.random.default_rng(0))
    x = np.random.default_rng(10).normal(size=(400,) + sm.INPUT)
    x = x.astype("float32")
    y = np.argmax(keras.ops.convert_to_numpy(model(x))[:, :2], -1)
    drops = []
    for budget in BUDGETS:
        sub = kd.subtask(model, civs, ["cat", "dog"], budget=budget,
                         budget_scope="gate")
        report = kd.evaluate_subtask(sub, (x, y))
        assert report.full_net_accuracy == 1.0
        drops.append(100 * (1.0 - report.sub_net_accuracy))
    # The crafted case's premise: a larger budget never drops more.
    assert drops == sorted(drops, reverse=True) and drops[-1] == 0.0, drops
    assert drops[1] > drops[2] > 0, drops
    return model, civs, x, y, drops


@pytest.mark.parametrize("answer", [1, 2, 3])
def test_search_returns_the_smallest_budget_within_the_bound(case, answer):
    model, civs, x, y, drops = case
    weights = [w.copy() for w in model.get_weights()]
    # A bound halfway between the answer's drop and the next smaller one's.
    max_drop = (drops[answer] + drops[answer - 1]) / 2
    sub, table = kd.smallest_subtask(
        model, civs, ["cat", "dog"], max_drop=max_drop,
        validation_data=(x, y), budgets=BUDGETS, budget_scope="gate",
        verbose=0)
    assert isinstance(sub, kd.SubtaskModel)
    assert sub.budget == BUDGETS[answer]
    assert sub.live_class_names == ["cat", "dog"]
    rows = {row["budget"]: row for row in table}
    assert rows[BUDGETS[answer]]["met"]
    np.testing.assert_allclose(rows[BUDGETS[answer]]["drop"], drops[answer])
    if answer > 0 and BUDGETS[answer - 1] in rows:
        assert not rows[BUDGETS[answer - 1]]["met"]
    # Bisection: fewer sub-tasks built than budgets listed.
    assert len(table) < len(BUDGETS)
    assert [r["budget"] for r in table] == sorted(rows)
    for row in table:
        assert 0 < row["running_params_fraction"] <= 1
        assert row["full_net_accuracy"] == 1.0
    # The user's model is not modified.
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_no_budget_within_the_bound_returns_the_largest_with_a_warning(case):
    model, civs, x, y, drops = case
    # Budgets that all drop: the full network is never reached.
    with pytest.warns(UserWarning, match="No budget up to 0.8"):
        sub, table = kd.smallest_subtask(
            model, civs, ["cat", "dog"], max_drop=drops[1] / 2,
            validation_data=(x, y), budgets=(0.1, 0.8), budget_scope="gate",
            verbose=0)
    assert sub.budget == 0.8 and not table[-1]["met"]


def test_search_with_a_finetune_measures_the_finetuned_model(case):
    model, civs, x, y, _ = case
    small, table = kd.smallest_subtask(
        model, civs, ["cat", "dog"], max_drop=100.0, validation_data=(x, y),
        budgets=(0.8, 1.0), budget_scope="gate",
        finetune={"ds": (x, y), "epochs": 1, "learning_rate": 0.0},
        verbose=0)
    names = small.class_names
    columns = np.array([sm.NAMES.index(n) for n in names])
    predicted = columns[np.asarray(small.predict(x, verbose=0)).argmax(-1)]
    assert table[0]["budget"] == 0.8
    np.testing.assert_allclose(table[0]["accuracy"], np.mean(predicted == y))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_drop=-1.0), ValueError, r"max_drop.*Received: max_drop=-1.0"),
    (dict(max_drop=float("nan")), ValueError, "Received: max_drop=nan"),
    (dict(max_drop="0.5"), TypeError, "Received: max_drop='0.5'"),
    (dict(max_drop=True), TypeError, "Received: max_drop=True"),
    (dict(budgets=(0.5, 0.2)), ValueError, "increasing fractions"),
    (dict(finetune={"epochs": 3}), ValueError, 'at least "ds"'),
    (dict(validation_data=None), ValueError, "`validation_data` is required"),
    (dict(classes=["cat", "bird"]), ValueError, r"no image of \['bird'\]"),
    (dict(max_drop=0.1), ValueError, "needs at least 1000"),
    (dict(repair="yes"), ValueError, r'"auto".*Received: repair=\'yes\''),
])
def test_bad_arguments_are_refused(case, kwargs, error, message):
    model, civs, x, y, _ = case
    arguments = dict(classes=["cat", "dog"], max_drop=0.5,
                     validation_data=(x, y), verbose=0)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        kd.smallest_subtask(model, civs, **arguments)


def _accuracy(small, x, y):
    columns = np.array([sm.NAMES.index(n) for n in small.class_names])
    return float(np.mean(
        columns[np.asarray(small.predict(x, verbose=0)).argmax(-1)] == y))


def test_most_accurate_under_a_size_tries_each_exponent(case):
    model, civs, x, y, _ = case
    sub, table = kd.smallest_subtask(
        model, civs, ["cat", "dog"], validation_data=(x, y),
        max_params=0.3, exponents=(0.0, 1.0, 2.0), verbose=0)
    assert [row["exponent"] for row in table] == [0.0, 1.0, 2.0]
    assert all(row["running_params_fraction"] <= 0.3 for row in table)
    best = max(table, key=lambda row: row["accuracy"])
    report = kd.evaluate_subtask(sub, (x, y))
    assert report.sub_net_accuracy == best["accuracy"]
    assert report.running_params_fraction == best["running_params_fraction"]


def test_search_over_parameter_budgets_with_repair(case):
    model, civs, x, y, drops = case
    small, table = kd.smallest_subtask(
        model, civs, ["cat", "dog"], max_drop=100.0, validation_data=(x, y),
        budgets=(0.2, 0.5), budget_scope="params", repair=x, verbose=0)
    # The bisection's first candidate passes any bound: it is returned.
    assert [row["budget"] for row in table] == [0.2]
    assert table[0]["running_params_fraction"] <= 0.2
    assert small.class_names == ["cat", "dog"]
    np.testing.assert_allclose(table[0]["accuracy"], _accuracy(small, x, y))
    # What kd.repair gives for the same sub-task.
    fractions = kd.allocate_budget(model, civs, ["cat", "dog"],
                                   max_params=0.2)
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=fractions)
    np.testing.assert_allclose(
        small.predict(x[:20], verbose=0),
        kd.repair(sub, x).predict(x[:20], verbose=0), rtol=1e-5, atol=1e-6)


def test_default_search_repairs_on_the_calibration_images(case):
    model, civs, x, y, _ = case
    arguments = dict(max_drop=100.0, validation_data=(x, y), budgets=(0.2,),
                     calibrate=x, verbose=0)
    auto, auto_table = kd.smallest_subtask(model, civs, ["cat", "dog"],
                                           **arguments)
    given, given_table = kd.smallest_subtask(model, civs, ["cat", "dog"],
                                             repair=x, **arguments)
    # The default is parameter budgets and kd.repair on `calibrate`.
    assert isinstance(auto, keras.Model)
    assert not isinstance(auto, kd.SubtaskModel)
    assert auto_table[0]["running_params_fraction"] <= 0.2
    assert auto_table[0]["accuracy"] == given_table[0]["accuracy"]
    np.testing.assert_allclose(auto.predict(x[:20], verbose=0),
                               given.predict(x[:20], verbose=0), atol=1e-6)
    # repair=None turns it off: the calibrated SubtaskModel comes back.
    sub, _ = kd.smallest_subtask(model, civs, ["cat", "dog"], repair=None,
                                 **arguments)
    assert isinstance(sub, kd.SubtaskModel)
    # With a fine-tune, "auto" starts it from the recalibrated compact
    # model, not from a repair (the better start measured on the VGG16).
    # At learning rate 0 the fine-tune returns its start (BatchNorm
    # recomputed on the same images when it starts from compact(sub)).
    tune = {"ds": (x, y), "epochs": 1, "learning_rate": 0.0}
    tuned = {
        name: kd.smallest_subtask(model, civs, ["cat", "dog"], finetune=tune,
                                  **arguments, **repair)[0].predict(
                                      x[:20], verbose=0)
        for name, repair in (("auto", {}), ("none", {"repair": None}),
                             ("repaired", {"repair": x}))}
    np.testing.assert_allclose(tuned["auto"], tuned["none"], atol=1e-5)
    assert np.abs(tuned["auto"] - tuned["repaired"]).max() > 1e-3


def test_non_finite_validation_images_are_refused(case):
    model, civs, x, y, _ = case
    bad = x.copy()
    bad[np.flatnonzero(y < 2)[:3]] = np.nan
    with pytest.raises(ValueError, match="3 of the .* validation images of "
                       "the sub-task's classes have NaN or inf values"):
        kd.smallest_subtask(model, civs, ["cat", "dog"],
                            validation_data=(bad, y), repair=None, verbose=0)
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    with pytest.raises(ValueError, match="images with NaN or inf values"):
        kd.evaluate_subtask(sub, (bad, y))


def test_budgets_as_a_string_and_misspelled_finetune_keys_are_refused(case):
    model, civs, x, y, _ = case
    with pytest.raises(ValueError, match="`budgets` must be increasing "
                       "fractions in \\(0, 1\\].*Received: budgets=0.5"):
        kd.smallest_subtask(model, civs, ["cat", "dog"], budgets="0.5",
                            validation_data=(x, y), verbose=0)
    with pytest.raises(ValueError, match=r"`finetune` has keys \['epoch'\] "
                       "that `keras_drnet.finetune\\(\\)` does not take"):
        kd.smallest_subtask(model, civs, ["cat", "dog"],
                            validation_data=(x, y), verbose=0,
                            finetune={"ds": (x, y), "epoch": 1})
