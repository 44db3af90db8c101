"""Helpers for test_compaction.py: models, hand-made CIVs, references.

The references are what `compact()` must reproduce: the sub-task's own
masked softmax `sub(x)` and its gated logits model `sub.logits_model(x)`,
both restricted to the sub-task's classes in the order the user gave.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import keras_drnet as kd
from keras_drnet.channel_gate import ChannelGate
from keras_drnet.civ import gate_layout
from keras_drnet.civ import model_fingerprint

NUM_CLASSES = 10
NAMES = [f"c{i}" for i in range(NUM_CLASSES)]
CIFAR_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# ---------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------


def vgg_bn(seed=0, filters=(16, 32, 64), input_shape=(32, 32, 3),
           num_classes=NUM_CLASSES, random_bn=True):
    """A VGG16-style CNN: per block 2 x (conv -> BN -> ReLU), max-pool;
    then Flatten -> Dense(relu) -> Dropout -> Dense (logits).

    Gates: one per ReLU (6 conv ReLUs, `fc1`). With `random_bn`, the
    BatchNormalization layers get random scales and variances (zero mean and
    shift, so the network stays positively homogeneous in its input).
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input(input_shape, name="image")
    h = inp
    for i, f in enumerate(filters):
        for j in range(2):
            h = layers.Conv2D(f, 3, padding="same", name=f"b{i}_conv{j}")(h)
            h = layers.BatchNormalization(name=f"b{i}_bn{j}")(h)
            h = layers.ReLU(name=f"b{i}_relu{j}")(h)
        h = layers.MaxPooling2D(name=f"b{i}_pool")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(64, activation="relu", name="fc1")(h)
    h = layers.Dropout(0.5, name="drop")(h)
    out = layers.Dense(num_classes, name="head")(h)
    model = keras.Model(inp, out, name="vgg_bn")
    if random_bn:
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                c = layer.gamma.shape[0]
                layer.set_weights(
                    [
                        rng.uniform(0.5, 1.5, c).astype("float32"),
                        np.zeros(c, "float32"),
                        np.zeros(c, "float32"),
                        rng.uniform(0.5, 2.0, c).astype("float32"),
                    ]
                )
    return model


def application(name, size=32):
    """A keras.applications model, random weights, (size, size, 3) -> 10
    logits.

    Its classifier is scaled so that the logits of images in [0, 1] reach
    ~5 (at random initialisation they are ~1e-2 to 1e-12, which makes the
    softmax uniform and every CDRP gradient vanish: a dissection then gives
    identical CIVs for all channels).
    """
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None,
        input_shape=(size, size, 3),
        classes=NUM_CLASSES,
        classifier_activation=None,
    )
    x = np.random.default_rng(9).uniform(0, 1, (8, size, size, 3))
    logits = to_numpy(model(x.astype("float32")))
    head = model.layers[-1]
    factor = 5.0 / float(np.abs(logits).max())
    head.set_weights([w * factor for w in head.get_weights()])
    return model


def _head(h, num_classes=4):
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    return layers.Dense(num_classes, name="head")(h)


FEATURE_INPUT = (8, 8, 3)


def shared_conv_model():
    """One Conv2D layer called on two branches, then added."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    a = layers.Conv2D(5, 1, activation="relu", name="pre_a")(inp)
    b = layers.Conv2D(5, 1, activation="relu", name="pre_b")(inp)
    shared = layers.Conv2D(8, 3, padding="same", activation="relu",
                           name="shared")
    h = layers.Add(name="add")([shared(a), shared(b)])
    return keras.Model(inp, _head(h), name="shared_conv")


def nested_model():
    """A functional sub-model (conv -> relu -> conv -> relu) used inside."""
    inner_in = keras.Input((8, 8, 6), name="inner_in")
    g = layers.Conv2D(7, 3, padding="same", activation="relu",
                      name="inner1")(inner_in)
    g = layers.Conv2D(5, 3, padding="same", activation="relu",
                      name="inner2")(g)
    inner = keras.Model(inner_in, g, name="inner")
    inp = keras.Input(FEATURE_INPUT, name="image")
    h = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="conv0")(inp)
    h = inner(h)
    return keras.Model(inp, _head(h), name="nested")


def concat_model():
    """Two gated branches concatenated, then a conv reading both."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    a = layers.Conv2D(4, 3, padding="same", activation="relu",
                      name="branch_a")(inp)
    b = layers.Conv2D(6, 1, activation="relu", name="branch_b")(inp)
    h = layers.Concatenate(name="cat")([a, b])
    h = layers.Conv2D(8, 3, padding="same", activation="relu",
                      name="after")(h)
    return keras.Model(inp, _head(h), name="concat")


