"""DRNet's CIFAR-10 experiments (paper Tables 1-3, Figure 7) with keras_drnet.

Trains the paper's VGG16 (with BN), ResNet18 or MobileNetV2 on CIFAR-10 at a
width multiplier (or reuses the cached model), dissects it into CIVs from
the first `--samples_per_class` training images of each class, and for the
paper's six sub-tasks and all 45 two-class sub-tasks builds the union CCIV
at the paper's threshold and measures: full-net accuracy (masked softmax),
sub-net accuracy, running channels, running parameters and the compacted
model's batch-1 latency relative to the base model. It also sweeps the
threshold on the six sub-tasks (accuracy vs running parameters) and plots
the per-layer running channels of plane-truck (Figure 7).

    python examples/paper_cifar.py --arch=vgg16 --width=0.5
    python examples/paper_cifar.py --quick      # seconds, for the tests

Results go to `--output_dir` (default `examples/results`) as
`{arch}_w{width}_*.md|csv|png`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402

# The paper's thresholds (sec. 4.2-4.4) and sub-tasks (Tables 1-3).
_VGG_RESNET_SUBTASKS = [
    ["airplane", "truck"],
    ["automobile", "deer"],
    ["cat", "dog"],
    ["airplane", "bird", "cat"],
    ["automobile", "deer", "frog"],
    ["dog", "horse", "truck"],
]
PAPER_SUBTASKS = {
    "vgg16": _VGG_RESNET_SUBTASKS,
    "resnet18": _VGG_RESNET_SUBTASKS,
    "mobilenetv2": _VGG_RESNET_SUBTASKS[:3] + [
        ["airplane", "cat", "bird"],
        ["bird", "cat", "deer"],
        ["deer", "dog", "frog"],
    ],
}

_ARCH = flags.DEFINE_enum("arch", "vgg16", list(cifar_models.PAPER_THRESHOLDS),
                          "The network.")
_WIDTH = flags.DEFINE_float(
    "width", None, "Width multiplier (paper: 1); default: "
    "cifar_models.DEFAULT_WIDTHS[arch].")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs.")
_SEED = flags.DEFINE_integer("seed", 0, "Training seed.")
_SAMPLES = flags.DEFINE_integer(
    "samples_per_class", 100, "Images per class for the CIVs (paper: 100)."
)
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "union_thr; defaults to the paper's for --arch."
)
_ON_TOP1 = flags.DEFINE_string(
    "on_top1_change", "reset",
    "What to do with an image whose top-1 the fitted gates change "
    "(paper: reset).",
)
_SWEEP = flags.DEFINE_list(
    "sweep", ["1e-3", "3e-3", "6e-3", "1e-2", "2e-2", "4e-2", "8e-2", "0.15"],
    "Thresholds for the accuracy vs running-parameters trade-off (empty: "
    "skip it).",
)
_QUICK = flags.DEFINE_boolean("quick", False, "Tiny run to check it works.")
_OUTPUT = flags.DEFINE_string("output_dir", "examples/results",
                              "Where the tables and plots go.")


def batch1_latency(model, x, repeats=30):
    fn = tf.function(lambda images: model(images, training=False))
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(sub, classes, test, threshold, base_latency, x1):
    sub.set_classes(classes, threshold=threshold)
    report = kd.evaluate_subtask(sub, test)
    row = {
        "classes": "-".join(classes),
        "full_net_acc": report.full_net_accuracy,
        "sub_net_acc": report.sub_net_accuracy,
        "running_channels": report.running_channels,
        "running_params": report.running_params_fraction,
        "running_flops": report.running_flops_fraction,
        # Table 3 (MobileNetV2): running channels of the last two gates.
        "last_two_gates": "; ".join(f"{k}/{n}" for _, n, k in report.gates[-2:]),
    }
    if base_latency is not None:
        small = kd.compact(sub)
        row["compact_latency"] = batch1_latency(small, x1) / base_latency
    return row, report


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |",
             "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.2%}" if isinstance(row.get(c), float) and
                 c != "compact_latency" else
                 f"{row[c]:.2f}x" if c == "compact_latency" else str(row[c])
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows, columns):
    out = []
    for name, fn in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        out.append({"classes": name,
                    **{c: float(fn([r[c] for r in rows])) for c in columns}})
    return out


def plot_tradeoff(points, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    params = [p["running_params"] * 100 for p in points]
    drops = [(p["full_net_acc"] - p["sub_net_acc"]) * 100 for p in points]
    ax.plot(params, drops, "o-")
    for p, x, y in zip(points, params, drops):
        ax.annotate(f"{p['threshold']:g}", (x, y), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("running parameters (%)")
    ax.set_ylabel("accuracy drop (pp, full-net - sub-net)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(_):
    logging.set_verbosity(logging.WARNING)
    quick = _QUICK.value
    arch = _ARCH.value
    width = _WIDTH.value or cifar_models.DEFAULT_WIDTHS[arch]
    threshold = _THRESHOLD.value or cifar_models.PAPER_THRESHOLDS[arch]
    model, accuracy, names = cifar_models.trained(
        arch, width, _EPOCHS.value, _SEED.value, quick=quick
    )
    tag = f"{arch}_w{width:g}" + ("_quick" if quick else "")
    if _ON_TOP1.value != "reset":
        tag += f"_{_ON_TOP1.value}"
    scale = cifar_models.pixel_scale(model)  # what its entry expects
    train, _ = cifar_models.cifar10("train", scale)
    test, _ = cifar_models.cifar10("test[:500]" if quick else "test", scale)
    test = tuple(np.concatenate(part) for part in zip(
        *test.batch(1000).as_numpy_iterator()))

    samples = 3 if quick else _SAMPLES.value
    civs = cifar_models.dissected(
        model, f"{arch}_w{width:g}_e{_EPOCHS.value}_s{_SEED.value}", samples,
        quick=quick, on_top1_change=_ON_TOP1.value)
    print(civs)

    # The paper's reset rule opens every channel of a class with a reset
    # image once union_thr < resets / images; the CIVs above list the
    # resets, so the warning would only repeat itself here.
    warnings.filterwarnings("ignore", message=".*reset to all-ones gates")
    subtasks = PAPER_SUBTASKS[arch]
    sub = kd.subtask(model, civs, subtasks[0], threshold=threshold)
    x1 = test[0][:1]
    base_latency = batch1_latency(model, x1, 5 if quick else 30)
    pairs = [list(p) for p in itertools.combinations(names, 2)]
    if quick:
        pairs = pairs[:2]
    columns = ["full_net_acc", "sub_net_acc", "running_channels",
               "running_params", "compact_latency"]
    paper_rows, pair_rows = [], []
    for classes in subtasks:
        row, report = measure(sub, classes, test, threshold, base_latency,
                              x1)
        paper_rows.append(row)
        if classes == ["airplane", "truck"]:
            os.makedirs(_OUTPUT.value, exist_ok=True)
            report.plot(os.path.join(_OUTPUT.value,
                                     f"{tag}_plane_truck_layers.png"))
    for classes in pairs:
        pair_rows.append(measure(sub, classes, test, threshold, base_latency,
                                 x1)[0])

    sweep = []
    for value in [float(v) for v in _SWEEP.value[: 2 if quick else None] if v]:
        rows = [measure(sub, classes, test, value, None, x1)[0]
                for classes in subtasks[: 1 if quick else None]]
        sweep.append({"threshold": value,
                      **summary(rows, columns[:4] + ["running_flops"])[0]})
    if sweep:
        plot_tradeoff(sweep, os.path.join(_OUTPUT.value,
                                          f"{tag}_tradeoff.png"),
                      f"{arch} width {width:g}, six sub-tasks (mean)")

    with open(os.path.join(_OUTPUT.value, f"{tag}_pairs.csv"), "w",
              newline="") as f:
        writer = csv.DictWriter(f, ["classes", *columns, "running_flops",
                                    "last_two_gates"])
        writer.writeheader()
        writer.writerows(pair_rows)
    text = [
        f"# {arch} width {width:g} on CIFAR-10\n",
        f"Model: {model.count_params():,} parameters, test accuracy "
        f"{accuracy:.2%} ({_EPOCHS.value} epochs, seed {_SEED.value}). "
        f"CIVs: first {samples} training images per class, T="
        f"{civs.config['iterations']}, gamma={civs.config['gamma']}, "
        f"on_top1_change={_ON_TOP1.value}. union_thr = {threshold:g}. "
        f"Latency: compact / base at batch 1 on the CPU.\n",
        "## The paper's sub-tasks\n",
        table(paper_rows, ["classes", *columns, "last_two_gates"]),
        f"\n## All {len(pair_rows)} two-class sub-tasks\n",
        table(summary(pair_rows, columns), ["classes", *columns]),
    ]
    if sweep:
        text += [
            "\n## Threshold sweep (six sub-tasks, mean)\n",
            table([{**p, "threshold": f"{p['threshold']:g}"} for p in sweep],
                  ["threshold", *columns[:4], "running_flops"]),
        ]
    text.append("")
    path = os.path.join(_OUTPUT.value, f"{tag}.md")
    with open(path, "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    print(f"Written: {path}")


if __name__ == "__main__":
    cifar_models.run_app(main)
