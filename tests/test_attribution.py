"""Tests for keras_drnet.attribution and `dissect(method=...)`.

Every method is checked against an independent per-image computation on
the trained MNIST CNN of `_dissect_models`: the original model's layers run
one by one on one image under a `GradientTape` that watches the post-ReLU
maps the gates sit on (conv1, relu2, fc1), with no gate and no code shared
with `keras_drnet.attribution`.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import _dissect_models as dm
import keras_drnet as kd
from keras_drnet.attribution import Attribution

GATED = ("conv1", "relu2", "fc1")
METHODS = ("activation", "frat", "taylor")
K = 3  # images per class
N = 200  # images offered


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dm.trained(tmp_path_factory)


@pytest.fixture(scope="module")
def xy(data):
    return data["x_train"][:N], data["y_train"][:N]


def reference_scores(model, image, label, method, classes=None):
    """One image's channel scores, written from the method's definition
    (with `classes`: of the softmax over those classes only)."""
    head = model.get_layer("head")
    with tf.GradientTape(persistent=True) as tape:
        h = tf.constant(image[None])
        maps = []
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if layer is head:
                logits = tf.matmul(h, head.kernel) + head.bias
                break
            h = layer(h, training=False)
            if layer.name in GATED:
                tape.watch(h)
                maps.append(h)
        if classes is not None:
            logits = tf.gather(logits, classes, axis=1)
            label = list(classes).index(label)
        p = tf.nn.softmax(logits)[0, label]
        log_p = tf.nn.log_softmax(logits)[0, label]
    scores = []
    for a in maps:
        axes = list(range(1, len(a.shape) - 1))  # spatial axes, if any

        def mean(t):
            return tf.reduce_mean(t, axis=axes) if axes else t

        if method == "activation":
            score = mean(a)
        elif method == "frat":
            score = mean(tf.nn.relu(tape.gradient(p, a)))
        else:
            score = tf.abs(mean(a * tape.gradient(log_p, a)))
        scores.append(score.numpy()[0])
    return np.concatenate(scores)


@pytest.mark.parametrize("method", METHODS)
def test_batched_scores_equal_the_per_image_reference(data, xy, method):
    x, y = xy
    model = data["model"]
    attribution = Attribution(kd.inject_gates(model), method)
    scores, changed = attribution.fit_batch(tf.constant(x[:12]), y[:12])
    assert not np.any(changed)
    expected = np.stack(
        [reference_scores(model, x[i], y[i], method) for i in range(12)]
    )
    assert expected.shape == (12, 8 + 16 + 32)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    # Without labels, the top-1 class is explained.
    top1 = np.argmax(model.predict(x[:4], verbose=0), -1)
    unlabelled, _ = attribution.fit_batch(tf.constant(x[:4]))
    expected = np.stack(
        [reference_scores(model, x[i], top1[i], method) for i in range(4)]
    )
    np.testing.assert_allclose(unlabelled, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_dissect_civ_is_the_mean_of_its_class_reference_scores(
    data, xy, method, tmp_path
):
    x, y = xy
    model = data["model"]
    civs = kd.dissect(model, (x, y), samples_per_class=K, method=method,
                      class_names=dm.CLASS_NAMES, batch_size=8, verbose=0)
    assert civs.config["method"] == method
    assert civs.layout == kd.CIVs.load(_saved(civs, tmp_path)).layout
    chosen = dm.first_per_class(y, K)
    for c in range(dm.NUM_CLASSES):
        rows = [reference_scores(model, x[i], c, method)
                for i in chosen if y[i] == c]
        np.testing.assert_allclose(
            civs.vectors[c], np.mean(rows, axis=0), rtol=1e-4, atol=1e-6
        )
    # The method travels with the file.
    assert kd.CIVs.load(_saved(civs, tmp_path)).config["method"] == method
    assert f"({method})" in repr(civs)


@pytest.mark.parametrize("method", ["frat", "taylor"])
def test_subtask_classes_score_against_their_own_softmax(data, xy, method,
                                                         tmp_path):
    x, y = xy
    model = data["model"]
    pair = [8, 3]
    # Only the pair's images are read; no warning about the other classes.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        civs = kd.dissect(model, (x, y), samples_per_class=K, method=method,
                          classes=[dm.CLASS_NAMES[c] for c in pair],
                          class_names=dm.CLASS_NAMES, batch_size=8,
                          verbose=0)
    assert [c for c in range(dm.NUM_CLASSES) if civs.counts[c]] == [3, 8]
    assert civs.counts[3] == civs.counts[8] == K
    assert civs.config["classes"] == [3, 8]
    chosen = dm.first_per_class(y, K)
    for c in pair:
        rows = [reference_scores(model, x[i], c, method, classes=pair)
                for i in chosen if y[i] == c]
        np.testing.assert_allclose(
            civs.vectors[c], np.mean(rows, axis=0), rtol=1e-4, atol=1e-6
        )
    # Not the ten-class scores.
    everything = kd.dissect(model, (x, y), samples_per_class=K,
                            method=method, batch_size=8, verbose=0)
    assert not np.allclose(civs.vectors[3], everything.vectors[3])
    # They serve that sub-task (in any order), after a round trip too.
    loaded = kd.CIVs.load(_saved(civs, tmp_path))
    for ready in (civs, loaded):
        kd.subtask(model, ready, ["three", "eight"], budget=0.5,
                   budget_scope="gate")
        with pytest.raises(ValueError, match=r"dissected for the sub-task "
                           r"\['three', 'eight'\].*Received: classes="
                           r"\['three'\]"):
            kd.subtask(model, ready, ["three"], budget=0.5)
        with pytest.raises(ValueError, match=r"Class 'one' has no CIV: these "
                           r"CIVs were dissected for the sub-task \['three', "
                           r"'eight'\] only"):
            kd.subtask(model, ready, ["one", "three"], budget=0.5)
    assert "for the sub-task ['three', 'eight']" in repr(loaded)
    # The detector and the per-request export need every class's CIV.
    with pytest.raises(ValueError, match=r"dissected for the sub-task "
                       r"\['three', 'eight'\].*Dissect without `classes`"):
        kd.PathDetector(model, civs)
    with pytest.raises(ValueError, match=r"`export_dynamic` serves any "
                       r"sub-task.*\['three', 'eight'\] only"):
        kd.export_dynamic(model, civs, str(tmp_path / "served"), budget=0.5)


def test_a_subtask_class_without_images_is_named(data, xy):
    x, y = xy
    keep = y != 8
    with pytest.warns(UserWarning, match=r"No image was averaged for "
                      r"classes \['eight'\]"):
        civs = kd.dissect(data["model"], (x[keep], y[keep]),
                          samples_per_class=K, method="taylor",
                          classes=["three", "eight"],
                          class_names=dm.CLASS_NAMES, verbose=0)
    with pytest.raises(ValueError, match="Class 'eight' has no CIV: no "
                       "image of it was seen"):
        civs.index("eight")


def test_resuming_with_other_subtask_classes_is_refused(data, xy, tmp_path):
    x, y = xy
    settings = dict(samples_per_class=None, batch_size=8, method="taylor",
                    classes=["three", "eight"], class_names=dm.CLASS_NAMES,
                    verbose=0)
    plain = kd.dissect(data["model"], (x, y), **settings)
    directory = str(tmp_path / "ckpt")
    kd.dissect(data["model"], (x[:40], y[:40]), checkpoint_dir=directory,
               **settings)
    resumed = kd.dissect(data["model"], (x, y), checkpoint_dir=directory,
                         **settings)
    np.testing.assert_array_equal(resumed.vectors, plain.vectors)
    with pytest.raises(ValueError, match="classes"):
        kd.dissect(data["model"], (x, y), checkpoint_dir=directory,
                   **dict(settings, classes=["three", "one"]))


@pytest.mark.parametrize("method, classes, message", [
    ("cdrp", [1, 2], r"needs `method='taylor'` or `'frat'`. Received: "
                     r"method='cdrp', classes=\[1, 2\]"),
    ("activation", [1, 2], r"Received: method='activation'"),
    ("frat", [1, 2, 1], r"names the same class more than once"),
    ("taylor", [1], r"at least two classes.*Received: classes=\[1\]"),
    ("taylor", [1, 1], r"names the same class more than once"),
    ("taylor", ["one", "thre"], r"Unknown class name 'thre'.*Did you mean "
                                r"'three'"),
    ("taylor", "three", r"must be a list of class names or indices"),
])
def test_bad_subtask_classes_are_refused_before_any_work(data, method,
                                                         classes, message):
    images = np.full((4,) + data["x_train"].shape[1:], np.nan, "float32")
    with pytest.raises((ValueError, TypeError), match=message):
        kd.dissect(data["model"], (images, np.arange(4)), method=method,
                   classes=classes, class_names=dm.CLASS_NAMES, verbose=0)


def _saved(civs, tmp_path):
    path = str(tmp_path / "civs.npz")
    civs.save(path)
    return path


@pytest.mark.parametrize("method", METHODS)
def test_resumed_dissection_equals_an_uninterrupted_one(data, xy, method,
                                                        tmp_path):
    x, y = xy
    # Every image, so that the cut falls between two whole batches.
    settings = dict(samples_per_class=None, batch_size=8, method=method,
                    verbose=0)
    plain = kd.dissect(data["model"], (x, y), **settings)
    directory = str(tmp_path / "ckpt")
    # The stream ends half-way: the checkpoint holds a partial state.
    with pytest.warns(UserWarning, match="No image was averaged"):
        cut = kd.dissect(data["model"], (x[:40], y[:40]),
                         checkpoint_dir=directory, **settings)
    assert cut.counts.sum() == 40
    resumed = kd.dissect(data["model"], (x, y), checkpoint_dir=directory,
                         **settings)
    np.testing.assert_array_equal(resumed.counts, plain.counts)
    np.testing.assert_array_equal(resumed.vectors, plain.vectors)


def test_resuming_with_another_method_is_refused(data, xy, tmp_path):
    directory = str(tmp_path / "ckpt")
    settings = dict(samples_per_class=1, batch_size=8, verbose=0,
                    checkpoint_dir=directory)
    kd.dissect(data["model"], xy, method="activation", **settings)
    with pytest.raises(ValueError, match=r"method='activation'; this one "
                       r"has method='taylor'\. Pass method='activation'"):
        kd.dissect(data["model"], xy, method="taylor", **settings)


@pytest.mark.parametrize("method", ["gradcam", "CDRP", None, 3])
def test_unknown_method_is_refused(data, xy, method):
    with pytest.raises(ValueError, match=r"`method` must be one of \['cdrp', "
                       r"'activation', 'frat', 'taylor'\]. Received: method="):
        kd.dissect(data["model"], xy, samples_per_class=1, method=method)


def test_attribution_civs_build_subtasks_with_per_gate_budgets(data, xy):
    civs = kd.dissect(data["model"], xy, samples_per_class=2,
                      method="taylor", class_names=dm.CLASS_NAMES, verbose=0)
    sub = kd.subtask(data["model"], civs, ["three", "eight"], budget=0.5,
                     budget_scope="gate")
    for (_, total, kept) in kd.evaluate_subtask(
        sub, (data["x_test"], data["y_test"])
    ).gates:
        assert kept == round(total * 0.5)


def test_cdrp_options_object_equals_the_keywords(data, xy):
    x, y = xy
    settings = dict(samples_per_class=1, batch_size=8, verbose=0)
    by_object = kd.dissect(data["model"], (x, y), **settings,
                           method=kd.CDRP(iterations=3, gamma=0.01))
    by_keywords = kd.dissect(data["model"], (x, y), **settings,
                             iterations=3, gamma=0.01)
    np.testing.assert_array_equal(by_object.vectors, by_keywords.vectors)
    assert by_object.config == by_keywords.config
    assert by_object.config["gamma"] == 0.01
    assert by_object.config["iterations"] == 3


@pytest.mark.parametrize("method", METHODS)
def test_cdrp_options_with_another_method_are_refused(data, xy, method):
    with pytest.raises(ValueError, match=r"\['gamma'\] are options of "
                       f"CDRP's gate fitting; method='{method}'"):
        kd.dissect(data["model"], xy, samples_per_class=1, method=method,
                   gamma=0.01)


def test_cdrp_options_are_validated_and_not_given_twice(data, xy):
    with pytest.raises(ValueError, match="`gamma` must be a finite number"):
        kd.CDRP(gamma=-1.0)
    with pytest.raises(ValueError, match="not both"):
        kd.dissect(data["model"], xy, samples_per_class=1,
                   method=kd.CDRP(), gamma=0.01)
