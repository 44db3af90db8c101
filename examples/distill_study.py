"""Does a fine-tune make small sub-tasks accurate, and which one (issue 14)?

For a trained CIFAR-10 model, builds two-class sub-tasks at per-gate budgets
(BatchNorm recalibrated on 128 training images per class), compacts them
and fine-tunes them with `kd.finetune` on the pair's training images
(5,000 per class): hard labels or distillation from the full network
(`distill=True`; `distill-all`: distillation on all ten classes' images),
for several epoch counts and channel rankings (CDRP as dissected, CDRP with
gamma 0.01, the L1 norm of the filters, random), plus the baseline that
says whether dissection helps at all: the same compact architecture trained
from scratch (fresh weights, hard labels, same epochs). Drop = full-net
accuracy (masked softmax) minus the fine-tuned model's accuracy on test
images, in pp; time = wall seconds per pair on this machine.

`--search_max_drop` instead runs `kd.smallest_subtask` on every pair
(validation: 250 training images per class never used above) and reports
the parameters it ends at and the test drop there.

    python examples/distill_study.py                      # 9 pairs, the grid
    python examples/distill_study.py --pairs=all --rankings=cdrp \
        --losses=distill --epochs=3                       # one config, 45 pairs
    python examples/distill_study.py --pairs=all --search_max_drop=0.5
    python examples/distill_study.py --quick              # seconds, for tests
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402

# Easy, middling and hard pairs for the quickstart CNN (CIFAR-10 indices).
NINE_PAIRS = [(1, 6), (0, 6), (7, 8),   # automobile-frog, airplane-frog,
              (0, 2), (4, 7), (1, 9),   # horse-ship; airplane-bird,
              (3, 5), (0, 8), (2, 4)]   # deer-horse, automobile-truck;
#                                         cat-dog, airplane-ship, bird-deer.
RANKINGS = {
    "cdrp": {"on_top1_change": "keep_best"},
    "cdrp gamma 0.01": {"on_top1_change": "keep_best", "gamma": 0.01},
    "L1-norm": {"baseline": "l1"},
    "random": {"baseline": "random"},
}

_MODEL = flags.DEFINE_string(
    "model_path", "~/.cache/keras_drnet/quickstart_cifar10_v2.keras",
    "A trained CIFAR-10 classifier (.keras; its input scale is read off "
    "its entry, see cifar_models.pixel_scale); default: "
    "the quickstart's.")
_PAIRS = flags.DEFINE_list(
    "pairs", ["nine"], "nine (NINE_PAIRS), all (the 45), or pairs of "
    "class names, e.g. cat-dog,airplane-ship.")
_BUDGETS = flags.DEFINE_list("budgets", ["0.25", "0.33"],
                             "Per-gate channel budgets.")
_EPOCHS = flags.DEFINE_list("epochs", ["1", "3", "10"],
                            "Fine-tune epochs (each a separate run).")
_LOSSES = flags.DEFINE_list(
    "losses", ["hard", "distill"],
    "hard, distill and/or distill-all (distillation on all classes' images, "
    "one epoch = 5x the pair's images).")
_RANKINGS = flags.DEFINE_list("rankings", list(RANKINGS),
                              f"Channel rankings: {list(RANKINGS)}.")
_SCRATCH = flags.DEFINE_bool(
    "scratch", True, "Also train the compact architecture from scratch "
    "(first ranking's channels, hard labels).")
_SEARCH = flags.DEFINE_float(
    "search_max_drop", None, "Run kd.smallest_subtask with this max_drop "
    "(pp) on every pair instead of the grid.")
_TEST = flags.DEFINE_integer("test_per_class", 500, "Test images per class.")
_NAME = flags.DEFINE_string("name", None, "Output file name stem.")
_OUTPUT = flags.DEFINE_string("output_dir", "examples/results",
                              "Where the tables and plot go.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny run to check it works.")


def compact_accuracy(small, names, test, pair):
    """Accuracy of a compact model on the pair's test images."""
    columns = small.class_names
    correct = total = 0
    for c in pair:
        predicted = np.asarray(small.predict(test[c], verbose=0)).argmax(-1)
        correct += int((predicted == columns.index(names[c])).sum())
        total += len(predicted)
    return correct / total


