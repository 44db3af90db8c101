"""Throughput and memory of batched gate fitting (issue 3 benchmark).

Measured side by side in one run, on a CNN trained here on CIFAR-10 (or
MNIST):
  (a) a one-image-at-a-time loop like the CDRP reference code (a compiled
      gradient step per iteration, Keras SGD, clip, top-1 check), and (a')
      the same loop run eagerly, as the reference code runs,
  (b) `keras_drnet.cdrp`, batched,
  (c) the model's ordinary training step (`train_on_batch`), same batch size;
and the ratios (b)/(a) and (b's time per image) / (T x c's time per image).
Then `dissect` with every `method` on the same images (images/s, and the
speed-up over CDRP), and the peak memory of `dissect` over 1k and 10k
images, each in a fresh process (with T=2: memory does not depend on T).

    python -m benchmarks.dissect_throughput
"""

import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_drnet as kd  # noqa: E402
from keras_drnet.channel_gate import per_sample_gates  # noqa: E402

_DATASET = flags.DEFINE_enum("dataset", "cifar10", ["cifar10", "mnist"], "")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size of (b) and (c).")
_IMAGES = flags.DEFINE_integer("images", 256, "Images fitted by (b).")
_LOOP_IMAGES = flags.DEFINE_integer("loop_images", 16, "Images fitted by (a).")
_EAGER_IMAGES = flags.DEFINE_integer("eager_images", 4, "Images of (a').")
_METHOD_IMAGES = flags.DEFINE_integer(
    "method_images", 4096, "Images of the one-pass dissect methods.")
_MEMORY = flags.DEFINE_boolean("memory", True, "Also measure peak memory.")
_CACHE = flags.DEFINE_string(
    "cache_dir", os.path.expanduser("~/.cache/keras_drnet"), "Trained models."
)
_MEMORY_RUN = flags.DEFINE_integer("memory_run", 0, "Internal: child process.")

T = 30


def load(dataset, split):
    ds = tfds.load(dataset, split=split, as_supervised=True)
    return ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))


def trained_model(dataset):
    path = os.path.join(_CACHE.value, f"bench_{dataset}_cnn.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    shape = (32, 32, 3) if dataset == "cifar10" else (28, 28, 1)
    keras.utils.set_random_seed(0)
    layers = [keras.Input(shape)]
    for filters in (32, 64, 128):
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
        ]
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
    model = keras.Sequential(layers)
    model.compile(
        "adam", "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(load(dataset, "train").batch(128), epochs=2, shuffle=False,
              verbose=2)
    os.makedirs(_CACHE.value, exist_ok=True)
    model.save(path)
    return model


