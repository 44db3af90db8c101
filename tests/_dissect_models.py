"""Shared helpers for test_gate_fitting.py, test_dissection.py, test_civ.py.

A small CNN trained on a slice of MNIST (random weights give degenerate,
all-zero CDRPs), cached once per test session, and a per-image reference
implementation of the CDRP fitting that shares no code with
`keras_drnet.gate_fitting`.
"""

import os
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import keras_drnet as kd
from keras_drnet.civ import LayoutEntry

NUM_CLASSES = 10
CLASS_NAMES = [
    "zero", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine",
]  # fmt: skip
PAPER = dict(
    iterations=30, learning_rate=0.1, momentum=0.9, gamma=0.05, clip=(0.0, 10.0)
)

_CACHE = {}


def _mnist(split):
    import tensorflow_datasets as tfds

    ds = tfds.load(
        "mnist",
        split=split,
        as_supervised=True,
        data_dir=os.environ.get("TFDS_DATA_DIR"),
        download=False,
    )
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    images = np.stack(images).astype("float32") / 255.0
    return images, np.asarray(labels, "int64")


def build_cnn(logits=False, sequential=False):
    """Conv(relu) -> pool -> conv -> BN -> ReLU -> pool -> dense(relu) -> head.

    Gates: conv1 (8), relu2 (16), fc1 (32): 56 channels. `sequential=True`
    builds the same network as a `keras.Sequential` (same weight order).
    """
    stack = [
        layers.Conv2D(8, 3, activation="relu", name="conv1"),
        layers.MaxPooling2D(name="pool1"),
        layers.Conv2D(16, 3, use_bias=False, name="conv2"),
        layers.BatchNormalization(name="bn2"),
        layers.ReLU(name="relu2"),
        layers.MaxPooling2D(name="pool2"),
        layers.Flatten(name="flat"),
        layers.Dense(32, activation="relu", name="fc1"),
        layers.Dense(
            NUM_CLASSES, activation=None if logits else "softmax", name="head"
        ),
    ]
    name = "cnn_logits" if logits else "cnn"
    if sequential:
        return keras.Sequential(
            [keras.Input((28, 28, 1), name="image")] + stack, name=name
        )
    h = inp = keras.Input((28, 28, 1), name="image")
    for layer in stack:
        h = layer(h)
    return keras.Model(inp, h, name=name)


def first_per_class(labels, k):
    """Indices (dataset order) of the first `k` images of every class."""
    taken = np.zeros(NUM_CLASSES, int)
    chosen = []
    for i, label in enumerate(labels):
        if taken[label] < k:
            taken[label] += 1
            chosen.append(i)
    return np.array(chosen)


