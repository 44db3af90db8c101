"""Tests for keras_drnet.model_surgery: inject_gates, list_gates, split_softmax."""

import collections
import types

import keras
import numpy as np
import pytest
from keras import layers
from keras import ops

import keras_drnet as kd
from keras_drnet import model_surgery
from keras_drnet.model_surgery import split_softmax

APPS = ["VGG16", "ResNet50", "MobileNetV2", "DenseNet121"]
_RELU_FNS = (keras.activations.relu, keras.activations.relu6)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _max_diff(a, b):
    return float(np.abs(_np(a) - _np(b)).max())


def _assert_same_output(original, gated, x):
    """Gated output equals the original's within 1e-5 of the output scale."""
    expected = _np(original(x))
    scale = float(np.abs(expected).max())
    assert scale > 0.0, "degenerate test: the model outputs all zeros"
    assert _max_diff(gated(x), expected) <= 1e-5 * scale


def _specs(gated):
    return [(s.name, s.source, s.channels) for s in kd.list_gates(gated)]


def _relu_call_sites(model):
    """(layer name, channels) for each call of a ReLU-family layer.

    Counted from the architecture: every layer that is `layers.ReLU` or has a
    relu/relu6 activation contributes its output's last-axis size once per
    inbound node (call site).
    """
    sites = []
    for layer in model.layers:
        is_relu = isinstance(layer, layers.ReLU) or any(
            getattr(layer, "activation", None) is fn for fn in _RELU_FNS
        )
        if is_relu:
            for node in layer._inbound_nodes:
                sites.append((layer.name, int(node.outputs[0].shape[-1])))
    return sites


# ---------------------------------------------------------------------------
# keras.applications models, built once per module.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def apps():
    cache = {}

    def get(name):
        if name not in cache:
            model = getattr(keras.applications, name)(
                weights=None,
                input_shape=(32, 32, 3),
                classes=10,
                classifier_activation=None,
            )
            weights_before = model.get_weights()
            n_layers_before = len(model.layers)
            n_ops_before = len(model.operations)
            gated = kd.inject_gates(model)
            cache[name] = types.SimpleNamespace(
                model=model,
                gated=gated,
                weights_before=weights_before,
                n_layers_before=n_layers_before,
                n_ops_before=n_ops_before,
            )
        return cache[name]

    yield get
    cache.clear()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(7).normal(size=(2, 32, 32, 3)).astype("float32")


@pytest.mark.parametrize("name", APPS)
def test_all_ones_gates_leave_application_logits_unchanged(apps, images, name):
    app = apps(name)
    _assert_same_output(app.model, app.gated, images)


@pytest.mark.parametrize("name", APPS)
def test_application_gates_are_on_the_output_path(apps, images, name):
    app = apps(name)
    first = kd.list_gates(app.gated)[0].layer
    reference = _np(app.gated(images))
    try:
        first.set_gate(np.zeros(first.channels))
        changed = _np(app.gated(images))
    finally:
        first.set_gate(np.ones(first.channels))
    assert _max_diff(changed, reference) > 1e-3 * np.abs(reference).max()


@pytest.mark.parametrize("name", APPS)
def test_application_gated_channels_match_relu_call_sites(apps, name):
    app = apps(name)
    sites = _relu_call_sites(app.model)
    specs = kd.list_gates(app.gated)
    assert len(specs) == len(sites)
    assert sum(s.channels for s in specs) == sum(c for _, c in sites)
    assert collections.Counter((s.source, s.channels) for s in specs) == (
        collections.Counter(sites)
    )


@pytest.mark.parametrize("name", APPS)
def test_application_gate_names_are_unique_and_tied_to_relu_sources(apps, name):
    app = apps(name)
    specs = kd.list_gates(app.gated)
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    assert all(s.name == f"{s.source}_gate" for s in specs)
    relu_layers = {layer for layer, _ in _relu_call_sites(app.model)}
    assert {s.source for s in specs} == relu_layers
    assert all(isinstance(s.layer, kd.ChannelGate) for s in specs)
    # Gates are real layers of the gated model, found under their names.
    assert all(app.gated.get_layer(s.name) is s.layer for s in specs)


