"""Tests for keras_drnet.channel_gate: the ChannelGate layer and per-image gates."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import keras_drnet as kd
from keras_drnet.channel_gate import per_sample_gates


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture
def small(rng):
    """A fresh small CNN (conv ReLU -> dense ReLU -> linear head), gated.

    Gates: c1 (4 channels, feature map), d1 (5 channels, dense).
    """
    inp = keras.Input((6, 6, 3))
    h = layers.Conv2D(4, 3, activation="relu", name="c1")(inp)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(5, activation="relu", name="d1")(h)
    out = layers.Dense(3, name="out")(h)
    model = keras.Model(inp, out, name="small")
    gated = kd.inject_gates(model)
    gates = [spec.layer for spec in kd.list_gates(gated)]
    assert [g.source for g in gates] == ["c1", "d1"]
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    return model, gated, gates, x


# ---------------------------------------------------------------------------
# The layer on its own.
# ---------------------------------------------------------------------------


def test_fresh_gate_is_identity_with_one_value_per_channel(rng):
    gate = kd.ChannelGate()
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    y = _np(gate(x))
    assert gate.channels == 3
    np.testing.assert_array_equal(_np(gate.gate), np.ones(3, "float32"))
    np.testing.assert_array_equal(y, x)


def test_gate_weight_is_non_trainable():
    gate = kd.ChannelGate()
    gate.build((None, 4, 4, 3))
    assert gate.trainable_weights == []
    assert len(gate.non_trainable_weights) == 1
    assert tuple(gate.non_trainable_weights[0].shape) == (3,)


def test_set_gate_scales_each_channel_of_last_axis(rng):
    gate = kd.ChannelGate()
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    gate(x)
    gate.set_gate([1.0, 0.0, 0.5])
    y = _np(gate(x))
    np.testing.assert_array_equal(y[..., 0], x[..., 0])
    assert np.abs(y[..., 1]).max() == 0.0
    np.testing.assert_allclose(y[..., 2], 0.5 * x[..., 2], rtol=0, atol=0)


def test_gate_on_axis_1_scales_channels_first_input(rng):
    gate = kd.ChannelGate(axis=1)
    x = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    gate(x)
    assert gate.channels == 3
    gate.set_gate([0.0, 1.0, 2.0])
    y = _np(gate(x))
    expected = x * np.array([0.0, 1.0, 2.0], "float32")[None, :, None, None]
    np.testing.assert_array_equal(y, expected)


def test_gate_on_rank2_input_scales_features(rng):
    gate = kd.ChannelGate()
    x = rng.normal(size=(3, 4)).astype("float32")
    gate(x)
    gate.set_gate([0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(_np(gate(x)), x * np.array([0, 1, 0, 1], "float32"))


def test_set_gate_with_wrong_number_of_values_raises(rng):
    gate = kd.ChannelGate(name="g")
    gate(rng.normal(size=(1, 2, 2, 3)).astype("float32"))
    with pytest.raises(ValueError, match=r"'g' has 3 channels.*\(3,\).*\(4,\)"):
        gate.set_gate([1.0, 0.0, 1.0, 1.0])
    # The failed call left the gate untouched.
    np.testing.assert_array_equal(_np(gate.gate), np.ones(3, "float32"))


def test_unknown_channel_count_raises_on_build():
    with pytest.raises(ValueError, match="known number of channels"):
        kd.ChannelGate()(keras.Input((None,)))


def test_get_config_round_trip_keeps_axis_source_and_name():
    gate = kd.ChannelGate(axis=1, source="block1_conv1", name="block1_conv1_gate")
    config = gate.get_config()
    assert config["axis"] == 1
    assert config["source"] == "block1_conv1"
    assert config["name"] == "block1_conv1_gate"
    clone = kd.ChannelGate.from_config(config)
    assert isinstance(clone, kd.ChannelGate)
    assert (clone.axis, clone.source, clone.name) == (
        1,
        "block1_conv1",
        "block1_conv1_gate",
    )
    assert clone.get_config() == config


def test_serialize_deserialize_restores_registered_channel_gate():
    gate = kd.ChannelGate(axis=-1, source="fc1", name="fc1_gate")
    assert (
        keras.saving.get_registered_name(kd.ChannelGate)
        == "keras_drnet>ChannelGate"
    )
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(gate)
    )
    assert type(restored) is kd.ChannelGate
    assert (restored.source, restored.axis, restored.name) == (
        "fc1",
        -1,
        "fc1_gate",
    )


# ---------------------------------------------------------------------------
# Gates inside a (traced) model.
# ---------------------------------------------------------------------------


def test_set_gate_changes_traced_function_output_without_retracing(small):
    model, gated, gates, x = small
    traces = []

    @tf.function
    def forward(images):
        traces.append(1)
        return gated(images)

    before = _np(forward(x))
    mask = np.array([1.0, 0.0, 0.0, 1.0], "float32")
    gates[0].set_gate(mask)
    after = _np(forward(x))

    assert len(traces) == 1
    # The traced function sees the new mask: it matches an eager call ...
    np.testing.assert_allclose(after, _np(gated(x)), rtol=0, atol=1e-6)
    # ... and the mask really changed the output.
    assert np.abs(after - before).max() > 1e-3


def test_per_sample_gates_give_each_image_its_own_gates(small, rng):
    model, gated, gates, x = small
    values = [
        np.array([[1, 0, 1, 0], [0, 1, 1, 1]], "float32"),
        rng.uniform(0.0, 2.0, size=(2, 5)).astype("float32"),
    ]
    with per_sample_gates(gates, [tf.constant(v) for v in values]):
        batched = _np(gated(x))

    for i in range(2):
        gates[0].set_gate(values[0][i])
        gates[1].set_gate(values[1][i])
        single = _np(gated(x[i : i + 1]))
        np.testing.assert_allclose(batched[i : i + 1], single, rtol=0, atol=1e-6)
    # Not vacuous: per-image gates differ from the all-ones result.
    gates[0].set_gate(np.ones(4))
    gates[1].set_gate(np.ones(5))
    assert np.abs(batched - _np(gated(x))).max() > 1e-3


def test_per_sample_gate_gradients_are_nonzero_and_exact(small, rng):
    model, gated, gates, x = small
    conv_values = tf.constant(np.ones((2, 4), "float32"))
    dense_values = tf.constant(rng.uniform(0.5, 1.5, size=(2, 5)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch([conv_values, dense_values])
        with per_sample_gates(gates, [conv_values, dense_values]):
            total = tf.reduce_sum(gated(x))
    grad_conv, grad_dense = tape.gradient(total, [conv_values, dense_values])

    assert grad_conv is not None and grad_dense is not None
    assert tuple(grad_conv.shape) == (2, 4)
    assert np.abs(_np(grad_conv)).max() > 1e-6
    # d sum(y) / d g[i, j] = relu(d1)[i, j] * sum_k W_out[j, k], because the
    # conv gates are 1 and the head is linear.
    relu_d1 = _np(keras.Model(model.input, model.get_layer("d1").output)(x))
    kernel = model.get_layer("out").get_weights()[0]
    expected = relu_d1 * kernel.sum(axis=1)[None, :]
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(_np(grad_dense), expected, rtol=1e-5, atol=1e-6)


def test_per_sample_gates_work_inside_tf_function(small, rng):
    model, gated, gates, x = small
    values = [
        rng.integers(0, 2, size=(2, 4)).astype("float32"),
        rng.uniform(0.0, 2.0, size=(2, 5)).astype("float32"),
    ]

    @tf.function
    def forward(images, conv_gates, dense_gates):
        with per_sample_gates(gates, [conv_gates, dense_gates]):
            return gated(images)

    traced = _np(forward(x, *values))
    with per_sample_gates(gates, [tf.constant(v) for v in values]):
        eager = _np(gated(x))
    np.testing.assert_allclose(traced, eager, rtol=0, atol=1e-6)


def test_per_sample_gates_accept_keras_variables(small):
    """Gate fitting optimises per-image gates, i.e. keras.Variables."""
    model, gated, gates, x = small
    values = [
        keras.Variable(np.ones((2, 4), "float32")),
        keras.Variable(np.full((2, 5), 0.5, "float32")),
    ]
    n_weights = len(gated.weights)
    with tf.GradientTape() as tape:
        with per_sample_gates(gates, values):
            total = tf.reduce_sum(gated(x))
    grads = tape.gradient(total, [v.value for v in values])
    assert all(g is not None for g in grads)
    assert np.abs(_np(grads[1])).max() > 1e-6
    # The per-image values are not adopted as weights of the gated model.
    assert len(gated.weights) == n_weights


def test_per_sample_gates_restore_variable_gates_on_exit(small):
    model, gated, gates, x = small
    reference = _np(gated(x))
    zeros = [tf.zeros((2, 4)), tf.zeros((2, 5))]
    with pytest.raises(RuntimeError, match="boom"):
        with per_sample_gates(gates, zeros):
            raise RuntimeError("boom")
    with per_sample_gates(gates, zeros):
        pass
    assert all(g._per_sample is None for g in gates)
    np.testing.assert_array_equal(_np(gated(x)), reference)


def test_per_sample_gates_reject_wrong_number_of_tensors(small):
    model, gated, gates, x = small
    with pytest.raises(ValueError, match=r"one gate tensor per gate \(2\).*1"):
        with per_sample_gates(gates, [tf.ones((2, 4))]):
            pass


# ---------------------------------------------------------------------------
# Saving.
# ---------------------------------------------------------------------------


def test_keras_file_round_trip_of_masked_gated_model_keeps_outputs(small, tmp_path):
    model, gated, gates, x = small
    gates[0].set_gate([0.0, 1.0, 1.0, 0.0])
    gates[1].set_gate([1.0, 1.0, 0.0, 1.0, 0.0])
    expected = _np(gated(x))
    path = tmp_path / "gated.keras"
    gated.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(_np(loaded(x)), expected)
    # The masks matter, so equality above is a real check.
    assert np.abs(expected - _np(model(x))).max() > 1e-3


def test_keras_file_round_trip_restores_channel_gates_with_source_and_mask(
    small, tmp_path
):
    model, gated, gates, x = small
    gates[0].set_gate([0.0, 1.0, 1.0, 0.0])
    path = tmp_path / "gated.keras"
    gated.save(path)
    loaded = kd.list_gates(keras.models.load_model(path))
    assert [type(s.layer) for s in loaded] == [kd.ChannelGate, kd.ChannelGate]
    assert [(s.name, s.source, s.channels) for s in loaded] == [
        ("c1_gate", "c1", 4),
        ("d1_gate", "d1", 5),
    ]
    np.testing.assert_array_equal(
        _np(loaded[0].layer.gate), np.array([0, 1, 1, 0], "float32")
    )
    np.testing.assert_array_equal(_np(loaded[1].layer.gate), np.ones(5, "float32"))
