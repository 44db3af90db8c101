"""Tests for keras_drnet.subtask: the SubtaskModel (DRNet sec. 3.2, 4.2).

The sub-task network runs the original network with the CCIV's channels
switched off and a masked softmax over the sub-task's classes. Every
expected output here is computed by hand from the *original* model (its
layers run one by one, ReLU outputs multiplied by the mask, then a numpy
masked softmax: `_subtask_models.py`), with hand-made CIVs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import _subtask_models as sm
import keras_drnet as kd
from keras_drnet.civ import gate_layout
from keras_drnet.civ import model_fingerprint

NAMES = sm.NAMES
MODELS = {
    "chain_softmax": lambda: sm.chain_cnn("softmax"),
    "chain_logits": lambda: sm.chain_cnn("logits"),
    "bn_relu_softmax": lambda: sm.bn_relu_cnn("softmax"),
    "bn_relu_logits": lambda: sm.bn_relu_cnn("logits"),
}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in MODELS.items()}


@pytest.fixture(scope="module")
def x():
    return sm.images(np.random.default_rng(1), n=6)


@pytest.fixture
def chain(models):
    """The softmax chain CNN, its hand-made CIVs, and a cat/dog sub-task."""
    model = models["chain_softmax"]
    civs = sm.hand_civs(model, np.random.default_rng(2))
    sub = kd.subtask(model, civs, ["cat", "dog"], threshold=0.6)
    return model, civs, sub


def expected(model, sub, x):
    """Masked softmax of the original model with the sub-task's channels."""
    logits = sm.reference_logits(model, x, sm.source_masks(sub))
    return sm.masked_softmax(logits, sub.cciv.classes)


def original_probabilities(model, x):
    out = keras.ops.convert_to_numpy(model(x, training=False))
    if model.name.endswith("logits"):
        out = keras.ops.convert_to_numpy(keras.ops.softmax(out))
    return out


# ---------------------------------------------------------------------------
# All channels: the masked softmax of the original model.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep_all", [{"threshold": 0.0}, {"budget": 1.0}],
                         ids=["threshold0", "budget1"])
@pytest.mark.parametrize("name", ["chain_softmax", "chain_logits"])
def test_all_channels_give_the_original_softmax_restricted_to_live_classes(
    models, x, name, keep_all
):
    model = models[name]
    civs = sm.hand_civs(model, np.random.default_rng(3))
    sub = kd.subtask(model, civs, ["dog", "frog", "ship"], **keep_all)
    assert sub.cciv.kept_fraction == 1.0
    got = sub.predict(x, verbose=0)
    want = sm.restricted(original_probabilities(model, x), [1, 3, 4])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # The restriction matters: the original puts mass on the other classes.
    assert original_probabilities(model, x)[:, [0, 2]].sum(1).min() > 1e-3


@pytest.mark.parametrize("name", ["bn_relu_softmax", "bn_relu_logits"])
def test_all_channels_with_batchnorm_and_softmax_layer_match_the_original(
    models, x, name
):
    model = models[name]
    civs = sm.hand_civs(model, np.random.default_rng(3))
    sub = kd.subtask(model, civs, ["cat", "ship"], budget=1.0)
    np.testing.assert_allclose(
        sub.predict(x, verbose=0),
        sm.restricted(original_probabilities(model, x), [0, 4]),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------
# Masked softmax.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "classes", [["cat"], ["dog", "bird"], ["cat", "frog", "ship"], NAMES]
)
def test_masked_probabilities_are_zero_outside_and_sum_to_one_inside(
    chain, x, classes
):
    _, _, sub = chain
    sub.set_classes(classes)
    p = sub.predict(x, verbose=0)
    live = [NAMES.index(c) for c in classes]
    dead = [i for i in range(len(NAMES)) if i not in live]
    assert np.all(p[:, dead] == 0.0)
    np.testing.assert_allclose(p[:, live].sum(axis=1), 1.0, atol=1e-6)
    assert np.all(p[:, live] > 0.0)


def test_call_and_predict_agree(chain, x):
    _, _, sub = chain
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sub(x)), sub.predict(x, verbose=0),
        atol=1e-6,
    )


