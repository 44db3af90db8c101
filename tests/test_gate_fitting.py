"""Tests for keras_drnet.gate_fitting: per-image CDRPs (DRNet sec. 3.1, 4.1).

The batched, compiled fitting of `kd.cdrp` / `kd.GateFitter` is compared
with `_dissect_models.ReferenceFitter`, a straightforward per-image loop
(`tf.Variable` λ, `keras.optimizers.SGD`, KL from the original model's
probabilities, L1, clip, top-1 check) that shares no code with the package's
fitting. The model is a small CNN trained on MNIST: random weights give
degenerate all-zero CDRPs.
"""

import inspect

import numpy as np
import pytest
import tensorflow as tf

import _dissect_models as dm  # noqa: E402
import keras_drnet as kd  # noqa: E402

N_CHANNELS = 8 + 16 + 32


def paper_cdrp(*args, **kwargs):
    """`kd.cdrp` with the paper's top-1 rule unless a test picks another."""
    kwargs.setdefault("on_top1_change", "reset")
    return kd.cdrp(*args, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dm.trained(tmp_path_factory)


@pytest.fixture(scope="module")
def pool(data):
    """CDRPs (paper defaults) of 300 held-out images, fitted 64 at a time."""
    images = data["x_test"][:300]
    cdrps = paper_cdrp(data["model"], images, batch_size=64)
    return images, cdrps


@pytest.fixture(scope="module")
def mixed_images(data, pool):
    """13 images: 10 whose gates are kept and 3 whose gates get reset.

    Chosen from the pool by the package's output only; the reference decides
    on its own which images are reset, and the tests assert it agrees.
    """
    images, cdrps = pool
    reset = np.flatnonzero(np.all(cdrps == 1.0, axis=1))
    kept = np.flatnonzero(~np.all(cdrps == 1.0, axis=1))
    assert len(reset) >= 3, "need images whose top-1 changes under fitting"
    index = np.sort(np.concatenate([kept[:10], reset[:3]]))
    return images[index]


@pytest.fixture(scope="module")
def reference(data, mixed_images):
    """Reference CDRPs (paper hyperparameters) of the 13 mixed images."""
    fitter = dm.ReferenceFitter(data["model"])
    cdrps, kept = fitter(mixed_images)
    return fitter, cdrps, kept


def assert_close_to_reference(observed, expected):
    assert observed.shape == expected.shape
    assert observed.dtype == np.float32
    diff = np.abs(observed - expected)
    assert np.mean(diff <= 1e-3) >= 0.999, f"max abs diff {diff.max()}"
    assert diff.max() <= 1e-4, f"max abs diff {diff.max()}"
    # Same reset decision for every image.
    np.testing.assert_array_equal(
        np.all(observed == 1.0, axis=1), np.all(expected == 1.0, axis=1)
    )


def assert_meaningful(cdrps, kept):
    """The comparison covers reset images and gates clipped to 0."""
    assert (~kept).sum() >= 1, "no image was reset"
    assert kept.sum() >= 1, "every image was reset"
    np.testing.assert_array_equal(cdrps[~kept], 1.0)
    assert (cdrps[kept] == 0.0).sum() > 0, "no gate reached 0"
    assert (cdrps[kept] > 0.0).sum() > 0, "every gate reached 0"


# ---------------------------------------------------------------------------
# The paper's hyperparameters.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "function",
    # `dissect`'s are `CDRP`'s (its keywords default to None: not given).
    [kd.cdrp, kd.CDRP, kd.GateFitter.__init__],
    ids=["cdrp", "CDRP", "GateFitter"],
)
def test_default_hyperparameters_are_the_papers(function):
    parameters = inspect.signature(function).parameters
    defaults = {name: parameters[name].default for name in dm.PAPER}
    assert defaults["iterations"] == 30
    assert defaults["learning_rate"] == 0.1
    assert defaults["momentum"] == 0.9
    assert defaults["gamma"] == 0.05
    assert tuple(defaults["clip"]) == (0.0, 10.0)
    # The paper resets; the default keeps each image's best gates instead
    # (the reset opened every channel on our CIFAR VGG16, BUILD_NOTES.md).
    assert parameters["on_top1_change"].default == "keep_best"


