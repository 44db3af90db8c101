"""The bad-input suite (issue 15): each misuse ends in an error that names
the mistake and the fix, checked by its message."""

import numpy as np
import pytest
import tensorflow as tf

import _subtask_models as sm
import keras_drnet as kd


@pytest.fixture(scope="module")
def setup():
    model = sm.chain_cnn("logits")
    civs = sm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    return model, civs, sub


def test_images_and_labels_of_different_lengths(setup):
    model, _, _ = setup
    x = sm.images(np.random.default_rng(0), n=6)
    with pytest.raises(ValueError, match=r"one label per image. Received: "
                       r"6 images and 5 labels"):
        kd.dissect(model, (x, np.zeros(5, "int64")), verbose=0)


def test_a_subtask_passed_to_dissect(setup):
    _, _, sub = setup
    x = sm.images(np.random.default_rng(0), n=2)
    with pytest.raises(TypeError, match="is a `SubtaskModel`; pass the "
                       "original classifier"):
        kd.dissect(sub, (x, np.zeros(2, "int64")), verbose=0)


def test_a_subtask_passed_to_subtask(setup):
    _, civs, sub = setup
    with pytest.raises(TypeError, match="is a `SubtaskModel`"):
        kd.subtask(sub, civs, ["cat", "dog"], budget=0.5)


def test_a_plain_model_passed_to_compact(setup):
    model, _, _ = setup
    with pytest.raises(TypeError, match=r"`compact` takes the `SubtaskModel`"
                       r".*Received: Functional"):
        kd.compact(model)


def test_a_gated_model_passed_to_inject_gates(setup):
    _, _, sub = setup
    with pytest.raises(ValueError, match="already has `ChannelGate`s"):
        kd.inject_gates(sub.gated_model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold="0.1"), r"`threshold` must be a finite number"),
    (dict(threshold=float("nan")), r"Received: threshold=nan"),
    (dict(budget="0.5"), r"`budget` is the fraction.*Received: budget='0.5'"),
])
def test_numbers_given_as_strings_or_nan(setup, kwargs, message):
    model, civs, _ = setup
    with pytest.raises(ValueError, match=message):
        kd.subtask(model, civs, ["cat", "dog"], **kwargs)


def test_subtasks_of_a_gated_model_share_nothing_with_it_or_each_other():
    model = sm.chain_cnn("logits")
    civs = sm.hand_civs(model, np.random.default_rng(0))
    gated = kd.inject_gates(model)
    x = sm.images(np.random.default_rng(1), n=4)
    before = np.asarray(gated(x))
    first = kd.subtask(gated, civs, ["cat", "dog"], budget=0.3)
    expected = np.asarray(first(x))
    second = kd.subtask(gated, civs, ["bird", "ship"], budget=0.6)
    np.testing.assert_array_equal(np.asarray(first(x)), expected)
    assert not np.array_equal(np.asarray(second(x)), expected)
    # The user's gated model still has every gate open.
    np.testing.assert_array_equal(np.asarray(gated(x)), before)
    for spec in kd.list_gates(gated):
        assert np.all(np.asarray(spec.layer.gate) == 1.0)


@pytest.mark.parametrize("head", ["fused", "layer", "op"])
def test_a_sigmoid_multi_label_output_is_refused(head):
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if head == "fused":
        out = keras.layers.Dense(3, activation="sigmoid")(x)
    elif head == "layer":
        out = keras.layers.Activation("sigmoid")(keras.layers.Dense(3)(x))
    else:
        out = keras.ops.sigmoid(keras.layers.Dense(3)(x))
    model = keras.Model(inputs, out)
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    with pytest.raises(ValueError, match="ends in a sigmoid: a multi-label"):
        kd.dissect(model, (x, np.arange(4) % 3), verbose=0)


def test_non_finite_images_in_dissect_are_skipped_counted_and_named():
    model = sm.chain_cnn("logits")
    x = sm.images(np.random.default_rng(0), n=8)
    y = np.arange(8) % 5
    bad = x.copy()
    bad[2, 0, 0, 0] = np.nan
    bad[5, 1, 1, 1] = np.inf
    with pytest.warns(UserWarning, match=r"Skipped 2 images with NaN or inf "
                      r"values \(dataset elements \[2, 5\]\)"):
        civs = kd.dissect(model, (bad, y), method="activation",
                          samples_per_class=None, verbose=0)
    keep = np.isin(np.arange(8), [2, 5], invert=True)
    expected = kd.dissect(model, (x[keep], y[keep]), method="activation",
                          samples_per_class=None, verbose=0)
    np.testing.assert_array_equal(civs.counts, expected.counts)
    np.testing.assert_allclose(civs.vectors, expected.vectors, rtol=1e-6)


