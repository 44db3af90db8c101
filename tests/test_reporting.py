"""Tests for keras_drnet.reporting and graph.flow: the sub-task report.

A small CNN (Conv -> Conv -> Flatten -> Dense -> Dense) is trained for one
epoch on MNIST `train[:6000]`, dissected with a few images per class, and
reduced to a two-class sub-task. Accuracies are recomputed from the
original model, and running parameters / MACs are counted by hand from the
per-gate masks.
"""

import os

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from keras import layers

import keras_drnet as kd
from keras_drnet.graph import running_costs

matplotlib.use("Agg")

NAMES = [
    "zero", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine",
]  # fmt: skip
CLASSES = ["three", "eight"]
LIVE = [3, 8]
# Shapes of the chain CNN: 28 -> 13 -> 6.
H1 = W1 = 13
H2 = W2 = 6
C1, C2, D1 = 8, 16, 32


def _load(split):
    ds = tfds.load(
        "mnist",
        split=split,
        as_supervised=True,
        data_dir=os.environ.get("TFDS_DATA_DIR"),
        download=False,
    )
    return ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))


def _numpy(ds):
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, "int64")


def chain_cnn():
    keras.utils.set_random_seed(11)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Conv2D(C1, 3, strides=2, activation="relu", name="conv1"),
            layers.Conv2D(C2, 3, strides=2, activation="relu", name="conv2"),
            layers.Flatten(name="flat"),
            layers.Dense(D1, activation="relu", name="fc1"),
            layers.Dense(10, activation="softmax", name="head"),
        ],
        name="mnist_chain",
    )


