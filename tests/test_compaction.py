"""Tests for keras_drnet.compaction: a sub-task as a smaller plain model.

`kd.compact(sub)` must compute exactly the sub-task's masked softmax
restricted to its classes (`sub(x)[:, classes]`), and without the softmax
its gated logits (`sub.logits_model(x)[:, classes]`), with the channels the
CCIV switches off physically removed. References are the `SubtaskModel`
itself; CCIVs are random (hand-made CIVs at several keep ratios) or come
from real dissections (a small VGG-style CNN trained on CIFAR-10, and quick
dissections of keras.applications models).

Random deep networks with most channels off give logits near 1e-15, so
logits are compared relative to their scale, and for the probability checks
the sub-task's own copy of the classifier is scaled so that its logits
reach ~5 (`_compaction_models.amplify_head`), which makes the softmax far
from uniform.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import _compaction_models as cm
import keras_drnet as kd
from keras_drnet.graph import running_costs

CLASSES = ["c7", "c2", "c4"]  # deliberately not sorted
CLASS_IDX = [7, 2, 4]
BUDGETS = {
    "vgg": (0.1, 0.3, 0.7),
    "ResNet50": (0.1, 0.3, 0.7),
    # At 0.1 the random CCIV cuts every MobileNetV2 path (a depthwise
    # channel must be open both before and after it): see
    # test_mobilenet_sub_task_with_every_path_cut_compacts_to_a_constant.
    "MobileNetV2": (0.3, 0.5, 0.7),
    "DenseNet121": (0.1, 0.7),  # the slowest model: two budgets
}
ARCHS = list(BUDGETS)


# ---------------------------------------------------------------------------
# Module fixtures: every model is built once.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x32():
    return np.random.default_rng(1).uniform(0, 1, (4, 32, 32, 3)).astype(
        "float32"
    )


@pytest.fixture(scope="module")
def zoo():
    """Lazily built models and their random CIVs, one of each per module."""

    class Zoo:
        def __init__(self):
            self.models, self.civs, self.subs = {}, {}, {}

        def model(self, arch):
            if arch not in self.models:
                if arch == "vgg":
                    self.models[arch] = cm.vgg_bn()
                elif arch == "Xception":  # needs 71 x 71 at least
                    self.models[arch] = cm.application(arch, size=71)
                else:
                    self.models[arch] = cm.application(arch)
            return self.models[arch]

        def random_civs(self, arch):
            if arch not in self.civs:
                rng = np.random.default_rng(sum(map(ord, arch)))
                self.civs[arch] = cm.hand_civs(self.model(arch), rng)
            return self.civs[arch]

        def compacted(self, arch, budget, x):
            """(sub, small_with_softmax, small_logits, rel_err), memoised."""
            key = (arch, budget)
            if key not in self.subs:
                sub = kd.subtask(
                    self.model(arch),
                    self.random_civs(arch),
                    CLASSES,
                    budget=budget,
                )
                cm.amplify_head(sub, x)
                self.subs[key] = (sub,) + cm.check_compact_equals(sub, x)
            return self.subs[key]

    return Zoo()


@pytest.fixture(scope="module")
def cifar():
    return cm.cifar_train(5000)


@pytest.fixture(scope="module")
def trained_vgg(cifar):
    """A small VGG-style CNN trained for 2 epochs on CIFAR-10 train[:5000]
    and dissected with 3 images per class."""
    x, y = cifar
    model = cm.vgg_bn(seed=3, filters=(8, 16, 32), random_bn=False)
    model.compile(
        keras.optimizers.Adam(2e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    # 10 iterations, not 30: this weak classifier's top-1 flips under 30
    # iterations of the L1 pull, and the top-1 guard then resets every
    # CDRP to all ones.
    civs = kd.dissect(
        model,
        (x[:500], y[:500]),
        samples_per_class=3,
        iterations=10,
        class_names=cm.CIFAR_NAMES,
        verbose=0,
    )
    return model, civs, history.history["accuracy"][-1]


@pytest.fixture(scope="module")
def dissected_apps(cifar):
    """Quick dissections (1 image per class, 3 iterations) of applications."""
    x, y = cifar
    cache = {}

    def get(zoo, arch):
        if arch not in cache:
            cache[arch] = kd.dissect(
                zoo.model(arch),
                (x[:100], y[:100]),
                samples_per_class=1,
                iterations=3,
                class_names=cm.CIFAR_NAMES,
                verbose=0,
            )
        return cache[arch]

    return get


# ---------------------------------------------------------------------------
# Equality with the sub-task: random CCIVs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,budget",
    [
        pytest.param(arch, budget, id=f"{arch}-{budget}")
        for arch, budgets in BUDGETS.items()
        for budget in budgets
    ],
)
def test_compact_equals_the_sub_task_for_a_random_cciv(zoo, x32, arch, budget):
    sub, small, small_logits, rel_err = zoo.compacted(arch, budget, x32)
    # The CCIV really switches channels off, at about the requested ratio.
    assert abs(sub.cciv.kept_fraction - budget) < 0.02
    # Outputs are the sub-task's classes, in the order given.
    assert small.output.shape[-1] == len(CLASSES)
    assert small_logits.output.shape[-1] == len(CLASSES)
    assert rel_err < 2e-5
    # Probabilities are far from uniform, so the 1e-4 check above has teeth.
    probs = cm.sub_probabilities(sub, x32)
    assert np.ptp(probs, axis=1).max() > 0.2


def test_mobilenet_sub_task_with_every_path_cut_compacts_to_a_constant(
    zoo, x32
):
    # Budget 0.1 keeps ~1 of 96 channels per gate; the channel kept after a
    # depthwise conv is closed before it, so nothing reaches the classifier.
    model = zoo.model("MobileNetV2")
    sub = kd.subtask(model, zoo.random_civs("MobileNetV2"), CLASSES,
                     budget=0.1)
    want = cm.sub_logits(sub, x32)
    np.testing.assert_array_equal(want, 0.0)  # the bias (zero at init)
    small = kd.compact(sub, include_softmax=False)
    np.testing.assert_array_equal(cm.to_numpy(small(x32)), want)
    assert small.count_params() < 1e-3 * model.count_params()
    cm.all_layers_have_channels(small)


# ---------------------------------------------------------------------------
# Equality with the sub-task: CCIVs from real dissections.
# ---------------------------------------------------------------------------


def test_trained_vgg_learned_something(trained_vgg):
    _, civs, accuracy = trained_vgg
    assert accuracy > 0.15  # chance is 0.1
    assert not np.isnan(civs.vectors).any()
    # The CIVs differ between classes: a real dissection, not a constant.
    assert np.ptp(civs.vectors, axis=0).max() > 0.05


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7])
def test_compact_equals_the_sub_task_for_a_dissected_vgg(
    trained_vgg, cifar, budget
):
    model, civs, _ = trained_vgg
    x, y = cifar
    classes = ["truck", "cat", "airplane"]
    sub = kd.subtask(model, civs, classes, budget=budget)
    assert sub.cciv.classes == (9, 3, 0)
    images = x[y == 3][:4]
    # At 0.1 the trained BatchNormalization shifts dominate: the logits are
    # the same constant for every image (still compared exactly).
    small, small_logits, rel_err = cm.check_compact_equals(
        sub, images, input_dependent=budget > 0.1
    )
    assert rel_err < 2e-5
    assert small.class_names == classes
    assert small.count_params() < model.count_params()


@pytest.mark.parametrize(
    "arch",
    [
        "ResNet50",
        "MobileNetV2",
        pytest.param("DenseNet121", marks=pytest.mark.slow),
    ],
)
def test_compact_equals_the_sub_task_for_a_dissected_application(
    zoo, dissected_apps, cifar, arch
):
    civs = dissected_apps(zoo, arch)
    assert civs.counts.tolist() == [1] * 10
    # A real (if short) fit: the channels of the sub-task's classes got
    # different importances.
    assert np.ptp(civs.vectors[[8, 5]], axis=1).min() > 1e-3
    x, _ = cifar
    images = x[:4]
    sub = kd.subtask(zoo.model(arch), civs, ["ship", "dog"], budget=0.5)
    assert sub.cciv.classes == (8, 5)
    cm.amplify_head(sub, images)
    small, _, rel_err = cm.check_compact_equals(sub, images)
    assert rel_err < 2e-5
    assert small.class_names == [
        "ship", "dog",
    ]
    assert small.count_params() < zoo.model(arch).count_params()


# ---------------------------------------------------------------------------
# The compact model is genuinely smaller.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_params_grow_with_the_keep_ratio(zoo, x32, arch):
    counts = [
        zoo.compacted(arch, budget, x32)[1].count_params()
        for budget in BUDGETS[arch]
    ]
    full = zoo.model(arch).count_params()
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        counts
    )
    assert counts[-1] < full
    # Even the largest keep ratio removes a real share of the weights.
    assert counts[-1] < 0.9 * full
    assert counts[0] < 0.5 * full


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_keeps_at_least_one_channel(zoo, x32, arch):
    for budget in BUDGETS[arch]:
        _, small, small_logits, _ = zoo.compacted(arch, budget, x32)
        cm.all_layers_have_channels(small)
        cm.all_layers_have_channels(small_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_compact_model_is_flat_and_plain(zoo, x32, arch):
    _, small, _, _ = zoo.compacted(arch, BUDGETS[arch][1], x32)
    assert isinstance(small, keras.Model)
    assert not any(isinstance(l, keras.Model) for l in small.layers)
    assert isinstance(small.layers[-1], keras.layers.Softmax)
    assert small.layers[-1].name == "class_probabilities"
    assert small.class_names == CLASSES
    assert not any(isinstance(l, kd.ChannelGate) for l in small.layers)


def test_classifier_has_the_classes_in_the_given_order(zoo, x32):
    model = zoo.model("vgg")
    sub = kd.subtask(model, zoo.random_civs("vgg"), ["c7", "c2"], budget=0.3)
    small = kd.compact(sub, include_softmax=False)
    head = small.get_layer("head")
    assert head.units == 2
    logits = cm.to_numpy(sub.logits_model(x32))
    got = cm.to_numpy(small(x32))
    cm.assert_logits_close(got[:, 0], logits[:, 7])
    cm.assert_logits_close(got[:, 1], logits[:, 2])
    # The kept classifier weights are the original columns 7 then 2.
    original = model.get_layer("head").get_weights()
    np.testing.assert_array_equal(head.get_weights()[1], original[1][[7, 2]])
    fc1 = small.get_layer("fc1")
    assert head.get_weights()[0].shape == (fc1.units, 2)
    kept_rows = np.flatnonzero(sub.cciv.per_gate()["fc1_gate"])
    # fc1 keeps exactly its open channels (a plain chain).
    assert fc1.units == len(kept_rows)
    np.testing.assert_array_equal(
        head.get_weights()[0], original[0][kept_rows][:, [7, 2]]
    )


def test_class_names_and_outputs_survive_keras_export_and_load(
    zoo, x32, tmp_path
):
    model = zoo.model("vgg")
    sub = kd.subtask(model, zoo.random_civs("vgg"), ["c7", "c2"], budget=0.3)
    cm.amplify_head(sub, x32)
    small = kd.compact(sub)
    assert small.class_names == ["c7", "c2"]
    path = os.path.join(tmp_path, "small.keras")
    kd.export(small, path, format="keras")
    loaded = keras.models.load_model(path)
    assert kd.read_class_names(path) == ["c7", "c2"]
    want = cm.sub_probabilities(sub, x32)
    np.testing.assert_allclose(cm.to_numpy(loaded(x32)), want, atol=1e-5)
    assert loaded.count_params() == small.count_params()


# ---------------------------------------------------------------------------
# Parameter counts against the report's running parameters.
# ---------------------------------------------------------------------------


def _labels_for(sub, n):
    return np.resize(np.asarray(sub.cciv.classes, "int64"), n)


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7])
def test_params_equal_running_params_for_a_plain_chain(zoo, x32, budget):
    sub, small, small_logits, _ = zoo.compacted("vgg", budget, x32)
    report = kd.evaluate_subtask(sub, (x32, _labels_for(sub, len(x32))))
    assert small_logits.count_params() == report.running_params
    assert small.count_params() == report.running_params
    assert report.running_params < report.params


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7])
def test_params_equal_running_params_for_a_dissected_chain(
    trained_vgg, cifar, budget
):
    # Trained BatchNormalization shifts make closed channels constant;
    # the count must still match.
    model, civs, _ = trained_vgg
    x, y = cifar
    sub = kd.subtask(model, civs, ["truck", "cat", "airplane"], budget=budget)
    small = kd.compact(sub)
    report = kd.evaluate_subtask(sub, (x[:200], y[:200]))
    assert small.count_params() == report.running_params


def _resnet50_expected_extra(cciv):
    """Parameters ResNet50's compaction keeps beyond the running ones.

    Residual channels of a stage form one group (identity shortcuts): every
    block's `_3_conv`/`_3_bn` (and the stage's `_0_conv`/`_0_bn`) keep the
    union U_s of the stage's `conv{s}_block{b}_out` gates, while only the
    block's own gate m_sb of them run; the `_1_conv` reading a gated
    residual tensor (and the next stage's `_0_conv`, and the classifier)
    read all of U_s while only the gate's open channels are non-zero.
    Computed from the CCIV alone, all 1x1 convolutions with biases.
    """
    gates = cciv.per_gate()
    blocks = {2: 3, 3: 4, 4: 6, 5: 3}
    count = lambda name: int(gates[name].sum())
    union = {1: count("conv1_relu_gate")}  # pool1 is not a residual tensor
    last = {1: count("conv1_relu_gate")}  # open channels of the last gate
    for s, n in blocks.items():
        u = np.zeros_like(gates[f"conv{s}_block1_out_gate"], bool)
        for b in range(1, n + 1):
            u |= gates[f"conv{s}_block{b}_out_gate"] > 0
        union[s] = int(u.sum())
        last[s] = count(f"conv{s}_block{n}_out_gate")
    per_layer = {}
    for s, n in blocks.items():
        u = union[s]
        for b in range(1, n + 1):
            m = count(f"conv{s}_block{b}_out_gate")
            k1 = count(f"conv{s}_block{b}_1_relu_gate")
            k2 = count(f"conv{s}_block{b}_2_relu_gate")
            per_layer[f"conv{s}_block{b}_3_conv"] = (k2 + 1) * (u - m)
            per_layer[f"conv{s}_block{b}_3_bn"] = 4 * (u - m)
            if b == 1:
                kept_in, live_in = union[s - 1], last[s - 1]
                per_layer[f"conv{s}_block1_0_conv"] = (
                    kept_in * u + u - (live_in * m + m)
                )
                per_layer[f"conv{s}_block1_0_bn"] = 4 * (u - m)
            else:
                kept_in = u
                live_in = count(f"conv{s}_block{b - 1}_out_gate")
            per_layer[f"conv{s}_block{b}_1_conv"] = (kept_in - live_in) * k1
    per_layer["predictions"] = (union[5] - last[5]) * len(cciv.classes)
    weights = sum(per_layer.values())
    # A block's out gate that closes some of the stage's kept channels
    # follows the residual Add: it stays as a mask (`Rescaling`, no
    # parameters).
    masked = {
        f"conv{s}_block{b}_out_gate"
        for s, n in blocks.items()
        for b in range(1, n + 1)
        if count(f"conv{s}_block{b}_out_gate") < union[s]
    }
    return weights, masked, per_layer, union


@pytest.mark.parametrize("arch", ["ResNet50", "DenseNet121", "Xception"])
def test_report_states_what_the_compact_model_really_has(zoo, x32, arch):
    if arch == "Xception":
        x32 = np.random.default_rng(1).uniform(0, 1, (2, 71, 71, 3))
        x32 = x32.astype("float32")
    budget = BUDGETS.get(arch, (0.3,))[0]
    sub, small, small_logits, _ = zoo.compacted(arch, budget, x32)
    report = kd.evaluate_subtask(sub, (x32, _labels_for(sub, len(x32))))
    assert report.compact_params == small.count_params()
    # Residual adds (ResNet50, Xception) and concatenations (DenseNet121)
    # keep channels that no gate of the sub-task runs.
    assert report.running_params < report.compact_params < report.params
    assert report.running_flops <= report.compact_flops < report.flops
    assert report.compact_flops == sum(
        c.macs for c in running_costs(small_logits))
    assert f"compact model:    {report.compact_params:,} params" in str(report)


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7])
def test_resnet50_keeps_coupled_residual_channels_beyond_running_params(
    zoo, x32, budget
):
    sub, small, small_logits, _ = zoo.compacted("ResNet50", budget, x32)
    report = kd.evaluate_subtask(sub, (x32, _labels_for(sub, len(x32))))
    params = small_logits.count_params()
    assert small.count_params() == params
    assert params >= report.running_params
    weights, masked, per_layer, union = _resnet50_expected_extra(sub.cciv)
    assert params - report.running_params == weights
    assert report.compact_params == params
    # Coupling keeps real weights (at budget 0.3: 2,664,148 on top of
    # 2,080,661 running ones, as the union over a stage's 3-6 out gates is
    # much larger than one gate), yet far less than the whole model.
    assert weights > 0.25 * report.running_params
    assert params < 0.7 * report.params
    # Per layer: only the layers touching residual tensors differ.
    running = {cost.name: cost.running_params for cost in report.layers}
    for layer in small_logits.layers:
        if not layer.weights:
            continue
        diff = layer.count_params() - running.get(layer.name, 0)
        assert diff == per_layer.get(layer.name, 0), layer.name
    # Every residual tensor of a stage keeps the union of its gates.
    for s, n in {2: 3, 3: 4, 4: 6, 5: 3}.items():
        for b in range(1, n + 1):
            conv = small_logits.get_layer(f"conv{s}_block{b}_3_conv")
            assert conv.filters == union[s], conv.name
    # Where a kept residual channel is closed by a block's own out gate
    # (after the Add), a mask stays; every other gate is folded or gone.
    kept_gates = cm.masks_in(small)
    assert masked and set(kept_gates) == masked
    gates = sub.cciv.per_gate()
    for name, mask in kept_gates.items():
        stage = int(name[4])
        assert mask.size == union[stage]
        assert int(mask.sum()) == int(gates[name].sum()) < mask.size


# ---------------------------------------------------------------------------
# Saving, SavedModel export and TFLite.
# ---------------------------------------------------------------------------


def _logits_and_probabilities(small):
    """One model whose output is [logits | probabilities] of `small`, so a
    single SavedModel / TFLite conversion checks both (same layers)."""
    logits = small.get_layer("class_probabilities").input
    both = keras.layers.Concatenate(name="both")([logits, small.output])
    return keras.Model(small.input, both, name=f"{small.name}_both")


def _split(out):
    k = len(CLASSES)
    return np.asarray(out)[:, :k], np.asarray(out)[:, k:]


def _assert_same_as_sub_task(out, sub, x, what):
    logits, probabilities = _split(out)
    cm.assert_logits_close(logits, cm.sub_logits(sub, x), 1e-5, what)
    np.testing.assert_allclose(
        probabilities, cm.sub_probabilities(sub, x), atol=1e-5, rtol=0
    )
    assert np.ptp(probabilities, axis=1).max() > 0.2  # far from uniform


@pytest.fixture(scope="module")
def exported(zoo, x32, tmp_path_factory):
    """Per arch: the sub-task at budget 0.3 and a SavedModel written by
    `small.export()` (logits and probabilities)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            sub, small, _, _ = zoo.compacted(arch, 0.3, x32)
            path = os.path.join(tmp_path_factory.mktemp(f"export_{arch}"), "m")
            _logits_and_probabilities(small).export(path, verbose=False)
            cache[arch] = (sub, path)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["vgg", "MobileNetV2"])