@pytest.mark.parametrize("name", APPS)
def test_inject_gates_leaves_application_weights_and_layers_unchanged(apps, name):
    app = apps(name)
    assert len(app.model.layers) == app.n_layers_before
    assert len(app.model.operations) == app.n_ops_before
    after = app.model.get_weights()
    assert len(after) == len(app.weights_before)
    assert all(np.array_equal(a, b) for a, b in zip(after, app.weights_before))
    assert not any(isinstance(op, kd.ChannelGate) for op in app.model.operations)


@pytest.mark.parametrize("name", APPS)
def test_application_gated_model_shares_no_variables(apps, name):
    app = apps(name)
    original = {id(v) for v in app.model.weights}
    gated = {id(v) for v in app.gated.weights}
    assert not original & gated
    n_gates = len(kd.list_gates(app.gated))
    assert len(app.gated.weights) == len(app.model.weights) + n_gates


def test_vgg16_relu_channels_match_architecture(apps):
    conv_filters = [64] * 2 + [128] * 2 + [256] * 3 + [512] * 3 + [512] * 3
    expected = sum(conv_filters) + 4096 * 2
    specs = kd.list_gates(apps("VGG16").gated)
    assert len(specs) == 15
    assert sum(s.channels for s in specs) == expected == 12416


def test_resnet50_relu_channels_match_architecture(apps):
    # conv1_relu, then per bottleneck block three ReLUs: f, f and 4f.
    expected_gates = 1
    expected = 64
    for filters, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        expected_gates += 3 * blocks
        expected += blocks * (filters + filters + 4 * filters)
    specs = kd.list_gates(apps("ResNet50").gated)
    assert len(specs) == expected_gates == 49
    assert sum(s.channels for s in specs) == expected == 22720


def test_densenet121_relu_channels_match_architecture(apps):
    growth, channels = 32, 64
    expected, expected_gates = 64, 1  # conv1_relu
    for i, blocks in enumerate([6, 12, 24, 16]):
        for _ in range(blocks):
            expected += channels + 4 * growth  # BN-ReLU on input, bottleneck
            expected_gates += 2
            channels += growth
        if i < 3:  # transition: BN-ReLU, then halve the channels
            expected += channels
            expected_gates += 1
            channels //= 2
    expected += channels  # final relu
    expected_gates += 1
    specs = kd.list_gates(apps("DenseNet121").gated)
    assert len(specs) == expected_gates
    assert sum(s.channels for s in specs) == expected


def test_vgg16_gate_names_follow_sources_in_topological_order(apps):
    sources = [
        f"block{b}_conv{c}"
        for b, n in [(1, 2), (2, 2), (3, 3), (4, 3), (5, 3)]
        for c in range(1, n + 1)
    ] + ["fc1", "fc2"]
    specs = kd.list_gates(apps("VGG16").gated)
    assert [s.source for s in specs] == sources
    assert [s.name for s in specs] == [f"{s}_gate" for s in sources]
    assert specs[0].name == "block1_conv1_gate"
    assert specs[0].source == "block1_conv1"


# ---------------------------------------------------------------------------
# select=
# ---------------------------------------------------------------------------


def test_select_conv_gates_only_the_13_vgg16_feature_map_relus(apps, images):
    model = apps("VGG16").model
    gated = kd.inject_gates(model, select="conv")
    specs = kd.list_gates(gated)
    assert len(specs) == 13
    assert all(s.source.startswith("block") for s in specs)
    assert all(len(s.layer.input.shape) == 4 for s in specs)
    _assert_same_output(model, gated, images)


def test_select_dense_gates_only_the_2_vgg16_fc_relus(apps):
    gated = kd.inject_gates(apps("VGG16").model, select="dense")
    assert _specs(gated) == [
        ("fc1_gate", "fc1", 4096),
        ("fc2_gate", "fc2", 4096),
    ]


def test_select_callable_sees_each_relu_site_once_and_picks_gates(apps):
    model = apps("VGG16").model
    seen = []

    def only_block5(op, output):
        seen.append((op.name, tuple(output.shape)))
        return op.name.startswith("block5")

    gated = kd.inject_gates(model, select=only_block5)
    assert [s.source for s in kd.list_gates(gated)] == [
        "block5_conv1",
        "block5_conv2",
        "block5_conv3",
    ]
    assert [name for name, _ in seen] == [s for s, _ in _relu_call_sites(model)]
    assert ("block1_conv1", (None, 32, 32, 64)) in seen
    assert ("fc1", (None, 4096)) in seen