def from_scratch(sub, seed=0):
    """`sub` with every weight re-initialized: the same channels trained
    from nothing (the `SubtaskModel` constructor takes any gated model)."""
    keras.utils.set_random_seed(seed)
    fresh = keras.models.clone_model(sub.gated_model)
    return kd.SubtaskModel(fresh, sub.civs, sub.classes, budget=sub.budget,
                           budget_scope=sub.budget_scope)


def summarize(rows):
    """Mean/worst drop and mean seconds per (config, budget, epochs)."""
    groups = {}
    for row in rows:
        key = (row["config"], row["budget"], row["epochs"])
        groups.setdefault(key, []).append(row)
    return [{"config": k[0], "budget": k[1], "epochs": k[2],
             "pairs": len(g),
             "params": float(np.mean([r["params"] for r in g])),
             "drop": float(np.mean([r["drop"] for r in g])),
             "max_drop": float(np.max([r["drop"] for r in g])),
             "seconds": float(np.mean([r["seconds"] for r in g]))}
            for k, g in groups.items()]


def plot(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({s["budget"] for s in summary})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4),
                             squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        configs = sorted({s["config"] for s in summary
                          if s["budget"] == budget})
        for config in configs:
            points = sorted((s["epochs"], s["drop"]) for s in summary
                            if s["budget"] == budget and s["config"] == config)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-",
                    ms=3, label=config)
        ax.set_xscale("log")
        epochs = sorted({s["epochs"] for s in summary})
        ax.set_xticks(epochs, [str(e) for e in epochs])
        ax.minorticks_off()
        ax.axhline(0.5, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("epochs of fine-tune")
        ax.set_title(f"per-gate budget {budget:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy drop, mean over pairs (pp)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def search(model, civs, names, pairs, calibration, validation, test, full):
    rows = []
    for pair in pairs:
        start = time.time()
        x = np.concatenate([validation[c] for c in pair])
        y = np.repeat(pair, [len(validation[c]) for c in pair])
        images = np.concatenate([calibration[c] for c in pair])
        sub, table = kd.smallest_subtask(
            model, civs, list(pair), max_drop=_SEARCH.value,
            validation_data=(x, y), calibrate=images, budget_scope="gate",
            repair=None, verbose=0)  # as measured: per-gate, no repair
        chosen = next(r for r in table if r["budget"] == sub.budget)
        logits = lambda images, s=sub: s.logits_model(images, training=False)
        accuracy = cifar_models.pair_accuracy(logits, test, pair)
        rows.append({
            "pair": "-".join(names[c] for c in pair), "budget": sub.budget,
            "params": chosen["running_params_fraction"],
            "validation_drop": chosen["drop"],
            "drop": 100 * (full[pair] - accuracy),
            "built": len(table), "seconds": time.time() - start})
        print(rows[-1], flush=True)
    params = np.array([r["params"] for r in rows])
    lines = [
        f"\n## kd.smallest_subtask(max_drop={_SEARCH.value:g}), "
        f"{len(rows)} pairs\n",
        f"Running parameters it ends at: median {np.median(params):.1%}, "
        f"quartiles {np.percentile(params, 25):.1%} / "
        f"{np.percentile(params, 75):.1%}, min {params.min():.1%}, max "
        f"{params.max():.1%}; budgets: "
        + ", ".join(f"{b:g} x{n}" for b, n in zip(*np.unique(
            [r["budget"] for r in rows], return_counts=True))) + ".",
        f"Test drop there: mean {np.mean([r['drop'] for r in rows]):.2f} pp,"
        f" worst {np.max([r['drop'] for r in rows]):.2f} pp (validation "
        f"drop mean {np.mean([r['validation_drop'] for r in rows]):.2f} pp)"
        f"; sub-tasks built per pair {np.mean([r['built'] for r in rows]):.1f}"
        f", {np.mean([r['seconds'] for r in rows]):.0f} s per pair.",
    ]
    return rows, lines


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
    stem = _NAME.value or f"{tag}_distill"
    scale = cifar_models.pixel_scale(model)  # what its entry expects
    train_ds, _ = cifar_models.cifar10("train", scale)
    test_ds, _ = cifar_models.cifar10("test", scale)
    test = cifar_models.per_class(test_ds, 8 if quick else _TEST.value)
    calibration = cifar_models.per_class(train_ds.skip(10_000),
                                          8 if quick else 128)
    if _PAIRS.value == ["nine"]:
        pairs = NINE_PAIRS
    elif _PAIRS.value == ["all"]:
        pairs = list(itertools.combinations(range(10), 2))
    else:
        pairs = [tuple(names.index(n) for n in p.split("-"))
                 for p in _PAIRS.value]
    pairs = pairs[:2] if quick else pairs
    base = lambda x: model(x, training=False)
    full = {pair: cifar_models.pair_accuracy(base, test, pair)
            for pair in pairs}
    rankings = {}
    for name in _RANKINGS.value:
        fitting = RANKINGS[name]
        if "baseline" in fitting:
            rankings[name] = cifar_models.baseline_civs(
                model, fitting["baseline"], names)
        else:
            rankings[name] = cifar_models.dissected(
                model, tag, 2 if quick else 100, quick=quick, **fitting)
    os.makedirs(_OUTPUT.value, exist_ok=True)

    if _SEARCH.value is not None:
        validation = cifar_models.per_class(train_ds.skip(40_000),
                                            8 if quick else 250)
        civs = rankings[_RANKINGS.value[0]]
        _, lines = search(model, civs, names, pairs, calibration, validation,
                          test, full)
        text = "\n".join(lines) + "\n"
        with open(os.path.join(_OUTPUT.value, f"{stem}_search.md"), "w") as f:
            f.write(text)
        print(text)
        return

    train = cifar_models.per_class(train_ds, 16 if quick else 5000)
    everything = (np.concatenate([train[c] for c in range(10)]),
                  np.repeat(np.arange(10), [len(train[c]) for c in range(10)]))
    epochs = [int(e) for e in _EPOCHS.value][: 1 if quick else None]
    rows = []

    def record(config, pair, budget, e, small, start):
        accuracy = compact_accuracy(small, names, test, pair)
        rows.append({
            "config": config, "pair": "-".join(names[c] for c in pair),
            "budget": budget, "epochs": e,
            # What the fine-tuned model really has.
            "params": small.count_params() / model.count_params(),
            "drop": 100 * (full[pair] - accuracy),
            "seconds": time.time() - start})
        print(f"{config:28s} {rows[-1]['pair']:18s} budget {budget:g} "
              f"epochs {e:2d}: drop {rows[-1]['drop']:6.2f} pp "
              f"[{rows[-1]['seconds']:.0f} s]", flush=True)

    for budget in [float(b) for b in _BUDGETS.value]:
        for pair in pairs:
            x = np.concatenate([train[c] for c in pair])
            y = np.repeat(pair, [len(train[c]) for c in pair])
            images = np.concatenate([calibration[c] for c in pair])
            for name, civs in rankings.items():
                sub = kd.subtask(model, civs, list(pair), budget=budget,
                                 budget_scope="gate", calibrate=images)
                for loss in _LOSSES.value:
                    for e in epochs:
                        start = time.time()
                        small = kd.finetune(
                            sub, everything if loss == "distill-all" else
                            (x, y), epochs=e, distill=loss != "hard",
                            images="all" if loss == "distill-all" else
                            "subtask", verbose=0)
                        record(f"{name}, {loss}", pair, budget, e, small, start)
                if _SCRATCH.value and name == _RANKINGS.value[0]:
                    for e in epochs:
                        start = time.time()
                        small = kd.finetune(from_scratch(sub), (x, y),
                                            epochs=e, distill=False,
                                            learning_rate=0.05, verbose=0)
                        record("scratch (same channels), hard", pair, budget,
                               e, small, start)

    summary = summarize(rows)
    with open(os.path.join(_OUTPUT.value, f"{stem}_pairs.csv"), "w",
              newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(summary, os.path.join(_OUTPUT.value, f"{stem}.png"),
         f"{tag} (test acc {accuracy:.1%}): {len(pairs)} two-class "
         "sub-tasks, compact + fine-tune")
    lines = [
        f"# Fine-tune study: {tag}\n",
        f"Model test accuracy {accuracy:.2%}; {len(pairs)} pairs; "
        f"{_TEST.value if not quick else 8} test images per class; drop = "
        "full-net accuracy (masked softmax) - fine-tuned compact model's "
        "accuracy, in pp; seconds per pair (2-core CPU).\n",
        "| config | budget | epochs | pairs | params | drop (mean, pp) | "
        "drop (max, pp) | s/pair |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ] + [
        f"| {s['config']} | {s['budget']:g} | {s['epochs']} | {s['pairs']} | "
        f"{s['params']:.1%} | {s['drop']:.2f} | {s['max_drop']:.1f} | "
        f"{s['seconds']:.0f} |" for s in summary
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(_OUTPUT.value, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cifar_models.run_app(main)