def test_outputs_equal_after_keras_save_and_load(zoo, x32, arch, tmp_path):
    sub, small, small_logits, _ = zoo.compacted(arch, 0.3, x32)
    path = os.path.join(tmp_path, "small.keras")
    small.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.count_params() == small.count_params()
    _assert_same_as_sub_task(
        cm.to_numpy(_logits_and_probabilities(loaded)(x32)), sub, x32, arch
    )


@pytest.mark.parametrize("arch", ["vgg", "MobileNetV2"])
def test_outputs_equal_after_saved_model_export(exported, x32, arch):
    sub, path = exported(arch)
    loaded = tf.saved_model.load(path)
    out = cm.to_numpy(loaded.serve(tf.constant(x32)))
    assert out.shape == (len(x32), 2 * len(CLASSES))
    _assert_same_as_sub_task(out, sub, x32, arch)


@pytest.mark.parametrize("arch", ["vgg", "MobileNetV2"])
def test_outputs_equal_in_tflite(exported, x32, arch):
    sub, path = exported(arch)
    flatbuffer = tf.lite.TFLiteConverter.from_saved_model(path).convert()
    out = cm.tflite_predict(flatbuffer, x32)
    assert out.shape == (len(x32), 2 * len(CLASSES))
    _assert_same_as_sub_task(out, sub, x32, arch)


