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
  class;
- `--variant=thinet`: channels chosen by what the next layer needs
  (ThiNet, Luo et al. 2017, greedy removal): on the pair's images through
  the full network, each channel's contribution to the next layer's
  output (its BatchNorm scale applied; for the last gate, to the pair's
  logit difference) at sampled positions; a gate's channels are removed
  one at a time, each time the one whose removal (with those already
  removed) changes that output least, and the removal order ranks them.
  `thinet-taylor` also weights each output channel of the next layer by
  its two-class Taylor score, so that what matters to the pair counts,

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
_VARIANT = flags.DEFINE_enum(
    "variant", "plain",
    ["plain", "relu", "pairwise", "thinet", "thinet-taylor"], "See above.")
_MAX_PARAMS = flags.DEFINE_float("max_params", 0.108,
                                 "Running-parameter fraction.")
_POSITIONS = flags.DEFINE_integer("positions", 64,
                                  "kd.repair's positions per image.")
_ITERATIONS = flags.DEFINE_integer("relu_iterations", 5,
                                   "Rounds of the ReLU-aware refit.")
_HEAD = flags.DEFINE_enum(
    "head", "ls", ["ls", "ls-refit", "logistic"],
    "ls: kd.repair's head (least squares to the full network's logits); "
    "logistic: refit the head by Newton's method to the full network's "
    "masked softmax (cross-entropy), after the repair; ls-refit: least "
    "squares again, on --head_images.")
_HEAD_IMAGES = flags.DEFINE_integer(
    "head_images", 512, "Images per class for the logistic head.")
_REPAIR_PER_CLASS = flags.DEFINE_integer(
    "repair_per_class", 512, "Images per class for kd.repair.")
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


def consumers(model):
    """For each gate of the chain, the Conv2D or Dense layer that reads it,
    and that layer's BatchNorm (None for the head)."""
    layers = model.layers
    found = []
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.ReLU):
            reader = next(l for l in layers[i + 1:]
                          if isinstance(l, (keras.layers.Conv2D,
                                            keras.layers.Dense)))
            j = layers.index(reader)
            bn = layers[j + 1] if j + 1 < len(layers) and isinstance(
                layers[j + 1], keras.layers.BatchNormalization) else None
            found.append((reader, bn))
    return found


def removal_ranks(gram):
    """ThiNet's greedy removal on the Gram matrix of per-channel
    contributions: rank 0 is removed first (least needed)."""
    channels = len(gram)
    removed = np.zeros(channels, bool)
    cost = np.diag(gram).copy()  # |removed sum + z_c|^2 - |removed sum|^2
    ranks = np.empty(channels)
    for rank in range(channels):
        c = int(np.argmin(np.where(removed, np.inf, cost)))
        ranks[c] = rank
        removed[c] = True
        cost += 2 * gram[c]
    return ranks