@pytest.mark.parametrize("select", ["convolution", None, 3])
def test_invalid_select_raises_value_error(select):
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="relu")])
    with pytest.raises(ValueError, match=r"`select` must be one of"):
        kd.inject_gates(model, select=select)


# ---------------------------------------------------------------------------
# Small hand-built models: every way a ReLU can appear.
# ---------------------------------------------------------------------------


def _x(rng, *shape):
    # Scale 3 so that relu6 clipping is exercised.
    return (3.0 * rng.normal(size=(3,) + shape)).astype("float32")


def _sequential_cnn(rng):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, activation="relu", name="c1"),
            layers.Conv2D(6, 3, activation="relu", name="c2"),
            layers.Flatten(name="flat"),
            layers.Dense(16, activation="relu", name="fc1"),
            layers.Dense(8, activation="relu", name="fc2"),
            layers.Dense(10, name="logits"),
        ],
        name="seq_cnn",
    )
    return model, _x(rng, 8, 8, 3), [4, 6, 16, 8]


def _ops_relu_relu6(rng):
    inp = keras.Input((8, 8, 3))
    h = ops.relu(layers.Conv2D(5, 3, name="c1")(inp))
    h = ops.relu6(layers.Conv2D(7, 3, name="c2")(h))
    out = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out, name="ops_relu"), _x(rng, 8, 8, 3), [5, 7]


def _nested(rng):
    deep = keras.Sequential(
        [layers.Conv2D(3, 1, activation="relu", name="deep_conv")], name="deep"
    )
    submodel = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, activation="relu", name="sub_conv"),
            deep,
        ],
        name="submodel",
    )
    inner_in = keras.Input((6, 6, 3))
    inner = keras.Model(
        inner_in,
        layers.Dense(5, activation="relu", name="inner_dense")(inner_in),
        name="inner",
    )
    inp = keras.Input((8, 8, 3))
    h = inner(submodel(inp))
    h = layers.Activation("relu", name="outer_relu")(h)
    out = layers.Dense(10, name="logits")(layers.Flatten()(h))
    return keras.Model(inp, out, name="nested"), _x(rng, 8, 8, 3), [4, 3, 5, 5]


def _shared_layer(rng):
    inp = keras.Input((6,))
    shared = layers.Dense(8, activation="relu", name="shared")
    a = shared(inp)
    b = shared(layers.Dense(6, name="pre")(inp))
    out = layers.Dense(10, name="logits")(layers.Add()([a, b]))
    return keras.Model(inp, out, name="shared_model"), _x(rng, 6), [8, 8]


def _multi_input(rng):
    image = keras.Input((8, 8, 3), name="image")
    meta = keras.Input((5,), name="meta")
    h = layers.Conv2D(4, 3, activation="relu", name="img_conv")(image)
    h = layers.GlobalAveragePooling2D()(h)
    k = layers.Dense(6, activation="relu", name="meta_dense")(meta)
    out = layers.Dense(10, name="logits")(layers.Concatenate()([h, k]))
    model = keras.Model([image, meta], out, name="multi_input")
    return model, [_x(rng, 8, 8, 3), _x(rng, 5)], [4, 6]


def _depthwise_separable(rng):
    inp = keras.Input((8, 8, 3))
    h = layers.DepthwiseConv2D(
        3, depth_multiplier=2, activation="relu", name="dw"
    )(inp)
    h = layers.SeparableConv2D(5, 3, activation="relu", name="sep")(h)
    h = layers.SeparableConv2D(4, 1, activation="relu6", name="sep6")(h)
    out = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out, name="dw_sep"), _x(rng, 8, 8, 3), [6, 5, 4]


def _relu_layer_max_value_6(rng):
    inp = keras.Input((8, 8, 3))
    h = layers.ReLU(max_value=6.0, name="relu_max6")(layers.Conv2D(4, 3)(inp))
    out = layers.Dense(10, name="logits")(layers.Flatten()(h))
    return keras.Model(inp, out, name="relu_max6_model"), _x(rng, 8, 8, 3), [4]