# ---------------------------------------------------------------------------
# Graph features.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features():
    built = {}
    for i, (name, build) in enumerate(cm.FEATURE_MODELS.items()):
        keras.utils.set_random_seed(100 + i)
        built[name] = build()
    return built


@pytest.fixture(scope="module")
def x8():
    rng = np.random.default_rng(2)
    return rng.uniform(-1, 1, (5,) + cm.FEATURE_INPUT).astype("float32")


def _feature_sub(features, name, budget, seed=0):
    model = features[name]
    civs = cm.hand_civs(model, np.random.default_rng(seed))
    return kd.subtask(model, civs, ["c3", "c1"], budget=budget,
                      budget_scope="model")


@pytest.mark.parametrize("budget", [0.4, 0.7])
@pytest.mark.parametrize("name", list(cm.FEATURE_MODELS))
def test_graph_feature_compacts_and_equals(features, x8, name, budget):
    for seed in range(3):
        sub = _feature_sub(features, name, budget, seed)
        small, small_logits, _ = cm.check_compact_equals(sub, x8)
        cm.all_layers_have_channels(small)
        cm.all_layers_have_channels(small_logits)


def test_shared_conv_is_sliced_once_and_called_twice(features, x8):
    sub = _feature_sub(features, "shared_conv", 0.4)
    small = kd.compact(sub, include_softmax=False)
    shared = small.get_layer("shared")
    assert len(shared._inbound_nodes) == 2
    gates = sub.cciv.per_gate()
    # Its output channels: union of what its two call sites keep.
    union = (gates["shared_gate"] > 0) | (gates["shared_1_gate"] > 0)
    assert shared.filters == int(union.sum()) < 8
    # Its input channels: union of the two branches' open channels.
    inputs = (gates["pre_a_gate"] > 0) | (gates["pre_b_gate"] > 0)
    assert shared.kernel.shape[2] == int(inputs.sum())


