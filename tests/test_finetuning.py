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
from keras_drnet.finetuning import Distiller


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
    small = kd.finetune(sub, (x, y), epochs=30, distill=False,
                        optimizer=keras.optimizers.Adam(0.01), verbose=0)
    names = small.class_names
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


def _kl_to_teacher(teacher, small, x):
    """Mean KL(teacher || student) over `x`, on the student's columns."""
    names = small.class_names
    columns = [sm.NAMES.index(n) for n in names]
    logits = keras.ops.convert_to_numpy(teacher(x))[:, columns]
    p = sm.masked_softmax(logits, range(len(columns)))
    q = np.asarray(small.predict(x, verbose=0), "float64")
    return np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))


@pytest.fixture
def distilled():
    """A calibrated sub-task of bn_chain and its teacher, written out: an
    untouched twin of the model (bn_chain's head gives logits)."""
    model = sm.bn_chain()
    civs = sm.hand_civs(model, np.random.default_rng(1))
    x, y = labelled(seed=1)
    sub = kd.subtask(model, civs, ["dog", "cat"], budget=0.6,
                     budget_scope="model", calibrate=(x, y))
    return sub, sm.bn_chain()


def test_distillation_moves_the_student_toward_the_teacher(distilled):
    sub, teacher = distilled
    x, y = labelled()
    cat_dog = x[np.isin(y, [0, 1])]
    before = _kl_to_teacher(teacher, kd.compact(sub), cat_dog)
    # Distillation is the default.
    small = kd.finetune(sub, (x, y), epochs=20, temperature=2.0,
                        batch_size=16, verbose=0)
    after = _kl_to_teacher(teacher, small, cat_dog)
    assert after < 0.5 * before, (before, after)
    loss = small.history.history["loss"]
    assert loss[-1] < loss[0]
    assert "accuracy" not in small.history.history


def test_full_width_student_with_the_teachers_weights_has_no_loss():
    model = sm.bn_chain()
    civs = sm.hand_civs(model, np.random.default_rng(1))
    x, _ = labelled()
    sub = kd.subtask(model, civs, ["dog", "cat"], budget=1.0)
    small = kd.compact(sub)
    student = keras.Model(small.input,
                          small.get_layer("class_probabilities").input)
    columns = [sm.NAMES.index("dog"), sm.NAMES.index("cat")]
    distiller = Distiller(student, sub.full_logits_model(), columns)
    loss = distiller.compute_loss(x, np.full(len(x), -1), student(x),
                                  training=False)
    assert abs(float(loss)) < 1e-6
    # And a student that is not the teacher has a loss.
    wrong = Distiller(student, sub.full_logits_model(), columns[::-1])
    assert float(wrong.compute_loss(x, np.full(len(x), -1), student(x))) > 1e-3


def test_unlabeled_images_work_as_array_or_dataset(distilled):
    sub, _ = distilled
    x, y = labelled()
    cat_dog = x[np.isin(y, [0, 1])]
    for ds in (cat_dog, tf.data.Dataset.from_tensor_slices(cat_dog).batch(5)):
        small = kd.finetune(sub, ds, distill=True, batch_size=16,
                            verbose=0)
        # 48 images in batches of 16.
        assert small.history.params["steps"] == 3


def test_images_all_uses_every_class_and_calibrates_on_the_subtask(
        distilled):
    sub, _ = distilled
    x, y = labelled()
    small = kd.finetune(sub, (x, y), distill=True, images="all",
                        batch_size=16, verbose=0)
    # 120 images of five classes, not the 48 of cat and dog.
    assert small.history.params["steps"] == 8
    cat_dog = x[np.isin(y, [0, 1])]
    bn = small.get_layer("bn1")
    features = keras.Model(small.inputs[0], bn.input)
    values = keras.ops.convert_to_numpy(features(cat_dog))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               values.mean(axis=(0, 1, 2)), rtol=1e-4,
                               atol=1e-5)


def test_full_logits_model_is_the_original_network_after_calibration(
        distilled):
    sub, teacher = distilled
    x, _ = labelled()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(sub.full_logits_model()(x)),
        keras.ops.convert_to_numpy(teacher(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(distill=False), "images but no labels"),
    (dict(distill=True, label_weight=0.5), "`label_weight` > 0 needs labels"),
    (dict(distill=False, images="all", labels=True), 'images="all" needs'),
    (dict(distill=True, temperature=0.0), "temperature"),
    (dict(distill=True, temperature=float("nan")), "temperature"),
    (dict(distill=True, label_weight=1.5), "label_weight"),
    (dict(distill=True, images="others"), "`images` must be"),
])
def test_distillation_arguments_are_checked(sub, kwargs, message):
    x, y = labelled()
    ds = (x, y) if kwargs.pop("labels", False) else x
    with pytest.raises(ValueError, match=message):
        kd.finetune(sub, ds, verbose=0, **kwargs)


