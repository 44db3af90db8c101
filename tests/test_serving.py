"""Tests for keras_drnet.export_dynamic: one SavedModel, the sub-task chosen
per request, equal to `kd.subtask` (references: `SubtaskModel` itself)."""

import threading

import numpy as np
import pytest
import tensorflow as tf

import _subtask_models as sm
import keras_drnet as kd

CLASS_SETS = (["cat", "dog"], ["bird"], ["cat", "frog", "ship"], sm.NAMES)
CONFIGS = {
    "threshold": dict(threshold=0.5),
    "budget": dict(budget=0.4, budget_scope="model"),
    "budget_per_gate": dict(budget=0.3, budget_scope="gate"),
    # One fraction per gate, as `kd.allocate_budget` returns.
    "budget_list": dict(budget=[0.9, 0.25, 0.6, 0.4][: len(kd.list_gates(
        kd.inject_gates(sm.bn_relu_cnn("softmax"))))]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = sm.bn_relu_cnn("softmax")
    rng = np.random.default_rng(0)
    # Scores in {0, 0.5, 1}: many ties, broken by channel order as in
    # `combine`.
    civs = sm.hand_civs(model, rng)
    civs.vectors[:] = rng.integers(0, 3, civs.vectors.shape) / 2
    x = sm.images(rng, 6)
    named = kd.subtask(model, civs, ["cat", "dog"], budget=0.5, calibrate=x)
    paths = {}
    for key, kwargs in CONFIGS.items():
        paths[key] = str(tmp_path_factory.mktemp(key) / "served")
        kd.export_dynamic(model, civs, paths[key],
                          subtasks={"cat-dog": named}, **kwargs)
    return model, civs, x, named, paths


def _hot(classes):
    return np.isin(sm.NAMES, classes)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_each_request_equals_its_subtask(setup, config):
    model, civs, x, named, paths = setup
    served = tf.saved_model.load(paths[config])
    for classes in CLASS_SETS:
        want = np.asarray(kd.subtask(model, civs, classes,
                                     **CONFIGS[config])(x))
        for hot in (_hot(classes), _hot(classes).astype("int32")):
            got = served.serve(tf.constant(x), tf.constant(hot)).numpy()
            np.testing.assert_allclose(got, want, atol=1e-6)
    # The calibrated sub-task, by name, with its own BatchNorm statistics.
    got = served.serve_named(tf.constant(x), tf.constant("cat-dog"))
    np.testing.assert_allclose(got.numpy(), np.asarray(named(x)), atol=1e-6)
    uncalibrated = served.serve(tf.constant(x), tf.constant(_hot(
        ["cat", "dog"])))
    if config == "budget":
        assert np.abs(uncalibrated.numpy() - got.numpy()).max() > 1e-3
    assert [n.decode() for n in served.class_names().numpy()] == sm.NAMES
    assert [n.decode() for n in served.subtask_names().numpy()] == [
        "cat-dog"]


def test_concurrent_requests_do_not_see_each_others_subtask(setup):
    model, civs, x, _, paths = setup
    served = tf.saved_model.load(paths["budget"])
    sets = (["cat", "dog"], ["bird", "frog", "ship"])
    wants = [np.asarray(kd.subtask(model, civs, c, **CONFIGS["budget"])(x))
             for c in sets]
    assert np.abs(wants[0] - wants[1]).max() > 0.1
    wrong = []

    def client(i):
        for _ in range(40):
            got = served.serve(tf.constant(x), tf.constant(_hot(sets[i])))
            if np.abs(got.numpy() - wants[i]).max() > 1e-6:
                wrong.append(i)

    threads = [threading.Thread(target=client, args=(i % 2,))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_bad_requests_and_arguments_are_named(setup, tmp_path):
    model, civs, x, named, paths = setup
    served = tf.saved_model.load(paths["threshold"])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="`classes` selects no class"):
        served.serve(tf.constant(x), tf.constant(np.zeros(5, bool)))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="Unknown sub-task name; known: cat-dog"):
        served.serve_named(tf.constant(x), tf.constant("cat"))
    with pytest.raises(ValueError, match="Pass exactly one of `threshold`"):
        kd.export_dynamic(model, civs, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="`subtasks` maps names to "
                       "`SubtaskModel`s built from this model and CIVs. "
                       "Received: 'x': Sequential"):
        kd.export_dynamic(model, civs, str(tmp_path / "b"), budget=0.5,
                          subtasks={"x": model})


def test_a_class_without_a_civ_is_refused_per_request(tmp_path):
    model = sm.bn_relu_cnn("softmax")
    rng = np.random.default_rng(0)
    civs = sm.hand_civs(model, rng, counts=[5, 5, 0, 5, 5])
    civs.vectors[2] = np.nan  # "bird": no image was dissected
    with pytest.raises(ValueError, match="'bird' has no CIV"):
        kd.subtask(model, civs, ["cat", "bird"], budget=0.5)
    path = str(tmp_path / "served")
    kd.export_dynamic(model, civs, path, budget=0.5)
    served = tf.saved_model.load(path)
    x = tf.constant(sm.images(rng, 2))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="selects a class without a CIV \\(bird\\)"):
        served.serve(x, tf.constant(_hot(["cat", "bird"])))
    np.testing.assert_allclose(
        served.serve(x, tf.constant(_hot(["cat", "dog"]))),
        kd.subtask(model, civs, ["cat", "dog"], budget=0.5)(x), atol=1e-6)


def test_bundled_names_must_name_the_subtasks_classes(setup, tmp_path):
    model, civs, x, named, _ = setup
    other = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    other.set_classes(["bird", "ship"])  # named before, switched after
    with pytest.raises(ValueError, match=r"Sub-task 'cat-dog' runs classes "
                       r"\['bird', 'ship'\], not \['cat', 'dog'\]"):
        kd.export_dynamic(model, civs, str(tmp_path / "a"), budget=0.5,
                          subtasks={"cat-dog": other})
    # A list names each after its classes; free names are left alone.
    path = str(tmp_path / "b")
    kd.export_dynamic(model, civs, path, budget=0.5,
                      subtasks=[other, named])
    served = tf.saved_model.load(path)
    assert [n.decode() for n in served.subtask_names().numpy()] == [
        "bird-ship", "cat-dog"]
    np.testing.assert_allclose(
        served.serve_named(tf.constant(x), tf.constant("bird-ship")),
        other(x), atol=1e-6)
    kd.export_dynamic(model, civs, str(tmp_path / "c"), budget=0.5,
                      subtasks={"pets": named})