def test_nested_model_is_inlined(features):
    sub = _feature_sub(features, "nested", 0.4)
    small = kd.compact(sub)
    assert not any(isinstance(l, keras.Model) for l in small.layers)
    names = {l.name for l in small.layers}
    assert {"inner1", "inner2"} <= names
    gates = sub.cciv.per_gate()
    assert small.get_layer("inner1").filters == int(
        gates["inner/inner1_gate"].sum()
    )


def test_concatenate_maps_kept_channels_into_each_branch(features):
    sub = _feature_sub(features, "concat", 0.4)
    small = kd.compact(sub)
    gates = sub.cciv.per_gate()
    a, b = int(gates["branch_a_gate"].sum()), int(gates["branch_b_gate"].sum())
    assert small.get_layer("branch_a").filters == a
    assert small.get_layer("branch_b").filters == b
    assert small.get_layer("after").kernel.shape[2] == a + b


def test_separable_conv_is_sliced_on_both_kernels(features):
    sub = _feature_sub(features, "separable", 0.4)
    small = kd.compact(sub)
    gates = sub.cciv.per_gate()
    sep = small.get_layer("sep")
    assert sep.filters == int(gates["sep_gate"].sum()) < 8
    k1 = int(gates["conv1_gate"].sum())
    assert tuple(sep.depthwise_kernel.shape) == (3, 3, k1, 2)
    assert tuple(sep.pointwise_kernel.shape) == (1, 1, 2 * k1, sep.filters)


