"""Tests for keras_drnet.allocate_budget and per-gate budget lists."""

import numpy as np
import pytest

import _compaction_models as cm
import keras_drnet as kd
from keras_drnet.compaction import subtask_costs


@pytest.fixture(scope="module")
def case():
    # Widths 16, 16, 32, 32, 64, 64 and a 64-unit dense layer: the later
    # gates' channels cost far more parameters than the first ones'.
    model = cm.vgg_bn(seed=0)
    civs = cm.hand_civs(model, np.random.default_rng(0))
    return model, civs


def _running_fraction(sub):
    running, _ = subtask_costs(sub)
    return sum(c.running_params for c in running) / sum(
        c.params for c in running)


def test_a_budget_list_keeps_that_fraction_of_every_gate(case):
    model, civs = case
    widths = [e.channels for e in civs.layout]
    fractions = [1.0, 0.5, 0.25, 0.75, 0.1, 0.3, 0.6][: len(widths)]
    cciv = kd.combine(civs, ["c1", "c2"], budget=fractions)
    kept = [int(m.sum()) for m in cciv.per_gate().values()]
    assert kept == [max(1, round(f * w)) for f, w in zip(fractions, widths)]
    with pytest.raises(ValueError, match=f"one fraction per gate.*"
                       f"\\({len(widths)} gates here\\). Received: 2 values"):
        kd.combine(civs, ["c1"], budget=[0.5, 0.5])
    with pytest.raises(ValueError, match="budget"):
        kd.combine(civs, ["c1"], budget=[0.5] * (len(widths) - 1) + [0])


@pytest.mark.parametrize("max_params", [0.05, 0.15, 0.4])
def test_allocation_meets_the_parameter_budget(case, max_params):
    model, civs = case
    fractions = kd.allocate_budget(model, civs, ["c1", "c2"],
                                   max_params=max_params)
    assert len(fractions) == len(civs.layout)
    sub = kd.subtask(model, civs, ["c1", "c2"], budget=fractions)
    got = _running_fraction(sub)
    assert got <= max_params
    assert got > 0.8 * max_params  # the bisection uses the budget


def test_cheap_gates_keep_more_with_a_larger_exponent(case):
    model, civs = case
    uniform = kd.allocate_budget(model, civs, ["c1", "c2"], max_params=0.15,
                                 exponent=0.0)
    assert np.ptp(uniform) < 0.05  # one fraction (up to rounding clips)
    skewed = kd.allocate_budget(model, civs, ["c1", "c2"], max_params=0.15,
                                exponent=1.5)
    # Same size, other shape: the first gate (3 input channels) is the
    # cheapest; the last conv's channels each feed 16 inputs of fc1, the
    # most expensive.
    assert skewed[0] > uniform[0] and skewed[5] < uniform[5]
    assert skewed[0] >= skewed[2] >= skewed[5]


def test_flops_budget(case):
    model, civs = case
    fractions = kd.allocate_budget(model, civs, ["c1", "c2"], max_flops=0.2)
    sub = kd.subtask(model, civs, ["c1", "c2"], budget=fractions)
    running, _ = subtask_costs(sub)
    assert sum(c.running_macs for c in running) <= 0.2 * sum(
        c.macs for c in running)


def test_allocation_refuses_bad_input(case):
    model, civs = case
    with pytest.raises(ValueError, match="exactly one of `max_params` or "
                       "`max_flops`"):
        kd.allocate_budget(model, civs, ["c1"])
    with pytest.raises(ValueError, match=r"Received: max_params=1.5"):
        kd.allocate_budget(model, civs, ["c1"], max_params=1.5)
    with pytest.raises(ValueError, match="exponent"):
        kd.allocate_budget(model, civs, ["c1"], max_params=0.1,
                           exponent=float("nan"))
    with pytest.raises(ValueError, match="Unknown class name 'c99'"):
        kd.allocate_budget(model, civs, ["c99"], max_params=0.1)


def test_a_per_gate_sub_task_survives_keras_save_and_load(case, tmp_path):
    import keras

    model, civs = case
    fractions = kd.allocate_budget(model, civs, ["c1", "c2"], max_params=0.2)
    sub = kd.subtask(model, civs, ["c1", "c2"], budget=fractions)
    path = str(tmp_path / "sub.keras")
    sub.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.budget == fractions
    x = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3))
    np.testing.assert_allclose(loaded(x), sub(x), atol=1e-6)
