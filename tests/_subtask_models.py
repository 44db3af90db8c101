"""Shared helpers for test_reconstruction/test_subtask/test_reporting.

Small untrained models, hand-made CIVs for them, and hand-written references
(masked softmax, a forward pass that zeroes channels) sharing no code with
`keras_drnet.subtask`.
"""

import os

import keras
import numpy as np
from keras import layers

import keras_drnet as kd
from keras_drnet.civ import gate_layout
from keras_drnet.civ import model_fingerprint

NAMES = ["cat", "dog", "bird", "frog", "ship"]
INPUT = (10, 10, 2)


def chain_cnn(head="softmax", seed=0):
    """conv1(4, relu) -> conv2(6, relu) -> flatten -> fc1(8, relu) -> head.

    Gates: conv1 (4), conv2 (6), fc1 (8): 18 channels. `head` is
    `"softmax"` (fused softmax activation) or `"logits"`.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input(INPUT, name="image")
    h = layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
    h = layers.Conv2D(6, 3, activation="relu", name="conv2")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(8, activation="relu", name="fc1")(h)
    out = layers.Dense(
        len(NAMES),
        activation="softmax" if head == "softmax" else None,
        name="head",
    )(h)
    return keras.Model(inp, out, name=f"chain_{head}")


def bn_relu_cnn(head="softmax", seed=0):
    """conv1 -> BN -> ReLU -> pool -> conv2(relu) -> GAP -> fc1(relu) -> head.

    A `keras.Sequential`; gates: relu1 (5), conv2 (7), fc1 (6). With
    `head="softmax"` the softmax is a separate `Softmax` layer.
    """
    keras.utils.set_random_seed(seed)
    stack = [
        keras.Input(INPUT, name="image"),
        layers.Conv2D(5, 3, use_bias=False, name="conv1"),
        layers.BatchNormalization(name="bn1"),
        layers.ReLU(name="relu1"),
        layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(7, 2, activation="relu", name="conv2"),
        layers.GlobalAveragePooling2D(name="gap"),
        layers.Dense(6, activation="relu", name="fc1"),
        layers.Dense(len(NAMES), name="head"),
    ]
    if head == "softmax":
        stack.append(layers.Softmax(name="softmax"))
    model = keras.Sequential(stack, name=f"bn_relu_{head}")
    # Non-trivial BatchNorm statistics, so that inference mode matters.
    bn = model.get_layer("bn1")
    rng = np.random.default_rng(seed)
    bn.set_weights(
        [
            rng.uniform(0.5, 1.5, 5).astype("float32"),
            rng.uniform(-0.5, 0.5, 5).astype("float32"),
            rng.uniform(-0.2, 0.2, 5).astype("float32"),
            rng.uniform(0.5, 2.0, 5).astype("float32"),
        ]
    )
    return model


def bn_chain(seed=0):
    """(conv -> BN -> ReLU) x 3 -> GAP -> head; input (12, 12, 3).

    Gates: relu1 (6), relu2 (8), relu3 (10); bn2 and bn3 follow a gate.
    """
    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((12, 12, 3))
    for i, filters in enumerate((6, 8, 10), start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.BatchNormalization(name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, layers.Dense(len(NAMES), name="head")(x))


def bn_stats(model):
    """Copies of every BatchNormalization layer's weights, by layer name."""
    return {
        layer.name: [w.copy() for w in layer.get_weights()]
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    }


def hand_civs(model, rng, names=NAMES, counts=None, vectors=None):
    """CIVs made by hand for `model`: uniform [0, 1) vectors by default."""
    layout = gate_layout(kd.inject_gates(model))
    total = sum(entry.channels for entry in layout)
    if vectors is None:
        vectors = rng.uniform(0.0, 1.0, (len(names), total))
    if counts is None:
        counts = np.full(len(names), 5)
    return kd.CIVs(
        vectors, names, counts, layout, model_fingerprint(model), {}
    )


def images(rng, n=6):
    return rng.uniform(0.0, 1.0, (n,) + INPUT).astype("float32")


def masked_softmax(logits, live):
    """Softmax over the columns `live` of `logits`, zero elsewhere (float64)."""
    logits = np.asarray(logits, "float64")
    out = np.zeros_like(logits)
    z = logits[:, list(live)]
    z = np.exp(z - z.max(axis=1, keepdims=True))
    out[:, list(live)] = z / z.sum(axis=1, keepdims=True)
    return out


def restricted(probabilities, live):
    """Full-model probabilities restricted to `live` and renormalised."""
    p = np.asarray(probabilities, "float64")
    out = np.zeros_like(p)
    out[:, list(live)] = p[:, list(live)] / p[:, list(live)].sum(
        axis=1, keepdims=True
    )
    return out


def reference_logits(model, x, masks=None):
    """Logits of `model` with the given ReLU outputs multiplied by masks.

    Runs the original model's layers one by one (eagerly, no gates);
    `masks` maps a source layer name to its 0/1 channel mask, applied to
    that layer's (post-ReLU) output. A softmax head's logits are taken as
    `h @ kernel + bias`, a trailing `Softmax` layer is skipped.
    """
    masks = masks or {}
    h = keras.ops.convert_to_tensor(x)
    chain = [l for l in model.layers if not isinstance(l, layers.InputLayer)]
    for layer in chain:
        if isinstance(layer, layers.Softmax):
            continue
        if (
            isinstance(layer, layers.Dense)
            and layer.activation is keras.activations.softmax
        ):
            h = keras.ops.matmul(h, layer.kernel) + layer.bias
            continue
        h = layer(h, training=False)
        if layer.name in masks:
            h = h * keras.ops.convert_to_tensor(
                np.asarray(masks[layer.name], "float32")
            )
    return keras.ops.convert_to_numpy(h)


def source_masks(sub):
    """`{source layer name: mask}` of a SubtaskModel's current CCIV."""
    return {
        entry.source: mask
        for entry, mask in zip(sub.cciv.layout, sub.cciv.per_gate().values())
    }


def env_with_tfds():
    env = dict(os.environ)
    env.setdefault("TFDS_DATA_DIR", "/work/shared/tensorflow_datasets")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env