def test_depthwise_multiplier_2_removes_closed_input_channels(features, x8):
    # conv1 (8) -> gate -> DepthwiseConv2D(depth_multiplier=2) (16) -> gate.
    # Input channel c feeds outputs 2c and 2c+1 only; with zero depthwise
    # biases, a channel closed by conv1's gate, or whose two outputs are
    # both closed, is dead or unread, and its conv1 filter and depthwise
    # weights can go (the design note: "depth multipliers tie groups by
    # index maps, propagated to a fixed point").
    model = features["depthwise_m2"]
    conv1 = [1, 1, 0, 1, 0, 1, 1, 0]
    dw2 = [1, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    civs = cm.civs_from_masks(model, {"conv1_gate": conv1, "dw2_gate": dw2})
    sub = kd.subtask(model, civs, ["c0", "c1"], threshold=0.5)
    small, _, _ = cm.check_compact_equals(sub, x8)
    keep = np.array(conv1, bool) & np.array(dw2, bool).reshape(8, 2).any(1)
    assert keep.tolist() == [1, 1, 0, 1, 0, 1, 0, 0]
    assert small.get_layer("conv1").filters == int(keep.sum())  # 4 of 8
    assert small.get_layer("dw2").kernel.shape[2] == int(keep.sum())
    assert small.count_params() < model.count_params()


# ---------------------------------------------------------------------------
# Coupled channels that a gate closes somewhere.
# ---------------------------------------------------------------------------


def _add_group_model():
    keras.utils.set_random_seed(7)
    inp = keras.Input(cm.FEATURE_INPUT, name="image")
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            name="conv_a")(inp)
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            name="conv_b")(a)
    h = keras.layers.Add(name="add")([a, b])
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inp, out, name="add_group")


