"""DRNet's MNIST class similarity (paper sec. 5.3, Figure 8) with keras_drnet.

Trains a 5-layer ConvNet on MNIST without augmentation (or reuses the
cached one), dissects it into CIVs, and draws the class-by-class IoU of the
important-channel sets (`CIVs.similarity()`), once per top-1 policy. Lists
the most and least similar digit pairs and checks the paper's observations:
'1' stands apart, and 2~5, 6~9, 7~9 are close.

    python examples/paper_mnist.py
    python examples/paper_mnist.py --quick      # seconds, for the tests
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import itertools  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402

_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs.")
_SAMPLES = flags.DEFINE_integer("samples_per_class", 100,
                                "Images per class for the CIVs.")
_POLICIES = flags.DEFINE_list("policies", ["reset", "keep_best"],
                              "Top-1 policies to dissect with.")
_QUICK = flags.DEFINE_boolean("quick", False, "Tiny run to check it works.")
_OUTPUT = flags.DEFINE_string("output_dir", "examples/results",
                              "Where the heat maps and the summary go.")
PAPER_PAIRS = [("2", "5"), ("6", "9"), ("7", "9")]


def mnist(split):
    ds = tfds.load("mnist", split=split, as_supervised=True)
    return ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))


def convnet():
    """Three convolutions and two dense layers, ReLU after each but the last."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(name="pool1"),
        keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(name="pool2"),
        keras.layers.Conv2D(64, 3, activation="relu", name="conv3"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="fc1"),
        keras.layers.Dense(10, name="predictions"),
    ], name="mnist_convnet")


def trained(quick):
    path = os.path.join(cifar_models.CACHE, f"mnist_convnet_e{_EPOCHS.value}.keras")
    test = mnist("test").batch(1000)
    if os.path.exists(path) and not quick:
        model = keras.models.load_model(path)
        return model, model.evaluate(test, verbose=0)[1]
    model = convnet()
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    train = mnist("train").cache().shuffle(60_000, seed=0).batch(128)
    model.fit(train.take(3) if quick else train,
              epochs=1 if quick else _EPOCHS.value, verbose=0 if quick else 2)
    accuracy = model.evaluate(test.take(1) if quick else test, verbose=0)[1]
    if not quick:
        os.makedirs(cifar_models.CACHE, exist_ok=True)
        model.save(path)
    return model, accuracy


def describe(civs, policy):
    names = civs.class_names
    iou = civs.similarity(threshold=0.0)  # the paper's non-zero sets
    pairs = sorted(
        ((iou[i, j], names[i], names[j])
         for i, j in itertools.combinations(range(len(names)), 2)),
        reverse=True,
    )
    rank = {(a, b): k + 1 for k, (_, a, b) in enumerate(pairs)}
    off = iou + np.diag(np.full(len(names), np.nan))
    mean = np.nanmean(off, axis=1)
    lines = [
        f"## on_top1_change={policy}\n",
        f"CIVs: {civs}\n",
        f"![similarity](mnist_similarity_{policy}.png)\n",
        "Most similar: " + ", ".join(
            f"{a}~{b} ({v:.3f})" for v, a, b in pairs[:5]),
        "Least similar: " + ", ".join(
            f"{a}~{b} ({v:.3f})" for v, a, b in pairs[-5:]),
        "Mean IoU with the other digits: " + ", ".join(
            f"{n}: {m:.3f}" for n, m in zip(names, mean)),
        f"'1' stands apart (lowest mean IoU): "
        f"{'yes' if names[int(np.nanargmin(mean))] == '1' else 'no'} "
        f"(lowest: '{names[int(np.nanargmin(mean))]}')",
        "Paper's close pairs, rank among the 45 (1 = most similar): " +
        ", ".join(f"{a}~{b}: {rank[(a, b)] if (a, b) in rank else rank[(b, a)]}"
                  f" ({iou[names.index(a), names.index(b)]:.3f})"
                  for a, b in PAPER_PAIRS),
        "",
    ]
    return "\n".join(lines)


def main(_):
    logging.set_verbosity(logging.WARNING)
    quick = _QUICK.value
    model, accuracy = trained(quick)
    names = [str(i) for i in range(10)]
    os.makedirs(_OUTPUT.value, exist_ok=True)
    text = [
        "# MNIST class similarity (paper Figure 8)\n",
        f"5-layer ConvNet (3 conv + 2 dense, {model.count_params():,} params), "
        f"no augmentation, {_EPOCHS.value} epochs: test accuracy "
        f"{accuracy:.2%}. CIVs from the first "
        f"{3 if quick else _SAMPLES.value} training images per class; "
        "important channels: CIV > 0.\n",
    ]
    for policy in _POLICIES.value:
        civs = kd.dissect(model, mnist("train"),
                          samples_per_class=3 if quick else _SAMPLES.value,
                          class_names=names, on_top1_change=policy,
                          verbose=0 if quick else 1)
        civs.plot_similarity(
            os.path.join(_OUTPUT.value, f"mnist_similarity_{policy}.png"),
            threshold=0.0)
        text.append(describe(civs, policy))
    path = os.path.join(_OUTPUT.value, "mnist_similarity.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    cifar_models.run_app(main)
