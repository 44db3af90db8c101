"""Tests for keras_drnet.export: artifacts that stand alone and name their
classes, checked with the clients that deploy them (a fresh process without
keras_drnet, the LiteRT interpreter, ONNX Runtime)."""

import os
import subprocess
import sys
import warnings
import zipfile

import keras
import numpy as np
import pytest

import _compaction_models as cm
import keras_drnet as kd

# The add_relu gate follows a residual Add and closes channels that the
# stem keeps for res1: a mask that cannot be folded into weights.
MASKS = {"add_relu_gate": [1, 0, 1, 1, 0, 1], "res1_gate": [1, 1, 0, 1, 1]}


@pytest.fixture(scope="module")
def compacted():
    keras.utils.set_random_seed(3)
    model = cm.residual_model()
    civs = cm.civs_from_masks(model, MASKS)
    sub = kd.subtask(model, civs, ["c3", "c1"], threshold=0.5)
    x = np.random.default_rng(0).uniform(-1, 1, (5,) + cm.FEATURE_INPUT)
    x = x.astype("float32")
    small = kd.compact(sub)
    return sub, small, x


def test_compact_model_is_standard_keras_with_a_mask_layer(compacted):
    sub, small, x = compacted
    assert small.class_names == ["c3", "c1"]
    assert list(cm.masks_in(small)) == ["add_relu_gate"]
    assert {type(l).__module__.split(".")[0] for l in small.layers} == {
        "keras"}
    np.testing.assert_allclose(cm.to_numpy(small(x)),
                               cm.sub_probabilities(sub, x), atol=1e-6)


_FRESH = """
import sys, zipfile
import numpy as np
import keras
import tensorflow as tf
keras_path, saved_path, sub_path, dynamic_path, x_path, out_path = sys.argv[1:]
x = tf.constant(np.load(x_path))
loaded = keras.models.load_model(keras_path)
served = tf.saved_model.load(saved_path)
sub = tf.saved_model.load(sub_path)
dynamic = tf.saved_model.load(dynamic_path)
with zipfile.ZipFile(keras_path) as archive:
    keras_names = archive.read("class_names.txt").decode().split("\\n")
decode = lambda names: ",".join(n.decode() for n in names.numpy())
assert "keras_drnet" not in sys.modules
np.savez(out_path, keras=np.asarray(loaded(x)), served=served.serve(x).numpy(),
         sub=sub.serve(x).numpy(),
         dynamic=dynamic.serve(x, tf.constant([0, 1, 0, 1])).numpy(),
         names=np.array([",".join(keras_names), decode(served.class_names()),
                         decode(sub.class_names()),
                         decode(dynamic.class_names())]))
"""


def test_artifacts_load_in_a_process_without_the_package(compacted,
                                                         tmp_path):
    sub, small, x = compacted
    keras_path = kd.export(small, tmp_path / "small.keras", format="keras")
    saved_path = kd.export(small, tmp_path / "saved", format="tf_saved_model")
    sub_path = str(tmp_path / "sub")
    sub.export(sub_path, verbose=False)
    model, civs = sub.gated_model, sub.civs
    dynamic_path = kd.export_dynamic(model, civs, str(tmp_path / "dynamic"),
                                     threshold=0.5)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(
        [sys.executable, str(script), keras_path, saved_path, sub_path,
         dynamic_path, str(tmp_path / "x.npy"), str(tmp_path / "out.npz")],
        check=True, env=env, cwd=tmp_path)
    out = np.load(tmp_path / "out.npz")
    want = cm.sub_probabilities(sub, x)
    np.testing.assert_allclose(out["keras"], want, atol=1e-6)
    np.testing.assert_allclose(out["served"], want, atol=1e-6)
    np.testing.assert_allclose(out["sub"], cm.to_numpy(sub(x)), atol=1e-6)
    np.testing.assert_allclose(out["dynamic"], cm.to_numpy(sub(x)),
                               atol=1e-6)
    assert list(out["names"]) == ["c3,c1"] * 2 + ["c0,c1,c2,c3"] * 2
    assert kd.read_class_names(keras_path) == ["c3", "c1"]
    assert kd.read_class_names(saved_path) == ["c3", "c1"]
    assert kd.read_class_names(sub_path) == ["c0", "c1", "c2", "c3"]


def test_litert_model_runs_in_the_interpreter_and_carries_its_labels(
        compacted, tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils

    sub, small, x = compacted
    path = kd.export(small, tmp_path / "small.tflite", format="litert")
    with open(path, "rb") as f:
        flatbuffer = f.read()
    np.testing.assert_allclose(cm.tflite_predict(flatbuffer, x),
                               cm.sub_probabilities(sub, x), atol=1e-6)
    assert kd.read_class_names(path) == ["c3", "c1"]
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["class_names.txt"]
    model = flatbuffer_utils.read_model(path)
    (entry,) = [m for m in model.metadata if m.name == b"class_names"]
    data = bytes(model.buffers[entry.buffer].data)
    assert data.decode() == "c3\nc1"


def test_onnx_model_runs_in_onnxruntime_and_carries_its_labels(
        compacted, tmp_path):
    import onnxruntime

    sub, small, x = compacted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = kd.export(small, tmp_path / "small.onnx", format="onnx")
    # Not Keras's numpy-2 FutureWarning (np.object) for the user to puzzle.
    assert not [w for w in caught if "np.object" in str(w.message)], caught
    session = onnxruntime.InferenceSession(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(out, cm.sub_probabilities(sub, x), atol=1e-6)
    assert kd.read_class_names(path) == ["c3", "c1"]


def test_export_errors_name_the_fix(compacted, tmp_path):
    _, small, _ = compacted
    with pytest.raises(ValueError, match=r"`format` must be one of \['keras'"
                       r", 'tf_saved_model', 'litert', 'onnx'\]. Received: "
                       r"format='tflite'"):
        kd.export(small, tmp_path / "m", format="tflite")
    plain = keras.Model(small.inputs, small.outputs)
    with pytest.raises(ValueError, match="pass `class_names=\\[...\\]`"):
        kd.export(plain, tmp_path / "m.keras", format="keras")
    with pytest.raises(ValueError, match=r"one class name per output column "
                       r"\(2\), none with a newline. Received: "
                       r"class_names=\['a'\]"):
        kd.export(plain, tmp_path / "m.keras", format="keras",
                  class_names=["a"])
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="carries no class names: write it "
                       "with `keras_drnet.export"):
        kd.read_class_names(tmp_path / "plain.keras")


def test_a_subtask_model_is_refused_with_the_way_to_export_it(compacted,
                                                              tmp_path):
    sub, _, _ = compacted
    with pytest.raises(TypeError, match=r"keras_drnet.export\(keras_drnet."
                       r"compact\(sub\)"):
        kd.export(sub, tmp_path / "m.keras", format="keras")
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        kd.read_class_names(tmp_path / "missing.keras")


def test_litert_export_of_a_model_with_unknown_image_size(tmp_path):
    # Valid convolutions: a 1x1 warm-up image would be too small.
    inp = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 5, activation="relu")(inp)
    h = keras.layers.Conv2D(4, 5, activation="relu")(h)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    path = kd.export(model, tmp_path / "m.tflite", format="litert",
                     class_names=["a", "b"])
    assert kd.read_class_names(path) == ["a", "b"]