def test_residual_group_keeps_a_channel_open_in_one_member(x8):
    model = _add_group_model()
    # Channel 0: open in A, closed in B. Channel 1: closed in both.
    # Channel 2: open in both. Channel 3: closed in A, open in B.
    masks = {"conv_a_gate": [1, 0, 1, 0], "conv_b_gate": [0, 0, 1, 1]}
    civs = cm.civs_from_masks(model, masks)
    sub = kd.subtask(model, civs, ["c2", "c0"], threshold=0.5)
    assert {k: v.tolist() for k, v in sub.cciv.per_gate().items()} == masks
    x = x8
    small, small_logits, _ = cm.check_compact_equals(sub, x)
    # Channels 0, 2, 3 stay (open somewhere in the group), 1 goes.
    assert small.get_layer("conv_a").filters == 3
    assert small.get_layer("conv_b").filters == 3
    assert small.get_layer("conv_b").kernel.shape[2] == 3
    assert small.get_layer("head").kernel.shape == (3, 2)
    # The remaining closed channels are zeroed in conv_a/conv_b (ReLU(0) is
    # 0): conv_a's kept channel 3 and conv_b's kept channel 0.
    assert cm.masks_in(small) == {}
    for name, closed in (("conv_a", 2), ("conv_b", 0)):
        kernel, bias = small.get_layer(name).get_weights()
        assert not kernel[..., closed].any() and bias[closed] == 0
        assert kernel[..., [c for c in range(3) if c != closed]].any()
    # Without the kept gates the outputs would differ: the closed channels
    # carry signal before their gate.
    raw = cm.to_numpy(model(x))[:, [2, 0]]
    assert np.abs(raw - cm.sub_logits(sub, x)).max() > 1e-3