@pytest.fixture(scope="module")
def trained():
    x_train, y_train = _numpy(_load("train[:6000]"))
    model = chain_cnn()
    model.compile(
        keras.optimizers.Adam(3e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    civs = kd.dissect(
        model,
        (x_train[:400], y_train[:400]),
        samples_per_class=4,
        class_names=NAMES,
        batch_size=40,
        verbose=0,
    )
    test_ds = _load("test")
    x_test, y_test = _numpy(test_ds)
    return dict(model=model, civs=civs, test_ds=test_ds, x_test=x_test,
                y_test=y_test)


@pytest.fixture(scope="module")
def sub(trained):
    return kd.subtask(trained["model"], trained["civs"], CLASSES, budget=0.4)


@pytest.fixture(scope="module")
def report(trained, sub):
    return kd.evaluate_subtask(sub, trained["test_ds"])


def kept(sub):
    per_gate = sub.cciv.per_gate()
    return tuple(
        int(per_gate[f"{name}_gate"].sum()) for name in ("conv1", "conv2", "fc1")
    )


def expected_params(k1, k2, k3, classes=len(LIVE)):
    """Running parameters of the chain, layer by layer, from kept channels.

    A weight runs iff its input channel is live and its output channel is
    needed: conv1's inputs all live; conv2 reads k1 live channels; fc1 reads
    H2*W2*k2 of the flattened inputs; of the head's 10 outputs only the
    sub-task's classes are needed (the masked softmax never reads the rest).
    """
    return {
        "conv1": 3 * 3 * 1 * k1 + k1,
        "conv2": 3 * 3 * k1 * k2 + k2,
        "fc1": H2 * W2 * k2 * k3 + k3,
        "head": k3 * classes + classes,
    }


def expected_macs(k1, k2, k3, classes=len(LIVE)):
    return {
        "conv1": 3 * 3 * 1 * k1 * H1 * W1,
        "conv2": 3 * 3 * k1 * k2 * H2 * W2,
        "fc1": H2 * W2 * k2 * k3,
        "head": k3 * classes,
    }


# ---------------------------------------------------------------------------
# Accuracy.
# ---------------------------------------------------------------------------


def test_the_model_trained(trained):
    probabilities = trained["model"].predict(trained["x_test"][:1000], verbose=0)
    accuracy = (probabilities.argmax(-1) == trained["y_test"][:1000]).mean()
    assert accuracy > 0.85


def test_report_counts_the_test_images_of_the_two_classes(trained, report):
    expected = int(np.isin(trained["y_test"], LIVE).sum())
    assert expected > 1500  # about 1000 per digit in MNIST test
    assert report.images == expected
    assert report.classes == CLASSES


def test_full_net_accuracy_is_the_original_restricted_to_the_classes(
    trained, report
):
    select = np.isin(trained["y_test"], LIVE)
    x, y = trained["x_test"][select], trained["y_test"][select]
    p = trained["model"].predict(x, batch_size=256, verbose=0)
    predicted = np.asarray(LIVE)[p[:, LIVE].argmax(-1)]
    expected = (predicted == y).mean()
    # Restricting matters: the 10-class argmax is sometimes another digit.
    assert (p.argmax(-1) != predicted).any()
    assert report.full_net_accuracy == pytest.approx(expected, abs=1e-12)


def test_sub_net_accuracy_is_the_accuracy_of_sub_predict(trained, sub, report):
    select = np.isin(trained["y_test"], LIVE)
    x, y = trained["x_test"][select], trained["y_test"][select]
    expected = (sub.predict(x, batch_size=256, verbose=0).argmax(-1) == y).mean()
    assert report.sub_net_accuracy == pytest.approx(expected, abs=1e-12)
    # The sub-task runs 40% of the channels: its accuracy differs.
    assert report.sub_net_accuracy != report.full_net_accuracy


# ---------------------------------------------------------------------------
# Running channels, parameters, FLOPs.
# ---------------------------------------------------------------------------


def test_running_channels_and_gates_follow_the_cciv(sub, report):
    k1, k2, k3 = kept(sub)
    assert report.running_channels == pytest.approx((k1 + k2 + k3) / 56)
    assert report.running_channels == pytest.approx(0.4, abs=3 / 56)
    assert report.gates == [
        ("conv1_gate", C1, k1),
        ("conv2_gate", C2, k2),
        ("fc1_gate", D1, k3),
    ]


def test_running_params_are_counted_per_layer_by_hand(sub, report):
    k1, k2, k3 = kept(sub)
    assert 0 < k1 < C1 and 0 < k2 < C2 and 0 < k3 < D1
    expected = expected_params(k1, k2, k3)
    assert {c.name: c.running_params for c in report.layers} == expected
    assert report.running_params == sum(expected.values())


def test_total_params_and_flops_are_the_model_s(trained, report):
    assert {c.name: c.params for c in report.layers} == expected_params(
        C1, C2, D1, classes=10
    )
    assert report.params == trained["model"].count_params() == 20042
    assert report.flops == sum(expected_macs(C1, C2, D1, classes=10).values())


def test_running_flops_are_counted_per_layer_by_hand(sub, report):
    k1, k2, k3 = kept(sub)
    expected = expected_macs(k1, k2, k3)
    assert {c.name: c.running_macs for c in report.layers} == expected
    assert report.running_flops == sum(expected.values())
    assert report.running_flops_fraction == pytest.approx(
        report.running_flops / report.flops
    )


def test_all_channels_kept_runs_every_parameter(trained):
    sub = kd.subtask(trained["model"], trained["civs"], CLASSES, budget=1.0)
    x, y = trained["x_test"][:600], trained["y_test"][:600]
    report = kd.evaluate_subtask(sub, (x, y))
    total = trained["model"].count_params()
    # Everything runs but the head's rows for the 8 classes left out.
    unread = (D1 + 1) * (10 - len(LIVE))
    assert report.params == total
    assert report.running_params == total - unread
    assert report.running_flops == report.flops - D1 * (10 - len(LIVE))
    assert report.running_channels == 1.0
    assert report.sub_net_accuracy == report.full_net_accuracy
    assert report.images == int(np.isin(y, LIVE).sum())


def test_report_reads_batched_datasets_and_tuples_alike(trained, sub):
    x, y = trained["x_test"][:500], trained["y_test"][:500]
    from_tuple = kd.evaluate_subtask(sub, (x, y))
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(37)
    from_batches = kd.evaluate_subtask(sub, batched, batch_size=64)
    assert from_tuple.images == from_batches.images == int(
        np.isin(y, LIVE).sum()
    )
    assert from_tuple.full_net_accuracy == from_batches.full_net_accuracy
    assert from_tuple.sub_net_accuracy == from_batches.sub_net_accuracy


def test_report_refuses_a_dataset_without_the_classes(trained, sub):
    y = trained["y_test"]
    other = ~np.isin(y, LIVE)
    with pytest.raises(ValueError, match="no image of the sub-task's classes"):
        kd.evaluate_subtask(sub, (trained["x_test"][other][:50], y[other][:50]))


def test_report_str_shows_the_table_row(report):
    text = str(report)
    assert "three-eight" in text
    assert f"{report.running_params:,} of {report.params:,}" in text
    assert f"{report.images} test images" in text


def test_plot_writes_a_png_and_returns_the_figure(report, tmp_path):
    import matplotlib.figure

    path = tmp_path / "layers.png"
    fig = report.plot(str(path))
    assert isinstance(fig, matplotlib.figure.Figure)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    # One bar pair per gate.
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * len(report.gates)
    matplotlib.pyplot.close(fig)


# ---------------------------------------------------------------------------
# graph.flow on keras.applications.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["ResNet50", "MobileNetV2"])
def application(request):
    model = getattr(keras.applications, request.param)(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    return model, kd.inject_gates(model)


def _set_gates(gated, masks):
    for spec, mask in zip(kd.list_gates(gated), masks):
        spec.layer.set_gate(mask)


def test_all_ones_cciv_runs_every_parameter_of_an_application(application):
    model, gated = application
    _set_gates(gated, [np.ones(s.channels) for s in kd.list_gates(gated)])
    costs = running_costs(gated)
    assert sum(c.params for c in costs) == model.count_params()
    assert sum(c.running_params for c in costs) == model.count_params()
    assert sum(c.running_macs for c in costs) == sum(c.macs for c in costs)


def test_random_cciv_runs_fewer_parameters_of_an_application(application):
    model, gated = application
    rng = np.random.default_rng(0)
    masks = [
        (rng.uniform(size=s.channels) < 0.5).astype("float32")
        for s in kd.list_gates(gated)
    ]
    _set_gates(gated, masks)
    costs = running_costs(gated)
    total = sum(c.params for c in costs)
    running = sum(c.running_params for c in costs)
    assert total == model.count_params()
    assert running < total
    assert sum(c.running_macs for c in costs) < sum(c.macs for c in costs)
    _set_gates(gated, [np.ones(s.channels) for s in kd.list_gates(gated)])
