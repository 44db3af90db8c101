"""Tests for keras_drnet.calibration: mask-aware BatchNorm recalibration.

After calibration, every BatchNormalization layer downstream of a closed
gate must hold the mean and population variance of its input as the masked
network computes it on the calibration images (checked against a feature
model that reads the layer's input); layers upstream, and every layer of a
model with all gates open, keep their statistics. The user's model is never
written to.
"""

import keras
import numpy as np
import pytest

import _subtask_models as sm
import keras_drnet as kd
from keras_drnet.calibration import affected_batchnorms

NAMES = sm.NAMES


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).uniform(0, 1, (40, 12, 12, 3)).astype(
        "float32"
    )


@pytest.fixture
def chain_sub():
    model = sm.bn_chain()
    rng = np.random.default_rng(1)
    civs = sm.hand_civs(model, rng)
    return model, kd.subtask(model, civs, ["cat", "dog"], budget=0.5)


def test_only_batchnorms_after_a_closed_gate_are_affected(chain_sub):
    _, sub = chain_sub
    names = [layer.name for layer in affected_batchnorms(sub.gated_model)]
    assert names == ["bn2", "bn3"]  # bn1 reads the image: unaffected


def test_calibrated_statistics_are_the_masked_input_moments(chain_sub, x):
    model, sub = chain_sub
    before = sm.bn_stats(sub.gated_model)
    original = sm.bn_stats(model)
    names = sub.calibrate(x)
    assert names == ["bn2", "bn3"]
    after = sm.bn_stats(sub.gated_model)
    for name in ("bn2", "bn3"):
        bn = sub.gated_model.get_layer(name)
        # The input of bn{i} as the calibrated, masked network computes it.
        features = keras.Model(sub.gated_model.inputs[0], bn.input)
        values = keras.ops.convert_to_numpy(features(x)).astype("float64")
        np.testing.assert_allclose(
            after[name][2], values.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            after[name][3], values.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5
        )
        # gamma and beta are not touched.
        np.testing.assert_array_equal(after[name][0], before[name][0])
        np.testing.assert_array_equal(after[name][1], before[name][1])
    for weights, expected in zip(after["bn1"], before["bn1"]):
        np.testing.assert_array_equal(weights, expected)
    # The user's model is not written to.
    for name, weights in sm.bn_stats(model).items():
        for w, o in zip(weights, original[name]):
            np.testing.assert_array_equal(w, o)


def test_all_open_gates_leave_every_statistic_and_output_unchanged(x):
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5
    )
    civs = sm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["cat", "dog"], threshold=0.0)
    assert sub.cciv.mask.all()
    images = np.random.default_rng(2).uniform(0, 1, (8, 32, 32, 3)).astype(
        "float32"
    )
    before = sm.bn_stats(sub.gated_model)
    out = keras.ops.convert_to_numpy(sub(images))
    assert sub.calibrate(images) == []
    after = sm.bn_stats(sub.gated_model)
    for name, weights in before.items():
        for w, b in zip(after[name], weights):
            np.testing.assert_array_equal(w, b)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(sub(images)), out)


def test_calibrated_mobilenet_compacts_to_equal_outputs():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=5
    )
    civs = sm.hand_civs(model, np.random.default_rng(0))
    images = np.random.default_rng(3).uniform(0, 1, (16, 32, 32, 3)).astype(
        "float32"
    )
    sub = kd.subtask(model, civs, ["dog", "cat"], budget=0.6,
                     calibrate=images)
    assert sub.calibrated_for == [1, 0]
    small = kd.compact(sub, include_softmax=False)
    logits = keras.ops.convert_to_numpy(sub.logits_model(images))[:, [1, 0]]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(small(images)), logits,
        atol=1e-4 * max(1.0, np.abs(logits).max()),
    )


def test_labelled_data_calibrates_on_the_subtask_classes_only(x):
    model = sm.bn_chain()
    civs = sm.hand_civs(model, np.random.default_rng(1))
    labels = np.arange(len(x)) % len(NAMES)  # cat, dog, bird, ...
    by_label = kd.subtask(model, civs, ["cat", "dog"], budget=0.5,
                          calibrate=(x, labels))
    wanted = np.isin(labels, [0, 1])
    by_images = kd.subtask(model, civs, ["cat", "dog"], budget=0.5,
                           calibrate=x[wanted])
    for name, weights in sm.bn_stats(by_label.gated_model).items():
        for a, b in zip(weights, sm.bn_stats(by_images.gated_model)[name]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_calibration_round_trips_and_warns_on_set_classes(chain_sub, x,
                                                          tmp_path):
    _, sub = chain_sub
    sub.calibrate(x)
    path = tmp_path / "sub.keras"
    sub.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.calibrated_for == [0, 1]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(sub(x)), atol=1e-6,
    )
    with pytest.warns(UserWarning, match=r"recalibrated for classes "
                      r"\['cat', 'dog'\].*call `calibrate\(\)`"):
        loaded.set_classes(["bird", "frog"])


def test_calibrating_a_gated_model_never_writes_to_it(x):
    gated = kd.inject_gates(sm.bn_chain())
    civs = sm.hand_civs(sm.bn_chain(), np.random.default_rng(1))
    original = sm.bn_stats(gated)
    sub = kd.subtask(gated, civs, ["cat", "dog"], budget=0.5, calibrate=x)
    assert sub.gated_model is not gated
    for name, weights in sm.bn_stats(gated).items():
        for w, o in zip(weights, original[name]):
            np.testing.assert_array_equal(w, o)