def test_gate_fitter_stores_paper_defaults(data):
    fitter = kd.GateFitter(kd.inject_gates(data["model"]))
    assert fitter.iterations == 30
    assert fitter.learning_rate == 0.1
    assert fitter.momentum == 0.9
    assert fitter.gamma == 0.05
    assert tuple(fitter.clip) == (0.0, 10.0)
    assert fitter.total_channels == N_CHANNELS


# ---------------------------------------------------------------------------
# Batched fitting == the per-image reference loop.
# ---------------------------------------------------------------------------


def test_reference_sees_resets_and_zero_gates(reference):
    _, cdrps, kept = reference
    assert cdrps.shape == (13, N_CHANNELS)
    assert_meaningful(cdrps, kept)


def test_batched_cdrps_match_per_image_reference(data, mixed_images, reference):
    """Default (paper) hyperparameters, batch size 5 not dividing N = 13."""
    _, expected, _ = reference
    observed = paper_cdrp(data["model"], mixed_images, batch_size=5)
    assert_close_to_reference(observed, expected)


def test_logits_model_matches_per_image_reference(data, mixed_images):
    fitter = dm.ReferenceFitter(data["logits_model"])
    assert not fitter.softmax_head
    expected, kept = fitter(mixed_images)
    assert_meaningful(expected, kept)
    observed = paper_cdrp(data["logits_model"], mixed_images, batch_size=5)
    assert_close_to_reference(observed, expected)
    # Same weights, softmax head: the CDRPs do not depend on the head form.
    softmax = paper_cdrp(data["model"], mixed_images, batch_size=5)
    np.testing.assert_allclose(observed, softmax, atol=1e-5)


def test_other_hyperparameters_match_per_image_reference(data, mixed_images):
    settings = dict(
        iterations=8, learning_rate=0.3, momentum=0.5, gamma=0.2, clip=(0.25, 1.5)
    )
    images = mixed_images[::2]  # 7 images, batch size 3
    expected, kept = dm.ReferenceFitter(data["model"])(images, **settings)
    observed = paper_cdrp(data["model"], images, batch_size=3, **settings)
    assert_close_to_reference(observed, expected)
    assert observed.min() >= 0.25 and observed.max() <= 1.5
    assert (observed[kept] == 0.25).any(), "no gate reached the lower clip"


def test_per_gate_gamma_matches_per_image_reference(data, mixed_images):
    """One L1 weight per gate (e.g. scaled by the layer's width)."""
    images = mixed_images[:6]
    gamma = [0.02, 0.2, 0.05]  # conv1 (8), relu2 (16), fc1 (32)
    expected, _ = dm.ReferenceFitter(data["model"])(images, gamma=gamma)
    observed = paper_cdrp(data["model"], images, batch_size=4, gamma=gamma)
    assert_close_to_reference(observed, expected)
    scalar = paper_cdrp(data["model"], images, batch_size=4)
    assert np.abs(observed - scalar).max() > 0.01
    # The same weight for every gate is the scalar gamma.
    same = paper_cdrp(data["model"], images, batch_size=4, gamma=[0.05] * 3)
    np.testing.assert_allclose(same, scalar, atol=1e-6)
    fitter = kd.GateFitter(kd.inject_gates(data["model"]), gamma=(0.02, 0.2, 0.05))
    assert fitter.gamma == [0.02, 0.2, 0.05]
    assert fitter.get_config()["gamma"] == [0.02, 0.2, 0.05]


@pytest.mark.parametrize(
    "select, sources",
    [("conv", ["conv1", "relu2"]), ("dense", ["fc1"])],
)
def test_selected_gates_match_per_image_reference(
    data, mixed_images, select, sources
):
    """Only some ReLUs gated; "dense" leaves a single gate layer."""
    images = mixed_images[:6]
    fitter = dm.ReferenceFitter(data["model"], select=select)
    assert [g.source for g in fitter.gates] == sources
    expected, _ = fitter(images, iterations=10)
    observed = paper_cdrp(
        data["model"], images, batch_size=4, iterations=10, select=select
    )
    assert observed.shape == (6, fitter.total)
    assert_close_to_reference(observed, expected)