def residual_model():
    """x -> conv(relu) ; x + conv(relu)(conv(relu)(x)) -> relu."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    x = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="stem")(inp)
    r = layers.Conv2D(5, 3, padding="same", activation="relu",
                      name="res1")(x)
    r = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="res2")(r)
    h = layers.Add(name="add")([x, r])
    h = layers.ReLU(name="add_relu")(h)
    return keras.Model(inp, _head(h), name="residual")


def ops_relu_model():
    """A raw `keras.ops.relu` op between convolutions."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    h = layers.Conv2D(6, 3, padding="same", name="conv1")(inp)
    h = keras.ops.relu(h)
    h = layers.Conv2D(7, 3, padding="same", activation="relu",
                      name="conv2")(h)
    return keras.Model(inp, _head(h), name="ops_relu")


def separable_model():
    """SeparableConv2D (depth_multiplier 2) between plain convolutions."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    h = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="conv1")(inp)
    h = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2,
                               activation="relu", name="sep")(h)
    h = layers.Conv2D(5, 1, activation="relu", name="conv2")(h)
    return keras.Model(inp, _head(h), name="separable")


def depthwise_model():
    """DepthwiseConv2D with depth_multiplier=2 between convolutions
    (depth_multiplier=1 is covered by MobileNetV2)."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    h = layers.Conv2D(8, 3, padding="same", activation="relu",
                      name="conv1")(inp)
    h = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2,
                               activation="relu", name="dw2")(h)
    h = layers.Conv2D(6, 1, activation="relu", name="conv2")(h)
    return keras.Model(inp, _head(h), name="depthwise")


def bn_after_gate_model():
    """conv(relu) -> gate -> BN with a shift -> conv: a closed channel
    becomes the constant BN shift, which the next conv reads."""
    inp = keras.Input(FEATURE_INPUT, name="image")
    h = layers.Conv2D(6, 3, padding="same", activation="relu",
                      name="conv1")(inp)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Conv2D(5, 3, padding="same", activation="relu",
                      name="conv2")(h)
    model = keras.Model(inp, _head(h), name="bn_after_gate")
    model.get_layer("bn").set_weights(
        [
            np.linspace(0.5, 1.5, 6).astype("float32"),
            np.array([0.3, -0.2, 0.5, 0.0, 0.1, -0.4], "float32"),
            np.array([0.1, 0.2, -0.1, 0.0, 0.3, 0.05], "float32"),
            np.linspace(0.5, 2.0, 6).astype("float32"),
        ]
    )
    return model


FEATURE_MODELS = {
    "shared_conv": shared_conv_model,
    "nested": nested_model,
    "concat": concat_model,
    "residual_add": residual_model,
    "ops_relu": ops_relu_model,
    "separable": separable_model,
    "depthwise_m2": depthwise_model,
    "bn_after_gate": bn_after_gate_model,
}


# ---------------------------------------------------------------------------
# CIVs and sub-tasks.
# ---------------------------------------------------------------------------


def layout_of(model):
    return gate_layout(kd.inject_gates(model))


def hand_civs(model, rng=None, vectors=None, names=None, layout=None):
    """CIVs made by hand: uniform [0, 1) vectors unless `vectors` given."""
    layout = layout if layout is not None else layout_of(model)
    total = sum(entry.channels for entry in layout)
    n = int(model.outputs[0].shape[-1])
    names = names or [f"c{i}" for i in range(n)]
    if vectors is None:
        vectors = rng.uniform(0.0, 1.0, (n, total))
    vectors = np.broadcast_to(np.asarray(vectors, "float32"), (n, total))
    return kd.CIVs(
        vectors, names, np.full(n, 5), layout, model_fingerprint(model), {}
    )


