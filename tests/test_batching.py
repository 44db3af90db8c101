"""Tests for keras_drnet.batching: input plumbing (pairs or images, batched
or not, one-hot labels, class filters) and the `Progress` rule (a bar on a
terminal, a few plain lines in a file)."""

import io
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_drnet import batching

SHAPE = (None, 4, 4, 3)


def _pairs(n=12):
    x = np.arange(n * 48, dtype="float32").reshape(n, 4, 4, 3)
    return x, np.arange(n) % 3


@pytest.mark.parametrize("form", ["tuple", "elements", "batches", "onehot"])
def test_labelled_elements_reads_every_form_as_the_same_elements(form):
    x, y = _pairs()
    ds = {
        "tuple": (x, y),
        "elements": tf.data.Dataset.from_tensor_slices((x, y)),
        "batches": tf.data.Dataset.from_tensor_slices((x, y)).batch(5),
        "onehot": tf.data.Dataset.from_tensor_slices(
            (x, np.eye(3, dtype="float32")[y])),
    }[form]
    got = list(batching.labelled_elements(ds, SHAPE, 3).as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), x)
    np.testing.assert_array_equal([g[1] for g in got], y)


def test_labelled_elements_refuses_float_labels_and_wrong_shapes():
    x, y = _pairs()
    with pytest.raises(ValueError, match="integer class indices"):
        batching.labelled_elements((x, y.astype("float32")), SHAPE, 3)
    with pytest.raises(ValueError, match="one label per image"):
        batching.labelled_elements((x, y[:5]), SHAPE, 3)
    with pytest.raises(ValueError, match="input shape"):
        batching.labelled_elements((x[:, :, :, 0], y), SHAPE, 3)


def test_class_images_keeps_the_classes_images_and_passes_images_through():
    x, y = _pairs()
    kept = np.stack(list(batching.class_images(
        (x, y), SHAPE, 3, [0, 2]).as_numpy_iterator()))
    np.testing.assert_array_equal(kept, x[y != 1])
    assert batching.class_images(x, SHAPE, 3, [0]) is x


def test_is_paired_and_is_number():
    x, y = _pairs()
    assert batching.is_paired((x, y))
    assert not batching.is_paired(x)
    assert not batching.is_paired(tf.data.Dataset.from_tensor_slices(x))
    with pytest.raises(TypeError, match="tuple of 3"):
        batching.is_paired((x, y, y))
    assert batching.is_number(np.float32(0.5)) and batching.is_number(3)
    assert not batching.is_number(True) and not batching.is_number("0.5")
    assert batching.is_int(np.int64(2)) and not batching.is_int(2.0)


def test_progress_in_a_file_is_a_few_plain_lines(monkeypatch):
    out = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stdout", out)
    progress = batching.Progress(1000, verbose=1)
    for _ in range(100):
        progress.add(10)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 11, lines
    assert lines[-1].startswith("1000/1000 images")
    assert "\r" not in out.getvalue() and "\x1b[" not in out.getvalue()
    silent = io.StringIO()
    monkeypatch.setattr(sys, "stdout", silent)
    quiet = batching.Progress(10, verbose=0)
    quiet.add(10)
    quiet.finish()
    assert silent.getvalue() == ""


def test_progress_on_a_terminal_is_keras_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    progress = batching.Progress(10, verbose=1)
    assert progress._bar is not None and progress._bar.target == 10