def test_statistics_come_from_every_class_when_data_is_sorted_by_class(sub):
    x, y = labelled()
    keep = np.isin(y, [0, 1])
    x, y = x[keep], y[keep]  # 24 cats, then 24 dogs
    small = kd.finetune(sub, (x, y), calibration_samples=24, verbose=0)
    bn = small.get_layer("bn1")
    features = keras.Model(small.input, bn.input)
    cats = keras.ops.convert_to_numpy(features(x[y == 0])).mean(axis=(0, 1, 2))
    dogs = keras.ops.convert_to_numpy(features(x[y == 1])).mean(axis=(0, 1, 2))
    mean = keras.ops.convert_to_numpy(bn.moving_mean)
    # Not the first 24 images' (all cats): a mix of both classes.
    assert np.abs(mean - cats).max() > 0.1 * np.abs(dogs - cats).max()


def test_the_teacher_is_not_trained(distilled):
    sub, _ = distilled
    x, _ = labelled()
    small = kd.compact(sub)
    student = keras.Model(small.input,
                          small.get_layer("class_probabilities").input)
    teacher = sub.full_logits_model()
    before = [w.copy() for w in teacher.get_weights()]
    distiller = Distiller(student, teacher, [1, 0])
    distiller.compile(keras.optimizers.SGD(0.5))
    distiller.fit(x, np.full(len(x), -1), epochs=2, verbose=0)
    for b, a in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(b, a)
    assert not all(np.array_equal(b, a) for b, a in zip(
        [w for w in kd.compact(sub).get_weights()], student.get_weights()))


def test_augmentation_is_applied_to_the_training_batches(sub):
    x, y = labelled()
    adam = lambda: keras.optimizers.Adam(0.01)  # noqa: E731
    plain = kd.finetune(sub, (x, y), epochs=10, distill=False,
                        optimizer=adam(), batch_size=16, verbose=0)
    # An "augmentation" that blanks every image leaves nothing to learn
    # but the class prior: the loss stays near log(2).
    blank = keras.layers.Lambda(lambda images: images * 0.0)
    blanked = kd.finetune(sub, (x, y), epochs=10, distill=False,
                          optimizer=adam(), batch_size=16, augment=blank,
                          verbose=0)
    assert plain.history.history["loss"][-1] < 0.4
    assert blanked.history.history["loss"][-1] > 0.6
    # The standard flips and shifts run end to end.
    kd.finetune(sub, (x, y), augment=True, verbose=0)
    with pytest.raises(TypeError, match="`augment` must be a bool"):
        kd.finetune(sub, (x, y), augment="flip", verbose=0)


def test_from_a_repaired_start_batchnorm_statistics_stay_frozen(sub):
    x, y = labelled()
    cat_dog = x[np.isin(y, [0, 1])]
    start = kd.repair(sub, cat_dog)
    before = sm.bn_stats(start)
    kernels = [w.copy() for w in start.get_layer("conv1").get_weights()]
    small = kd.finetune(sub, (x, y), epochs=3, start=start, verbose=0)
    assert small is start  # trained in place
    after = sm.bn_stats(small)
    for name in before:  # moving statistics, gamma and beta: untouched
        for was, now in zip(before[name], after[name]):
            np.testing.assert_array_equal(was, now)
        assert small.get_layer(name).trainable  # restored afterwards
    # The convolutions did train.
    assert not np.array_equal(kernels[0],
                              small.get_layer("conv1").get_weights()[0])
    # Asked for, BatchNorm trains and is recalibrated as from compact(sub).
    start = kd.repair(sub, cat_dog)
    small = kd.finetune(sub, (x, y), epochs=1, start=start,
                        freeze_batchnorm=False, verbose=0)
    assert not np.array_equal(sm.bn_stats(small)["bn1"][2], before["bn1"][2])
    with pytest.raises(TypeError, match="Received: freeze_batchnorm='yes'"):
        kd.finetune(sub, (x, y), freeze_batchnorm="yes")


def test_non_finite_images_and_bad_sizes_are_refused_before_training(sub):
    x, y = labelled()
    x = x.copy()
    x[[0, 5]] = np.nan
    with pytest.raises(ValueError, match="2 of the .* images of `ds` have "
                       "NaN or inf values"):
        kd.finetune(sub, (x, y), epochs=1, verbose=0)
    for name in ("batch_size", "shuffle_buffer", "calibration_samples"):
        with pytest.raises(ValueError, match=f"`{name}` must be a positive "
                           f"int. Received: {name}=0"):
            kd.finetune(sub, labelled(), epochs=1, verbose=0, **{name: 0})


def test_a_log_file_gets_lines_not_a_progress_bar(sub, capfd):
    # pytest's captured output is not a terminal, as a log file is not.
    kd.finetune(sub, labelled())
    out = capfd.readouterr().out
    assert "\r" not in out and "\x1b[" not in out
    assert out.count("Epoch ") == 3  # the default