def civs_from_masks(model, masks, n_classes=None):
    """CIVs in which every class has the same 0/1 vector: `masks` maps a
    gate name to its 0/1 list (gates not named are all ones). With
    `threshold=0.5` the CCIV is exactly these masks."""
    layout = layout_of(model)
    unknown = set(masks) - {entry.name for entry in layout}
    assert not unknown, (unknown, [e.name for e in layout])
    row = np.concatenate(
        [
            np.asarray(masks.get(e.name, np.ones(e.channels)), "float32")
            for e in layout
        ]
    )
    return hand_civs(model, vectors=row[None], layout=layout)


def amplify_head(sub, x, target=5.0):
    """Scales the gated model's final Dense so that the sub-task's logits on
    `x` reach `target` in absolute value (random deep nets with most
    channels off give logits near 1e-15 and near-uniform probabilities).

    Only the sub-task's own gated copy changes; returns the factor.
    """
    head = sub.logits_model.layers[-1]
    assert isinstance(head, layers.Dense), head
    logits = sub_logits(sub, x)
    scale = float(np.abs(logits).max())
    assert scale > 0, "the sub-task's logits are all zero"
    factor = target / scale
    weights = head.get_weights()
    head.set_weights([w * factor for w in weights])
    return factor


# ---------------------------------------------------------------------------
# References and comparisons.
# ---------------------------------------------------------------------------


def to_numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def sub_logits(sub, x):
    """The sub-task's gated logits, its classes' columns in the given order."""
    out = to_numpy(sub.logits_model(x, training=False))
    return out[:, list(sub.cciv.classes)]


def sub_probabilities(sub, x):
    return to_numpy(sub(x))[:, list(sub.cciv.classes)]


def assert_logits_close(got, want, rel=1e-5, what="logits"):
    """|got - want| <= rel * max|want|, with a non-zero scale."""
    got = np.asarray(got, "float64")
    want = np.asarray(want, "float64")
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max())
    assert scale > 0, f"{what}: reference is all zero"
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, (
        f"{what}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"
    )
    return err / scale


def check_compact_equals(sub, x, rel=2e-5, atol=1e-4, input_dependent=True):
    """Compacts `sub` (with and without softmax) and compares on `x`.

    Returns `(small_with_softmax, small_logits, relative_error)`.
    """
    want_logits = sub_logits(sub, x)
    scale = float(np.abs(want_logits).max())
    assert scale > 0, "degenerate sub-task: its logits are all zero"
    if input_dependent:
        # The logits must depend on the image, not only on biases/shifts.
        spread = float(np.ptp(want_logits, axis=0).max())
        assert spread > 1e-3 * scale, (spread, scale)
    small_logits = kd.compact(sub, include_softmax=False)
    got_logits = to_numpy(small_logits(x))
    assert got_logits.shape == (len(x), len(sub.cciv.classes))
    rel_err = assert_logits_close(got_logits, want_logits, rel)
    small = kd.compact(sub)
    got = to_numpy(small(x))
    want = sub_probabilities(sub, x)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    return small, small_logits, rel_err


def masks_in(model):
    """`{gate name: 0/1 mask}` of the gates a compact model still applies
    (as `Rescaling` layers: after a residual Add they cannot be folded)."""
    assert not any(isinstance(l, ChannelGate) for l in model.layers)
    return {
        l.name: np.ravel(l.scale)
        for l in model.layers
        if isinstance(l, layers.Rescaling) and l.name.endswith("_gate")
    }


def all_layers_have_channels(model):
    """Every layer's outputs have >= 1 channel and no weight is empty."""
    for layer in model.layers:
        for w in layer.weights:
            assert 0 not in tuple(w.shape), (layer.name, w.path, w.shape)
        out = layer.output
        for tensor in keras.tree.flatten(out):
            assert tensor.shape[-1] is None or tensor.shape[-1] >= 1, (
                layer.name, tensor.shape,
            )


def tflite_predict(flatbuffer, x):
    """Runs a TFLite flatbuffer on the batch `x` (input resized to it)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.asarray(x, inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def cifar_train(n=5000):
    """The first `n` CIFAR-10 training images scaled to [0, 1], and labels."""
    import tensorflow_datasets as tfds

    ds = tfds.load(
        "cifar10",
        split=f"train[:{n}]",
        as_supervised=True,
        data_dir=os.environ.get("TFDS_DATA_DIR"),
        download=False,
    )
    x, y = next(iter(ds.batch(n).as_numpy_iterator()))
    return x.astype("float32") / 255.0, np.asarray(y, "int64")