def test_closed_channel_with_a_batchnorm_shift_is_kept(features, x8):
    # conv1 -> gate -> BN -> conv2: channel 1 closed, but BN maps its zeros
    # to a non-zero constant that conv2 reads; channel 3's BN maps 0 to 0.
    model = features["bn_after_gate"]
    civs = cm.civs_from_masks(model, {"conv1_gate": [1, 0, 1, 0, 1, 1]})
    sub = kd.subtask(model, civs, ["c0", "c1"], threshold=0.5)
    x = x8
    small, _, _ = cm.check_compact_equals(sub, x)
    assert small.get_layer("conv1").filters == 5  # channel 3 removed
    # Closed channel 1 is zeroed in conv1 itself, before the BN shift.
    assert cm.masks_in(small) == {}
    kernel, bias = small.get_layer("conv1").get_weights()
    assert not kernel[..., 1].any() and bias[1] == 0


# ---------------------------------------------------------------------------
# All channels kept.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_cciv_drops_only_the_other_classes_rows(zoo, x32, arch):
    model = zoo.model(arch)
    sub = kd.subtask(model, zoo.random_civs(arch), CLASSES, budget=1.0)
    assert sub.cciv.kept_fraction == 1.0
    small = kd.compact(sub, include_softmax=False)
    head = model.layers[-1]
    fan_in = head.kernel.shape[0]
    dropped = cm.NUM_CLASSES - len(CLASSES)
    expected = model.count_params() - dropped * (fan_in + 1)
    assert small.count_params() == expected
    assert cm.masks_in(small) == {}
    cm.assert_logits_close(cm.to_numpy(small(x32)), cm.sub_logits(sub, x32))
    # Same as the original model's logits.
    cm.assert_logits_close(
        cm.to_numpy(small(x32)), cm.to_numpy(model(x32))[:, CLASS_IDX]
    )