# ---------------------------------------------------------------------------
# Gating equals zeroing the channels in the original model.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    "combine",
    [
        dict(classes=["cat", "dog"], threshold=0.6),
        dict(classes=["bird", "frog"], method="xor", threshold=0.3),
        dict(classes=["cat", "dog", "ship"], budget=0.4, empty_gates="allow"),
    ],
    ids=["union", "xor", "budget_allow"],
)
def test_gating_equals_zeroing_the_channels_in_the_original(
    models, x, name, combine
):
    model = models[name]
    civs = sm.hand_civs(model, np.random.default_rng(4))
    sub = kd.subtask(model, civs, **combine)
    assert 0.0 < sub.cciv.kept_fraction < 1.0
    want = expected(model, sub, x)
    # The mask changes the output: this test can tell gated from ungated.
    unmasked = sm.masked_softmax(
        sm.reference_logits(model, x), sub.cciv.classes
    )
    assert np.abs(want - unmasked).max() > 1e-3
    np.testing.assert_allclose(sub.predict(x, verbose=0), want, atol=1e-6)


def test_gates_hold_the_cciv_per_gate_masks(chain):
    _, _, sub = chain
    per_gate = sub.cciv.per_gate()
    for spec in kd.list_gates(sub.gated_model):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(spec.layer.gate), per_gate[spec.name]
        )


def test_select_conv_civs_gate_only_the_conv_channels(models, x):
    model = models["chain_softmax"]
    layout = gate_layout(kd.inject_gates(model, select="conv"))
    assert [e.source for e in layout] == ["conv1", "conv2"]
    vectors = np.random.default_rng(5).uniform(0, 1, (len(NAMES), 10))
    civs = kd.CIVs(
        vectors, NAMES, [3] * 5, layout, model_fingerprint(model),
        {"select": "conv"},
    )
    sub = kd.subtask(model, civs, ["cat", "bird"], threshold=0.5)
    assert [s.source for s in kd.list_gates(sub.gated_model)] == [
        "conv1",
        "conv2",
    ]
    np.testing.assert_allclose(
        sub.predict(x, verbose=0), expected(model, sub, x), atol=1e-6
    )


def test_building_a_subtask_leaves_the_original_model_unchanged(models, x):
    model = models["chain_logits"]
    before = keras.ops.convert_to_numpy(model(x))
    weights = [w.copy() for w in model.get_weights()]
    civs = sm.hand_civs(model, np.random.default_rng(6))
    kd.subtask(model, civs, ["cat"], threshold=0.9)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Switching sub-tasks.
# ---------------------------------------------------------------------------


def test_set_classes_does_not_retrace(chain, x):
    model, _, sub = chain
    traces = []

    @tf.function
    def run(images):
        traces.append(1)
        return sub(images)

    first = run(x).numpy()
    first_want = expected(model, sub, x)
    sub.set_classes(["bird", "frog", "ship"])
    second = run(x).numpy()
    assert len(traces) == 1
    np.testing.assert_allclose(first, first_want, atol=1e-6)
    assert np.all(first[:, 2:] == 0.0)
    assert np.all(second[:, :2] == 0.0)
    np.testing.assert_allclose(second, expected(model, sub, x), atol=1e-6)


def test_predict_after_set_classes_reflects_the_new_classes(chain, x):
    model, _, sub = chain
    first = sub.predict(x, verbose=0)
    old_mask = sub.cciv.mask.copy()
    sub.set_classes(["frog", "ship"])
    second = sub.predict(x, verbose=0)
    assert not np.array_equal(old_mask, sub.cciv.mask)
    assert np.all(second[:, :3] == 0.0) and np.all(first[:, 2:] == 0.0)
    np.testing.assert_allclose(second, expected(model, sub, x), atol=1e-6)
    assert sub.live_class_names == ["frog", "ship"]
    assert set(sub.predict_class_names(x)) <= {"frog", "ship"}


def test_set_classes_with_a_budget_replaces_the_threshold(chain):
    _, civs, sub = chain
    sub.set_classes(["cat", "bird"], budget=0.5)
    want = kd.combine(civs, ["cat", "bird"], budget=0.5)
    np.testing.assert_array_equal(sub.cciv.mask, want.mask)
    assert sub.budget == 0.5 and sub.threshold is None
    # Arguments left out keep their values: still a budget of 0.5.
    sub.set_classes(["dog", "ship"])
    np.testing.assert_array_equal(
        sub.cciv.mask, kd.combine(civs, ["dog", "ship"], budget=0.5).mask
    )


def test_set_classes_can_switch_to_xor(chain, x):
    model, civs, sub = chain
    sub.set_classes(["cat", "frog"], method="xor", threshold=0.3)
    want = kd.combine(civs, ["cat", "frog"], "xor", threshold=0.3)
    np.testing.assert_array_equal(sub.cciv.mask, want.mask)
    np.testing.assert_allclose(
        sub.predict(x, verbose=0), expected(model, sub, x), atol=1e-6
    )


