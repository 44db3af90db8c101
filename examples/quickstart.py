"""DRNet quickstart: a cat-vs-dog sub-network of a CIFAR-10 CNN.

Trains a small CNN on CIFAR-10 (or reuses the one it saved before),
dissects it into per-class CIVs, builds the cat/dog sub-task, prints its
report (the paper's Table 1 row), saves the per-layer plot (Figure 7),
exports a SavedModel and checks the reloaded artifact, and compacts the
sub-task into a smaller plain Keras model saved as `.keras`.

    python examples/quickstart.py            # ~10 min on 2 CPU cores, 1 min later
    python examples/quickstart.py --quick    # seconds, for the tests
    python examples/quickstart.py --max_drop=0.5   # + the smallest sub-task

CIFAR-10 comes through `tfds.load`: downloaded once (about 170 MB) into
`~/tensorflow_datasets`, or read offline from `$TFDS_DATA_DIR`.
"""

import math
import os
import sys

from absl import app
from absl import flags
from absl import logging

# TensorFlow is imported inside functions: `--help` and a bad flag answer at
# once instead of after ten seconds of start-up.

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                   "frog", "horse", "ship", "truck")

_QUICK = flags.DEFINE_boolean(
    "quick", False, "Tiny run (a few batches, few images) to check it works."
)
_OUTPUT = flags.DEFINE_string(
    "output_dir", "drnet_quickstart",
    "Where the plot, the SavedModel and the compact model go.",
)
_MODEL = flags.DEFINE_string(
    "model_path",
    os.path.join(os.path.expanduser("~"), ".cache", "keras_drnet",
                 "quickstart_cifar10_v3.keras"),
    "Trained model cache: reused if it exists.",
)
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Training epochs.")
_SAMPLES = flags.DEFINE_integer(
    "samples_per_class", 100, "Images per class for the CIVs (paper: 100)."
)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None,
    "union_thr (paper, VGG16 on CIFAR-10: 6e-3); replaces --budget.",
)
_BUDGET = flags.DEFINE_float(
    "budget", 0.5,
    "Fraction of the channels to keep (used unless --threshold is given).",
)
_BUDGET_SCOPE = flags.DEFINE_enum(
    "budget_scope", "gate", ["gate", "model"],
    "'gate' (the library's default): every layer keeps --budget of its "
    "channels; 'model': one ranking over all channels.",
)
_CALIBRATE = flags.DEFINE_boolean(
    "calibrate", False,
    "Recalibrate the BatchNorm statistics of the masked network on 512 "
    "training images of the sub-task.",
)
_MAX_DROP = flags.DEFINE_float(
    "max_drop", None,
    "Also search the smallest sub-task whose accuracy stays within this "
    "many pp of the full network (kd.smallest_subtask; e.g. 0.5).",
)
_FINETUNE_EPOCHS = flags.DEFINE_integer(
    "finetune_epochs", 1,
    "With --max_drop: epochs of fine-tuning per candidate (0: none).",
)
_DISTILL = flags.DEFINE_boolean(
    "distill", False,
    "With --max_drop: fine-tune by distillation from the full network "
    "instead of on the labels (worse on this model: README).",
)
_CLASSES = flags.DEFINE_list(
    "classes", ["cat", "dog"],
    f"The sub-task: CIFAR-10 class names ({', '.join(CIFAR10_CLASSES)}).",
)


