"""Tests for keras_drnet.graph: the trace, the layer-kind registry, the plan.

The custom layer is a per-channel scale, a layer type keras_drnet cannot
know: unregistered it keeps all its channels (and says so by name);
registered as "channelwise" it is sliced like BatchNormalization, and the
compact model equals the masked sub-task.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import layers

import _compaction_models as cm
import keras_drnet as kd
from keras_drnet.graph import Graph
from keras_drnet.graph import kinds


@keras.saving.register_keras_serializable(package="test_graph")
class Scale(layers.Layer):
    """Multiplies each channel by its own learned factor."""

    def build(self, input_shape):
        self.factor = self.add_weight(
            shape=(input_shape[-1],), initializer="random_uniform"
        )

    def call(self, x):
        return x * self.factor


def scaled_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input(cm.FEATURE_INPUT, name="image")
    h = layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    h = Scale(name="scale")(h)
    h = layers.ReLU(name="relu1")(h)
    h = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="conv2")(h)
    model = keras.Model(inp, cm._head(h), name="scaled")
    scale = model.get_layer("scale")
    scale.factor.assign(np.linspace(0.5, 2.0, 8).astype("float32"))
    return model


@pytest.fixture
def registry():
    """Restores the registry after a test registers a kind."""
    saved = dict(kinds._REGISTERED)
    yield
    kinds._REGISTERED.clear()
    kinds._REGISTERED.update(saved)


def _subtask(model):
    masks = {"relu1_gate": [1, 0, 1, 1, 0, 0, 1, 0]}
    civs = cm.civs_from_masks(model, masks)
    return kd.subtask(model, civs, [0, 1], threshold=0.5)


def test_each_call_gets_its_kind_once(registry):
    graph = Graph(kd.inject_gates(cm.residual_model()))
    names = {flat.op.name: flat.kind.name for flat in graph.nodes}
    assert names["add"] == "merge_any"
    assert names["head"] == "dense"
    assert "gate" in names.values()
    assert all(flat.kind is not None for flat in graph.nodes)
    # Producers and readers agree with the calls' inputs and outputs.
    for flat in graph.nodes:
        for key in flat.outputs:
            assert graph.producers[key] is flat
        for key in flat.inputs:
            assert flat in graph.readers[key]


def test_unknown_custom_layer_is_named_and_keeps_its_channels(registry):
    model = scaled_model()
    with pytest.warns(UserWarning, match=r"'scale' \(Scale\).*register_layer"):
        sub = _subtask(model)
        small = kd.compact(sub)
    # Nothing is removed through the unknown layer: conv1 keeps 8 filters.
    assert small.get_layer("conv1").filters == 8
    cm.check_compact_equals(sub, np.random.default_rng(0).normal(
        size=(16,) + cm.FEATURE_INPUT).astype("float32"))


def test_registered_channelwise_custom_layer_is_compacted(registry):
    model = scaled_model()
    kd.register_layer_kind(Scale, "channelwise")
    x = np.random.default_rng(0).normal(size=(16,) + cm.FEATURE_INPUT)
    with warnings.catch_warnings():
        # A known kind: no warning.
        warnings.filterwarnings("error", message=".*does not know")
        sub = _subtask(model)
        small, _, _ = cm.check_compact_equals(sub, x.astype("float32"))
    # Four of conv1's channels are closed and cut, and Scale's factors
    # with them: the kept factors are the open channels', in order.
    assert small.get_layer("conv1").filters == 4
    np.testing.assert_array_equal(
        small.get_layer("scale").get_weights()[0],
        np.linspace(0.5, 2.0, 8).astype("float32")[[0, 2, 3, 6]])


def test_register_layer_kind_refuses_bad_arguments(registry):
    with pytest.raises(TypeError, match="Layer` subclass"):
        kd.register_layer_kind(object, "channelwise")
    with pytest.raises(ValueError, match=r"Received: kind='channelwsie'"):
        kd.register_layer_kind(Scale, "channelwsie")
    with pytest.raises(TypeError, match="LayerKind"):
        kd.register_layer_kind(Scale, 3)


def test_per_channel_rescaling_is_sliced_and_the_output_name_is_kept():
    # A per-channel Rescaling (as a compact model's masks are), and a
    # layer already named like the compact model's output.
    inp = keras.Input((8, 8, 3))
    h = layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    h = layers.ReLU(name="relu1")(h)
    h = layers.Rescaling(np.linspace(0.5, 2.0, 8).reshape(1, 1, 8),
                         # 0 where relu1_gate closes: those channels go.
                         offset=np.array([.1, 0, .2, .3, 0, 0, .4, 0]),
                         name="scale")(h)
    h = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="class_probabilities")(h)
    model = keras.Model(inp, cm._head(h), name="rescaled")
    sub = _subtask(model)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    small, _, _ = cm.check_compact_equals(sub, x)
    assert small.get_layer("class_probabilities").__class__.__name__ == (
        "Softmax")
    assert small.get_layer("scale").scale.shape == (1, 1, 4)
    np.testing.assert_allclose(small.get_layer("scale").offset,
                               [.1, .2, .3, .4])
    # Dissecting and compacting the compact model again works too.
    civs = cm.civs_from_masks(small, {"relu1_gate": [1, 0, 1, 1]})
    again = kd.subtask(small, civs, [0, 1], threshold=0.5)
    cm.check_compact_equals(again, x)