def test_non_finite_images_in_calibration_are_refused_before_any_write():
    model = sm.bn_chain()
    civs = sm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    before = [np.array(w) for w in sub.gated_model.get_weights()]
    x = np.random.default_rng(0).normal(size=(6, 12, 12, 3)).astype("float32")
    x[4, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf.*images \[4\] of the "
                       r"6 taken"):
        sub.calibrate(x)
    for b, a in zip(before, sub.gated_model.get_weights()):
        np.testing.assert_array_equal(b, a)


def _head(inputs):
    import keras

    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    return keras.layers.GlobalAveragePooling2D()(x)


def test_unbuilt_sequential_subclassed_and_dict_output_models():
    import keras

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    y = np.array([0, 1])
    unbuilt = keras.Sequential([keras.layers.Conv2D(4, 3, activation="relu"),
                                keras.layers.GlobalAveragePooling2D(),
                                keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="is not built: it has no inputs "
                       r"yet. Start it with `keras.Input\(shape\)`"):
        kd.dissect(unbuilt, (x, y), verbose=0)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, images):
            return self.dense(keras.ops.mean(images, axis=(1, 2)))

    subclassed = Subclassed()
    subclassed(x)
    with pytest.raises(ValueError, match="is a subclassed `keras.Model`"):
        kd.dissect(subclassed, (x, y), verbose=0)
    inputs = keras.Input((8, 8, 3))
    dict_output = keras.Model(
        inputs, {"logits": keras.layers.Dense(2)(_head(inputs))})
    with pytest.raises(ValueError, match=r"dict output \(keys \['logits'\]\)"):
        kd.dissect(dict_output, (x, y), verbose=0)


def test_images_that_do_not_fit_a_dataset_with_unknown_dims():
    import keras
    import tensorflow as tf

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2)(_head(inputs)))
    sizes = [8, 8, 16]
    ds = tf.data.Dataset.from_generator(
        lambda: ((np.zeros((s, s, 3), "float32"), 0) for s in sizes),
        output_signature=(tf.TensorSpec((None, None, 3)),
                          tf.TensorSpec((), tf.int64)))
    with pytest.raises(ValueError, match=r"input shape \(8, 8, 3\). "
                       r"Received: image shape \(16, 16, 3\)"):
        kd.dissect(model, ds, method="activation", verbose=0)


def test_lambda_layers_are_gated_and_copied_without_deserialization():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(_head(inputs))
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    images = sm.images(np.random.default_rng(0), n=3)[..., :1].repeat(3, -1)
    images = images[:, :8, :8]
    gated = kd.inject_gates(model)
    np.testing.assert_array_equal(np.asarray(gated(images)),
                                  np.asarray(model(images)))
    civs = sm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=1.0,
                     calibrate=images)
    probabilities = np.asarray(sub(images))
    np.testing.assert_allclose(
        probabilities, sm.masked_softmax(np.asarray(model(images)), [0, 1]),
        rtol=1e-5, atol=1e-6)


def test_set_classes_is_atomic_for_a_concurrent_reader():
    import threading

    model = sm.chain_cnn("logits")
    civs = sm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.3)
    x = sm.images(np.random.default_rng(1), n=4)
    expected = {}
    for classes in (["cat", "dog"], ["bird", "ship"]):
        sub.set_classes(classes, budget=0.3 if classes[0] == "cat" else 0.7)
        expected[classes[0]] = np.asarray(sub(x))
    outputs, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            outputs.append(np.asarray(sub(x)))

    reader = threading.Thread(target=read)
    reader.start()
    k = 0
    while len(outputs) < 300 and k < 5000:
        if k % 2:
            sub.set_classes(["cat", "dog"], budget=0.3)
        else:
            sub.set_classes(["bird", "ship"], budget=0.7)
        k += 1
    stop.set()
    reader.join()
    assert len(outputs) >= 300 and k > 20, (len(outputs), k)
    torn = [o for o in outputs
            if not any(np.array_equal(o, e) for e in expected.values())]
    assert not torn, f"{len(torn)} of {len(outputs)} outputs were torn"