def flag_errors():
    """What is wrong with the flags, checked before anything is loaded."""
    errors = []
    classes = _CLASSES.value
    unknown = [c for c in classes if c not in CIFAR10_CLASSES]
    if unknown:
        errors.append(
            f"unknown class {', '.join(map(repr, unknown))}: --classes takes "
            f"CIFAR-10 names ({', '.join(CIFAR10_CLASSES)}). Received: "
            f"--classes={','.join(classes)}"
        )
    elif len(set(classes)) != len(classes) or len(classes) < 2:
        errors.append(
            "--classes needs two or more distinct class names. Received: "
            f"--classes={','.join(classes)}"
        )
    threshold, budget = _THRESHOLD.value, _BUDGET.value
    if threshold is not None and not (math.isfinite(threshold)
                                      and threshold >= 0):
        errors.append(
            f"--threshold must be a number >= 0. Received: "
            f"--threshold={threshold}"
        )
    if threshold is None and not 0 < budget <= 1:
        errors.append(
            f"--budget must be in (0, 1], the fraction of channels kept. "
            f"Received: --budget={budget}"
        )
    max_drop = _MAX_DROP.value
    if max_drop is not None and not (math.isfinite(max_drop)
                                     and max_drop >= 0):
        errors.append(
            f"--max_drop must be a number of pp >= 0, e.g. 0.5. Received: "
            f"--max_drop={max_drop}"
        )
    if _FINETUNE_EPOCHS.value < 0:
        errors.append(
            "--finetune_epochs must be 0 or more. Received: "
            f"--finetune_epochs={_FINETUNE_EPOCHS.value}"
        )
    for flag in (_EPOCHS, _SAMPLES):
        if flag.value < 1:
            errors.append(
                f"--{flag.name} must be at least 1. Received: "
                f"--{flag.name}={flag.value}"
            )
    return errors


