"""Small *and* accurate without training? (issue 23)

For a trained CIFAR-10 model (`--model_path`; the input scale is read off
its entry), builds every two-class sub-task for each combination of

- a channel ranking (`--rankings`: CDRP as dissected, Taylor, activation,
  `taylor-pair` (Taylor scores of the pair's own softmax,
  `kd.dissect(classes=pair)`, dissected per pair inside the timing), or
  the class-agnostic L1 norm of the filter and random),
- an allocation of the channel budget over the gates (`--allocations`):
  `uniform:B` keeps the fraction B of every gate's channels;
  `cost:E@P` gives each gate a fraction that falls with the cost of its
  channels (`kd.allocate_budget`, exponent E) for P of the running
  parameters,
- a recovery (`--recoveries`): `bn` (BatchNorm recalibrated on 256 of the
  pair's training images, the masked network as it is), `repair`
  (`kd.repair` on `--repair_images` of them: least squares, no SGD), or
  either followed by `+ftN` / `+distillN` / `+bothN` (N epochs of
  `kd.finetune` on the pair's 10,000 training images: hard labels /
  distillation / both, `label_weight=0.5`; a trailing `a` adds flips and
  shifts, e.g. `+distill3a`); or `scratchN`, the baseline: the same
  compact architecture with new weights, N epochs on the pair's labels
  with flips and crops (SGD, warm-up and cosine, as the model was trained),

and measures the drop against the full network's masked softmax on the
pair's 2,000 test images. One CSV row per (pair, config), written as it
comes; a rerun skips the rows already there, so the study resumes.

    python examples/repair_study.py \\
        --model_path=../shared/models/vgg16_w0.5_cifar10.keras \\
        --rankings=cdrp --allocations=uniform:0.33,cost:1.5@0.108 \\
        --recoveries=bn,repair --pairs=all --name=vgg16_w0.5_repair
    python examples/repair_study.py --quick   # seconds, for the tests
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402
from keras_drnet.compaction import subtask_costs  # noqa: E402

# Easy, middling and hard pairs of the VGG16 w0.5 (by the README recipe's
# drop: cat-dog, bird-cat, deer-dog are its worst).
NINE_PAIRS = [(3, 5), (2, 3), (4, 5), (2, 4), (3, 6), (0, 8),
              (1, 9), (0, 9), (6, 7)]
RANKINGS = {
    "cdrp": {"on_top1_change": "keep_best"},
    "taylor": {"method": "taylor"},
    "taylor-pair": {"method": "taylor", "classes": "pair"},
    "activation": {"method": "activation"},
    "L1-norm": {"baseline": "l1"},
    "random": {"baseline": "random"},
}

_MODEL = flags.DEFINE_string(
    "model_path", "../shared/models/vgg16_w0.5_cifar10.keras",
    "A trained CIFAR-10 classifier (.keras).")
_PAIRS = flags.DEFINE_list(
    "pairs", ["nine"], "nine (NINE_PAIRS), all (the 45), or pairs of class "
    "names, e.g. cat-dog,airplane-ship.")
_RANKINGS = flags.DEFINE_list("rankings", ["cdrp"],
                              f"Channel rankings: {list(RANKINGS)}.")
_ALLOCATIONS = flags.DEFINE_list(
    "allocations", ["uniform:0.33", "cost:1.5@0.108"],
    "uniform:B (per-gate fraction B) or cost:E@P (kd.allocate_budget, "
    "exponent E, running-parameter fraction P).")
_RECOVERIES = flags.DEFINE_list(
    "recoveries", ["bn", "repair"],
    "bn or repair, optionally +ftN / +distillN (epochs of kd.finetune).")
_REPAIR_IMAGES = flags.DEFINE_integer(
    "repair_images", 1024, "Training images of the pair for kd.repair.")
_POSITIONS = flags.DEFINE_integer("positions", 64,
                                  "kd.repair's positions per image.")
_RIDGE = flags.DEFINE_float("ridge", 1e-3, "kd.repair's ridge.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None, "kd.finetune's initial learning rate (default: "
    "kd.finetune's).")
_TEST = flags.DEFINE_integer("test_per_class", 1000, "Test images per class.")
_NAME = flags.DEFINE_string("name", None, "Output file name stem.")
_OUTPUT = flags.DEFINE_string("output_dir", "examples/results",
                              "Where the tables go.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny run to check it works.")

FIELDS = ["pair", "ranking", "allocation", "recovery", "params",
          "compact_params", "full", "accuracy", "drop", "seconds"]


def budget_for(model, civs, pair, allocation):
    """`budget=` for `kd.subtask` from an `--allocations` entry."""
    kind, _, value = allocation.partition(":")
    if kind == "uniform":
        return float(value)
    if kind == "cost":
        exponent, _, params = value.partition("@")
        return kd.allocate_budget(model, civs, list(pair),
                                  max_params=float(params),
                                  exponent=float(exponent))
    raise ValueError(f"Unknown allocation {allocation!r}")


def compact_accuracy(small, names, test, pair):
    correct = total = 0
    for c in pair:
        predicted = np.asarray(
            small.predict(test[c], verbose=0, batch_size=500)).argmax(-1)
        correct += int((predicted == small.class_names.index(names[c])).sum())
        total += len(predicted)
    return correct / total


TUNE = re.compile(r"(ft|distill|both)(\d+)(a?)$")


def recovered(sub, recovery, pair, repair_images, train):
    """The compact model after a recovery (see `--recoveries`)."""
    base, _, tune = recovery.partition("+")
    x = y = None
    if train is not None:
        x = np.concatenate([train[c] for c in pair])
        y = np.repeat(pair, [len(train[c]) for c in pair])
    if base == "repair":
        small = kd.repair(sub, repair_images, positions=_POSITIONS.value,
                          ridge=_RIDGE.value, max_images=len(repair_images))
    elif base == "bn":
        small = kd.compact(sub)
    elif base.startswith("scratch") and not tune:
        small = kd.compact(sub)
        names = sub.civs.class_names
        columns = np.array([small.class_names.index(names[c]) for c in y])
        return from_scratch(small, x, columns, int(base[7:]))
    else:
        raise ValueError(f"Unknown recovery {recovery!r}")
    if not tune:
        return small
    match = TUNE.match(tune)
    if match is None:
        raise ValueError(f"Unknown recovery {recovery!r}")
    loss, epochs, augment = match.groups()
    return kd.finetune(sub, (x, y), epochs=int(epochs),
                       distill=loss != "ft",
                       label_weight=0.5 if loss == "both" else 0.0,
                       augment=augment == "a",
                       learning_rate=_LEARNING_RATE.value,
                       start=small if base == "repair" else None, verbose=0)


def from_scratch(small, x, columns, epochs):
    """The baseline: the compact architecture, its weights drawn anew, and
    trained on the pair's labelled images as the model itself was (SGD,
    warm-up and cosine decay, flips and crops)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    for layer in small.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([np.ones_like(w) if i in (0, 3) else
                               np.zeros_like(w)
                               for i, w in enumerate(layer.get_weights())])
        elif hasattr(layer, "kernel"):  # Conv2D, Dense, DepthwiseConv2D
            initializer = keras.initializers.HeNormal()
            layer.set_weights([np.asarray(initializer(w.shape)) if i == 0
                               else np.zeros_like(w)
                               for i, w in enumerate(layer.get_weights())])
    logits = keras.Model(small.input,
                         small.get_layer("class_probabilities").input)
    batches = (tf.data.Dataset.from_tensor_slices((x, columns))
               .shuffle(len(x))
               .map(cifar_models.augment).batch(128).prefetch(2))
    cifar_models.compile_for_training(logits, epochs * -(-len(x) // 128))
    logits.fit(batches, epochs=epochs, verbose=0)
    return small


def summarize(rows):
    groups = {}
    for row in rows:
        key = (row["ranking"], row["allocation"], row["recovery"])
        groups.setdefault(key, []).append(row)
    return [{"config": " / ".join(k), "pairs": len(g),
             "params": np.mean([float(r["params"]) for r in g]),
             "compact": np.mean([float(r["compact_params"]) for r in g]),
             "drop": np.mean([float(r["drop"]) for r in g]),
             "worst": np.max([float(r["drop"]) for r in g]),
             "seconds": np.mean([float(r["seconds"]) for r in g])}
            for k, g in groups.items()]


def family(allocation):
    """`cost:1.5@0.108` -> `cost 1.5`; `uniform:0.33` -> `uniform`."""
    kind, _, value = allocation.partition(":")
    return kind if kind == "uniform" else f"{kind} {value.partition('@')[0]}"


def plot(summary, path, title):
    """Mean (solid) and worst-pair (dotted) drop against running params,
    one line per ranking / allocation family / recovery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}
    for s in summary:
        ranking, allocation, recovery = s["config"].split(" / ")
        key = f"{ranking}, {family(allocation)}, {recovery}"
        lines.setdefault(key, []).append(s)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, points in sorted(lines.items()):
        points.sort(key=lambda s: s["params"])
        x = [100 * s["params"] for s in points]
        (line,) = ax.plot(x, [s["drop"] for s in points], "o-", ms=4,
                          label=key)
        ax.plot(x, [s["worst"] for s in points], ":", color=line.get_color(),
                lw=1)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("running parameters (% of the model's)")
    ax.set_ylabel("accuracy drop (pp): mean, worst pair dotted")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(_):
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*reset to all-ones gates")
    quick = _QUICK.value
    if quick:  # a narrow VGG16 trained on 3 batches: checks the plumbing
        model, accuracy, names = cifar_models.trained(
            "vgg16", 0.125, 1, quick=True)
        tag = "vgg16_w0.125_quick"
    else:
        model, accuracy, names = cifar_models.loaded(_MODEL.value)
        tag = os.path.splitext(os.path.basename(_MODEL.value))[0]
    stem = _NAME.value or f"{tag}_repair"
    scale = cifar_models.pixel_scale(model)  # what its entry expects
    train_ds, _ = cifar_models.cifar10("train", scale)
    test_ds, _ = cifar_models.cifar10("test", scale)
    test = cifar_models.per_class(test_ds, 8 if quick else _TEST.value)
    # Dissection read the first 100 training images per class: skip them.
    held = cifar_models.per_class(
        train_ds.skip(10_000), 40 if quick else _REPAIR_IMAGES.value // 2)
    needs_train = any("+" in r or r.startswith("scratch")
                      for r in _RECOVERIES.value)
    train = (cifar_models.per_class(train_ds, 16 if quick else 5000)
             if needs_train else None)
    if _PAIRS.value == ["nine"]:
        pairs = NINE_PAIRS
    elif _PAIRS.value == ["all"]:
        pairs = list(itertools.combinations(range(10), 2))
    else:
        pairs = [tuple(names.index(n) for n in p.split("-"))
                 for p in _PAIRS.value]
    pairs = pairs[:2] if quick else pairs
    rankings = {}
    for name in _RANKINGS.value:
        fitting = RANKINGS[name]
        if fitting.get("classes") == "pair":
            rankings[name] = None  # dissected for each pair, below
        elif "baseline" in fitting:
            rankings[name] = cifar_models.baseline_civs(
                model, fitting["baseline"], names)
        else:
            rankings[name] = cifar_models.dissected(
                model, tag, 2 if quick else 100, quick=quick, **fitting)

    os.makedirs(_OUTPUT.value, exist_ok=True)
    path = os.path.join(_OUTPUT.value, f"{stem}_pairs.csv")
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    done = {(r["pair"], r["ranking"], r["allocation"], r["recovery"])
            for r in rows}
    new_file = not rows
    out = open(path, "w" if new_file else "a", newline="")
    writer = csv.DictWriter(out, FIELDS)
    if new_file:
        writer.writeheader()
    base = lambda x: model(x, training=False)
    total = model.count_params()
    for pair in pairs:
        label = "-".join(names[c] for c in pair)
        full = cifar_models.pair_accuracy(base, test, pair)
        images = np.concatenate([held[c] for c in pair])
        images = images[np.random.default_rng(0).permutation(len(images))]
        for (ranking, civs), allocation, recovery in itertools.product(
                rankings.items(), _ALLOCATIONS.value, _RECOVERIES.value):
            if (label, ranking, allocation, recovery) in done:
                continue
            start = time.time()
            if civs is None:  # dissected again for each row: its time counts
                civs = kd.dissect(model, train_ds,
                                  samples_per_class=2 if quick else 100,
                                  class_names=names, method="taylor",
                                  classes=list(pair), verbose=0)
            sub = kd.subtask(model, civs, list(pair),
                             budget=budget_for(model, civs, pair, allocation),
                             budget_scope="gate",
                             calibrate=(images[:256] if recovery.startswith(
                                 "bn") else None))
            running, compact = subtask_costs(sub)
            small = recovered(sub, recovery, pair, images, train)
            sub_accuracy = compact_accuracy(small, names, test, pair)
            row = {"pair": label, "ranking": ranking,
                   "allocation": allocation, "recovery": recovery,
                   "params": sum(c.running_params for c in running) / total,
                   "compact_params": small.count_params() / total,
                   "full": full, "accuracy": sub_accuracy,
                   "drop": 100 * (full - sub_accuracy),
                   "seconds": time.time() - start}
            writer.writerow(row)
            out.flush()
            rows.append(row)
            print(f"{label:20s} {ranking:8s} {allocation:16s} {recovery:12s}"
                  f" params {row['params']:.1%} full {full:.2%} sub "
                  f"{sub_accuracy:.2%} drop {row['drop']:5.2f} pp "
                  f"[{row['seconds']:.0f} s]", flush=True)
    out.close()
    summary = summarize(rows)
    lines = [
        f"# Repair study: {tag} (test accuracy {accuracy:.2%})\n",
        f"Two-class sub-tasks; drop = full network's accuracy (masked "
        f"softmax) - the compact model's, on {8 if quick else _TEST.value} "
        "test images per class, in pp; params = running parameters; "
        "seconds per sub-task on this machine (2-core CPU).\n",
        "| ranking / allocation / recovery | pairs | params | compact "
        "params | mean drop (pp) | worst pair (pp) | s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ] + [
        f"| {s['config']} | {s['pairs']} | {s['params']:.1%} | "
        f"{s['compact']:.1%} | {s['drop']:.2f} | {s['worst']:.2f} | "
        f"{s['seconds']:.0f} |" for s in summary
    ]
    text = "\n".join(lines) + "\n"
    plot(summary, os.path.join(_OUTPUT.value, f"{stem}.png"),
         f"{tag} (test accuracy {accuracy:.1%}): {len(pairs)} two-class "
         "sub-tasks")
    with open(os.path.join(_OUTPUT.value, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cifar_models.run_app(main)
