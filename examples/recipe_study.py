"""Which recipe makes sub-task networks small *and* accurate (issue 7)?

For a trained CIFAR-10 model (the cache of `paper_cifar.py`), dissects with
several fitting recipes and, over all 45 two-class sub-tasks, sweeps the
channel budget to draw running parameters vs accuracy drop (full-net
accuracy with the masked softmax minus sub-net accuracy), one curve per
recipe. Levers, alone and combined:

- the top-1 policy (`on_top1_change`: the paper's reset, exclude,
  keep_best);
- the fitting schedule (iterations, learning rate, gamma, gamma per
  layer), judged with BN recalibration, where the channel ranking matters;
- mask-aware BatchNorm recalibration (`calibrate=`, 256 training images of
  the sub-task's classes);
- a soft CCIV (kept channels scaled by their union CIV instead of 1);
- mean replacement (`kd.fill_closed_channels`: a closed channel reads as
  its mean over the sub-task's images, folded into the next layer), alone
  and before BN recalibration;
- a short fine-tune of the compacted model (`kd.finetune`, at some budgets);
- the channel ranking (issue 13): `kd.dissect(method=...)` with CDRP,
  activation, FRAT or Taylor scores, against the class-agnostic rankings a
  pruning engineer would try first: the L1 norm of the channel's filter,
  |BatchNorm gamma| and random.

    python examples/recipe_study.py --arch=vgg16 --width=0.5 --epochs=15
    python examples/recipe_study.py --quick     # seconds, for the tests
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402
from keras_drnet.graph import running_costs  # noqa: E402

# name: (fitting settings, calibrate, mask: None, "soft" or "fill")
RECIPES = {
    "paper (reset)": ({"on_top1_change": "reset"}, False, None),
    "exclude": ({"on_top1_change": "exclude"}, False, None),
    "keep_best": ({"on_top1_change": "keep_best"}, False, None),
    "keep_best gamma 0.1": (
        {"on_top1_change": "keep_best", "gamma": 0.1}, False, None),
    "keep_best gamma 0.01": (
        {"on_top1_change": "keep_best", "gamma": 0.01}, False, None),
    "keep_best T 60": (
        {"on_top1_change": "keep_best", "iterations": 60}, False, None),
    "keep_best + BN": ({"on_top1_change": "keep_best"}, True, None),
    "keep_best + soft": ({"on_top1_change": "keep_best"}, False, "soft"),
    "keep_best + BN + soft": ({"on_top1_change": "keep_best"}, True, "soft"),
    "reset + BN": ({"on_top1_change": "reset"}, True, None),
    # The fitting schedule, judged where a ranking matters: with BN.
    "keep_best T 60 + BN": (
        {"on_top1_change": "keep_best", "iterations": 60}, True, None),
    "keep_best lr 0.3 + BN": (
        {"on_top1_change": "keep_best", "learning_rate": 0.3}, True, None),
    "keep_best gamma 0.01 + BN": (
        {"on_top1_change": "keep_best", "gamma": 0.01}, True, None),
    "keep_best gamma 0.1 + BN": (
        {"on_top1_change": "keep_best", "gamma": 0.1}, True, None),
    "keep_best gamma 0.002 + BN": (
        {"on_top1_change": "keep_best", "gamma": 0.002}, True, None),
    "keep_best gamma per layer + BN": (
        {"on_top1_change": "keep_best", "gamma": "per layer"}, True, None),
    # The channel ranking (issue 13), judged with BN.
    "activation + BN": ({"method": "activation"}, True, None),
    "frat + BN": ({"method": "frat"}, True, None),
    "taylor + BN": ({"method": "taylor"}, True, None),
    "L1-norm + BN": ({"baseline": "l1"}, True, None),
    "BN gamma + BN": ({"baseline": "bn_gamma"}, True, None),
    "random + BN": ({"baseline": "random"}, True, None),
    "keep_best + fill": ({"on_top1_change": "keep_best"}, False, "fill"),
    "keep_best + fill + BN": ({"on_top1_change": "keep_best"}, True, "fill"),
    "taylor + fill": ({"method": "taylor"}, False, "fill"),
    "taylor + fill + BN": ({"method": "taylor"}, True, "fill"),
}


def lossless_points(rows, tolerance=0.005):
    """Per recipe, the smallest budget whose mean drop is <= tolerance."""
    best = {}
    for row in rows:
        if (np.isfinite(row["budget"]) and row["drop"] <= tolerance
                and "fine-tune" not in row["recipe"]):
            if row["recipe"] not in best or row["budget"] < best[
                    row["recipe"]]["budget"]:
                best[row["recipe"]] = row
    return best


def per_layer_gamma(model, gamma=0.05):
    """One L1 weight per gate, inversely proportional to its width.

    Every layer then gets the same total L1 pull (gamma times the mean
    width), where one gamma for all pulls a 256-channel layer 8x harder in
    total than a 32-channel one; the sum over all channels is unchanged.
    """
    widths = np.array([spec.channels for spec in kd.list_gates(
        kd.inject_gates(model))], "float64")
    return [float(g) for g in gamma * widths.mean() / widths]


def summary_point(recipe, budget, drops, params):
    return {"recipe": recipe, "budget": budget, "pairs": len(drops),
            "running_params": float(np.mean(params)),
            "drop": float(np.mean(drops)), "max_drop": float(np.max(drops))}

_MODEL = flags.DEFINE_string(
    "model_path", None,
    "A trained CIFAR-10 classifier (.keras, inputs in [0, 1]) to study "
    "instead of --arch, e.g. the quickstart's "
    "~/.cache/keras_drnet/quickstart_cifar10_v2.keras.")
_ARCH = flags.DEFINE_enum("arch", "vgg16", ["vgg16", "resnet18",
                                            "mobilenetv2"], "The network.")
_WIDTH = flags.DEFINE_float(
    "width", None, "Width multiplier; default: "
    "cifar_models.DEFAULT_WIDTHS[arch].")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs.")
_SAMPLES = flags.DEFINE_integer("samples_per_class", 100,
                                "Images per class for the CIVs.")
_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), "Recipes to compare.")
_BUDGETS = flags.DEFINE_list(
    "budgets", ["0.15", "0.2", "0.25", "0.33", "0.4", "0.5"],
    "Fractions of channels kept.")
_SCOPE = flags.DEFINE_enum(
    "budget_scope", "gate", ["gate", "model"],
    "The budget applies to every gate's channels or to all of them.")
_TEST = flags.DEFINE_integer("test_per_class", 1000,
                             "Test images per class (CIFAR-10 has 1000).")
_FINETUNE = flags.DEFINE_list(
    "finetune_budgets", ["0.33"],
    "Budgets at which the best recipe's compact models are fine-tuned "
    "(`kd.finetune`; empty: skip).")
_FINETUNE_EPOCHS = flags.DEFINE_integer("finetune_epochs", 1,
                                        "Epochs of each fine-tune.")
_FINETUNE_RECIPE = flags.DEFINE_string(
    "finetune_recipe", "keep_best + BN",
    "The recipe whose compact models are fine-tuned (one of --recipes).")
_QUICK = flags.DEFINE_boolean("quick", False, "Tiny run to check it works.")
_OUTPUT = flags.DEFINE_string("output_dir", "examples/results",
                              "Where the table and plot go.")
_NAME = flags.DEFINE_string(
    "name", None, "Output file name stem; default {arch}_w{width}_recipes.")


class PairEvaluator:
    """Accuracy and running parameters of a sub-task, pair after pair."""

    def __init__(self, model, civs, test, train):
        self.test, self.train = test, train
        first = [int(i) for i in np.flatnonzero(civs.counts > 0)[:2]]
        self.sub = kd.subtask(model, civs, first, budget=1.0)
        self.weights = self.sub.gated_model.get_weights()
        self.logits = tf.function(
            lambda x: self.sub.logits_model(x, training=False))

    def accuracy(self, pair):
        return cifar_models.pair_accuracy(self.logits, self.test, pair)

    def restore(self):
        """The trained weights back: BN statistics, folded biases."""
        self.sub.gated_model.set_weights(self.weights)
        self.sub.calibrated_for = None

    def set(self, pair, budget, calibrate, mask):
        self.restore()
        self.sub.set_classes(list(pair), budget=budget,
                             budget_scope=_SCOPE.value)
        if mask == "soft":
            scores = self.sub.cciv.scores
            start = 0
            for gate, kept in zip(self.sub.gates,
                                  self.sub.cciv.per_gate().values()):
                stop = start + gate.channels
                gate.set_gate(kept * scores[start:stop])
                start = stop
        images = np.concatenate([self.train[c] for c in pair])
        if mask == "fill":
            kd.fill_closed_channels(self.sub.gated_model, images)
        if calibrate:
            self.sub.calibrate(images)

    def running_params(self, pair):
        mask = np.zeros(self.sub.civs.num_classes, bool)
        mask[list(pair)] = True
        costs = running_costs(self.sub.logits_model, mask)
        return (sum(c.running_params for c in costs)
                / sum(c.params for c in costs))


def plot(frontiers, path, title, paper_point=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.tab20(np.linspace(0, 1, 20))  # more lines than tab10
    for (name, points), color in zip(frontiers.items(), colors[::2].tolist()
                                     + colors[1::2].tolist()):
        ax.plot([p["running_params"] * 100 for p in points],
                [p["drop"] * 100 for p in points], "o-", ms=3, label=name,
                color=color)
    if paper_point is not None:
        ax.plot([paper_point["running_params"] * 100],
                [paper_point["drop"] * 100], "k*", ms=10,
                label=paper_point["recipe"])
    ax.axvline(11, color="grey", lw=0.5, ls="--")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("running parameters, mean over pairs (%)")
    ax.set_ylabel("accuracy drop, mean over pairs (pp)")
    ax.set_ylim(bottom=-1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(_):
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*reset to all-ones gates")
    quick = _QUICK.value
    arch = _ARCH.value
    width = _WIDTH.value or cifar_models.DEFAULT_WIDTHS[arch]
    if _MODEL.value:
        model, accuracy, names = cifar_models.loaded(_MODEL.value)
        arch = os.path.splitext(os.path.basename(_MODEL.value))[0]
        model_key = tag = arch
    else:
        model, accuracy, names = cifar_models.trained(
            arch, width, _EPOCHS.value, quick=quick)
        tag = f"{arch}_w{width:g}"
        model_key = f"{tag}_e{_EPOCHS.value}_s0"
    tag += "_quick" if quick else ""
    stem = _NAME.value or f"{tag}_recipes"
    scale = cifar_models.pixel_scale(model)  # what its entry expects
    train_ds, _ = cifar_models.cifar10("train", scale)
    test_ds, _ = cifar_models.cifar10("test", scale)
    test = cifar_models.per_class(test_ds, 8 if quick else _TEST.value)
    calibration = cifar_models.per_class(
        train_ds.skip(10_000), 8 if quick else 128)
    pairs = list(itertools.combinations(range(10), 2))[: 2 if quick else None]
    budgets = [float(b) for b in _BUDGETS.value][: 2 if quick else None]
    samples = 2 if quick else _SAMPLES.value

    base_logits = tf.function(lambda x: model(x, training=False))
    full = {pair: cifar_models.pair_accuracy(base_logits, test, pair)
            for pair in pairs}
    civs_cache = {}
    frontiers, rows, evaluators = {}, [], {}
    for name in _RECIPES.value:
        fitting, calibrate, mask = RECIPES[name]
        key = tuple(sorted(fitting.items()))
        if fitting.get("gamma") == "per layer":
            fitting = dict(fitting, gamma=per_layer_gamma(model))
        if key not in civs_cache:
            if "baseline" in fitting:
                civs = cifar_models.baseline_civs(
                    model, fitting["baseline"], names)
            else:
                start = time.time()
                civs = cifar_models.dissected(
                    model, model_key, samples, quick=quick, **fitting)
                print(f"{name}: CIVs in {time.time() - start:.0f} s")
            print(f"{name}: {civs}")
            civs_cache[key] = civs
            if (civs.counts > 0).sum() < 2:
                print(f"  {name}: fewer than two classes have a CIV; skipped")
                continue
            evaluators[key] = PairEvaluator(model, civs, test, calibration)
        if key not in evaluators:
            continue
        evaluator = evaluators[key]
        missing = set(np.flatnonzero(civs_cache[key].counts == 0).tolist())
        points = []
        for budget in budgets:
            start = time.time()
            drops, params = [], []
            # "exclude" can leave a class without any image, hence no CIV.
            usable = [p for p in pairs if not set(p) & missing]
            for pair in usable:
                evaluator.set(pair, budget, calibrate, mask)
                drops.append(full[pair] - evaluator.accuracy(pair))
                params.append(evaluator.running_params(pair))
            point = summary_point(name, budget, drops, params)
            points.append(point)
            rows.append(point)
            print(f"  budget {budget:g}: params {point['running_params']:.1%}"
                  f", drop {point['drop'] * 100:.2f} pp (max "
                  f"{point['max_drop'] * 100:.1f}) [{time.time() - start:.0f}"
                  " s]")
        frontiers[name] = points

    # The paper's own setting: reset, its union_thr for the network.
    paper_point = None
    key = (("on_top1_change", "reset"),)
    if key in evaluators:
        evaluator = evaluators[key]
        evaluator.restore()  # a "+ BN" recipe may share it
        threshold = cifar_models.PAPER_THRESHOLDS.get(arch, 6e-3)
        drops, params = [], []
        for pair in pairs:
            evaluator.sub.set_classes(list(pair), threshold=threshold)
            drops.append(full[pair] - evaluator.accuracy(pair))
            params.append(evaluator.running_params(pair))
        paper_point = summary_point(
            f"paper (reset), union_thr {threshold:g}", float("nan"), drops,
            params)
        rows.append(paper_point)

    # A short fine-tune of the compact model (`kd.finetune`).
    finetuned = []
    best = _FINETUNE_RECIPE.value
    if _FINETUNE.value and best in _RECIPES.value:
        fitting, calibrate, mask = RECIPES[best]
        evaluator = evaluators[tuple(sorted(fitting.items()))]
        train = cifar_models.per_class(train_ds, 16 if quick else 5000)
        epochs = _FINETUNE_EPOCHS.value
        name = f"{best} + {epochs} epoch fine-tune"
        rng = np.random.default_rng(0)
        points = []
        for budget in [float(b) for b in _FINETUNE.value]:
            start = time.time()
            drops, params = [], []
            for pair in pairs:
                evaluator.set(pair, budget, calibrate, mask)
                x = np.concatenate([train[c] for c in pair])
                y = np.concatenate([np.full(len(train[c]), c) for c in pair])
                order = rng.permutation(len(x))
                # Hard labels, as when the tables were measured (before
                # distillation became the default).
                small = kd.finetune(evaluator.sub, (x[order], y[order]),
                                    epochs=epochs, distill=False, verbose=0)
                columns = small.class_names
                logits = tf.function(lambda x, m=small: m(x, training=False))
                correct = total = 0
                for c in pair:
                    predicted = np.asarray(logits(test[c])).argmax(-1)
                    column = columns.index(names[c])
                    correct += int((predicted == column).sum())
                    total += len(predicted)
                drops.append(full[pair] - correct / total)
                params.append(evaluator.running_params(pair))
            point = summary_point(name, budget, drops, params)
            points.append(point)
            rows.append(point)
            print(f"{point} [{time.time() - start:.0f} s]")
        finetuned = points

    os.makedirs(_OUTPUT.value, exist_ok=True)
    if best in _RECIPES.value:
        # Figure 7 for plane-truck under the best recipe.
        fitting, calibrate, mask = RECIPES[best]
        evaluator = evaluators[tuple(sorted(fitting.items()))]
        evaluator.set((0, 9), 0.33, calibrate, mask)
        x = np.concatenate([test[0], test[9]])
        y = np.repeat([0, 9], [len(test[0]), len(test[9])])
        report = kd.evaluate_subtask(evaluator.sub, (x, y))
        report.plot(os.path.join(_OUTPUT.value,
                                 f"{tag}_plane_truck_layers_recipe.png"))
        print(report)
    with open(os.path.join(_OUTPUT.value, f"{stem}.csv"), "w",
              newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if finetuned:
        frontiers[finetuned[0]["recipe"]] = finetuned
    plot(frontiers, os.path.join(_OUTPUT.value, f"{stem}.png"),
         f"{tag} (test acc {accuracy:.1%}): "
         f"{len(pairs)} two-class sub-tasks", paper_point)
    lines = [
        f"# Recipe study: {tag}\n",
        f"Model test accuracy {accuracy:.2%}; CIVs from {samples} training "
        f"images per class; {len(pairs)} two-class sub-tasks, "
        f"{_TEST.value if not quick else 8} test images per class; drop = "
        "full-net accuracy (masked softmax) - sub-net accuracy, in pp.\n",
        "| recipe | budget | pairs | running params (mean) | drop (mean, pp) "
        "| drop (max, pp) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['recipe']} | {row['budget']:g} | {row['pairs']} | "
            f"{row['running_params']:.1%} | {row['drop'] * 100:.2f} | "
            f"{row['max_drop'] * 100:.1f} |")
    lossless = lossless_points(rows)
    lines += [
        "\n## Lossless points\n",
        "The smallest budget whose mean drop stays <= 0.5 pp (recipes that "
        "never get there are not listed).\n",
        "| recipe | budget | running params (mean) | drop (mean, pp) | "
        "drop (max, pp) |",
        "| --- | --- | --- | --- | --- |",
    ] + [
        f"| {r['recipe']} | {r['budget']:g} | {r['running_params']:.1%} | "
        f"{r['drop'] * 100:.2f} | {r['max_drop'] * 100:.1f} |"
        for r in lossless.values()
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(_OUTPUT.value, f"{stem}.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    cifar_models.run_app(main)
