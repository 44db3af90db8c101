"""Deployment artifacts that carry the names of their output columns."""

import os
import warnings
import zipfile

import numpy as np
import tensorflow as tf

from keras_drnet.saved_model import write_saved_model
from keras_drnet.subtask import SubtaskModel

FORMATS = ("keras", "tf_saved_model", "litert", "onnx")
# A member of the `.keras` zip, and of the zip appended to a `.tflite` file
# (TFLite's layout for associated files such as a labels file).
LABELS_FILE = "class_names.txt"


def _class_names(model, class_names):
    names = class_names if class_names is not None else getattr(
        model, "class_names", None
    )
    if names is None:
        raise ValueError(
            f"Model '{model.name}' does not say what its output columns are: "
            "pass `class_names=[...]` (models from `keras_drnet.compact()` "
            "and `keras_drnet.repair()` carry them)."
        )
    names = [str(n) for n in names]
    columns = model.outputs[0].shape[-1]
    if len(names) != columns or any("\n" in n for n in names):
        raise ValueError(
            f"Expected one class name per output column ({columns}), none "
            f"with a newline. Received: class_names={names}"
        )
    return names


def export(model, filepath, format="tf_saved_model", class_names=None,
           verbose=False):
    """Writes a deployment artifact that names its output columns.

    Where the class names go, per `format` (read any of them back with
    `keras_drnet.read_class_names(filepath)`):

    - `"keras"`: `filepath` (`.keras`) as `model.save()` writes it, plus a
      `class_names.txt` member in its zip. A compact model is plain Keras:
      `keras.models.load_model` loads it without this package.
    - `"tf_saved_model"`: a SavedModel with endpoints `serve(images)` and
      `class_names()` (a string tensor).
    - `"litert"`: a `.tflite` flatbuffer with a `"class_names"` metadata
      buffer, and `class_names.txt` appended as an associated file (a zip
      at the end of the file, which interpreters ignore).
    - `"onnx"`: an ONNX model whose `metadata_props` hold `class_names`
      (newline-separated).

    Args:
        model: a `keras.Model`, e.g. from `keras_drnet.compact()`.
        filepath: str, where to write.
        format: one of `"keras"`, `"tf_saved_model"`, `"litert"`, `"onnx"`.
        class_names: list of str, one per output column. Defaults to
            `model.class_names`.
        verbose: bool, whether Keras prints what it writes.

    Example:

    ```python
    small = keras_drnet.compact(sub)
    keras_drnet.export(small, "cat_dog.tflite", format="litert")
    keras_drnet.read_class_names("cat_dog.tflite")  # ['cat', 'dog']
    ```
    """
    if isinstance(model, SubtaskModel):
        raise TypeError(
            "`export` writes a plain Keras model; a `SubtaskModel` runs the "
            "full-width network with masks. Export its compact form, which "
            "computes the same probabilities of its classes: "
            "`keras_drnet.export(keras_drnet.compact(sub), filepath, "
            "format=...)`, or write the masked network with "
            "`sub.export(filepath)` (SavedModel) or `sub.save(path.keras)`."
        )
    if format not in FORMATS:
        raise ValueError(
            f"`format` must be one of {list(FORMATS)}. Received: "
            f"format={format!r}"
        )
    names = _class_names(model, class_names)
    filepath = os.fspath(filepath)
    text = "\n".join(names)
    if format == "keras":
        model.save(filepath)
        with zipfile.ZipFile(filepath, "a") as archive:
            archive.writestr(LABELS_FILE, text)
    elif format == "tf_saved_model":
        spec = model.inputs[0]
        serve = lambda images: model(images, training=False)
        write_saved_model(
            filepath, [model],
            {"serve": (serve, [tf.TensorSpec(spec.shape, spec.dtype)])},
            {"class_names": names}, verbose,
        )
    else:
        # Keras's ONNX and LiteRT exporters want a model that has run once;
        # unknown sizes get one large enough for valid convolutions.
        spec = model.inputs[0]
        for size in (32, 64, 128, 256):
            try:
                shape = [1] + [d or size for d in spec.shape[1:]]
                model(np.zeros(shape, spec.dtype), training=False)
                break
            except (ValueError, tf.errors.InvalidArgumentError):
                if all(spec.shape[1:]):
                    raise
        with warnings.catch_warnings():
            # Keras's own tf2onnx patch probes `hasattr(np, "object")`,
            # which numpy 2 answers with a FutureWarning meant for Keras.
            warnings.filterwarnings(
                "ignore", message=".*np.object", category=FutureWarning
            )
            model.export(filepath, format=format, verbose=verbose)
        if format == "litert":
            _add_tflite_labels(filepath, text)
        else:
            import onnx

            proto = onnx.load(filepath)
            onnx.helper.set_model_props(proto, {"class_names": text})
            onnx.save(proto, filepath)
    return filepath


def _add_tflite_labels(filepath, text):
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(filepath)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(text.encode(), np.uint8)
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = "class_names"
    metadata.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [metadata]
    flatbuffer_utils.write_model(model, filepath)
    with zipfile.ZipFile(filepath, "a") as archive:
        archive.writestr(LABELS_FILE, text)


def read_class_names(filepath):
    """The class names stored in an artifact written by `export()`.

    Reads a `.keras` or `.tflite` file's `class_names.txt`, a SavedModel's
    `class_names()` endpoint, or an ONNX model's `metadata_props`.
    """
    filepath = os.fspath(filepath)
    if not os.path.exists(filepath):
        raise FileNotFoundError(f"No such file or folder: {filepath!r}")
    if os.path.isdir(filepath):
        loaded = tf.saved_model.load(filepath)
        if not hasattr(loaded, "class_names"):
            raise ValueError(
                f"The SavedModel at {filepath} has no `class_names` endpoint:"
                " write it with `keras_drnet.export()` or "
                "`SubtaskModel.export()`."
            )
        return [n.decode() for n in loaded.class_names().numpy()]
    if zipfile.is_zipfile(filepath):
        with zipfile.ZipFile(filepath) as archive:
            if LABELS_FILE in archive.namelist():
                return archive.read(LABELS_FILE).decode().split("\n")
    elif filepath.endswith(".onnx"):
        import onnx

        props = {p.key: p.value for p in onnx.load(filepath).metadata_props}
        if "class_names" in props:
            return props["class_names"].split("\n")
    raise ValueError(
        f"{filepath} carries no class names: write it with "
        "`keras_drnet.export(model, filepath, format=...)`."
    )