def trained(tmp_path_factory):
    """Trains (once per session) and returns the shared models and data.

    Returns a dict with `model` (softmax head), `logits_model` (same weights,
    linear head), `model_path` (the softmax model as a `.keras` file),
    `x_train`/`y_train` (6000 images) and `x_test`/`y_test` (600 held-out
    images, from `train[6000:6600]`).
    """
    if "trained" in _CACHE:
        return _CACHE["trained"]
    directory = tmp_path_factory.mktemp("dissect_models")
    x_train, y_train = _mnist("train[:6000]")
    x_test, y_test = _mnist("train[6000:6600]")
    keras.utils.set_random_seed(7)
    model = build_cnn()
    model.compile(
        keras.optimizers.Adam(3e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracy > 0.85, f"the test CNN did not train: accuracy {accuracy}"
    logits_model = build_cnn(logits=True)
    logits_model.set_weights(model.get_weights())
    model_path = str(directory / "cnn.keras")
    model.save(model_path)
    _CACHE["trained"] = dict(
        model=model,
        logits_model=logits_model,
        model_path=model_path,
        dir=directory,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
    )
    return _CACHE["trained"]


# ---------------------------------------------------------------------------
# Reference CDRP: one image at a time, written from the paper (sec. 3.1, 4.1).
# ---------------------------------------------------------------------------


class ReferenceFitter:
    """Fits gates image by image with `keras.optimizers.SGD`.

    The gates of `kd.inject_gates(model)` are set with `set_gate()` from one
    `tf.Variable` λ of shape `[1, total]`; the gradient of the loss is taken
    with respect to the gate variables (and to λ for the L1 term). The logits
    are computed from the gated model's penultimate features and the head's
    kernel and bias, so a softmax head and a logits head are handled alike.
    """

    def __init__(self, model, select="all"):
        self.model = model
        self.gated = kd.inject_gates(model, select=select)
        self.gates = [spec.layer for spec in kd.list_gates(self.gated)]
        self.sizes = [gate.channels for gate in self.gates]
        self.total = sum(self.sizes)
        head = model.layers[-1]
        assert isinstance(head, layers.Dense)
        self.softmax_head = head.activation is keras.activations.softmax
        self.kernel = keras.ops.convert_to_tensor(head.kernel)
        self.bias = keras.ops.convert_to_tensor(head.bias)
        self.features = keras.Model(
            self.gated.inputs, self.gated.get_layer(head.name).input
        )

    def set_gates(self, values):
        values = np.asarray(values, "float32").reshape(-1)
        for gate, part in zip(
            self.gates, np.split(values, np.cumsum(self.sizes)[:-1])
        ):
            gate.set_gate(part)

    def gated_logits(self, image):
        return tf.matmul(self.features(image, training=False), self.kernel) + (
            self.bias
        )

    def probabilities(self, image):
        """The original (ungated) model's output probabilities."""
        out = self.model(image, training=False)
        return out if self.softmax_head else tf.nn.softmax(out)

    @tf.function
    def _gradient(self, image, p, lam, gamma):
        """d/dλ [KL(p || softmax(gated logits)) + sum(gamma * |λ|)]."""
        gate_values = [gate.gate.value for gate in self.gates]
        with tf.GradientTape() as tape:
            tape.watch(gate_values)
            log_q = tf.nn.log_softmax(self.gated_logits(image))
            kl = tf.reduce_sum(tf.math.xlogy(p, p) - p * log_q)
            loss = kl + tf.reduce_sum(gamma * tf.abs(lam))
        *gate_grads, lam_grad = tape.gradient(loss, gate_values + [lam])
        # The gates hold λ: dL/dλ = dKL/d(gate values) + gamma * sign(λ).
        return lam_grad + tf.concat(gate_grads, 0)[None]

    def fit_one(
        self, image, iterations, learning_rate, momentum, gamma, clip,
        on_top1_change="reset",
    ):
        image = tf.constant(image[None])
        p = self.probabilities(image)
        target = int(tf.argmax(p[0]))

        def keeps_top1(gates):
            self.set_gates(gates)
            return int(tf.argmax(self.gated_logits(image)[0])) == target

        lam = tf.Variable(tf.ones([1, self.total]), name="lambda")
        # A number, or one per gate: the weight of each channel's |λ|.
        gamma = tf.constant(
            np.repeat(np.broadcast_to(gamma, len(self.sizes)), self.sizes)[None],
            "float32",
        )
        optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)
        best = lam.numpy()[0]  # the last gates that kept the top-1
        for _ in range(iterations):
            if keeps_top1(lam.numpy()):
                best = lam.numpy()[0]
            self.set_gates(lam.numpy())
            grad = self._gradient(image, p, lam, gamma)
            optimizer.apply_gradients([(grad, lam)])
            lam.assign(tf.clip_by_value(lam, clip[0], clip[1]))
        fitted = lam.numpy()[0]
        kept = keeps_top1(fitted)
        self.set_gates(np.ones(self.total))
        if kept:
            return fitted, kept
        fallback = {
            "reset": np.ones(self.total, "float32"),
            "exclude": np.full(self.total, np.nan, "float32"),
            "keep_best": best,
        }[on_top1_change]
        return fallback, kept

    def __call__(self, images, **hyperparameters):
        """`(cdrps [N, total], kept [N])` for `images`."""
        settings = dict(PAPER, **hyperparameters)
        results = [self.fit_one(image, **settings) for image in images]
        cdrps = np.stack([r[0] for r in results]).astype("float32")
        return cdrps, np.array([r[1] for r in results])


def top1_with_gates(fitter, images, cdrps):
    """Top-1 of `kd.inject_gates(model)` for each image with its own gates.

    The gates are written with `ChannelGate.set_gate()` and the gated model
    itself (softmax or logits head) predicts.
    """
    predict = tf.function(lambda image: fitter.gated(image, training=False))
    top1 = []
    for image, gates in zip(images, cdrps):
        fitter.set_gates(gates)
        top1.append(int(tf.argmax(predict(tf.constant(image[None]))[0])))
    fitter.set_gates(np.ones(fitter.total))
    return np.array(top1)


def shared_dissection(data, xy, samples_per_class=3, batch_size=8):
    """The dissection test_dissection.py and test_civ.py share, and the
    warnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        civs = kd.dissect(
            data["model"],
            xy,
            samples_per_class=samples_per_class,
            class_names=CLASS_NAMES,
            batch_size=batch_size,
            verbose=0,
        )
    return civs, [w for w in record if issubclass(w.category, UserWarning)]


def partial_dissection(data, xy, batch_size=8):
    """A dissection where class 3 has no image and class 5 only one.

    Built from a filtered `tf.data.Dataset`; returns `(civs, warnings, index of the one five)`.
    """
    x, y = xy
    first_five = int(np.flatnonzero(y == 5)[0])
    ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .enumerate()
        .filter(
            lambda i, e: (e[1] != 3)
            & ((e[1] != 5) | (i == tf.constant(first_five, tf.int64)))
        )
        .map(lambda i, e: e)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        civs = kd.dissect(
            data["model"],
            ds,
            samples_per_class=2,
            class_names=CLASS_NAMES,
            batch_size=batch_size,
            verbose=0,
        )
    return civs, record, first_five


def assert_identical(loaded, civs):
    assert loaded.vectors.dtype == civs.vectors.dtype
    assert loaded.vectors.shape == civs.vectors.shape
    assert loaded.vectors.tobytes() == civs.vectors.tobytes()
    assert loaded.counts.dtype == civs.counts.dtype
    np.testing.assert_array_equal(loaded.counts, civs.counts)
    np.testing.assert_array_equal(loaded.top1_changed, civs.top1_changed)
    assert loaded.class_names == civs.class_names
    assert loaded.layout == civs.layout
    assert all(isinstance(e, LayoutEntry) for e in loaded.layout)
    assert loaded.fingerprint == civs.fingerprint
    assert loaded.config == civs.config
    assert loaded.missing == civs.missing


def copy_of(model):
    """A clone of `model` with its weights."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone
