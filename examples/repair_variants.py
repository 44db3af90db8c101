"""What else might close target (b)? Variants of `kd.repair` (issue 23).

A probe, not API: it patches `keras_drnet`'s private internals to try
ideas before any of them earns a place in the package. On the given pairs
(default: the three hardest of the VGG16 w0.5) it builds the recommended
no-SGD sub-task (Taylor scores, `kd.allocate_budget` exponent 2 at
`--max_params`, `kd.repair` on 1,024 of the pair's training images) with

- `--variant=plain`: `kd.repair` as it is;
- `--variant=relu`: ReLU-aware targets. Where the full network's
  BatchNorm + ReLU zeroes a channel, any pre-activation below the ReLU's
  threshold gives the same output, so the target there is only an upper
  bound; `--relu_iterations` rounds of "clip the target to
  min(prediction, threshold), solve again" minimise the post-ReLU error
  instead of the pre-activation one (the normal equations' Gram matrix is
  shared, so each round is one more right-hand side);
- `--variant=pairwise`: Taylor scores of the two-class problem
  (`kd.dissect(..., classes=pair)`, the probe that became that option)
  instead of the ten-class one, from `--samples_per_class` images per
  class,

and prints each pair's drop against the full network's masked softmax.

    python examples/repair_variants.py --variant=relu
"""

import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import keras  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402

# `keras_drnet.repair` is also the function's name in the package.
repair_module = importlib.import_module("keras_drnet.repair")

_MODEL = flags.DEFINE_string(
    "model_path", "../shared/models/vgg16_w0.5_cifar10.keras",
    "A trained CIFAR-10 classifier (.keras).")
_PAIRS = flags.DEFINE_list("pairs", ["cat-dog", "bird-cat", "deer-dog"],
                           "Pairs of class names.")
_VARIANT = flags.DEFINE_enum("variant", "plain",
                             ["plain", "relu", "pairwise"], "See above.")
_MAX_PARAMS = flags.DEFINE_float("max_params", 0.108,
                                 "Running-parameter fraction.")
_POSITIONS = flags.DEFINE_integer("positions", 64,
                                  "kd.repair's positions per image.")
_ITERATIONS = flags.DEFINE_integer("relu_iterations", 5,
                                   "Rounds of the ReLU-aware refit.")
_SAMPLES = flags.DEFINE_integer(
    "samples_per_class", 100, "Images per class for the pairwise scores.")


def relu_threshold(layer):
    """Per channel, the pre-BatchNorm value under which the following
    BatchNorm + ReLU outputs 0 (NaN where gamma <= 0); None elsewhere."""
    readers = [n.operation for n in layer._outbound_nodes]
    if (len(readers) != 1
            or not isinstance(readers[0], keras.layers.BatchNormalization)):
        return None
    bn = readers[0]
    after = [n.operation for n in bn._outbound_nodes]
    if len(after) != 1 or not isinstance(after[0], keras.layers.ReLU):
        return None
    gamma, beta, mean, variance = (keras.ops.convert_to_numpy(w) for w in (
        bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
    scale = np.sqrt(variance + bn.epsilon)
    threshold = mean - beta * scale / np.where(gamma == 0, 1, gamma)
    return np.where(gamma > 0, threshold, np.nan)


def patch_relu_aware(iterations):
    target_class = repair_module._Target
    plain_refit = target_class.refit
    plain_solve = repair_module._ridge_solve

    def refit(self, inputs, batch_size, ridge):
        threshold = None if self.depthwise else relu_threshold(self.layer)
        if threshold is None:
            return plain_refit(self, inputs, batch_size, ridge)
        out = self.layer.get_weights()[0].shape[-1]
        d = self.unknowns()
        patches, targets = [], []
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size]
            if start == 0 and self.reads_as_full(x):
                return
            p = self.patches(self.layer, x,
                             self.index[start:start + batch_size])
            p = p.reshape(-1, d - 1)
            patches.append(np.concatenate([p, np.ones_like(p[:, :1])], 1))
            targets.append(self.targets[start // batch_size].reshape(-1, out))
        p, y = np.concatenate(patches), np.concatenate(targets)
        gram = (p.T @ p).astype("float64")
        solution = plain_solve(gram, (p.T @ y).astype("float64"), ridge)
        bounded = np.isfinite(threshold)
        t = np.where(bounded, threshold, 0).astype("float32")[None]
        exact = (y > t) | ~bounded[None]
        for _ in range(iterations):
            predicted = p @ solution.astype("float32")
            clipped = np.where(exact, y, np.minimum(predicted, t))
            solution = plain_solve(gram, (p.T @ clipped).astype("float64"),
                                   ridge)
        # The rest of the plain refit (zeroed channels, bias-free layers)
        # with this solution.
        repair_module._ridge_solve = lambda *_: solution
        try:
            plain_refit(self, inputs, batch_size, ridge)
        finally:
            repair_module._ridge_solve = plain_solve

    target_class.refit = refit


def main(_):
    model, _, names = cifar_models.loaded(_MODEL.value)
    scale = cifar_models.pixel_scale(model)
    train, _ = cifar_models.cifar10("train", scale)
    test = cifar_models.per_class(cifar_models.cifar10("test", scale)[0],
                                  1000)
    held = cifar_models.per_class(train.skip(10_000), 512)
    tag = os.path.splitext(os.path.basename(_MODEL.value))[0]
    civs = cifar_models.dissected(model, tag, 100, method="taylor")
    if _VARIANT.value == "relu":
        patch_relu_aware(_ITERATIONS.value)
    base = lambda x: model(x, training=False)
    drops = []
    for label in _PAIRS.value:
        pair = tuple(names.index(n) for n in label.split("-"))
        full = cifar_models.pair_accuracy(base, test, pair)
        images = np.concatenate([held[c] for c in pair])
        images = images[np.random.default_rng(0).permutation(len(images))]
        start = time.time()
        if _VARIANT.value == "pairwise":
            civs = kd.dissect(model, train, samples_per_class=_SAMPLES.value,
                              class_names=names, method="taylor",
                              classes=list(pair), verbose=0)
        budget = kd.allocate_budget(model, civs, list(pair),
                                    max_params=_MAX_PARAMS.value,
                                    exponent=2.0)
        sub = kd.subtask(model, civs, list(pair), budget=budget,
                         budget_scope="gate")
        small = kd.repair(sub, images, max_images=len(images),
                          positions=_POSITIONS.value)
        correct = 0
        for c in pair:
            predicted = small.predict(test[c], verbose=0, batch_size=500)
            correct += int((np.argmax(predicted, -1)
                            == small.class_names.index(names[c])).sum())
        accuracy = correct / sum(len(test[c]) for c in pair)
        drops.append(100 * (full - accuracy))
        print(f"{label:16s} full {full:.2%} sub {accuracy:.2%} drop "
              f"{drops[-1]:.2f} pp [{time.time() - start:.0f} s]", flush=True)
    print(f"{_VARIANT.value}: mean drop {np.mean(drops):.2f} pp, worst "
          f"{max(drops):.2f}")


if __name__ == "__main__":
    cifar_models.run_app(main)