@pytest.mark.parametrize("form, gated", [
    ("LeakyReLU(0)", True), ("ops.leaky_relu(0)", True),
    ("LeakyReLU(0.2)", False), ("ops.leaky_relu", False),
])
def test_a_leaky_relu_of_slope_zero_is_a_relu(form, gated):
    import keras

    inputs = keras.Input((3,))
    h = keras.layers.Dense(4)(inputs)
    if form == "LeakyReLU(0)":
        h = keras.layers.LeakyReLU(negative_slope=0.0)(h)
    elif form == "ops.leaky_relu(0)":
        h = keras.ops.leaky_relu(h, negative_slope=0.0)
    elif form == "LeakyReLU(0.2)":
        h = keras.layers.LeakyReLU(negative_slope=0.2)(h)
    else:
        h = keras.ops.leaky_relu(h)
    h = keras.layers.Dense(4, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    assert len(kd.list_gates(kd.inject_gates(model))) == (2 if gated else 1)


def test_ungated_activations_are_named_with_their_channels():
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.Conv2D(6, 3, activation="gelu")(x)
    x = keras.layers.Activation("hard_swish")(keras.layers.Conv2D(5, 1)(x))
    x = keras.ops.silu(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    with pytest.warns(UserWarning, match=r"does not gate: 6 gelu channels, "
                      r"5 hard_silu channels, 5 silu channels\. Only ReLU"):
        gated = kd.inject_gates(model)
    assert len(kd.list_gates(gated)) == 1


def _twin_cnn(channels_first, flatten):
    """conv -> BN -> ReLU -> pool -> conv(relu) -> GAP/Flatten -> fc(relu)
    -> head, in either data format; the same seed gives the same weights
    (Flatten variants: fc1's rows differ in order, see the test)."""
    import keras
    from keras import layers

    fmt = "channels_first" if channels_first else "channels_last"
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 12, 12) if channels_first else (12, 12, 3))
    h = layers.Conv2D(6, 3, use_bias=False, data_format=fmt, name="c1")(inputs)
    h = layers.BatchNormalization(axis=1 if channels_first else -1,
                                  name="bn1")(h)
    h = layers.ReLU(name="r1")(h)
    h = layers.MaxPooling2D(data_format=fmt, name="pool")(h)
    h = layers.Conv2D(8, 3, activation="relu", data_format=fmt, name="c2")(h)
    if flatten == "gap":
        h = layers.GlobalAveragePooling2D(data_format=fmt, name="gap")(h)
    else:
        # The twin reads its (H, W, C) maps with a plain Flatten.
        h = layers.Flatten(data_format=flatten if channels_first else None,
                           name="flat")(h)
    h = layers.Dense(7, activation="relu", name="fc1")(h)
    model = keras.Model(inputs, layers.Dense(5, name="head")(h))
    rng = np.random.default_rng(1)
    model.get_layer("bn1").set_weights(
        [rng.uniform(0.5, 1.5, 6), rng.uniform(0.0, 0.5, 6),
         rng.uniform(-0.2, 0.2, 6), rng.uniform(0.5, 2.0, 6)])
    return model


@pytest.mark.parametrize("flatten", ["gap", "channels_last",
                                     "channels_first"])
def test_channels_first_models_compact_and_report_like_their_twin(flatten):
    import keras
    import tensorflow as tf

    import _compaction_models as cm

    def run(model, x):  # TF runs NCHW convolutions on CPU only under XLA
        return np.asarray(tf.function(lambda t: model(t, training=False),
                                      jit_compile=True)(x))

    first = _twin_cnn(True, flatten)
    last = _twin_cnn(False, flatten)
    if flatten == "channels_last":
        # A plain Flatten reads (C, H, W) channel-major and (H, W, C)
        # channel-minor: reorder the twin's fc1 rows to compute the same.
        kernel, bias = first.get_layer("fc1").get_weights()
        order = np.arange(len(kernel)).reshape(8, 3, 3).transpose(1, 2, 0)
        last.get_layer("fc1").set_weights([kernel[order.ravel()], bias])
    x_last = np.random.default_rng(2).uniform(0, 1, (6, 12, 12, 3))
    x_last = x_last.astype("float32")
    x_first = x_last.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(run(first, x_first), last(x_last), atol=1e-5)
    masks = {"r1_gate": [1, 0, 1, 1, 0, 1],
             "c2_gate": [1, 1, 0, 1, 0, 0, 1, 1],
             "fc1_gate": [1, 0, 1, 1, 1, 0, 1]}
    labels = np.array([3, 1, 3, 1, 3, 1])
    subs, reports = [], []
    for model, x in ((first, x_first), (last, x_last)):
        civs = cm.civs_from_masks(model, masks)
        sub = kd.subtask(model, civs, ["c3", "c1"], threshold=0.5)
        reports.append(kd.evaluate_subtask(sub, (x, labels)))
        subs.append(sub)
    sub = subs[0]
    small = kd.compact(sub)
    np.testing.assert_allclose(run(small, x_first),
                               run(sub, x_first)[:, [3, 1]], atol=1e-6)
    assert small.count_params() == kd.compact(subs[1]).count_params()
    assert small.count_params() < first.count_params()
    assert small.get_layer("c2").filters == 5
    a, b = reports
    assert (a.running_params, a.running_flops, a.params, a.flops) == (
        b.running_params, b.running_flops, b.params, b.flops)
    assert a.sub_net_accuracy == b.sub_net_accuracy