# ---------------------------------------------------------------------------
# Concatenate input whose channels are all unneeded.
# ---------------------------------------------------------------------------


def _dead_branch_model():
    keras.utils.set_random_seed(5)
    inp = keras.Input(cm.FEATURE_INPUT, name="image")
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            name="conv_a")(inp)
    b = keras.layers.Conv2D(3, 3, padding="same", name="conv_b")(inp)
    h = keras.layers.Concatenate(name="cat")([a, b])
    h = keras.layers.ReLU(name="cat_relu")(h)
    h = keras.layers.Conv2D(5, 3, activation="relu", name="conv_c")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inp, out, name="dead_branch")


def test_concatenated_branch_with_no_needed_channel_compacts(x8):
    # conv_b (no ReLU) feeds only the concatenation, and the gate after it
    # closes all of conv_b's channels (as happens in DenseNet when a
    # block's last conv is closed in every later gate). The group of conv_b
    # has no channel to keep; compaction must still work and be equal.
    model = _dead_branch_model()
    civs = cm.civs_from_masks(
        model, {"cat_relu_gate": [1, 1, 1, 1, 0, 0, 0]}
    )
    sub = kd.subtask(model, civs, ["c0", "c1"], threshold=0.5)
    small, _, _ = cm.check_compact_equals(sub, x8)
    cm.all_layers_have_channels(small)


@pytest.mark.parametrize("seed", [0])
def test_densenet_sub_task_whose_block_output_is_unread_compacts(
    zoo, x32, seed
):
    # The same situation in DenseNet121: at budget 0.1 some block's last
    # 3x3 conv (concatenated, no ReLU of its own) has all its channels
    # closed in every later BN-ReLU gate that reads it. With these random
    # CCIV (seed 0) compaction fails in pool2_bn (seed 1: conv3_block12_0_bn).
    model = zoo.model("DenseNet121")
    civs = cm.hand_civs(model, np.random.default_rng(seed))
    sub = kd.subtask(model, civs, CLASSES, budget=0.1)
    cm.amplify_head(sub, x32)
    cm.check_compact_equals(sub, x32)