def test_cdrps_do_not_depend_on_batching_or_input_form(data, mixed_images):
    model = data["model"]
    expected = paper_cdrp(model, mixed_images, batch_size=13)
    labels = np.arange(13) % 10
    candidates = {
        "batch 1": paper_cdrp(model, mixed_images, batch_size=1),
        "batch 64": paper_cdrp(model, mixed_images, batch_size=64),
        "dataset of images": paper_cdrp(
            model, tf.data.Dataset.from_tensor_slices(mixed_images), batch_size=4
        ),
        "batched dataset of (image, label)": paper_cdrp(
            model,
            tf.data.Dataset.from_tensor_slices((mixed_images, labels)).batch(6),
            batch_size=5,
        ),
        "already gated model": paper_cdrp(
            kd.inject_gates(model), mixed_images, batch_size=13
        ),
    }
    for name, observed in candidates.items():
        assert observed.shape == expected.shape, name
        np.testing.assert_allclose(observed, expected, atol=1e-5, err_msg=name)


def test_sequential_model_gives_the_same_cdrps(data, mixed_images):
    sequential = dm.build_cnn(sequential=True)
    sequential.set_weights(data["model"].get_weights())
    observed = paper_cdrp(sequential, mixed_images, batch_size=5)
    expected = paper_cdrp(data["model"], mixed_images, batch_size=5)
    np.testing.assert_allclose(observed, expected, atol=1e-5)


def test_jit_compiled_fitting_gives_the_same_cdrps(data, mixed_images):
    observed = paper_cdrp(data["model"], mixed_images, batch_size=5, jit_compile=True)
    expected = paper_cdrp(data["model"], mixed_images, batch_size=5)
    np.testing.assert_allclose(observed, expected, atol=1e-5)
    np.testing.assert_array_equal(
        np.all(observed == 1.0, axis=1), np.all(expected == 1.0, axis=1)
    )


def test_verbose_cdrp_shows_progress(data, mixed_images, capsys):
    quiet = paper_cdrp(data["model"], mixed_images[:4], iterations=2, verbose=0)
    assert capsys.readouterr().out == ""
    loud = paper_cdrp(data["model"], mixed_images[:4], iterations=2, verbose=1)
    out = capsys.readouterr().out
    assert "images/s" in out and "4" in out
    np.testing.assert_allclose(loud, quiet, atol=1e-6)


def test_cdrp_of_no_image_is_empty(data):
    result = paper_cdrp(data["model"], data["x_test"][:0])
    assert result.shape == (0, N_CHANNELS)


# ---------------------------------------------------------------------------
# The top-1 guard (paper sec. 4.1).
# ---------------------------------------------------------------------------


def test_every_cdrp_is_reset_or_keeps_the_top1(data, pool):
    images, cdrps = pool
    assert cdrps.shape == (300, N_CHANNELS)
    assert cdrps.min() >= 0.0 and cdrps.max() <= 10.0
    reset = np.all(cdrps == 1.0, axis=1)
    assert 0 < reset.sum() < len(cdrps)
    original = np.argmax(data["model"].predict(images, verbose=0), axis=-1)
    fitter = dm.ReferenceFitter(data["model"])
    gated_top1 = dm.top1_with_gates(fitter, images[~reset], cdrps[~reset])
    np.testing.assert_array_equal(gated_top1, original[~reset])


# ---------------------------------------------------------------------------
# What happens to an image whose top-1 the fitted gates change.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["exclude", "keep_best"])
def test_top1_policy_batched_matches_per_image_reference(
    data, mixed_images, reference, policy
):
    _, reset_cdrps, kept = reference
    expected, expected_kept = dm.ReferenceFitter(data["model"])(
        mixed_images, on_top1_change=policy
    )
    np.testing.assert_array_equal(expected_kept, kept)
    observed = paper_cdrp(
        data["model"], mixed_images, batch_size=5, on_top1_change=policy
    )
    # Images that kept their top-1 get the same CDRP under every policy.
    np.testing.assert_allclose(observed[kept], reset_cdrps[kept], atol=1e-4)
    if policy == "exclude":
        assert np.isnan(observed[~kept]).all()
        assert not np.isnan(observed[kept]).any()
    else:
        np.testing.assert_allclose(observed[~kept], expected[~kept], atol=1e-4)