def _activation_relu6(rng):
    inp = keras.Input((8, 8, 3))
    h = layers.Activation("relu6", name="act6")(layers.Conv2D(4, 3)(inp))
    out = layers.Dense(10, name="logits")(layers.Flatten()(h))
    return keras.Model(inp, out, name="act6_model"), _x(rng, 8, 8, 3), [4]


def _concat_residual_add(rng):
    inp = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(inp)
    b = layers.Conv2D(4, 1, activation="relu", name="b")(inp)
    c = layers.Concatenate(name="cat")([a, b])
    r = layers.Conv2D(8, 3, padding="same", name="res")(c)
    h = layers.ReLU(name="add_relu")(layers.Add(name="add")([c, r]))
    out = layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out, name="concat_add"), _x(rng, 8, 8, 3), [4, 4, 8]


SMALL = {
    "sequential_cnn": _sequential_cnn,
    "ops_relu_relu6": _ops_relu_relu6,
    "nested_submodels": _nested,
    "shared_layer": _shared_layer,
    "multi_input": _multi_input,
    "depthwise_separable": _depthwise_separable,
    "relu_layer_max_value_6": _relu_layer_max_value_6,
    "activation_relu6": _activation_relu6,
    "concat_residual_add": _concat_residual_add,
}


@pytest.fixture(scope="module")
def small_models():
    cache = {}
    rng = np.random.default_rng(3)

    def get(name):
        if name not in cache:
            model, x, channels = SMALL[name](rng)
            cache[name] = (model, kd.inject_gates(model), x, channels)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(SMALL))
def test_all_ones_gates_leave_small_model_unchanged(small_models, name):
    model, gated, x, _ = small_models(name)
    _assert_same_output(model, gated, x)


@pytest.mark.parametrize("name", list(SMALL))
def test_small_model_gated_channels_match_hand_count(small_models, name):
    model, gated, x, channels = small_models(name)
    specs = kd.list_gates(gated)
    assert len(specs) == len(channels)
    assert sorted(s.channels for s in specs) == sorted(channels)
    assert sum(s.channels for s in specs) == sum(channels)


def test_sequential_gates_follow_layer_order(small_models):
    _, gated, _, _ = small_models("sequential_cnn")
    assert _specs(gated) == [
        ("c1_gate", "c1", 4),
        ("c2_gate", "c2", 6),
        ("fc1_gate", "fc1", 16),
        ("fc2_gate", "fc2", 8),
    ]


def test_ops_relu_gates_take_the_op_as_source(small_models):
    model, gated, _, _ = small_models("ops_relu_relu6")
    op_names = [
        op.name for op in model.operations if type(op).__name__ in ("Relu", "Relu6")
    ]
    assert len(op_names) == 2
    assert [s.source for s in kd.list_gates(gated)] == op_names
    assert [s.name for s in kd.list_gates(gated)] == [f"{n}_gate" for n in op_names]


def test_nested_gates_are_listed_with_submodel_path(small_models):
    _, gated, _, _ = small_models("nested_submodels")
    assert _specs(gated) == [
        ("submodel/sub_conv_gate", "sub_conv", 4),
        ("submodel/deep/deep_conv_gate", "deep_conv", 3),
        ("inner/inner_dense_gate", "inner_dense", 5),
        ("outer_relu_gate", "outer_relu", 5),
    ]


def test_shared_layer_gets_one_gate_per_call_site(small_models):
    model, gated, _, _ = small_models("shared_layer")
    assert len(model.get_layer("shared")._inbound_nodes) == 2
    specs = kd.list_gates(gated)
    assert [s.source for s in specs] == ["shared", "shared"]
    assert len({s.name for s in specs}) == 2
    assert specs[0].layer is not specs[1].layer
    assert {s.name for s in specs} == {"shared_gate", "shared_1_gate"}


