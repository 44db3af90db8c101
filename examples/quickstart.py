"""DRNet quickstart: a cat-vs-dog sub-network of a CIFAR-10 CNN.

Trains a small CNN on CIFAR-10 (or reuses the one it saved before),
dissects it into per-class CIVs, builds the cat/dog sub-task, prints its
report (the paper's Table 1 row), saves the per-layer plot (Figure 7),
exports a SavedModel and checks the reloaded artifact, and compacts the
sub-task into a smaller plain Keras model.

    python examples/quickstart.py            # ~3 minutes on 2 CPU cores
    python examples/quickstart.py --quick    # seconds, for the tests
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import keras_drnet as kd  # noqa: E402

_QUICK = flags.DEFINE_boolean(
    "quick", False, "Tiny run (a few batches, few images) to check it works."
)
_OUTPUT = flags.DEFINE_string(
    "output_dir", "drnet_quickstart", "Where the plot and SavedModel go."
)
_MODEL = flags.DEFINE_string(
    "model_path",
    os.path.join(os.path.expanduser("~"), ".cache", "keras_drnet",
                 "quickstart_cifar10_v2.keras"),
    "Trained model cache: reused if it exists.",
)
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Training epochs.")
_SAMPLES = flags.DEFINE_integer(
    "samples_per_class", 100, "Images per class for the CIVs (paper: 100)."
)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "union_thr (paper, VGG16 on CIFAR-10: 6e-3)."
)
_BUDGET = flags.DEFINE_float(
    "budget", 0.5, "Fraction of channels to keep (used unless --threshold)."
)
_CLASSES = flags.DEFINE_list("classes", ["cat", "dog"], "The sub-task.")


def cifar10(split):
    ds, info = tfds.load("cifar10", split=split, as_supervised=True,
                         with_info=True)
    ds = ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))
    return ds, info.features["label"].names


def small_cnn():
    keras.utils.set_random_seed(0)
    layers = [keras.Input((32, 32, 3))]
    for block, filters in enumerate((16, 32, 64), start=1):
        name = f"block{block}"
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                                name=f"{name}_conv1"),
            keras.layers.BatchNormalization(name=f"{name}_bn1"),
            keras.layers.ReLU(name=f"{name}_relu1"),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                name=f"{name}_conv2"),
            keras.layers.MaxPooling2D(name=f"{name}_pool"),
        ]
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dropout(0.3, name="dropout"),
        keras.layers.Dense(128, activation="relu", name="fc1"),
        keras.layers.Dense(10, activation="softmax", name="predictions"),
    ]
    return keras.Sequential(layers, name="cifar10_cnn")


def trained_model(train, test, quick):
    if not quick and os.path.exists(_MODEL.value):
        print(f"Reusing the trained model {_MODEL.value}")
        return keras.models.load_model(_MODEL.value)
    model = small_cnn()
    model.compile(
        keras.optimizers.Adam(2e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    batches = train.cache().shuffle(10_000, seed=0).batch(128)
    if quick:
        batches = batches.take(5)
    model.fit(batches, epochs=1 if quick else _EPOCHS.value, verbose=2)
    if not quick:
        _, accuracy = model.evaluate(test.batch(512), verbose=0)
        print(f"Test accuracy of the 10-class model: {accuracy:.2%}")
        os.makedirs(os.path.dirname(_MODEL.value), exist_ok=True)
        model.save(_MODEL.value)
    return model


def main(_):
    logging.set_verbosity(logging.WARNING)
    quick = _QUICK.value
    train, names = cifar10("train")
    test, _ = cifar10("test[:500]" if quick else "test")
    model = trained_model(train, test, quick)

    # Dissect: per-class CIVs from the first images of each class.
    civs = kd.dissect(
        model,
        train,
        samples_per_class=4 if quick else _SAMPLES.value,
        class_names=names,
        verbose=0 if quick else 1,
    )
    print(civs)

    # Reconstruct: the cat/dog sub-task (paper: union set, union_thr).
    if _THRESHOLD.value is not None:
        combine = {"threshold": _THRESHOLD.value}
    else:
        combine = {"budget": _BUDGET.value}
    sub = kd.subtask(model, civs, _CLASSES.value, **combine)
    report = kd.evaluate_subtask(sub, test)
    print(report)
    os.makedirs(_OUTPUT.value, exist_ok=True)
    plot_path = os.path.join(_OUTPUT.value, "running_channels.png")
    report.plot(plot_path)
    print(f"Per-layer running channels: {plot_path}")

    # Deploy: a SavedModel that serves the masked probabilities.
    export_path = os.path.join(_OUTPUT.value, "saved_model")
    sub.export(export_path, verbose=False)
    reloaded = tf.saved_model.load(export_path)
    images = np.stack([x for x, _ in test.take(8).as_numpy_iterator()])
    served = reloaded.serve(images).numpy()
    difference = np.abs(served - sub.predict(images, verbose=0)).max()
    served_names = [n.decode() for n in reloaded.class_names().numpy()]
    print(
        f"SavedModel {export_path}: max |served - keras| = {difference:.1e}; "
        f"predictions: {[served_names[i] for i in served.argmax(-1)]}"
    )
    if difference > 1e-5:
        raise SystemExit("The reloaded SavedModel disagrees with the model.")

    # Compact: a physically smaller plain Keras model for the sub-task.
    small = kd.compact(sub)
    live = list(sub.cciv.classes)
    difference = np.abs(small.predict(images, verbose=0) - sub.predict(
        images, verbose=0)[:, live]).max()
    print(
        f"Compact model: {small.count_params():,} params "
        f"(base {model.count_params():,}); outputs "
        f"{small.get_layer('class_probabilities').class_names}; max |compact "
        f"- masked| = {difference:.1e}"
    )
    if difference > 1e-4:
        raise SystemExit("The compact model disagrees with the sub-task.")


if __name__ == "__main__":
    app.run(main)