def test_failed_set_classes_leaves_the_subtask_unchanged(chain, x):
    _, _, sub = chain
    before = sub.predict(x, verbose=0)
    mask = sub.cciv.mask.copy()
    with pytest.raises(ValueError, match="Did you mean 'frog'"):
        sub.set_classes(["cat", "frgo"])
    with pytest.raises(ValueError, match="exactly two classes"):
        sub.set_classes(["cat", "dog", "bird"], method="xor")
    assert sub.live_class_names == ["cat", "dog"]
    np.testing.assert_array_equal(sub.cciv.mask, mask)
    np.testing.assert_array_equal(sub.predict(x, verbose=0), before)


def test_class_names_and_predicted_names(chain, x):
    model, _, sub = chain
    assert sub.class_names == NAMES
    assert sub.live_class_names == ["cat", "dog"]
    want = [NAMES[i] for i in expected(model, sub, x).argmax(-1)]
    assert sub.predict_class_names(x) == want


# ---------------------------------------------------------------------------
# Saving and serving.
# ---------------------------------------------------------------------------


def test_savedmodel_serves_the_masked_probabilities(chain, x, tmp_path):
    model, _, sub = chain
    sub.set_classes(["dog", "bird", "ship"])
    want = sub.predict(x, verbose=0)  # builds the model (see next test)
    path = str(tmp_path / "served")
    sub.export(path, verbose=False)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), want,
                               atol=1e-6)
    np.testing.assert_allclose(want, expected(model, sub, x), atol=1e-6)
    # Any batch size.
    np.testing.assert_allclose(
        served.serve(tf.constant(x[:1])).numpy(), want[:1], atol=1e-6
    )


def test_export_works_right_after_subtask(chain, x, tmp_path):
    # `subtask()` returns a ready model: exporting it must not need a call.
    _, _, sub = chain
    path = str(tmp_path / "served")
    sub.export(path, verbose=False)
    served = tf.saved_model.load(path)
    np.testing.assert_allclose(
        served.serve(tf.constant(x)).numpy(), sub.predict(x, verbose=0),
        atol=1e-6,
    )


def test_savedmodel_endpoints_name_the_columns(chain, x, tmp_path):
    _, _, sub = chain
    sub.set_classes(["ship", "cat"])
    sub.predict(x, verbose=0)
    path = str(tmp_path / "served")
    sub.export(path, verbose=False)
    served = tf.saved_model.load(path)
    names = [n.decode() for n in served.class_names().numpy()]
    assert names == NAMES
    assert sorted(served.live_classes().numpy().tolist()) == [0, 4]
    assert served.live_classes().dtype == tf.int32


def test_keras_file_round_trip_gives_equal_outputs(chain, x, tmp_path):
    _, _, sub = chain
    path = str(tmp_path / "sub.keras")
    sub.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, kd.SubtaskModel)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), sub.predict(x, verbose=0), atol=1e-6
    )
    assert loaded.live_class_names == ["cat", "dog"]


def test_keras_file_carries_the_civs_for_set_classes(chain, x, tmp_path):
    _, civs, sub = chain
    path = str(tmp_path / "sub.keras")
    sub.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.civs.vectors, civs.vectors)
    for target in (loaded, sub):
        target.set_classes(["bird", "frog", "ship"], threshold=0.7)
    np.testing.assert_array_equal(loaded.cciv.mask, sub.cciv.mask)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), sub.predict(x, verbose=0), atol=1e-6
    )


def test_loaded_subtask_reports_the_saved_cciv(chain, tmp_path):
    _, _, sub = chain
    path = str(tmp_path / "sub.keras")
    sub.save(path)
    loaded = keras.models.load_model(path)
    # The CCIV seen by `evaluate_subtask` (running channels, per-gate
    # counts) must be the one the gates hold.
    np.testing.assert_array_equal(loaded.cciv.mask, sub.cciv.mask)
    gates = np.concatenate(
        [
            keras.ops.convert_to_numpy(s.layer.gate)
            for s in kd.list_gates(loaded.gated_model)
        ]
    )
    np.testing.assert_array_equal(loaded.cciv.mask, gates)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


def test_civs_of_another_model_are_refused(models):
    model = models["chain_softmax"]
    twin = sm.chain_cnn("softmax", seed=1)  # same architecture, new weights
    civs = sm.hand_civs(twin, np.random.default_rng(0))
    assert civs.layout == gate_layout(kd.inject_gates(model))
    with pytest.raises(ValueError, match="another model.*dissect"):
        kd.subtask(model, civs, ["cat", "dog"], threshold=0.5)