def test_shared_layer_call_sites_are_gated_independently(small_models):
    model, gated, x, _ = small_models("shared_layer")
    first, second = [s.layer for s in kd.list_gates(gated)]
    try:
        first.set_gate(np.zeros(8))
        second.set_gate(np.zeros(8))
        # Both branches of the Add gated off: only the head's bias remains.
        bias = model.get_layer("logits").get_weights()[1]
        np.testing.assert_allclose(
            _np(gated(x)), np.broadcast_to(bias, (3, 10)), atol=1e-6
        )
        second.set_gate(np.ones(8))
        # Only the first call site is off: the output is head(shared(pre(x))).
        pre = model.get_layer("pre")(x)
        expected = model.get_layer("logits")(model.get_layer("shared")(pre))
        np.testing.assert_allclose(_np(gated(x)), _np(expected), atol=1e-5)
    finally:
        first.set_gate(np.ones(8))
        second.set_gate(np.ones(8))


def test_submodel_called_twice_shares_its_gates_like_its_weights(rng):
    """A nested model keeps one set of weights, so one set of gates."""
    sub = keras.Sequential(
        [keras.Input((4,)), layers.Dense(6, activation="relu", name="sd")],
        name="sub",
    )
    inp = keras.Input((4,))
    a = sub(inp)
    b = sub(layers.Dense(4, name="pre")(inp))
    model = keras.Model(inp, layers.Add()([a, b]))
    gated = kd.inject_gates(model)
    specs = kd.list_gates(gated)
    assert [(s.name, s.channels) for s in specs] == [("sub/sd_gate", 6)]
    x = rng.normal(size=(3, 4)).astype("float32")
    np.testing.assert_allclose(gated(x), model(x), atol=1e-6)
    specs[0].layer.set_gate(np.zeros(6))
    np.testing.assert_allclose(gated(x), np.zeros((3, 6)), atol=0)


def test_gate_names_avoid_existing_layer_names():
    inp = keras.Input((4,))
    h = layers.Dense(4, activation="relu", name="d")(inp)
    out = layers.Dense(4, name="d_gate")(h)
    gated = kd.inject_gates(keras.Model(inp, out))
    names = [layer.name for layer in gated.layers]
    assert len(set(names)) == len(names)
    assert _specs(gated) == [("d_gate_1", "d", 4)]


def test_keras_activations_relu_in_functional_graph_is_gated(rng):
    inp = keras.Input((6,))
    h = keras.activations.relu(layers.Dense(4, name="dense")(inp))
    model = keras.Model(inp, layers.Dense(2, name="head")(h))
    gated = kd.inject_gates(model)
    assert [s.channels for s in kd.list_gates(gated)] == [4]
    _assert_same_output(model, gated, _x(rng, 6))


def test_relu_after_channels_first_conv_gates_the_channel_axis():
    # 4 channels on axis 1, width 5 on the last axis.
    inp = keras.Input((3, 8, 5))
    h = layers.Conv2D(4, 1, data_format="channels_first", name="conv")(inp)
    h = layers.BatchNormalization(axis=1, name="bn")(h)
    h = layers.Activation("relu", name="relu")(h)
    gated = kd.inject_gates(keras.Model(inp, h))
    assert _specs(gated) == [("relu_gate", "relu", 4)]


# ---------------------------------------------------------------------------
# The user's model is left alone.
# ---------------------------------------------------------------------------


def _kitchen_sink():
    sub = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, name="sub_conv"),
            layers.BatchNormalization(name="sub_bn"),
            layers.ReLU(name="sub_relu"),
        ],
        name="submodel",
    )
    inp = keras.Input((8, 8, 3))
    shared = layers.Dense(5, activation="relu", name="shared")
    h = layers.Flatten()(sub(inp))
    out = layers.Dense(3, name="logits")(layers.Add()([shared(h), shared(-h)]))
    return keras.Model(inp, out, name="kitchen_sink")


def test_inject_gates_does_not_modify_the_original_model(rng):
    model = _kitchen_sink()
    x = _x(rng, 8, 8, 3)
    before_out = _np(model(x))
    before_weights = model.get_weights()
    before_layers = [layer.name for layer in model.layers]
    before_sub_layers = len(model.get_layer("submodel").layers)

    gated = kd.inject_gates(model)

    assert len(kd.list_gates(gated)) == 3
    assert [layer.name for layer in model.layers] == before_layers
    assert len(model.get_layer("submodel").layers) == before_sub_layers
    assert all(
        np.array_equal(a, b) for a, b in zip(model.get_weights(), before_weights)
    )
    np.testing.assert_array_equal(_np(model(x)), before_out)