def load_cifar10(data_dir=None):
    """CIFAR-10's train and test splits in [0, 1], and the class names.

    Downloads and prepares the dataset the first time, as `tfds.load` does;
    when that is impossible, ends the program with one line saying how to
    run offline.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=data_dir)
    if not builder.is_prepared():
        print(f"CIFAR-10 is not in {builder.data_dir}: downloading it "
              "(about 170 MB) ...", flush=True)
        try:
            builder.download_and_prepare()
        except OSError as error:  # requests' ConnectionError is an OSError.
            raise SystemExit(
                f"Could not download CIFAR-10 ({type(error).__name__}). "
                "Connect to the internet, or run offline with the prepared "
                "dataset: set TFDS_DATA_DIR to the folder that holds "
                "cifar10/ (e.g. a ~/tensorflow_datasets copied from a machine "
                "that ran `tfds build cifar10`)."
            ) from None

    def split(name):
        ds = builder.as_dataset(split=name, as_supervised=True)
        return ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))

    return split("train"), split("test"), builder.info.features["label"].names


def small_cnn():
    import keras

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
    import keras
    import tensorflow as tf

    path = _MODEL.value
    if not quick and os.path.exists(path):
        print(f"Reusing the trained model {path} (delete it to retrain).")
        return keras.models.load_model(path)
    # The same versions give the same model, hence the README's figures:
    # seeded weights, dropout and shuffling, and deterministic kernels.
    tf.config.experimental.enable_op_determinism()
    model = small_cnn()
    model.compile(
        keras.optimizers.Adam(2e-3),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    batches = train.cache().shuffle(10_000, seed=0).batch(128)
    if quick:
        batches = batches.take(5)
    epochs = 1 if quick else _EPOCHS.value
    print(f"Training a small CNN on CIFAR-10 ({epochs} epochs) ...")
    model.fit(batches, epochs=epochs, shuffle=False, verbose=2)  # shuffled
    if not quick:
        _, accuracy = model.evaluate(test.batch(512), verbose=0)
        print(f"Test accuracy of the 10-class model: {accuracy:.2%}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        model.save(path)
        print(f"Saved the trained model to {path}; later runs reuse it.")
    return model


def main(argv):
    if len(argv) > 1:
        sys.exit(f"quickstart.py: unexpected argument {argv[1]!r}; flags "
                 "are written --name=value (see --help).")
    errors = flag_errors()
    if errors:
        sys.exit(f"quickstart.py: {'; '.join(errors)}")

    # TensorFlow's own start-up lines about CUDA come before this can
    # silence them; level 2 keeps its later info and warning lines out.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)  # tfds and SavedModel info lines
    import numpy as np
    import tensorflow as tf

    import keras_drnet as kd

    quick = _QUICK.value
    train, test, names = load_cifar10()
    if quick:
        test = test.take(500)
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
    os.makedirs(_OUTPUT.value, exist_ok=True)
    civs_path = os.path.join(_OUTPUT.value, "civs.npz")
    civs.save(civs_path)  # for `keras-drnet subtask --civs=...`
    similarity_path = os.path.join(_OUTPUT.value, "similarity.png")
    civs.plot_similarity(similarity_path)
    print(f"CIVs {civs_path}; class similarity: {similarity_path}")

    # Reconstruct: the sub-task (paper: union set, union_thr).
    if _THRESHOLD.value is not None:
        combine = {"threshold": _THRESHOLD.value}
    else:
        combine = {"budget": _BUDGET.value,
                   "budget_scope": _BUDGET_SCOPE.value}
    if _CALIBRATE.value:
        combine["calibrate"] = train
    sub = kd.subtask(model, civs, _CLASSES.value, **combine)
    report = kd.evaluate_subtask(sub, test)
    print(report)
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
    small_path = os.path.join(_OUTPUT.value, "compact.keras")
    kd.export(small, small_path, format="keras")  # with its class names
    print(
        f"Compact model {small_path}: {small.count_params():,} params "
        f"(base {model.count_params():,}); outputs "
        f"{small.class_names}; max |compact "
        f"- masked| = {difference:.1e}"
    )
    if difference > 1e-4:
        raise SystemExit("The compact model disagrees with the sub-task.")

    if _MAX_DROP.value is not None:
        smallest(model, civs, train, test, names)


def smallest(model, civs, train, test, names):
    """The smallest sub-task within --max_drop pp of the full network.

    The first half of the test split chooses (validation), the second half
    reports: a figure measured on the images that chose it would flatter.
    """
    import numpy as np

    import keras_drnet as kd

    half = int(test.cardinality()) // 2
    if _QUICK.value:
        train = train.take(512)
    validation, held_out = test.take(half), test.skip(half)
    epochs = _FINETUNE_EPOCHS.value
    how = "distillation" if _DISTILL.value else "fine-tuning"
    print(f"Searching the smallest {'-'.join(_CLASSES.value)} sub-task "
          f"within {_MAX_DROP.value:g} pp (calibrated"
          f"{f', {epochs} epoch(s) of {how}' if epochs else ''}):")
    result, table = kd.smallest_subtask(
        model, civs, _CLASSES.value, max_drop=_MAX_DROP.value,
        validation_data=validation, calibrate=train,
        finetune={"ds": train, "epochs": epochs, "distill": _DISTILL.value}
        if epochs else None)
    row = next((r for r in table if r["met"]), table[-1])  # the one returned
    if epochs:
        small = result
    else:
        small = kd.compact(result)
    columns = small.class_names
    wanted = [names.index(c) for c in columns]
    images, labels = [], []
    for x, y in held_out.batch(500).as_numpy_iterator():
        keep = np.isin(y, wanted)
        images.append(x[keep])
        labels.append(y[keep])
    images, labels = np.concatenate(images), np.concatenate(labels)
    predicted = np.asarray(small.predict(images, verbose=0)).argmax(-1)
    accuracy = np.mean(np.array(wanted)[predicted] == labels)
    full = np.asarray(model.predict(images, verbose=0))[:, wanted]
    full_accuracy = np.mean(np.array(wanted)[full.argmax(-1)] == labels)
    path = os.path.join(_OUTPUT.value, "smallest.keras")
    kd.export(small, path, format="keras")
    print(
        f"Smallest: per-gate budget {row['budget']:g}, {small.count_params():,}"
        f" params ({small.count_params() / model.count_params():.1%} of "
        f"{model.count_params():,}); on {len(labels)} other test images "
        f"{accuracy:.2%} vs full net {full_accuracy:.2%}; saved {path}"
    )


if __name__ == "__main__":
    if {"-h", "--help", "--helpshort", "--helpfull"} & set(sys.argv[1:]):
        # absl exits 1 after help; help asked for is a success.
        flags.FLAGS(sys.argv[:1], known_only=True)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    app.run(main)
