"""The paper's CIFAR networks, with a width multiplier, and their training.

VGG16 with BatchNormalization as used for CIFAR (13 convs, then one Dense:
14.73M parameters at width 1, the paper's Table 1), a CIFAR ResNet18
(11.18M, Table 2) and a CIFAR MobileNetV2 (2.27M, Table 3). `trained()`
trains one on CIFAR-10 (tfds) or loads it from the cache.
"""

import hashlib
import os
import sys
import time

import keras
import numpy as np

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "keras_drnet")

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M"]


# union_thr of the paper's CIFAR-10 experiments (sec. 4.2).
PAPER_THRESHOLDS = {"vgg16": 6e-3, "resnet18": 2e-3, "mobilenetv2": 8e-4}


def vgg16_cifar(width=1.0, classes=10, name="vgg16_cifar"):
    x = inputs = keras.Input((32, 32, 3))
    block, index = 1, 1
    for entry in _VGG16:
        if entry == "M":
            x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
            block, index = block + 1, 1
            continue
        prefix = f"block{block}_conv{index}"
        x = keras.layers.Conv2D(
            max(1, int(entry * width)), 3, padding="same", use_bias=False,
            name=prefix,
        )(x)
        x = keras.layers.BatchNormalization(name=f"{prefix}_bn")(x)
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
        index += 1
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _basic_block(x, filters, stride, name):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, stride, padding="same",
                            use_bias=False, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                            name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False,
                                       name=f"{name}_shortcut")(shortcut)
        shortcut = keras.layers.BatchNormalization(
            name=f"{name}_shortcut_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet18_cifar(width=1.0, classes=10, name="resnet18_cifar"):
    x = inputs = keras.Input((32, 32, 3))
    filters = [max(1, int(f * width)) for f in (64, 128, 256, 512)]
    x = keras.layers.Conv2D(filters[0], 3, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, f in enumerate(filters):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, f, stride, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


# (expansion t, output channels c, repeats n, first stride s), with the
# CIFAR strides of the common 32x32 variant (stem and stage 2 at stride 1).
_MOBILENETV2 = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenetv2_cifar(width=1.0, classes=10, name="mobilenetv2_cifar"):
    def conv_bn(x, filters, kernel, stride, name, relu=True):
        x = keras.layers.Conv2D(filters, kernel, stride, padding="same",
                                use_bias=False, name=name)(x)
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
        return keras.layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    x = inputs = keras.Input((32, 32, 3))
    x = conv_bn(x, max(8, int(32 * width)), 3, 1, "stem_conv")
    block = 0
    for t, c, n, s in _MOBILENETV2:
        filters = max(8, int(c * width))
        for i in range(n):
            prefix = f"block{block}"
            shortcut = x
            y = x
            if t != 1:
                y = conv_bn(y, x.shape[-1] * t, 1, 1, f"{prefix}_expand")
            y = keras.layers.DepthwiseConv2D(
                3, s if i == 0 else 1, padding="same", use_bias=False,
                name=f"{prefix}_depthwise")(y)
            y = keras.layers.BatchNormalization(
                name=f"{prefix}_depthwise_bn")(y)
            y = keras.layers.ReLU(6.0, name=f"{prefix}_depthwise_relu")(y)
            y = conv_bn(y, filters, 1, 1, f"{prefix}_project", relu=False)
            if i > 0 and shortcut.shape[-1] == filters:
                y = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
            x = y
            block += 1
    x = conv_bn(x, max(8, int(1280 * width)), 1, 1, "head_conv")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


ARCHITECTURES = {
    "vgg16": vgg16_cifar,
    "resnet18": resnet18_cifar,
    "mobilenetv2": mobilenetv2_cifar,
}
# The widths our results use: close to the paper's, small enough for a
# 2-core CPU to dissect and evaluate in minutes.
DEFAULT_WIDTHS = {"vgg16": 0.5, "resnet18": 0.5, "mobilenetv2": 1.0}


def pixel_scale(model):
    """What the model's entry expects uint8 pixels to be multiplied by.

    1.0 for a model that starts with its own `Rescaling(1/255)` (it takes raw
    [0, 255] pixels, like `../shared/models/vgg16_w0.5_cifar10.keras`),
    else 1/255 (images in [0, 1], like the quickstart's and `trained()`'s).
    """
    first = [layer for layer in model.layers
             if not isinstance(layer, keras.layers.InputLayer)][0]
    if isinstance(first, keras.layers.Rescaling) and np.isclose(
            np.mean(first.scale) * 255.0, 1.0):
        return 1.0
    return 1 / 255


def cifar10(split, scale=1 / 255):
    """CIFAR-10 as (image * `scale`, label) pairs, and the class names.

    `scale` is `pixel_scale(model)` for the model the images are for.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    ds, info = tfds.load("cifar10", split=split, as_supervised=True,
                         with_info=True)
    ds = ds.map(lambda x, y: (tf.cast(x, "float32") * scale, y))
    return ds, info.features["label"].names


def augment(image, label):
    """A random horizontal flip and a crop of the image padded by 4."""
    import tensorflow as tf

    image = tf.image.random_flip_left_right(image)
    image = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
    return tf.image.random_crop(image, (32, 32, 3)), label


def compile_for_training(model, steps):
    """SGD (Nesterov, weight decay 5e-4), 5% warm-up then cosine to 0."""
    warmup = steps // 20
    model.compile(
        keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(
                0.0, steps - warmup, warmup_target=0.1, warmup_steps=warmup
            ),
            momentum=0.9, nesterov=True, weight_decay=5e-4,
        ),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def test_accuracy(model, batches):
    correct = total = 0
    for x, y in batches.as_numpy_iterator():
        correct += int((model.predict(x, verbose=0).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def trained(arch, width, epochs, seed=0, quick=False, cache_dir=CACHE):
    """A CIFAR-10 model trained with SGD + cosine decay, flips and crops.

    Cached as `{cache_dir}/{arch}_w{width}_e{epochs}_s{seed}.keras`; quick
    mode trains 3 batches and caches nothing. Returns (model, test
    accuracy, class names).
    """
    import tensorflow as tf

    path = os.path.join(cache_dir, f"{arch}_w{width:g}_e{epochs}_s{seed}.keras")
    train, names = cifar10("train")
    test, _ = cifar10("test[:256]" if quick else "test")
    test = test.batch(500)
    if os.path.exists(path) and not quick:
        model = keras.models.load_model(path, compile=False)
        return model, test_accuracy(model, test), names
    keras.utils.set_random_seed(seed)
    model = ARCHITECTURES[arch](width)
    if quick:  # not the 50,000-image shuffle buffer for three batches
        train = train.take(3 * 128)
    batches = (train.cache().shuffle(50_000, seed=seed)
               .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(128).prefetch(tf.data.AUTOTUNE))
    compile_for_training(model, 3 if quick else 391 * epochs)
    start = time.time()
    model.fit(batches.take(3) if quick else batches,
              epochs=1 if quick else epochs, shuffle=False,  # shuffled
              verbose=0 if quick else 2)
    accuracy = test_accuracy(model, test)
    print(f"Trained {arch} width {width:g}: {0 if quick else epochs} epochs in "
          f"{time.time() - start:.0f} s, test accuracy {accuracy:.2%}")
    if not quick:
        os.makedirs(cache_dir, exist_ok=True)
        model.save(path)
    return model, accuracy, names


def loaded(path):
    """A saved CIFAR-10 classifier, its test accuracy and the class names."""
    model = keras.models.load_model(os.path.expanduser(path), compile=False)
    test, names = cifar10("test", pixel_scale(model))
    return model, test_accuracy(model, test.batch(500)), names


def dissected(model, name, samples, quick=False, cache_dir=CACHE, **fitting):
    """`kd.dissect` of CIFAR-10's first `samples` training images per class,
    cached as `{cache_dir}/{name}_civs{samples}_{fitting}.npz`."""
    import keras_drnet as kd

    key = "_".join(
        f"{k}{v}" if isinstance(v, (int, float, str))
        # e.g. one gamma per gate: a short digest names it.
        else f"{k}{hashlib.sha256(repr(v).encode()).hexdigest()[:10]}"
        for k, v in sorted(fitting.items()))
    path = os.path.join(cache_dir, f"{name}_civs{samples}_{key}.npz")
    if os.path.exists(path) and not quick:
        return kd.CIVs.load(path)
    train, names = cifar10("train", pixel_scale(model))
    start = time.time()
    civs = kd.dissect(model, train, samples_per_class=samples,
                      class_names=names, verbose=0, **fitting)
    print(f"Dissected {name} ({fitting}) in {time.time() - start:.0f} s")
    if not quick:
        os.makedirs(cache_dir, exist_ok=True)
        civs.save(path)
    return civs


# Shared by the studies (recipe_study, distill_study, civ_vs_random).


def per_class(ds, count, num_classes=10):
    """The first `count` images of each class: `{class: images}`."""
    chosen = {c: [] for c in range(num_classes)}
    for image, label in ds.as_numpy_iterator():
        if len(chosen[int(label)]) < count:
            chosen[int(label)].append(image)
        if all(len(v) >= count for v in chosen.values()):
            break
    return {c: np.stack(v) for c, v in chosen.items()}


def pair_accuracy(logits_fn, test, pair):
    """Accuracy on the pair's test images, predicting among its classes."""
    correct = total = 0
    for position, c in enumerate(pair):
        logits = np.asarray(logits_fn(test[c]))[:, list(pair)]
        correct += int((logits.argmax(-1) == position).sum())
        total += len(logits)
    return correct / total


def _producers(model, source):
    """The layers that make a gated channel: back from `source` through
    channelwise layers and residual adds to the convolutions / dense layers,
    not past another ReLU (an identity shortcut has no filter)."""
    found, stack, seen = [], [model.get_layer(source)], set()
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append(layer)
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense,
                              keras.layers.DepthwiseConv2D)):
            continue
        if isinstance(layer, keras.layers.ReLU) and len(found) > 1:
            continue
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        stack.extend(t._keras_history.operation for t in inputs)
    return found


def baseline_civs(model, kind, names, seed=0):
    """Class-agnostic rankings as CIVs: every class scores a channel alike.

    `"l1"`: L1 norm of the channel's filter (summed over the filters that
    add into it); `"bn_gamma"`: |gamma| of its BatchNormalization layer(s),
    the L1 norm for a gate with none; `"random"`: uniform random scores.
    """
    import keras_drnet as kd
    from keras_drnet.civ import gate_layout
    from keras_drnet.civ import model_fingerprint

    gated = kd.inject_gates(model)
    rng = np.random.default_rng(seed)
    scores = []
    for spec in kd.list_gates(gated):
        if kind == "random":
            scores.append(rng.uniform(size=spec.channels))
            continue
        producers = _producers(model, spec.source)
        gammas = [layer for layer in producers
                  if isinstance(layer, keras.layers.BatchNormalization)]
        score = np.zeros(spec.channels)
        if kind == "bn_gamma" and gammas:
            for layer in gammas:
                score += np.abs(keras.ops.convert_to_numpy(layer.gamma))
        else:  # "l1", and "bn_gamma" where the gate has no BatchNorm
            for layer in producers:
                if hasattr(layer, "kernel"):
                    kernel = np.abs(keras.ops.convert_to_numpy(layer.kernel))
                    score += kernel.reshape(-1, spec.channels).sum(0)
        scores.append(score)
    vectors = np.tile(np.concatenate(scores), (len(names), 1))
    return kd.CIVs(vectors, names, np.ones(len(names), "int64"),
                   gate_layout(gated), model_fingerprint(model),
                   {"method": f"baseline {kind}"})


def adversarial(logits_fn, images, labels, kind, eps, high, seed=0):
    """Untargeted FGSM, PGD (10 steps of eps/4 from a random start) or
    Carlini-Wagner L2 (`"cw"`, another family: the smallest perturbation
    an optimiser finds, `eps` unused) of `images` with true `labels`, `eps`
    in 1/255ths of the pixel range, in the model's input units ([0,
    `high`]). `logits_fn(images)` gives the logits (detect_study)."""
    import tensorflow as tf

    eps = eps / 255.0 * high
    x0 = tf.constant(images)
    y = tf.constant(labels)

    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = keras.losses.sparse_categorical_crossentropy(
                y, logits_fn(x), from_logits=True)
        return tape.gradient(loss, x)

    if kind == "fgsm":
        return np.asarray(tf.clip_by_value(
            x0 + eps * tf.sign(gradient(x0)), 0, high))
    if kind == "cw":
        return _carlini_wagner(logits_fn, x0, y, high)
    rng = np.random.default_rng(seed)
    x = x0 + rng.uniform(-eps, eps, images.shape).astype("float32")
    for _ in range(10):
        x = x + eps / 4 * tf.sign(gradient(tf.clip_by_value(x, 0, high)))
        x = tf.clip_by_value(tf.clip_by_value(x, x0 - eps, x0 + eps), 0, high)
    return np.asarray(x)


def run_app(main):
    """`absl.app.run(main)` for the example scripts, except that `--help`
    exits 0: absl exits 1 after help, but help asked for is a success."""
    from absl import app
    from absl import flags

    if {"-h", "--help", "--helpshort", "--helpfull"} & set(sys.argv[1:]):
        flags.FLAGS(sys.argv[:1], known_only=True)
        print(flags.FLAGS.main_module_help())
        sys.exit(0)
    app.run(main)


def _carlini_wagner(logits_fn, x0, y, high, steps=50, c=1.0,
                    learning_rate=0.05):
    """C&W L2, untargeted, one constant `c` (no search over it): Adam on
    tanh-space images, minimising ||x - x0||^2 (in [0, 1] units) + c *
    max(z_y - max_{j != y} z_j, 0)."""
    import tensorflow as tf

    unit = tf.clip_by_value(x0 / high, 1e-6, 1 - 1e-6)
    w = tf.Variable(tf.atanh(2 * unit - 1))
    optimizer = keras.optimizers.Adam(learning_rate)
    mask = tf.one_hot(y, tf.shape(logits_fn(x0))[-1])
    best = tf.Variable(x0)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            x = (tf.tanh(w) + 1) / 2
            z = logits_fn(x * high)
            true = tf.reduce_sum(z * mask, -1)
            other = tf.reduce_max(z - 1e9 * mask, -1)
            distance = tf.reduce_sum(tf.square(x - unit), axis=[1, 2, 3])
            loss = tf.reduce_sum(distance + c * tf.nn.relu(true - other))
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])
        # Keep the last image that fools the model (the optimiser drifts
        # back toward the original once it does).
        fooled = tf.reshape(other > true, [-1, 1, 1, 1])
        best.assign(tf.where(fooled, x * high, best))

    for _ in range(steps):
        step()
    return np.asarray(best)