def test_changing_gated_weights_leaves_original_output_unchanged(rng):
    model = _kitchen_sink()
    x = _x(rng, 8, 8, 3)
    before = _np(model(x))
    gated = kd.inject_gates(model)
    assert not {id(v) for v in model.weights} & {id(v) for v in gated.weights}

    for variable in gated.weights:
        variable.assign(rng.uniform(0.5, 1.5, size=variable.shape))
    for spec in kd.list_gates(gated):
        spec.layer.set_gate(np.zeros(spec.channels))

    assert _max_diff(gated(x), before) > 1e-3  # the gated copy did change
    np.testing.assert_array_equal(_np(model(x)), before)


# ---------------------------------------------------------------------------
# A 0/1 mask equals zeroing those ReLU channels in the original model.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_model():
    inp = keras.Input((8, 8, 3))
    h = layers.Conv2D(6, 3, activation="relu", name="c1")(inp)
    h = layers.Conv2D(5, 3, activation="relu", name="c2")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(7, activation="relu", name="d1")(h)
    out = layers.Dense(4, name="head")(h)
    return keras.Model(inp, out)


def _manual_masked_output(model, source, mask, x):
    """Original model with channels of `source`'s ReLU output multiplied by mask."""
    relu_out = _np(keras.Model(model.input, model.get_layer(source).output)(x))
    h = relu_out * mask
    order = ["c1", "c2", "flat", "d1", "head"]
    for name in order[order.index(source) + 1 :]:
        h = model.get_layer(name)(h)
    return _np(h)