def test_civs_of_the_same_weights_in_a_fresh_copy_are_accepted(models, x):
    model = models["chain_softmax"]
    civs = sm.hand_civs(model, np.random.default_rng(0))
    copy = sm.chain_cnn("softmax", seed=1)
    copy.set_weights(model.get_weights())
    sub = kd.subtask(copy, civs, ["cat", "dog"], threshold=0.5)
    assert sub.live_class_names == ["cat", "dog"]


@pytest.mark.parametrize(
    "civs", [None, {"vectors": []}, "civs.npz"], ids=["none", "dict", "path"]
)
def test_non_civs_argument_is_refused(models, civs):
    with pytest.raises(TypeError, match="must be `keras_drnet.CIVs`.*dissect"):
        kd.subtask(models["chain_softmax"], civs, ["cat"], threshold=0.5)


def test_raw_civ_array_is_refused(models):
    model = models["chain_softmax"]
    civs = sm.hand_civs(model, np.random.default_rng(0))
    with pytest.raises(TypeError, match="ndarray"):
        kd.subtask(model, civs.vectors, ["cat"], threshold=0.5)


def test_civs_with_another_select_layout_are_refused(models):
    model = models["chain_softmax"]
    civs = sm.hand_civs(model, np.random.default_rng(0))
    civs = kd.CIVs(
        civs.vectors, NAMES, civs.counts, civs.layout, civs.fingerprint,
        {"select": "conv"},
    )
    with pytest.raises(ValueError, match="do not match the CIVs' layout"):
        kd.subtask(model, civs, ["cat"], threshold=0.5)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(classes=["cat", "dgo"], threshold=0.5), "Did you mean 'dog'"),
        (dict(classes=["cat", 0], threshold=0.5), "more than once"),
        (dict(classes=[], threshold=0.5), "is empty"),
        (dict(classes=["cat"]), "exactly one of `threshold`"),
        (dict(classes=["cat"], threshold=0.5, budget=0.5), "exactly one of"),
        (dict(classes=["cat"], budget=0.0), r"in \(0, 1\]"),
        (dict(classes=["cat"], budget=1.5), r"in \(0, 1\]"),
        (dict(classes=["cat"], method="xor", threshold=0.5), "exactly two"),
    ],
    ids=["unknown", "duplicate", "empty", "neither", "both", "budget0",
         "budget1.5", "xor1"],
)
def test_subtask_refuses_bad_classes_and_settings(models, kwargs, error):
    model = models["chain_softmax"]
    civs = sm.hand_civs(model, np.random.default_rng(0))
    with pytest.raises(ValueError, match=error):
        kd.subtask(model, civs, **kwargs)


def test_subtask_refuses_a_class_missing_from_the_civs(models):
    model = models["chain_softmax"]
    civs = sm.hand_civs(
        model, np.random.default_rng(0), counts=[5, 5, 0, 5, 5]
    )
    civs.vectors[2] = np.nan
    with pytest.raises(ValueError, match="'bird' has no CIV.*Dissect"):
        kd.subtask(model, civs, ["cat", "bird"], threshold=0.5)
    sub = kd.subtask(model, civs, ["cat", "dog"], threshold=0.5)
    with pytest.raises(ValueError, match="'bird' has no CIV"):
        sub.set_classes(["bird"])


def test_subtask_refuses_a_non_model():
    civs = sm.hand_civs(sm.chain_cnn(), np.random.default_rng(0))
    with pytest.raises(TypeError, match="Expected a `keras.Model`"):
        kd.subtask("model.keras", civs, ["cat"], threshold=0.5)


def test_gate_budget_scope_survives_set_classes_and_saving(models, tmp_path):
    model = models["chain_softmax"]
    civs = sm.hand_civs(model, np.random.default_rng(3))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5,
                     budget_scope="gate")
    expected = kd.combine(civs, ["cat", "dog"], budget=0.5,
                          budget_scope="gate")
    np.testing.assert_array_equal(sub.cciv.mask, expected.mask)
    sub.set_classes(["bird", "frog"])  # keeps budget and scope
    np.testing.assert_array_equal(
        sub.cciv.mask,
        kd.combine(civs, ["bird", "frog"], budget=0.5,
                   budget_scope="gate").mask,
    )
    path = str(tmp_path / "sub.keras")
    sub.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.budget_scope == "gate"
    np.testing.assert_array_equal(loaded.cciv.mask, sub.cciv.mask)
