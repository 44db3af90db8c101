"""Tests for keras_drnet.dissection: `dissect()` into Channel Importance Vectors.

A CIV is the mean CDRP of the first `samples_per_class` images of a class
(DRNet sec. 3.1, 4.1). The model is a small CNN trained on MNIST (see
`_dissect_models.py`); resumption and `MirroredStrategy` are tested in
subprocesses (`_dissect_worker.py`, `_dissect_mirrored.py`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import _dissect_models as dm  # noqa: E402
import keras_drnet as kd  # noqa: E402
from keras_drnet.civ import LayoutEntry  # noqa: E402
from keras_drnet.civ import model_fingerprint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAMES = dm.CLASS_NAMES
K = 3  # samples_per_class of the shared dissection
N = 300  # images offered to it
BATCH = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dm.trained(tmp_path_factory)


@pytest.fixture(scope="module")
def xy(data):
    return data["x_train"][:N], data["y_train"][:N]


@pytest.fixture(scope="module")
def baseline(data, xy):
    """The shared dissection, and the warnings it raised."""
    return dm.shared_dissection(data, xy, K, BATCH)


@pytest.fixture(scope="module")
def partial(data, xy):
    """A dissection where class 3 has no image and class 5 only one;
    returns `(civs, warnings, index of the one five)`."""
    return dm.partial_dissection(data, xy, BATCH)


# ---------------------------------------------------------------------------
# A CIV is the mean of its class's CDRPs.
# ---------------------------------------------------------------------------


def test_civ_is_the_mean_of_its_class_cdrps(data, xy, baseline):
    civs, _ = baseline
    x, y = xy
    chosen = dm.first_per_class(y, K)
    assert len(chosen) == K * dm.NUM_CLASSES
    cdrps = kd.cdrp(data["model"], x[chosen], batch_size=BATCH)
    labels = y[chosen]
    assert civs.vectors.shape == (dm.NUM_CLASSES, cdrps.shape[1])
    assert civs.vectors.dtype == np.float32
    for c in range(dm.NUM_CLASSES):
        np.testing.assert_allclose(
            civs.vectors[c], np.mean(cdrps[labels == c], axis=0), atol=1e-6
        )
    np.testing.assert_array_equal(civs.counts, np.full(dm.NUM_CLASSES, K))
    # The CDRPs are non-trivial: some gates at 0, not all images reset.
    assert (cdrps == 0).any() and not np.all(cdrps == 1)
    assert civs.vectors.min() >= 0.0 and civs.vectors.max() <= 10.0


@pytest.fixture(scope="module")
def policies(data):
    """Every policy's dissection of 300 test images, and their CDRPs.

    Held-out images: a few of them change their top-1 under fitting.
    """
    x, y = data["x_test"][:300], data["y_test"][:300]
    results = {}
    for policy in ("reset", "exclude", "keep_best"):
        civs = kd.dissect(data["model"], (x, y), samples_per_class=None,
                          class_names=NAMES, batch_size=64,
                          on_top1_change=policy, verbose=0)
        cdrps = kd.cdrp(data["model"], x, on_top1_change=policy)
        results[policy] = civs, cdrps
    return y, results


@pytest.mark.parametrize("policy", ["reset", "exclude", "keep_best"])
def test_top1_policy_civ_is_the_mean_of_what_it_keeps(policies, policy):
    labels, results = policies
    civs, cdrps = results[policy]
    changed = np.isnan(results["exclude"][1]).any(axis=1)
    assert changed.sum() >= 3, "too few images changed their top-1"
    for c in range(dm.NUM_CLASSES):
        mine = labels == c
        used = mine & ~np.isnan(cdrps).any(axis=1)
        assert civs.top1_changed[c] == (mine & changed).sum()
        assert civs.counts[c] == used.sum()
        if used.any():
            np.testing.assert_allclose(
                civs.vectors[c], cdrps[used].mean(axis=0), atol=1e-5
            )
    assert civs.config["on_top1_change"] == policy
    sizes = np.bincount(labels, minlength=dm.NUM_CLASSES)
    if policy == "exclude":
        np.testing.assert_array_equal(civs.counts + civs.top1_changed, sizes)
    else:
        np.testing.assert_array_equal(civs.counts, sizes)
    text = repr(civs).split("top-1 changed")[1]
    assert text.startswith(f" ({policy})")
    worst = int(np.argmax(civs.top1_changed))
    assert f"{NAMES[worst]}: {civs.top1_changed[worst]}" in text


def test_top1_changes_round_trip(policies, tmp_path):
    civs = policies[1]["exclude"][0]
    civs.save(tmp_path / "civs.npz")
    dm.assert_identical(kd.CIVs.load(tmp_path / "civs.npz"), civs)


def test_civs_metadata(data, baseline):
    civs, record = baseline
    assert record == [], [str(w.message) for w in record]
    assert civs.class_names == NAMES
    assert civs.num_classes == 10
    assert civs.missing == []
    gates = kd.list_gates(kd.inject_gates(data["model"]))
    assert civs.layout == tuple(
        LayoutEntry(g.name, g.source, g.channels) for g in gates
    )
    assert [e.source for e in civs.layout] == ["conv1", "relu2", "fc1"]
    assert civs.total_channels == 56
    assert civs.fingerprint == model_fingerprint(data["model"])
    assert civs.config["samples_per_class"] == K
    assert civs.config["iterations"] == 30
    assert civs.config["gamma"] == 0.05
    assert "10 classes x 56 channels" in repr(civs)


def test_default_class_names_are_indices(data, xy):
    x, y = xy
    civs = kd.dissect(
        data["model"], (x[:100], y[:100]), samples_per_class=1, iterations=2,
        verbose=0,
    )  # fmt: skip
    assert civs.class_names == [str(i) for i in range(10)]
    assert civs.missing == []


def test_dissect_does_not_depend_on_batch_size(data, xy, baseline):
    civs, _ = baseline
    other = kd.dissect(
        data["model"], xy, samples_per_class=K, class_names=NAMES,
        batch_size=3, verbose=0,
    )  # fmt: skip
    np.testing.assert_allclose(other.vectors, civs.vectors, atol=1e-5)
    np.testing.assert_array_equal(other.counts, civs.counts)


def test_samples_per_class_none_uses_every_image(data, xy):
    x, y = xy
    x, y = x[:25], y[:25]  # no image of class 5 among them
    assert 5 not in y
    with pytest.warns(UserWarning, match=r"No image was averaged for classes \['5'\]"):
        civs = kd.dissect(
            data["model"], (x, y), samples_per_class=None, iterations=5,
            batch_size=BATCH, verbose=0,
        )  # fmt: skip
    np.testing.assert_array_equal(civs.counts, np.bincount(y, minlength=10))
    assert civs.missing == ["5"]
    cdrps = kd.cdrp(data["model"], x, iterations=5, batch_size=BATCH)
    for c in np.flatnonzero(civs.counts):
        np.testing.assert_allclose(
            civs.vectors[c], cdrps[y == c].mean(0), atol=1e-6
        )


def test_verbose_dissect_shows_progress(data, xy, capsys):
    x, y = xy
    settings = dict(samples_per_class=1, iterations=2, class_names=NAMES)
    quiet = kd.dissect(data["model"], (x[:100], y[:100]), verbose=0, **settings)
    assert capsys.readouterr().out == ""
    loud = kd.dissect(data["model"], (x[:100], y[:100]), verbose=1, **settings)
    out = capsys.readouterr().out
    assert "10/10" in out and "images/s" in out
    np.testing.assert_allclose(loud.vectors, quiet.vectors, atol=1e-6)


@pytest.mark.parametrize(
    "numpy_setting",
    [
        dict(samples_per_class=np.int64(2)),
        dict(iterations=np.int64(3)),
        dict(batch_size=np.int64(4)),
        dict(clip=(np.float32(0.0), np.float32(10.0))),
    ],
    ids=lambda s: next(iter(s)),
)
def test_numpy_scalar_settings_can_be_saved_and_checkpointed(
    data, xy, tmp_path, numpy_setting
):
    """Settings accepted as numpy scalars must not break `save()` or resume."""
    x, y = xy
    settings = dict(samples_per_class=2, iterations=3, batch_size=4, verbose=0)
    expected = kd.dissect(data["model"], (x, y), **settings)
    settings.update(numpy_setting)
    civs = kd.dissect(
        data["model"], (x, y), checkpoint_dir=str(tmp_path / "ckpt"), **settings
    )
    np.testing.assert_allclose(civs.vectors, expected.vectors, atol=1e-6)
    civs.save(tmp_path / "civs.npz")
    dm.assert_identical(kd.CIVs.load(tmp_path / "civs.npz"), civs)


# ---------------------------------------------------------------------------
# Dataset forms.
# ---------------------------------------------------------------------------


def _tfds_mnist():
    import tensorflow_datasets as tfds

    ds = tfds.load(
        "mnist", split=f"train[:{N}]", as_supervised=True, download=False,
        data_dir=os.environ.get("TFDS_DATA_DIR"),
    )  # fmt: skip
    return ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))


DATASET_FORMS = {
    "unbatched dataset": lambda x, y: tf.data.Dataset.from_tensor_slices(
        (x, y)
    ),
    "batched dataset": lambda x, y: tf.data.Dataset.from_tensor_slices(
        (x, y)
    ).batch(7),
    "repeated (infinite) dataset": lambda x, y: tf.data.Dataset.from_tensor_slices(
        (x, y)
    ).repeat(),
    "int32 labels": lambda x, y: (x, y.astype("int32")),
    "one-hot numpy labels": lambda x, y: (
        x,
        keras.utils.to_categorical(y, 10).astype("float32"),
    ),
    "one-hot batched dataset": lambda x, y: tf.data.Dataset.from_tensor_slices(
        (x, tf.one_hot(y, 10))
    ).batch(16),
    "one-hot unbatched dataset": lambda x, y: tf.data.Dataset.from_tensor_slices(
        (x, tf.one_hot(y, 10))
    ),
    "tfds as_supervised": lambda x, y: _tfds_mnist(),
}


@pytest.mark.parametrize("form", list(DATASET_FORMS))
def test_dataset_forms_give_the_same_civs(data, xy, baseline, form):
    civs, _ = baseline
    ds = DATASET_FORMS[form](*xy)
    other = kd.dissect(
        data["model"], ds, samples_per_class=K, class_names=NAMES,
        batch_size=BATCH, verbose=0,
    )  # fmt: skip
    np.testing.assert_allclose(other.vectors, civs.vectors, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(other.counts, civs.counts)


# ---------------------------------------------------------------------------
# Classes with too few images, or none.
# ---------------------------------------------------------------------------


def test_short_class_is_counted_and_warned_once(partial):
    civs, record, _ = partial
    expected = np.full(10, 2)
    expected[3], expected[5] = 0, 1
    np.testing.assert_array_equal(civs.counts, expected)
    short = [w for w in record if "Fewer than" in str(w.message)]
    assert len(short) == 1
    assert issubclass(short[0].category, UserWarning)
    message = str(short[0].message)
    assert "samples_per_class=2" in message and "five (1)" in message
    assert "three" not in message  # the missing class is reported apart
    # The warning points at the caller, not at keras_drnet.
    # It points at the caller of `kd.dissect` (the shared helper).
    assert os.path.basename(short[0].filename) == "_dissect_models.py"
    assert np.all(np.isfinite(civs.vectors[5]))
    assert civs.for_class("five")  # usable


def test_short_class_warning_with_pytest_warns(data, xy):
    x, y = xy
    keep = np.flatnonzero(y != 7)[:100].tolist() + [int(np.flatnonzero(y == 7)[0])]
    with pytest.warns(UserWarning, match=r"Fewer than samples_per_class=2") as rec:
        civs = kd.dissect(
            data["model"], (x[keep], y[keep]), samples_per_class=2,
            iterations=2, batch_size=BATCH, verbose=0,
        )  # fmt: skip
    assert len([w for w in rec if "Fewer than" in str(w.message)]) == 1
    assert civs.counts[7] == 1 and civs.missing == []


def test_class_without_images_is_missing(partial):
    civs, record, _ = partial
    assert civs.missing == ["three"]
    assert np.all(np.isnan(civs.vectors[3]))
    others = np.delete(civs.vectors, 3, axis=0)
    assert np.all(np.isfinite(others))
    missing = [w for w in record if "No image" in str(w.message)]
    assert len(missing) == 1 and "three" in str(missing[0].message)
    for cls in ["three", 3, np.int64(3)]:
        with pytest.raises(ValueError, match=r"'three' has no CIV"):
            civs.for_class(cls)
        with pytest.raises(ValueError, match=r"'three' has no CIV"):
            civs.index(cls)


def test_missing_and_short_civs_are_means_of_what_there_was(data, xy, partial):
    civs, _, first_five = partial
    x, _ = xy
    cdrp = kd.cdrp(data["model"], x[first_five : first_five + 1])
    np.testing.assert_allclose(civs.vectors[5], cdrp[0], atol=1e-6)


# ---------------------------------------------------------------------------
# Input validation.
# ---------------------------------------------------------------------------


def _with_label(x, y, index, value):
    y = y[:100].copy()
    y[index] = value
    return x[:100], y


@pytest.mark.parametrize("value", [10, -1, 255])
def test_label_out_of_range(data, xy, value):
    ds = _with_label(*xy, 5, value)
    with pytest.raises(ValueError, match=rf"Label {value} .*out of range"):
        kd.dissect(data["model"], ds, samples_per_class=4, verbose=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: (np.zeros((20, 32, 32, 1), "float32"), y[:20]),
        lambda x, y: (np.zeros((20, 28, 28, 3), "float32"), y[:20]),
        lambda x, y: (x[:20, ..., 0], y[:20]),
        lambda x, y: tf.data.Dataset.from_tensor_slices(
            (np.zeros((20, 32, 32, 1), "float32"), y[:20])
        ).batch(4),
        lambda x, y: tf.data.Dataset.from_tensor_slices(
            (x[:20, None], y[:20])
        ).batch(4),
    ],
    ids=["32x32", "3 channels", "no channel axis", "batched 32x32", "rank 6"],
)
def test_wrong_image_shape(data, xy, make):
    with pytest.raises(ValueError, match=r"input shape \(28, 28, 1\)"):
        kd.dissect(data["model"], make(*xy), verbose=0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, y: [x[:10], y[:10]], TypeError, r"`ds` must be a `tf.data.Dataset`"),
        (lambda x, y: x[:10], TypeError, r"`ds` must be a `tf.data.Dataset`"),
        (lambda x, y: (x[:10], y[:10], y[:10]), TypeError, r"`ds` must be"),
        (lambda x, y: {"image": x[:10]}, TypeError, r"`ds` must be"),
        (
            lambda x, y: tf.data.Dataset.from_tensor_slices(x[:10]),
            ValueError,
            r"\(image, label\)",
        ),
        (
            lambda x, y: tf.data.Dataset.from_tensor_slices(
                {"image": x[:10], "label": y[:10]}
            ),
            ValueError,
            r"\(image, label\)",
        ),
        (
            lambda x, y: (x[:10], np.eye(4, dtype="float32")[y[:10] % 4]),
            ValueError,
            r"Labels must be integer class indices",
        ),
        (
            lambda x, y: (x[:10], np.array(["a"] * 10)),
            ValueError,
            r"Labels must be integer class indices",
        ),
    ],
    ids=[
        "list", "array", "3-tuple", "dict", "images only", "dict dataset",
        "one-hot of 4", "string labels",
    ],
)  # fmt: skip
def test_bad_ds(data, xy, make, error, match):
    with pytest.raises(error, match=match):
        kd.dissect(data["model"], make(*xy), verbose=0)


@pytest.mark.parametrize("value", [0, -2, 2.5, "10", 1e9 + 0.5])
def test_bad_samples_per_class(data, xy, value):
    with pytest.raises(ValueError, match=r"`samples_per_class` must be"):
        kd.dissect(data["model"], xy, samples_per_class=value, verbose=0)


@pytest.mark.parametrize(
    "names",
    [NAMES[:9], NAMES + ["ten"], ["a"] * 10, []],
    ids=["9 names", "11 names", "duplicates", "empty"],
)
def test_bad_class_names(data, xy, names):
    with pytest.raises(ValueError, match=r"`class_names` must be 10 distinct"):
        kd.dissect(data["model"], xy, class_names=names, verbose=0)


def test_non_model_is_rejected(xy):
    with pytest.raises(TypeError, match=r"Expected a `keras.Model`"):
        kd.dissect("model.keras", xy, verbose=0)


# ---------------------------------------------------------------------------
# Checkpoints: resume after a kill.
# ---------------------------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _worker_command(data, data_path, checkpoint_dir, result, delay=0.0):
    return [
        sys.executable,
        os.path.join(HERE, "_dissect_worker.py"),
        "--model", data["model_path"],
        "--data", str(data_path),
        "--checkpoint-dir", str(checkpoint_dir),
        "--result", str(result),
        "--delay", str(delay),
        "--samples-per-class", "4",
        "--batch-size", "4",
    ]  # fmt: skip


@pytest.mark.slow
def test_dissect_resumes_after_being_killed(data, tmp_path):
    x, y = data["x_train"][:200], data["y_train"][:200]
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x, y=y)
    checkpoint_dir = tmp_path / "checkpoint"
    state = checkpoint_dir / "dissect_state.npz"
    result = tmp_path / "resumed.npz"
    total = 4 * 10

    # 1. Start a run that reads slowly (50 ms per element) and kill it as
    #    soon as its first checkpoint is on disk.
    process = subprocess.Popen(
        _worker_command(data, data_path, checkpoint_dir, result, delay=0.05),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                pytest.fail(f"worker exited early ({process.returncode}):\n{output}")
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    # It really had not finished.
    assert not result.exists()
    assert not os.path.exists(f"{result}.json")
    with np.load(state) as checkpoint:
        done = int(checkpoint["counts"].sum())
        position = int(checkpoint["position"])
    assert 0 < done < total, done
    assert done % 4 == 0 and position >= done

    # 2. Restart it: it resumes and fits only the images not yet done.
    finished = subprocess.run(
        _worker_command(data, data_path, checkpoint_dir, result),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    with open(f"{result}.json") as f:
        assert json.load(f)["fitted"] == total - done
    resumed = kd.CIVs.load(result)

    # 3. An uninterrupted run (no checkpoint) gives exactly the same CIVs.
    uninterrupted = kd.dissect(
        data["model"], (x, y), samples_per_class=4, batch_size=4, verbose=0
    )
    np.testing.assert_array_equal(resumed.counts, np.full(10, 4))
    np.testing.assert_array_equal(resumed.counts, uninterrupted.counts)
    assert np.array_equal(resumed.vectors, uninterrupted.vectors)
    assert resumed.fingerprint == uninterrupted.fingerprint
    assert resumed.layout == uninterrupted.layout

    # 4. Running it once more on the finished checkpoint fits nothing and
    #    returns the same CIVs.
    again = kd.dissect(
        data["model"], (x, y), samples_per_class=4, batch_size=4,
        checkpoint_dir=str(checkpoint_dir), verbose=0,
    )  # fmt: skip
    assert np.array_equal(again.vectors, uninterrupted.vectors)


def test_checkpointed_run_equals_plain_run(data, xy, tmp_path):
    x, y = xy
    settings = dict(samples_per_class=2, iterations=5, batch_size=3, verbose=0)
    plain = kd.dissect(data["model"], (x, y), **settings)
    checkpointed = kd.dissect(
        data["model"], (x, y), checkpoint_dir=str(tmp_path / "ckpt"), **settings
    )
    assert np.array_equal(plain.vectors, checkpointed.vectors)
    assert (tmp_path / "ckpt" / "dissect_state.npz").exists()


def test_per_gate_gamma_is_recorded_and_resumes(data, xy, tmp_path):
    x, y = xy
    settings = dict(samples_per_class=1, iterations=3, batch_size=4, verbose=0,
                    gamma=(0.01, 0.1, 0.05), checkpoint_dir=str(tmp_path / "c"))
    civs = kd.dissect(data["model"], (x, y), **settings)
    assert civs.config["gamma"] == [0.01, 0.1, 0.05]
    civs.save(str(tmp_path / "civs.npz"))
    loaded = kd.CIVs.load(str(tmp_path / "civs.npz"))
    assert loaded.config["gamma"] == [0.01, 0.1, 0.05]
    # The same per-gate settings match the checkpoint (JSON lists).
    again = kd.dissect(data["model"], (x, y), **settings)
    np.testing.assert_array_equal(again.vectors, civs.vectors)


def test_resumed_exclude_run_takes_no_image_twice(data, tmp_path):
    """A dissection cut short (the stream ends early) resumes where it was:
    excluded images count as taken, so the result equals one plain run."""
    x, y = data["x_test"][:300], data["y_test"][:300]
    settings = dict(samples_per_class=20, batch_size=16, verbose=0,
                    on_top1_change="exclude")
    plain = kd.dissect(data["model"], (x, y), **settings)
    assert plain.top1_changed.sum() > 0, "no image was excluded"
    directory = str(tmp_path / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cut run has short classes
        kd.dissect(data["model"], (x[:150], y[:150]),
                   checkpoint_dir=directory, **settings)
    resumed = kd.dissect(data["model"], (x, y), checkpoint_dir=directory,
                         **settings)
    np.testing.assert_array_equal(resumed.counts, plain.counts)
    np.testing.assert_array_equal(resumed.top1_changed, plain.top1_changed)
    np.testing.assert_allclose(resumed.vectors, plain.vectors, atol=1e-6)


@pytest.fixture
def finished_checkpoint(data, xy, tmp_path):
    x, y = xy
    settings = dict(samples_per_class=1, iterations=2, batch_size=4, verbose=0)
    directory = str(tmp_path / "ckpt")
    civs = kd.dissect(data["model"], (x, y), checkpoint_dir=directory, **settings)
    return directory, settings, civs


@pytest.mark.parametrize(
    "change",
    [
        dict(iterations=3),
        dict(samples_per_class=2),
        dict(batch_size=5),
        dict(gamma=0.1),
        dict(gamma=[0.05, 0.05, 0.1]),
        dict(learning_rate=0.2),
        dict(clip=(0.0, 5.0)),
        dict(select="conv"),
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))}",
)
def test_checkpoint_with_other_settings_is_refused(
    data, xy, finished_checkpoint, change
):
    directory, settings, _ = finished_checkpoint
    with pytest.raises(ValueError, match=r"other settings or another model"):
        kd.dissect(
            data["model"], xy, checkpoint_dir=directory, **dict(settings, **change)
        )


def test_checkpoint_of_another_model_is_refused(data, xy, finished_checkpoint):
    directory, settings, civs = finished_checkpoint
    changed = dm.copy_of(data["model"])
    bias = changed.get_layer("head").bias
    bias.assign(keras.ops.convert_to_numpy(bias) + 1e-3)
    with pytest.raises(ValueError, match=r"other settings or another model"):
        kd.dissect(changed, xy, checkpoint_dir=directory, **settings)
    # The same settings and model resume (here: nothing left to do).
    again = kd.dissect(data["model"], xy, checkpoint_dir=directory, **settings)
    assert np.array_equal(again.vectors, civs.vectors)


def test_finished_checkpoint_with_another_dataset_is_refused(
    data, xy, finished_checkpoint
):
    directory, settings, _ = finished_checkpoint
    x, y = xy
    with pytest.raises(ValueError, match=r"made from another dataset"):
        kd.dissect(data["model"], (x[::-1], y[::-1]),
                   checkpoint_dir=directory, **settings)
    with pytest.raises(ValueError, match=r"made from another dataset"):
        kd.dissect(data["model"], (x + 0.5, y), checkpoint_dir=directory,
                   **settings)


def test_a_dataset_changed_after_its_first_elements_is_refused_on_resume(
        data, xy, tmp_path, capsys):
    x, y = xy
    settings = dict(samples_per_class=2, batch_size=BATCH,
                    class_names=NAMES, checkpoint_dir=str(tmp_path / "c"))
    kd.dissect(data["model"], (x, y), verbose=0, **settings)
    again = kd.dissect(data["model"], (x, y), verbose=1, **settings)
    assert "Resuming the dissection in" in capsys.readouterr().out
    # Labels corrected beyond the first elements (the first-elements check
    # cannot see it): the checkpoint's running digest does.
    fixed = y.copy()
    fixed[10:20] = (fixed[10:20] + 1) % 10
    with pytest.raises(ValueError, match="made from other data"):
        kd.dissect(data["model"], (x, fixed), verbose=0, **settings)
    with pytest.raises(ValueError, match="made from other data"):
        kd.dissect(data["model"], (x[:10], y[:10]), verbose=0, **settings)
    assert again.counts.sum() == 2 * len(NAMES)


def test_a_model_giving_nan_is_named_as_the_reason_classes_are_missing(
        data, xy):
    broken = dm.copy_of(data["model"])
    kernel = broken.get_layer("head").kernel
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    with pytest.warns(UserWarning, match="none was found, or their scores "
                      "were NaN") as record:
        kd.dissect(broken, xy, samples_per_class=1, method="taylor",
                   verbose=0)
    assert not any("exclude" in str(w.message) for w in record)


# ---------------------------------------------------------------------------
# tf.distribute.
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_mirrored_strategy_gives_the_same_civs(data, tmp_path):
    x, y = data["x_train"][:100], data["y_train"][:100]
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x, y=y)
    out = tmp_path / "mirrored.npz"
    finished = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "_dissect_mirrored.py"),
            "--model", data["model_path"],
            "--data", str(data_path),
            "--out", str(out),
        ],  # fmt: skip
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    with np.load(out) as results:
        results = dict(results)
    assert int(results["logical_devices"]) == 2
    assert int(results["replicas"]) == 2
    np.testing.assert_array_equal(results["single_counts"], np.full(10, 3))
    np.testing.assert_array_equal(
        results["mirrored_counts"], results["single_counts"]
    )
    np.testing.assert_allclose(
        results["mirrored_vectors"], results["single_vectors"], atol=1e-5
    )
    assert results["cdrp_single"].shape == (13, 56)
    np.testing.assert_allclose(
        results["cdrp_mirrored"], results["cdrp_single"], atol=1e-5
    )
    np.testing.assert_allclose(
        results["cdrp_in_scope"], results["cdrp_single"], atol=1e-5
    )
    for method in ("activation", "frat", "taylor"):
        np.testing.assert_allclose(
            results[f"{method}_mirrored"], results[f"{method}_single"],
            rtol=1e-5, atol=1e-6,
        )
    # And one device in the subprocess agrees with this process.
    here = kd.dissect(
        data["model"], (x, y), samples_per_class=3, batch_size=5, verbose=0
    )
    np.testing.assert_allclose(results["single_vectors"], here.vectors, atol=1e-5)


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(data, tmp_path, x, y, checkpoint_dir, name, delay=0.0):
    """Two workers of one job on localhost: `(processes, result paths)`."""
    data_path = tmp_path / "data.npz"
    np.savez(data_path, x=x, y=y)
    ports = ",".join(map(str, _free_ports(2)))
    outs = [tmp_path / f"{name}_{i}.npz" for i in range(2)]
    command = [sys.executable, os.path.join(HERE, "_dissect_multiworker.py"),
               "--model", data["model_path"], "--data", str(data_path),
               "--ports", ports, "--checkpoint-dir", str(checkpoint_dir),
               "--delay", str(delay)]
    workers = [
        subprocess.Popen(command + ["--index", str(i), "--out", str(out)],
                         env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i, out in enumerate(outs)
    ]
    return workers, outs


def _multiworker(data, tmp_path, x, y, checkpoint_dir, name):
    """Runs two workers to the end; returns each worker's saved results."""
    workers, outs = _start_workers(data, tmp_path, x, y, checkpoint_dir, name)
    logs = [w.communicate(timeout=300)[0] for w in workers]
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log[-3000:]
    results = []
    for out in outs:
        with np.load(out) as saved:
            results.append(dict(saved))
    return results


