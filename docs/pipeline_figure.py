"""Draws docs/pipeline.png, the README's picture of dissect -> reconstruct
-> compact, from a real model's CIVs and sub-task.

    python docs/pipeline_figure.py --model_path=../shared/models/vgg16_w0.5_cifar10.keras \
        --civs=~/.cache/keras_drnet/vgg16_w0.5_cifar10_civs100_methodtaylor.npz
"""

import os

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string("model_path", None, "The classifier (.keras).")
_CIVS = flags.DEFINE_string("civs", None, "Its CIVs (.npz).")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__),
                                               "pipeline.png"), "The PNG.")
_PARAMS = flags.DEFINE_float("max_params", 0.108, "The sub-task's size.")
flags.mark_flags_as_required(["model_path", "civs"])


def main(_):
    import keras
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import keras_drnet as kd

    model = keras.models.load_model(os.path.expanduser(_MODEL.value))
    civs = kd.CIVs.load(os.path.expanduser(_CIVS.value))
    classes = ["cat", "dog"]
    fractions = kd.allocate_budget(model, civs, classes,
                                   max_params=_PARAMS.value)
    sub = kd.subtask(model, civs, classes, budget=fractions)
    small = kd.compact(sub)
    # One gate in the middle of the network, to show the vectors.
    gate = len(civs.layout) // 2
    entry = civs.layout[gate]
    start = sum(e.channels for e in civs.layout[:gate])
    span = slice(start, start + entry.channels)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6),
                             gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    ax = axes[0]
    part = civs.vectors[:, span]
    ax.imshow(part / part.max(axis=1, keepdims=True), aspect="auto",
              cmap="magma", interpolation="nearest")
    ax.set_yticks(range(civs.num_classes), civs.class_names, fontsize=7)
    ax.set_xlabel(f"channels of {entry.source}")
    ax.set_title("1. Dissect: one importance vector (CIV)\nper class, "
                 "from its training images", fontsize=9)

    ax = axes[1]
    rows = [civs.class_names.index(c) for c in classes]
    union = part[rows].max(axis=0)
    order = np.argsort(-union)
    kept = sub.cciv.mask[span][order] > 0
    for row, name in zip(rows, classes):
        ax.plot(part[row][order], lw=0.8, label=name)
    ax.fill_between(range(len(order)), 0, union[order].max(),
                    where=kept, color="0.85", step="mid",
                    label=f"kept ({kept.mean():.0%} of this layer)")
    ax.set_xlabel(f"channels of {entry.source}, by cat/dog importance")
    ax.legend(fontsize=7)
    ax.set_title("2. Reconstruct: keep the channels the\nsub-task's "
                 "classes need (cat, dog)", fontsize=9)

    ax = axes[2]
    names = [e.source for e in civs.layout]
    full = [e.channels for e in civs.layout]
    left = [int(m.sum()) for m in sub.cciv.per_gate().values()]
    y = np.arange(len(names))
    ax.barh(y, full, color="0.85", label="full network")
    ax.barh(y, left, color="tab:green", label="compact model")
    ax.set_yticks(y, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("channels")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"3. Compact: a plain Keras model,\n"
                 f"{small.count_params():,} of {model.count_params():,} "
                 "params", fontsize=9)
    fig.tight_layout()
    fig.savefig(_OUT.value, dpi=110)
    print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