@pytest.mark.parametrize(
    "source, mask",
    [
        ("c1", [1, 0, 0, 1, 1, 0]),
        ("c2", [0, 1, 1, 0, 1]),
        ("d1", [1, 1, 0, 1, 0, 0, 1]),
    ],
)
def test_binary_mask_equals_zeroing_relu_channels_in_original(
    mask_model, rng, source, mask
):
    mask = np.array(mask, "float32")
    x = _x(rng, 8, 8, 3)
    gated = kd.inject_gates(mask_model)
    gate = gated.get_layer(f"{source}_gate")
    gate.set_gate(mask)
    expected = _manual_masked_output(mask_model, source, mask, x)
    unmasked = _np(mask_model(x))
    scale = np.abs(expected).max()
    assert np.abs(expected - unmasked).max() > 1e-3 * scale  # mask matters
    np.testing.assert_allclose(_np(gated(x)), expected, rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------
# split_softmax
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16_softmax():
    model = keras.applications.VGG16(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    x = np.random.default_rng(11).normal(size=(2, 32, 32, 3)).astype("float32")
    # Random-init logits are ~1e-4, i.e. a near-uniform softmax; rescale the
    # classifier so that the logits are O(1) and the softmax is informative.
    features = _np(keras.Model(model.input, model.get_layer("fc2").output)(x))
    kernel, bias = model.get_layer("predictions").get_weights()
    kernel *= 3.0 / np.abs(features @ kernel).max()
    model.get_layer("predictions").set_weights([kernel, bias])
    return model, x, features


def test_split_softmax_vgg16_logits_softmax_to_model_output(vgg16_softmax):
    model, x, _ = vgg16_softmax
    logits_model, ended_in_softmax = split_softmax(model)
    assert ended_in_softmax is True
    logits = _np(logits_model(x))
    probs = _np(model(x))
    assert logits.shape == probs.shape == (2, 10)
    assert _max_diff(logits, probs) > 0.1  # really logits, not probabilities
    np.testing.assert_allclose(_np(ops.softmax(logits)), probs, rtol=0, atol=1e-6)


def test_split_softmax_vgg16_logits_are_predictions_pre_activation(vgg16_softmax):
    model, x, features = vgg16_softmax
    logits_model, _ = split_softmax(model)
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_allclose(
        _np(logits_model(x)), features @ kernel + bias, rtol=1e-5, atol=1e-5
    )


def test_split_softmax_leaves_vgg16_predicting_probabilities(vgg16_softmax):
    model, x, _ = vgg16_softmax
    split_softmax(model)
    assert model.get_layer("predictions").activation is keras.activations.softmax
    np.testing.assert_allclose(_np(model(x)).sum(axis=-1), 1.0, atol=1e-6)


def _softmax_head(kind):
    inp = keras.Input((5,))
    if kind == "sequential_fused_dense":
        model = keras.Sequential(
            [inp, layers.Dense(4, activation="softmax", name="head")]
        )
        return model, model.get_layer("head")
    head = layers.Dense(4, name="head")
    logits = head(inp)
    if kind == "softmax_layer":
        out = layers.Softmax()(logits)
    elif kind == "ops_softmax":
        out = ops.softmax(logits)
    elif kind == "activation_softmax":
        out = layers.Activation("softmax")(logits)
    return keras.Model(inp, out), head


@pytest.mark.parametrize(
    "kind",
    ["softmax_layer", "ops_softmax", "activation_softmax", "sequential_fused_dense"],
)
def test_split_softmax_returns_pre_softmax_logits(kind, rng):
    model, head = _softmax_head(kind)
    x = _x(rng, 5)
    logits_model, ended_in_softmax = split_softmax(model)
    assert ended_in_softmax is True
    kernel, bias = head.get_weights()
    expected_logits = x @ kernel + bias
    np.testing.assert_allclose(
        _np(logits_model(x)), expected_logits, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        _np(ops.softmax(logits_model(x))), _np(model(x)), rtol=0, atol=1e-6
    )


def test_split_softmax_on_logits_model_returns_false_and_same_outputs(rng):
    inp = keras.Input((5,))
    h = layers.Dense(6, activation="relu")(inp)
    model = keras.Model(inp, layers.Dense(4, name="logits")(h))
    x = _x(rng, 5)
    logits_model, ended_in_softmax = split_softmax(model)
    assert ended_in_softmax is False
    np.testing.assert_array_equal(_np(logits_model(x)), _np(model(x)))


def test_split_softmax_rejects_multi_output_model():
    inp = keras.Input((5,))
    model = keras.Model(inp, [layers.Dense(2)(inp), layers.Dense(3)(inp)])
    with pytest.raises(ValueError, match="has 2 outputs"):
        split_softmax(model)


# ---------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = layers.Dense(3, activation="relu")

    def call(self, x):
        return self.dense(x)


def _built_subclassed():
    model = _Subclassed()
    model(np.ones((1, 4), "float32"))
    return model


def test_inject_gates_rejects_model_without_relu():
    model = keras.applications.EfficientNetB0(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    with pytest.raises(ValueError, match=r"no ReLU activation.*silu"):
        kd.inject_gates(model)


def test_inject_gates_refuses_an_already_gated_model():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, activation="relu")(inputs)
    x = layers.GlobalAveragePooling2D()(x)
    gated = kd.inject_gates(keras.Model(inputs, layers.Dense(2)(x)))
    with pytest.raises(ValueError, match="already has `ChannelGate`s.*"
                       "Pass the original model"):
        kd.inject_gates(gated)


def test_inject_gates_rejects_subclassed_model():
    with pytest.raises(ValueError, match="subclassed"):
        kd.inject_gates(_built_subclassed())


def test_split_softmax_rejects_subclassed_model():
    with pytest.raises(ValueError, match="subclassed"):
        split_softmax(_built_subclassed())


@pytest.mark.parametrize(
    "not_a_model", ["a string", layers.Dense(3)], ids=["str", "Dense"]
)
@pytest.mark.parametrize("fn", [kd.inject_gates, split_softmax], ids=["inject", "split"])
def test_non_model_raises_type_error(fn, not_a_model):
    with pytest.raises(TypeError, match=r"Expected a `keras.Model`"):
        fn(not_a_model)


@pytest.mark.parametrize("fn", [kd.inject_gates, split_softmax], ids=["inject", "split"])
def test_unbuilt_sequential_raises_value_error(fn):
    model = keras.Sequential([layers.Dense(3, activation="relu")])
    with pytest.raises(ValueError, match="is not built.*build"):
        fn(model)


def test_gated_reuses_a_gated_model_and_injects_gates_into_a_plain_one():
    model, _, channels = _sequential_cnn(np.random.default_rng(0))
    gated = kd.inject_gates(model)
    assert model_surgery.gated(gated) is gated
    fresh = model_surgery.gated(model)
    assert fresh is not model and isinstance(fresh, keras.Model)
    assert [s.channels for s in kd.list_gates(fresh)] == channels