@pytest.mark.slow
def test_multi_worker_strategy_gives_the_same_civs_on_every_worker(
        data, tmp_path):
    x, y = data["x_train"][:100], data["y_train"][:100]
    checkpoint_dir = tmp_path / "ckpt"
    state = checkpoint_dir / "dissect_state.npz"
    # 1. A slow-reading job, killed (both workers) once the chief has
    #    written its first checkpoint.
    workers, outs = _start_workers(data, tmp_path, x, y, checkpoint_dir,
                                   "killed", delay=0.05)
    try:
        deadline = time.monotonic() + 120
        while not state.exists():
            assert all(w.poll() is None for w in workers), "a worker ended"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
    finally:
        for worker in workers:
            worker.kill()
            worker.communicate()
    with np.load(state) as checkpoint:
        done = int(checkpoint["counts"].sum())
    assert 0 < done < 50 and not any(out.exists() for out in outs)
    # 2. Restarted, the job resumes from the chief's checkpoint and every
    #    worker returns what one process gives.
    results = _multiworker(data, tmp_path, x, y, checkpoint_dir, "resumed")
    single = kd.dissect(data["model"], (x, y), samples_per_class=5,
                        batch_size=8, verbose=0)
    cdrps = kd.cdrp(data["model"], x[:13], batch_size=8)
    for result in results:
        assert int(result["replicas"]) == 2
        np.testing.assert_array_equal(result["counts"], single.counts)
        np.testing.assert_allclose(result["vectors"], single.vectors,
                                   atol=1e-5)
        np.testing.assert_allclose(result["cdrps"], cdrps, atol=1e-5)
        assert str(result["refusal"]).startswith(
            "`finetune` runs in one process")
