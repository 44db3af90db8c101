"""Tests for keras_drnet.repair: the compact sub-task refit without training.

A small BatchNorm CNN is trained for one epoch on MNIST `train[:6000]`,
dissected (activation scores), and cut to a quarter of every layer's
channels for the 3-vs-8 sub-task. The full network is the original model;
its layer outputs at the compact model's kept channels are what the
repaired layers must come closer to than the compact model's.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from keras import layers

import _compaction_models as cm
from _readme import readme_blocks
import keras_drnet as kd
from keras_drnet.compaction import build_compact

NAMES = [str(i) for i in range(10)]
PAIR = ["3", "8"]


def _numpy(split):
    ds = tfds.load("mnist", split=split, as_supervised=True,
                   data_dir=os.environ.get("TFDS_DATA_DIR"), download=False)
    ds = ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))
    images, labels = zip(*ds.as_numpy_iterator())
    return np.stack(images), np.asarray(labels, "int64")


def bn_cnn():
    keras.utils.set_random_seed(5)
    inp = keras.Input((28, 28, 1), name="image")
    h = inp
    for i, (filters, stride) in enumerate([(16, 1), (32, 2), (32, 2)]):
        h = layers.Conv2D(filters, 3, strides=stride, use_bias=i == 0,
                          name=f"conv{i}")(h)
        h = layers.BatchNormalization(name=f"bn{i}")(h)
        h = layers.ReLU(name=f"relu{i}")(h)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(32, activation="relu", name="fc")(h)
    return keras.Model(inp, layers.Dense(10, name="head")(h), name="bn_cnn")


@pytest.fixture(scope="module")
def trained():
    x, y = _numpy("train[:6000]")
    model = bn_cnn()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    civs = kd.dissect(model, (x, y), samples_per_class=20, class_names=NAMES,
                      method="activation", verbose=0)
    x_test, y_test = _numpy("test")
    pair = np.isin(y_test, [3, 8])
    own = np.isin(y, [3, 8])
    return dict(model=model, civs=civs, x=x[own][:600], y=y[own][:600],
                x_test=x_test[pair], y_test=y_test[pair])


def _accuracy(small, x, y):
    columns = [int(n) for n in small.class_names]
    predicted = np.asarray(small.predict(x, verbose=0)).argmax(-1)
    return float(np.mean(np.asarray(columns)[predicted] == y))


def _outputs(model, names, x):
    reader = keras.Model(model.input,
                         [model.get_layer(n).output for n in names])
    return [keras.ops.convert_to_numpy(v) for v in reader(x)]


def test_nothing_pruned_returns_the_compact_model_unchanged(trained):
    sub = kd.subtask(trained["model"], trained["civs"], PAIR, budget=1.0,
                     budget_scope="gate")
    x = trained["x_test"][:200]
    np.testing.assert_array_equal(
        kd.repair(sub, trained["x"]).predict(x, verbose=0),
        kd.compact(sub).predict(x, verbose=0),
    )


def test_repair_lowers_the_feature_error_layer_by_layer(trained):
    model = trained["model"]
    sub = kd.subtask(model, trained["civs"], PAIR, budget=0.25,
                     budget_scope="gate")
    small, sliced = build_compact(sub)
    kept = {name: out for name, _, _, out in sliced}
    repaired = kd.repair(sub, trained["x"])
    x = trained["x_test"][:500]  # held out
    names = ["bn0", "bn1", "bn2", "fc"]
    full = _outputs(model, names, x)
    before = _outputs(small, names, x)
    after = _outputs(repaired, names, x)
    for name, f, b, a in zip(names, full, before, after):
        f = f[..., kept[name]]
        error_before = np.linalg.norm(b - f) / np.linalg.norm(f)
        error_after = np.linalg.norm(a - f) / np.linalg.norm(f)
        # bn0 reads the image itself: nothing to repair there.
        if name == "bn0":
            np.testing.assert_allclose(a, b, atol=1e-5)
        else:
            assert error_after < 0.8 * error_before, (name, error_before,
                                                      error_after)


def test_repair_lowers_the_accuracy_drop_on_held_out_images(trained):
    model = trained["model"]
    x, y = trained["x_test"], trained["y_test"]
    logits = keras.ops.convert_to_numpy(model(x))[:, [3, 8]]
    full = float(np.mean(np.array([3, 8])[logits.argmax(-1)] == y))
    sub = kd.subtask(model, trained["civs"], PAIR, budget=0.25,
                     budget_scope="gate", calibrate=(trained["x"],
                                                     trained["y"]))
    compact_drop = full - _accuracy(kd.compact(sub), x, y)
    repaired = kd.repair(sub, (trained["x"], trained["y"]))
    repaired_drop = full - _accuracy(repaired, x, y)
    assert compact_drop > 0.02, compact_drop  # the premise: pruning hurts
    assert repaired_drop < compact_drop / 2, (compact_drop, repaired_drop)
    assert repaired.class_names == PAIR


def test_repair_is_deterministic_and_leaves_the_sub_task_alone(trained):
    sub = kd.subtask(trained["model"], trained["civs"], PAIR, budget=0.4,
                     budget_scope="gate")
    before = [w.copy() for w in sub.get_weights()]
    x = trained["x_test"][:100]
    first = kd.repair(sub, trained["x"], seed=3).predict(x, verbose=0)
    second = kd.repair(sub, trained["x"], seed=3).predict(x, verbose=0)
    np.testing.assert_array_equal(first, second)
    for a, b in zip(before, sub.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["concat", "residual_add", "nested",
                                  "separable", "depthwise_m2",
                                  "bn_after_gate", "shared_conv"])
def test_graph_models_stay_runnable_and_shaped_like_compact(name):
    keras.utils.set_random_seed(7)
    model = cm.FEATURE_MODELS[name]()
    civs = cm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["c3", "c1"], budget=0.5,
                     budget_scope="gate")
    x = np.random.default_rng(1).uniform(
        0, 1, (64,) + cm.FEATURE_INPUT).astype("float32")
    small = kd.compact(sub)
    repaired = kd.repair(sub, x, positions=64)
    assert [w.shape for w in repaired.weights] == [
        w.shape for w in small.weights]
    out = repaired.predict(x[:8], verbose=0)
    assert out.shape == (8, 2) and np.isfinite(out).all()
    # What the full network says is closer than what compact says.
    full = keras.ops.convert_to_numpy(
        keras.ops.softmax(model(x)[:, 3::-2]))  # columns c3, c1
    assert np.abs(repaired.predict(x, verbose=0) - full).mean() <= np.abs(
        small.predict(x, verbose=0) - full).mean() + 1e-6


def test_depthwise_layers_are_refit(trained):
    keras.utils.set_random_seed(3)
    inp = keras.Input((12, 12, 3))
    h = layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    h = layers.DepthwiseConv2D(3, activation="relu", name="dw")(h)
    h = layers.Conv2D(6, 1, activation="relu", name="pw")(h)
    h = layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, layers.Dense(4, name="head")(h))
    civs = cm.hand_civs(model, np.random.default_rng(2))
    sub = kd.subtask(model, civs, ["c0", "c2"], budget=0.5,
                     budget_scope="gate")
    x = np.random.default_rng(4).uniform(0, 1, (200, 12, 12, 3))
    x = x.astype("float32")
    small = kd.compact(sub)
    repaired = kd.repair(sub, x)
    assert not np.array_equal(repaired.get_layer("pw").get_weights()[0],
                              small.get_layer("pw").get_weights()[0])
    # The depthwise layer reads the gated conv's kept channels only: same
    # input as the full network there, so it is left as it was.
    np.testing.assert_array_equal(repaired.get_layer("dw").get_weights()[0],
                                  small.get_layer("dw").get_weights()[0])


def test_bad_input_is_refused_before_any_work(trained):
    model, civs = trained["model"], trained["civs"]
    sub = kd.subtask(model, civs, PAIR, budget=0.5, budget_scope="gate")
    with pytest.raises(ValueError, match=r"needs at least \d+ images to "
                       r"refit layer 'fc'.*Received: 20 images"):
        kd.repair(sub, trained["x"][:20])
    nan = trained["x"][:300].copy()
    nan[7, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="images \\[7\\]"):
        kd.repair(sub, nan)
    with pytest.raises(TypeError, match="takes the `SubtaskModel`.*"
                       "Received: Functional"):
        kd.repair(model, trained["x"])
    with pytest.raises(ValueError, match="ridge"):
        kd.repair(sub, trained["x"], ridge=-1)
    with pytest.raises(ValueError, match="positions"):
        kd.repair(sub, trained["x"], positions=0)


@pytest.mark.slow
def test_readme_recommended_path_runs_as_written(trained, tmp_path,
                                                 monkeypatch):
    """The README's recommended calls, as written, on the MNIST model:
    its classes named like CIFAR-10's, so that "cat" and "dog" are the
    digits 3 and 5."""
    monkeypatch.chdir(tmp_path)
    x, y = _numpy("train[:6000]")
    x_test, y_test = _numpy("test")
    names = ["airplane", "automobile", "bird", "cat", "deer",
             "dog", "frog", "horse", "ship", "truck"]
    scope = {
        "kd": kd, "model": trained["model"], "names": names,
        "train": tf.data.Dataset.from_tensor_slices((x, y)),
        "test": tf.data.Dataset.from_tensor_slices((x_test, y_test)),
    }
    recommended, search = readme_blocks("**The recommended path", 2)
    exec(recommended, scope)
    small = scope["small"]
    assert small.class_names == ["cat", "dog"]
    assert kd.read_class_names("cat_dog_small.keras") == ["cat", "dog"]
    assert sum(scope["fractions"]) < len(scope["fractions"])
    exec(search, scope)
    assert scope["table"][0]["exponent"] == 0.0  # the max_params search
    assert scope["small"].class_names == ["cat", "dog"]