def reference_loop(model, images, compiled=True):
    """One image at a time, as the CDRP reference code does.

    `compiled=True` runs each SGD iteration as a `tf.function` (the strongest
    form of this loop); `compiled=False` runs it eagerly, as the reference
    PyTorch code does.
    """
    gated = kd.inject_gates(model)
    logits_model, _ = kd.model_surgery.split_softmax(gated)
    gates = [spec.layer for spec in kd.list_gates(gated)]
    sizes = [g.channels for g in gates]
    lam = tf.Variable(tf.ones((1, sum(sizes))))
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build([lam])

    def logits(x):
        with per_sample_gates(gates, tf.split(lam, sizes, axis=1)):
            return logits_model(x, training=False)

    @tf.function
    def step(x, target):
        with tf.GradientTape() as tape:
            log_q = tf.nn.log_softmax(logits(x))
            kl = tf.reduce_sum(tf.exp(target) * (target - log_q))
            loss = kl + 0.05 * tf.reduce_sum(tf.abs(lam))
        optimizer.apply([tape.gradient(loss, lam)], [lam])
        lam.assign(tf.clip_by_value(lam, 0.0, 10.0))

    predict = tf.function(logits) if compiled else logits
    step = step if compiled else step.python_function
    results = []
    for image in images:
        x = image[None]
        lam.assign(tf.ones_like(lam))
        for v in optimizer.momentums:
            v.assign(tf.zeros_like(v))
        target = tf.nn.log_softmax(predict(x))
        for _ in range(T):
            step(x, target)
        if np.argmax(predict(x)) != np.argmax(target):
            lam.assign(tf.ones_like(lam))
        results.append(lam.numpy()[0])
    return np.array(results)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def memory_child(count):
    model = trained_model(_DATASET.value)
    ds = load(_DATASET.value, "train").take(count)
    next(iter(ds))  # TF and tfds set up before the baseline is read.
    before = rss_mb()
    # Memory does not depend on T: 2 iterations keep the 10k run short.
    kd.dissect(
        model, ds, samples_per_class=None, iterations=2, verbose=0
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": count, "before_mb": before, "peak_mb": peak_mb}))


def main(_):
    if _MEMORY_RUN.value:
        memory_child(_MEMORY_RUN.value)
        return
    dataset = _DATASET.value
    model = trained_model(dataset)
    x, y = next(iter(load(dataset, "test").batch(_IMAGES.value)))
    x, y = x.numpy(), y.numpy()
    mx, my = next(iter(load(dataset, "test").batch(_METHOD_IMAGES.value)))
    mx, my = mx.numpy(), my.numpy()
    batch = _BATCH.value
    print(f"model: {model.count_params():,} params, {dataset}, T={T}")

    # Warm up every path once so that tracing is not timed.
    reference_loop(model, x[:1])
    kd.cdrp(model, x[:batch], batch_size=batch)
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.train_on_batch(x[:batch], y[:batch])

    loop_x = x[: _LOOP_IMAGES.value]
    ref, t_a = timed(reference_loop, model, loop_x)
    _, t_eager = timed(reference_loop, model, x[: _EAGER_IMAGES.value], False)
    out, t_b = timed(lambda: kd.cdrp(
        model, x, on_top1_change="reset", batch_size=batch))  # as (a)
    steps = len(x) // batch
    start = time.perf_counter()
    for i in range(steps):
        model.train_on_batch(x[i * batch : (i + 1) * batch], y[i * batch :][:batch])
    t_c = time.perf_counter() - start

    a = len(loop_x) / t_a
    b = len(x) / t_b
    c = steps * batch / t_c
    eager = _EAGER_IMAGES.value / t_eager
    print(f"(a) one image at a time : {a:9.1f} images/s (compiled steps)")
    print(f"(a') same, eager steps  : {eager:9.1f} images/s")
    print(f"(b) kd.cdrp batch {batch:<5} : {b:9.1f} images/s")
    print(f"(c) train step batch {batch:<3}: {c:9.1f} images/s")
    print(f"(b)/(a) speed-up        : {b / a:9.1f}x   (target >= 10)")
    print(f"(b)/(a') speed-up       : {b / eager:9.1f}x")
    print(
        f"cost(b) / (T x cost(c)) : {(1 / b) / (T / c):9.3f}    (target <= 0.7)"
    )
    diff = np.abs(out[: len(ref)] - ref).max()
    print(f"max |(b) - (a)| over the loop's images: {diff:.2e}")

    # dissect(method=...): CDRP fits T iterations, the others read once.
    # Each call traces its step once, included, as a user's call does.
    rates = {}
    for method in ("cdrp", "activation", "frat", "taylor"):
        images = x if method == "cdrp" else mx
        _, seconds = timed(lambda: kd.dissect(
            model, (images, my[: len(images)]), samples_per_class=None,
            method=method, batch_size=batch, verbose=0))
        rates[method] = len(images) / seconds
        print(f"dissect method={method:<10}: {rates[method]:9.1f} images/s "
              f"({rates[method] / rates['cdrp']:.1f}x cdrp)")

    if _MEMORY.value:
        for count in (1000, 10000):
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.dissect_throughput", f"--dataset={dataset}",
                 f"--memory_run={count}", f"--cache_dir={_CACHE.value}"],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            print(
                f"dissect {result['images']:>6} images: RSS before "
                f"{result['before_mb']:7.1f} MB, peak {result['peak_mb']:7.1f}"
                f" MB (+{result['peak_mb'] - result['before_mb']:.1f} MB)"
            )


if __name__ == "__main__":
    app.run(main)