def test_a_model_mixing_data_formats_is_refused_by_name():
    import keras

    x = np.zeros((2, 3, 8, 8), "float32")
    inputs = keras.Input((3, 8, 8))
    h = keras.layers.Conv2D(4, 3, activation="relu",
                            data_format="channels_first", name="c1")(inputs)
    h = keras.layers.MaxPooling2D(data_format="channels_last", name="p")(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(inputs, keras.layers.Dense(5)(h))
    civs = sm.hand_civs(model, np.random.default_rng(0))
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    message = (r"mixes channels_first layers \(e.g. 'c1'\) with "
               r"channels_last ones \(e.g. 'p'\)")
    for call in (kd.compact, lambda s: kd.evaluate_subtask(s, (x, [0, 1]))):
        with pytest.raises(ValueError, match=message):
            call(sub)


def test_mobilenet_v3_reports_and_compacts_through_its_constant_ops():
    import keras

    import _compaction_models as cm

    model = keras.applications.MobileNetV3Small(
        weights=None, input_shape=(32, 32, 3), classes=10,
        classifier_activation=None, include_preprocessing=False)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 32, 32, 3)).astype("float32")
    with pytest.warns(UserWarning, match="hard_silu"):
        civs = cm.hand_civs(model, rng)
    sub = kd.subtask(model, civs, ["c7", "c2"], budget=0.4, calibrate=x)
    report = kd.evaluate_subtask(sub, (x, np.array([7, 2] * 4)))
    assert report.running_params < report.params
    # The first block's squeeze-excite ends in `relu6(x + 3.0) * (1 / 6)`,
    # multiplied into ReLU channels: its closed channels go all the way.
    small_logits = kd.compact(sub, include_softmax=False)
    cm.assert_logits_close(cm.to_numpy(small_logits(x)), cm.sub_logits(sub, x),
                           rel=1e-4)
    conv = "expanded_conv_squeeze_excite_conv_1"
    assert small_logits.get_layer(conv).filters < model.get_layer(conv).filters


@pytest.mark.parametrize("form", ["xyw", "xyw_dataset", "dict_dataset",
                                  "dict"])
@pytest.mark.parametrize("call", ["dissect", "calibrate", "finetune",
                                  "repair", "evaluate", "cdrp"])
def test_data_that_is_neither_images_nor_pairs_is_named(setup, form, call):
    model, civs, _ = setup
    x = sm.images(np.random.default_rng(0), 10)
    y, w = np.arange(10) % 5, np.ones(10)
    data = {
        "xyw": (x, y, w),
        "xyw_dataset": tf.data.Dataset.from_tensor_slices((x, y, w)),
        "dict_dataset": tf.data.Dataset.from_tensor_slices(
            {"image": x, "label": y}),
        "dict": {"image": x},
    }[form]
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5)
    run = {
        "dissect": lambda d: kd.dissect(model, d, samples_per_class=1,
                                        method="activation", verbose=0),
        "calibrate": lambda d: sub.calibrate(d),
        "finetune": lambda d: kd.finetune(sub, d, verbose=0),
        "repair": lambda d: kd.repair(sub, d),
        "evaluate": lambda d: kd.evaluate_subtask(sub, d),
        "cdrp": lambda d: kd.cdrp(model, d),
    }[call]
    with pytest.raises((TypeError, ValueError),
                       match=r"\(image, label\)|\(images, labels\)"):
        run(data)
