"""Latency of base vs masked SubtaskModel vs compacted model (issue 5).

For the paper's CIFAR VGG16 (with BN) and ResNet18, at a CCIV keeping ~33%
of the channels (the paper's plane-truck ratio for VGG16), measures side by
side in one run, interleaved: latency at batch 1 (median) and throughput at
batch 256, for the base model, the masked `SubtaskModel` and
`kd.compact(sub)`; with parameters and MACs. Weights are random (latency
does not depend on them); the CCIV is random with `budget=--keep`.

    python -m benchmarks.subtask_latency
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from examples import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402
from keras_drnet.graph import running_costs  # noqa: E402
from keras_drnet.civ import gate_layout  # noqa: E402
from keras_drnet.civ import model_fingerprint  # noqa: E402

_KEEP = flags.DEFINE_float("keep", 0.33, "Fraction of channels kept.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Width multiplier of the models.")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Batch-1 calls per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")


def random_subtask(model, keep, rng):
    layout = gate_layout(kd.inject_gates(model))
    total = sum(entry.channels for entry in layout)
    vectors = rng.uniform(size=(10, total)).astype("float32")
    civs = kd.CIVs(vectors, [str(i) for i in range(10)], [100] * 10, layout,
                   model_fingerprint(model))
    return kd.subtask(model, civs, [0, 9], budget=keep)


def measure(fns, x1, x256, repeats, rounds):
    """Interleaved timings: {name: (batch-1 median s, batch-256 s)}."""
    for fn in fns.values():
        fn(x1), fn(x256)  # trace and warm up
    ones = {name: [] for name in fns}
    bulk = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeats):
                start = time.perf_counter()
                fn(x1).numpy()
                ones[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            fn(x256).numpy()
            bulk[name].append(time.perf_counter() - start)
    return {n: (np.median(ones[n]), np.median(bulk[n])) for n in fns}


def main(_):
    rng = np.random.default_rng(0)
    x1 = tf.constant(rng.normal(size=(1, 32, 32, 3)).astype("float32"))
    x256 = tf.constant(rng.normal(size=(256, 32, 32, 3)).astype("float32"))
    print(f"keep={_KEEP.value:.0%} of channels, width {_WIDTH.value}, CPU "
          f"{os.cpu_count()} cores")
    for build in (cifar_models.vgg16_cifar, cifar_models.resnet18_cifar):
        base = build(_WIDTH.value)
        sub = random_subtask(base, _KEEP.value, rng)
        small = kd.compact(sub)
        costs = running_costs(kd.inject_gates(base))
        macs = sum(c.macs for c in costs)
        small_macs = sum(c.macs for c in running_costs(small))
        fns = {
            "base": tf.function(lambda x, m=base: m(x, training=False)),
            "masked": tf.function(lambda x, m=sub: m(x, training=False)),
            "compact": tf.function(lambda x, m=small: m(x, training=False)),
        }
        times = measure(fns, x1, x256, _REPEATS.value, _ROUNDS.value)
        b1, b256 = times["base"]
        print(f"\n{base.name}: {base.count_params():,} params, "
              f"{macs / 1e6:.1f}M MACs/image")
        print(f"  {'model':8} {'params':>12} {'MACs share':>10} "
              f"{'batch-1 ms':>10} {'ratio':>6} {'img/s @256':>10} "
              f"{'ratio':>6}")
        for name, (t1, t256) in times.items():
            params = small.count_params() if name == "compact" else (
                base.count_params())
            share = small_macs / macs if name == "compact" else 1.0
            print(f"  {name:8} {params:>12,} {share:>10.1%} {t1 * 1e3:>10.2f}"
                  f" {t1 / b1:>6.2f} {256 / t256:>10.1f} {t256 / b256:>6.2f}")


if __name__ == "__main__":
    app.run(main)