def test_keep_best_gates_keep_the_top1_and_are_fitted(data, pool):
    images, reset_cdrps = pool
    changed = np.all(reset_cdrps == 1.0, axis=1)
    best = paper_cdrp(data["model"], images[changed], on_top1_change="keep_best")
    original = np.argmax(
        data["model"].predict(images[changed], verbose=0), axis=-1
    )
    fitter = dm.ReferenceFitter(data["model"])
    np.testing.assert_array_equal(
        dm.top1_with_gates(fitter, images[changed], best), original
    )
    # Not merely reset: most changed images had useful gates on the way.
    assert np.mean(np.any(best < 0.5, axis=1)) > 0.5


def test_unknown_top1_policy_is_rejected(data):
    with pytest.raises(ValueError, match="on_top1_change.*Received.*'drop'"):
        paper_cdrp(data["model"], data["x_test"][:2], on_top1_change="drop")


# ---------------------------------------------------------------------------
# GateFitter as a Keras model.
# ---------------------------------------------------------------------------


def test_gate_fitter_predict_equals_cdrp(data, mixed_images):
    gated = kd.inject_gates(data["model"])
    fitter = kd.GateFitter(gated, on_top1_change="reset")
    predicted = fitter.predict(mixed_images, batch_size=5, verbose=0)
    expected = paper_cdrp(data["model"], mixed_images, batch_size=5)
    assert predicted.shape == (13, N_CHANNELS)
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    np.testing.assert_array_equal(
        np.all(predicted == 1.0, axis=1), np.all(expected == 1.0, axis=1)
    )


def test_gate_fitter_fit_raises_a_clear_error(data, mixed_images):
    fitter = kd.GateFitter(kd.inject_gates(data["model"]))
    with pytest.raises(NotImplementedError, match=r"predict"):
        fitter.fit(mixed_images, np.zeros(len(mixed_images)))


def test_gate_fitter_needs_a_gated_model(data):
    with pytest.raises(ValueError, match=r"no `ChannelGate`.*inject_gates"):
        kd.GateFitter(data["model"])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(iterations=0), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(momentum=-1), "momentum"),
        (dict(gamma=-0.05), "gamma"),
        (dict(gamma=[0.05, 0.05]), r"one number per gate \(3 gates\)"),
        (dict(gamma=[0.05, -0.05, 0.05]), "gamma"),
        (dict(gamma="0.05"), "gamma"),
        (dict(gamma=float("nan")), "gamma.*finite"),
        (dict(learning_rate=float("inf")), "learning_rate.*finite"),
        (dict(momentum=float("nan")), "momentum.*finite"),
        (dict(clip=(10.0, 0.0)), "clip"),
        (dict(clip=(0.0, 1.0, 2.0)), "clip"),
    ],
)
def test_bad_hyperparameters_are_rejected(data, bad, match):
    gated = kd.inject_gates(data["model"])
    with pytest.raises(ValueError, match=match):
        kd.GateFitter(gated, **bad)
    with pytest.raises(ValueError, match=match):
        paper_cdrp(gated, data["x_test"][:2], **bad)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, None])
def test_cdrp_rejects_bad_batch_size(data, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        paper_cdrp(data["model"], data["x_test"][:2], batch_size=batch_size)


@pytest.mark.parametrize(
    "shape", [(3, 32, 32, 1), (3, 28, 28), (3, 28, 28, 3)], ids=str
)
def test_cdrp_rejects_wrong_image_shape(data, shape):
    images = np.zeros(shape, "float32")
    with pytest.raises(ValueError, match=r"shape"):
        paper_cdrp(data["model"], images)
    with pytest.raises(ValueError, match=r"shape"):
        paper_cdrp(data["model"], tf.data.Dataset.from_tensor_slices(images))