def test_empty_calibration_set_is_refused(chain_sub, x):
    _, sub = chain_sub
    with pytest.raises(ValueError, match="`images` is empty"):
        sub.calibrate(x[:0])


def test_full_net_accuracy_stays_the_original_models_after_calibration(
    x, tmp_path
):
    model = sm.bn_chain()
    # Put the cat/dog boundary through the middle of the images, so that
    # other BatchNorm statistics flip some of the network's choices.
    logits = sm.reference_logits(model, x)
    head = model.get_layer("head")
    bias = keras.ops.convert_to_numpy(head.bias).copy()
    bias[0] -= np.median(logits[:, 0] - logits[:, 1])
    head.bias.assign(bias)
    civs = sm.hand_civs(model, np.random.default_rng(1))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    # Labels: the original network's own cat/dog choice, so its accuracy is 1.
    labels = np.argmax(sm.reference_logits(model, x)[:, :2], -1)
    assert 0 < labels.mean() < 1
    before = kd.evaluate_subtask(sub, (x, labels))
    assert before.full_net_accuracy == 1.0
    sub.calibrate(x)
    # The test can fail: the recalibrated full network predicts otherwise.
    for gate in sub.gates:
        gate.set_gate(np.ones(gate.channels))
    recalibrated = sub.gated_model.predict(x, verbose=0)[:, :2].argmax(-1)
    assert np.mean(recalibrated == labels) < 0.9
    sub.set_classes(["cat", "dog"])

    after = kd.evaluate_subtask(sub, (x, labels))
    assert after.full_net_accuracy == 1.0
    sub_net = np.argmax(sub.predict(x, verbose=0), -1)
    assert after.sub_net_accuracy == pytest.approx(np.mean(sub_net == labels))
    # The original statistics travel with a saved sub-task.
    sub.save(tmp_path / "calibrated.keras")
    loaded = keras.models.load_model(tmp_path / "calibrated.keras")
    reloaded = kd.evaluate_subtask(loaded, (x, labels))
    assert reloaded.full_net_accuracy == 1.0
    assert reloaded.sub_net_accuracy == pytest.approx(after.sub_net_accuracy)


def _filled_reference_logits(model, x, masks):
    """`model`'s logits with each gated layer's closed channels replaced by
    their mean over `x` and positions (upstream replacements applied)."""
    h = keras.ops.convert_to_tensor(x)
    for layer in model.layers[1:]:
        if layer.name == "head":
            return keras.ops.convert_to_numpy(
                keras.ops.matmul(h, layer.kernel) + layer.bias)
        h = keras.ops.convert_to_numpy(layer(h, training=False))
        if layer.name in masks:
            mask = np.asarray(masks[layer.name], "float32")
            mean = h.reshape(-1, h.shape[-1]).mean(axis=0)
            h = h * mask + (1 - mask) * mean
    raise AssertionError("no head")


def test_filled_channels_read_as_their_mean():
    """Valid convolutions and Flatten -> Dense: no border, so the fold is
    exactly the network that reads a closed channel as its mean."""
    model = sm.chain_cnn(head="logits")
    x = np.random.default_rng(2).uniform(0, 1, (16,) + sm.INPUT).astype(
        "float32")
    sub = kd.subtask(model, sm.hand_civs(model, np.random.default_rng(3)),
                     ["cat", "dog"], budget=0.5)
    masks = sm.source_masks(sub)
    zero_filled = sub.logits_model.predict(x, verbose=0)
    assert kd.fill_closed_channels(sub.gated_model, x) == [
        "conv1_gate", "conv2_gate", "fc1_gate"]
    filled = sub.logits_model.predict(x, verbose=0)
    want = _filled_reference_logits(model, x, masks)
    np.testing.assert_allclose(filled, want, rtol=1e-4, atol=1e-5)
    assert np.abs(filled - zero_filled).max() > 1e-3  # it did something
    # The fold survives compaction exactly.
    small = kd.compact(sub)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), sub.predict(x, verbose=0)[:, [0, 1]],
        rtol=1e-5, atol=1e-6)


def test_fold_into_the_batchnorm_after_a_bias_free_conv(x):
    keras.utils.set_random_seed(4)
    h = inp = keras.Input((12, 12, 3))
    for i, filters in enumerate((6, 8), start=1):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{i}")(h)
        h = keras.layers.ReLU(name=f"relu{i}")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(len(NAMES), name="head")(h))
    sub = kd.subtask(model, sm.hand_civs(model, np.random.default_rng(1)),
                     ["cat", "dog"], budget=0.5)
    before = sm.bn_stats(sub.gated_model)["bn2"]
    assert kd.fill_closed_channels(sub.gated_model, x) == [
        "relu1_gate", "relu2_gate"]
    after = sm.bn_stats(sub.gated_model)["bn2"]
    assert not np.array_equal(before[2], after[2])  # the moving mean moved
    np.testing.assert_array_equal(before[3], after[3])
    small = kd.compact(sub)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), sub.predict(x, verbose=0)[:, [0, 1]],
        rtol=1e-5, atol=1e-6)


def test_gate_feeding_a_residual_add_is_not_filled():
    import _compaction_models as cm

    model = cm.residual_model()
    civs = cm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, civs.class_names[:2], budget=0.4)
    images = np.random.default_rng(0).uniform(
        0, 1, (8,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    names = kd.fill_closed_channels(sub.gated_model, images)
    gates = {spec.name for spec in kd.list_gates(sub.gated_model)}
    assert set(names) < gates
