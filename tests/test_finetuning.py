"""Tests for keras_drnet.finetuning: a short fit of the compact sub-task.

The fit must learn the sub-task from the original model's labels (mapped to
the compact model's output columns, other classes left out), end with the
BatchNorm statistics of the fine-tuned network, and leave the sub-task
untouched.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import _subtask_models as sm
import keras_drnet as kd


def labelled(seed=0, per_class=24):
    """Images whose class is their sign pattern; labels are original ones."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(sm.NAMES)):
        base = rng.choice([-1.0, 1.0], (1, 12, 12, 3))
        noise = rng.normal(0, 0.3, (per_class, 12, 12, 3))
        images.append((base + noise).astype("float32"))
        labels.append(np.full(per_class, label))
    return np.concatenate(images), np.concatenate(labels)


@pytest.fixture
def sub():
    model = sm.bn_chain()
    civs = sm.hand_civs(model, np.random.default_rng(1))
    x, y = labelled(seed=1)
    # "dog" first: the compact model's columns are not the label order.
    return kd.subtask(model, civs, ["dog", "cat"], budget=0.6,
                      calibrate=(x, y))


def test_finetune_learns_the_subtask_from_original_labels(sub):
    x, y = labelled()
    small = kd.finetune(sub, (x, y), epochs=30,
                        optimizer=keras.optimizers.Adam(0.01), verbose=0)
    names = small.get_layer("class_probabilities").class_names
    assert sorted(names) == ["cat", "dog"]
    keep = np.isin(y, [0, 1])
    predicted = np.asarray(small.predict(x[keep], verbose=0)).argmax(-1)
    expected = [names.index(sm.NAMES[label]) for label in y[keep]]
    assert np.mean(predicted == expected) >= 0.95
    # Only the 48 cat and dog images were fitted on: one batch per epoch.
    assert len(small.history.history["loss"]) == 30
    assert small.history.history["loss"][-1] < small.history.history["loss"][0]


def test_batchnorm_statistics_are_those_of_the_finetuned_network(sub):
    x, y = labelled()
    outputs = keras.ops.convert_to_numpy(sub(x))
    before = sm.bn_stats(kd.compact(sub))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    small = kd.finetune(sub, ds, epochs=2, verbose=0)
    after = sm.bn_stats(small)
    assert after.keys() == before.keys() == {"bn1", "bn2", "bn3"}
    cat_dog = x[np.isin(y, [0, 1])]
    for name in after:
        bn = small.get_layer(name)
        # The moments of bn's input over the 48 cat and dog images, as the
        # fine-tuned network computes them.
        features = keras.Model(small.inputs[0], bn.input)
        values = keras.ops.convert_to_numpy(features(cat_dog)).astype("float64")
        np.testing.assert_allclose(
            after[name][2], values.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            after[name][3], values.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5
        )
        # gamma was trained.
        assert not np.array_equal(after[name][0], before[name][0])
    # The sub-task is not modified.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(sub(x)), outputs)


def test_bad_arguments_are_refused(sub):
    x, y = labelled()
    with pytest.raises(ValueError, match="no image of the sub-task's classes"):
        kd.finetune(sub, (x[y > 1], y[y > 1]), verbose=0)
    with pytest.raises(ValueError, match="Received: epochs=0"):
        kd.finetune(sub, (x, y), epochs=0)