def thinet_scores(model, civs, pair, images, weigh_by_taylor, positions=8,
                  seed=0):
    """Per-channel scores (in the CIV layout) from ThiNet's removal order."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    pairs = consumers(model)
    probe = keras.Model(model.input, [r.input for r, _ in pairs])
    inputs = probe.predict(images, verbose=0, batch_size=128)
    taylor = civs.vectors[list(pair)].max(0)
    spans = [(int(a), int(b)) for a, b in zip(
        np.cumsum([0] + [e.channels for e in civs.layout])[:-1],
        np.cumsum([e.channels for e in civs.layout]))]
    scores = np.zeros(civs.total_channels, "float32")
    for g, ((reader, bn), x) in enumerate(zip(pairs, inputs)):
        kernel = keras.ops.convert_to_numpy(reader.kernel)
        if isinstance(reader, keras.layers.Dense):
            x = x.reshape(len(x), -1)
            w = kernel[:, pair[0]] - kernel[:, pair[1]]
            z = x * w[None]  # (images, channels): contributions
            gram = z.T.astype("float64") @ z
        else:
            size = kernel.shape[0]
            patches = tf.image.extract_patches(
                x, [1, size, size, 1], [1, 1, 1, 1], [1, 1, 1, 1],
                "SAME").numpy()
            n, h, wd, _ = patches.shape
            flat = patches.reshape(n, h * wd, size * size, x.shape[-1])
            picks = rng.integers(0, h * wd, (n, min(positions, h * wd)))
            p = flat[np.arange(n)[:, None], picks].reshape(
                -1, size * size, x.shape[-1])
            weights = np.ones(kernel.shape[-1])
            if bn is not None:
                gamma = keras.ops.convert_to_numpy(bn.gamma)
                var = keras.ops.convert_to_numpy(bn.moving_variance)
                weights = np.abs(gamma) / np.sqrt(var + bn.epsilon)
            if weigh_by_taylor and g + 1 < len(spans):
                a, b = spans[g + 1]
                weights = weights * np.sqrt(taylor[a:b] / taylor[a:b].mean())
            k = kernel.reshape(size * size, x.shape[-1], -1) * weights
            gram = np.zeros((x.shape[-1],) * 2)
            for start in range(0, len(p), 256):
                z = np.einsum("mkc,kco->moc", p[start:start + 256], k)
                z = z.reshape(-1, x.shape[-1]).astype("float64")
                gram += z.T @ z
        a, b = spans[g]
        scores[a:b] = (removal_ranks(gram) + 1) / (b - a)
    return scores


def logistic_head(small, model, all_names, images, ridge=1e-3, steps=25,
                  least_squares=False):
    """Refits the compact model's head to the full network's softmax over
    `pair` by Newton's method on the cross-entropy (no SGD)."""
    head = small.get_layer("class_probabilities")._inbound_nodes[0]
    head = head.parent_nodes[0].operation
    features = keras.Model(small.input, head.input).predict(
        images, verbose=0, batch_size=500).reshape(len(images), -1)
    logits = np.asarray(model.predict(images, verbose=0, batch_size=500))
    columns = [all_names.index(n) for n in small.class_names]
    teacher = logits[:, columns]
    teacher = np.exp(teacher - teacher.max(1, keepdims=True))
    teacher /= teacher.sum(1, keepdims=True)
    x = np.concatenate([features, np.ones((len(features), 1))], 1)
    x = x.astype("float64")
    kernel, bias = (np.asarray(w, "float64") for w in head.get_weights())
    w = np.concatenate([kernel, bias[None]], 0)  # (d + 1, k)
    d, k = w.shape
    penalty = ridge * np.mean(np.sum(x * x, 0))
    mask = np.ones(d)
    mask[-1] = 0  # the bias is not penalised
    if least_squares:
        gram = x.T @ x + penalty * np.diag(mask)
        w = np.linalg.solve(gram, x.T @ logits[:, columns])
        steps = 0

    def loss(w):
        z = x @ w
        z -= z.max(1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(1, keepdims=True))
        return (-(teacher * log_q).sum()
                + 0.5 * penalty * np.sum(mask[:, None] * w * w))

    for _ in range(steps):
        z = x @ w
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        grad = x.T @ (q - teacher) + penalty * mask[:, None] * w
        hessian = np.zeros((d, k, d, k))
        for a in range(k):
            for b in range(k):
                weight = q[:, a] * ((a == b) - q[:, b])
                hessian[:, a, :, b] = (x * weight[:, None]).T @ x
        for a in range(k):
            hessian[:, a, :, a] += penalty * np.diag(mask)
        hessian = hessian.reshape(d * k, d * k) + 1e-9 * np.eye(d * k)
        step = np.linalg.lstsq(hessian, grad.reshape(-1), rcond=None)[0]
        step = step.reshape(d, k)
        rate, before = 1.0, loss(w)
        while loss(w - rate * step) > before and rate > 1e-4:
            rate /= 2
        w = w - rate * step
    head.set_weights([w[:-1].astype("float32"), w[-1].astype("float32")])
    return small


def main(_):
    model, _, names = cifar_models.loaded(_MODEL.value)
    scale = cifar_models.pixel_scale(model)
    train, _ = cifar_models.cifar10("train", scale)
    test = cifar_models.per_class(cifar_models.cifar10("test", scale)[0],
                                  1000)
    held = cifar_models.per_class(train.skip(10_000),
                                  _REPAIR_PER_CLASS.value)
    head_pool = (held if _HEAD_IMAGES.value == 512 else
                 cifar_models.per_class(train.skip(10_000),
                                        _HEAD_IMAGES.value))
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
        if _VARIANT.value.startswith("thinet"):
            civs = kd.dissect(model, train, samples_per_class=_SAMPLES.value,
                              class_names=names, method="taylor",
                              classes=list(pair), verbose=0)
            scores = thinet_scores(model, civs, pair, images[:512],
                                   _VARIANT.value == "thinet-taylor")
            civs.vectors = np.tile(scores, (len(names), 1))
        budget = kd.allocate_budget(model, civs, list(pair),
                                    max_params=_MAX_PARAMS.value,
                                    exponent=2.0)
        sub = kd.subtask(model, civs, list(pair), budget=budget,
                         budget_scope="gate")
        small = kd.repair(sub, images, max_images=len(images),
                          positions=_POSITIONS.value)
        if _HEAD.value != "ls":
            small = logistic_head(small, model, names, np.concatenate(
                [head_pool[c] for c in pair]),
                least_squares=_HEAD.value == "ls-refit")
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
