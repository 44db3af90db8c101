"""A short fine-tune of a compacted sub-task, from labels or a teacher."""

import math
import sys

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_drnet.batching import check_image_shape
from keras_drnet.batching import is_int
from keras_drnet.batching import is_paired
from keras_drnet.batching import is_number
from keras_drnet.batching import labelled_elements
from keras_drnet.batching import model_input_shape
from keras_drnet.calibration import batchnorm_layers
from keras_drnet.calibration import record_statistics
from keras_drnet.compaction import compact


class Distiller(keras.Model):
    """Trains a student's logits toward a teacher's softmax and/or labels.

    The loss of a batch is `(1 - label_weight) * T**2 * KL(teacher_T ||
    student_T)`, where `_T` is a softmax at temperature `T` (the `T**2`
    keeps the gradient's scale independent of `T`; Hinton et al. 2015),
    plus `label_weight` times the cross-entropy with the labels of the
    images that have one (label `-1`: none). Without a teacher the loss is
    the cross-entropy alone.

    Args:
        student: a model returning the logits of the sub-task's classes.
        teacher: `None`, or a model returning logits of which `columns` are
            the sub-task's classes, in the student's order.
        columns: list of int. See `teacher`.
        temperature: float. The softmax temperature `T`.
        label_weight: float in [0, 1]. Weight of the hard-label loss.
        **kwargs: Base model keyword arguments, such as `name`.

    Example:

    ```python
    distiller = Distiller(student_logits, teacher_logits, [3, 5])
    distiller.compile(keras.optimizers.SGD(0.01, momentum=0.9))
    distiller.fit(ds_of_images_and_labels_or_minus_1, epochs=3)
    ```
    """

    def __init__(
        self,
        student,
        teacher=None,
        columns=None,
        temperature=4.0,
        label_weight=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.student = student
        if teacher is not None:
            # Only the student learns (the teacher is a sub-layer here).
            teacher.trainable = False
        self.teacher = teacher
        self.columns = columns
        self.temperature = temperature
        self.label_weight = label_weight

    def call(self, images, training=False):
        return self.student(images, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        y_pred = ops.cast(y_pred, "float32")
        known = ops.cast(ops.greater_equal(y, 0), "float32")
        per_image = keras.losses.sparse_categorical_crossentropy(
            ops.maximum(y, 0), y_pred, from_logits=True
        )
        hard = ops.sum(per_image * known) / ops.maximum(ops.sum(known), 1.0)
        loss = hard
        if self.teacher is not None:
            t = self.temperature
            target = ops.take(
                ops.cast(self.teacher(x, training=False), "float32"),
                self.columns,
                axis=-1,
            )
            log_p = ops.log_softmax(target / t, axis=-1)
            log_q = ops.log_softmax(y_pred / t, axis=-1)
            kl = ops.mean(ops.sum(ops.exp(log_p) * (log_p - log_q), -1))
            w = self.label_weight
            loss = (1.0 - w) * t * t * kl + w * hard
        if self.student.losses:
            loss = loss + ops.sum(self.student.losses)
        return loss


def finetune(
    sub,
    ds,
    epochs=3,
    distill=True,
    temperature=4.0,
    label_weight=0.0,
    images="subtask",
    augment=False,
    optimizer=None,
    learning_rate=None,
    batch_size=128,
    shuffle_buffer=10_000,
    calibration_samples=1024,
    start=None,
    freeze_batchnorm=None,
    verbose="auto",
):
    """Compacts a sub-task and fine-tunes it, by distillation or on labels.

    By default (`distill=True`) the teacher is the full network's masked
    softmax over the sub-task's classes, exactly what the sub-task promises
    to reproduce (every channel on, the BatchNorm statistics it was built
    with; `SubtaskModel.full_logits_model()`), and labels are optional.
    The defaults, 3 epochs of distillation, were chosen on a CIFAR-10
    VGG16 w0.5 at 89%, where the pair's hard labels lose more: with
    `keras_drnet.allocate_budget` at 10.8% of the parameters, nine hard
    pairs, 3 epochs on labels lost 0.80 pp, 3 of distillation 0.61 (1
    epoch: 0.93; over all 45 pairs: 0.36); at a uniform 33% per gate,
    eight pairs, 7.26 against 3.93 (BUILD_NOTES). On a weak model (65-70%)
    hard labels can do better: its teacher is wrong a third of the time.

    The learning rate follows a cosine decay from `learning_rate` to 0 over
    all steps (unless `optimizer` is given). From `keras_drnet.compact(sub)`
    BatchNormalization layers train as usual (batch statistics), then their
    moving statistics are all recomputed on up to `calibration_samples` of
    the sub-task's images in one inference pass: a short fit leaves the
    moving averages part-way between the old and the new statistics (on our
    CIFAR-10 VGG16, car-deer, 33% of the channels per layer, one epoch
    without that last step scored 60.7% on test images, with it 97.0%).
    From a `start` model (`keras_drnet.repair`) they are frozen instead, as
    Keras advises for fine-tuning: its weights were fit to those statistics,
    and batch statistics undo the fit (VGG16 w0.5, cat-dog at 10.8% of the
    parameters, one epoch of distillation at learning rate 1e-3: 2.90 pp
    lost with BatchNorm training, 1.55 frozen, 1.15 for the repair alone).

    Args:
        sub: `keras_drnet.SubtaskModel`; not modified.
        ds: `(image, label)` pairs (dataset, batched or not, or a tuple of
            arrays) with the original model's labels; with `distill=True`
            (the default) also images alone (array or dataset), used as
            they are.
        epochs: int. Passes over the images (default 3).
        distill: bool. Learn from the teacher's probabilities (default,
            see above); `False`: from the labels alone.
        temperature: float > 0. Softmax temperature of the distillation.
        label_weight: float in [0, 1]. With `distill=True`, the weight of
            the hard-label loss (on images that have a sub-task label).
        images: `"subtask"` (default): of labelled `ds`, use only the images
            of the sub-task's classes; `"all"`: every image (needs
            `distill=True`: images of other classes have no label here, the
            teacher still says what the sub-task would answer).
        augment: `False`; `True` for random horizontal flips and shifts of
            up to 1/8 of the size (natural images only); or a Keras layer
            (e.g. a `keras.Sequential` of preprocessing layers) applied to
            each training batch. Student and teacher see the same images.
        optimizer: a `keras.optimizers.Optimizer`; default SGD with
            momentum 0.9 and the cosine schedule above.
        learning_rate: float. Initial learning rate of the default
            optimizer; default 0.01, or 0.001 from a `start` model (0.01
            wrecked a repaired cat-horse of the VGG16: 11.05 pp lost after
            one epoch, 1.30 at 0.001, 1.90 before it).
        batch_size: int.
        shuffle_buffer: int. Size of the shuffle buffer; pass shuffled data
            when the images are large.
        calibration_samples: int. Images for the final BatchNorm statistics.
        start: `None` (default: `keras_drnet.compact(sub)`), or the compact
            model of `sub` to start from, e.g. `keras_drnet.repair(sub,
            images)`; it is trained in place.
        freeze_batchnorm: bool, or `None` (default): `True` with `start`,
            `False` without (see above). Not for the BN-recalibrated
            `compact(sub)`: frozen, its statistics made the VGG16 collapse
            to one class in one epoch (cat-horse at learning rate 0.01,
            cat-dog at 0.001), so leave `start=None` for that one.
        verbose: passed to `Model.fit()`; 0 is silent. Where the output
            is not a terminal (a log file), "auto" and 1 print one line per
            epoch instead of a progress bar.

    Returns:
        The fine-tuned compact model (see `keras_drnet.compact()`): outputs
        are the probabilities of the sub-task's classes, in the order of
        its `class_names`; its `history` holds the loss (and, for
        hard labels, the accuracy) of each epoch.

    Example:

    ```python
    sub = keras_drnet.subtask(model, civs, ["cat", "dog"], budget=0.33,
                              budget_scope="gate", calibrate=train_ds)
    small = keras_drnet.finetune(sub, unlabeled_images)  # distillation
    small = keras_drnet.finetune(sub, train_ds, distill=False)  # labels
    keras_drnet.export(small, "cat_dog_small.keras", format="keras")
    ```
    """
    _check_arguments(
        epochs, distill, temperature, label_weight, images,
        0.01 if learning_rate is None else learning_rate,
        {"batch_size": batch_size, "shuffle_buffer": shuffle_buffer,
         "calibration_samples": calibration_samples},
    )
    if freeze_batchnorm not in (None, True, False):
        raise TypeError(
            "`freeze_batchnorm` must be True, False or None. Received: "
            f"freeze_batchnorm={freeze_batchnorm!r}"
        )
    if isinstance(tf.distribute.get_strategy(),
                  tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError(
            "`finetune` runs in one process: call it outside the "
            "`MultiWorkerMirroredStrategy` scope, on one worker (a sub-task "
            "network fine-tunes in minutes on one device)."
        )
    model = compact(sub) if start is None else _checked_start(start, sub)
    if freeze_batchnorm is None:
        freeze_batchnorm = start is not None
    if learning_rate is None:
        learning_rate = 0.001 if start is not None else 0.01
    frozen = batchnorm_layers(model) if freeze_batchnorm else []
    for layer in frozen:
        # A non-trainable BatchNormalization runs in inference mode (Keras 3).
        layer.trainable = False
    # The compact model's output columns, as the original model's classes.
    columns = [sub.civs.class_names.index(n) for n in model.class_names]
    data, labelled = _elements(sub, ds, columns, keep_all=images == "all")
    if not labelled and not distill:
        raise ValueError(
            "`ds` has images but no labels, and `distill=False`: pass "
            "`(image, label)` pairs, or leave `distill=True` (the default) "
            "to learn from the full network's answers."
        )
    if not labelled and label_weight > 0:
        raise ValueError(
            "`label_weight` > 0 needs labels, but `ds` has images alone. "
            f"Received: label_weight={label_weight}"
        )
    # Counted once, before any training, so that Keras knows the epoch
    # length and a non-finite image is refused up front (one would turn
    # every weight NaN).
    count, bad = (
        int(n) for n in data.reduce(
            (0, 0),
            lambda state, element: (
                state[0] + 1,
                state[1] + tf.cast(
                    tf.logical_not(tf.reduce_all(tf.math.is_finite(
                        tf.cast(element[0], tf.float32)))), tf.int32),
            ),
        )
    )
    if count == 0:
        raise ValueError(
            "`ds` has no image of the sub-task's classes "
            f"{model.class_names}; pass images of those classes."
        )
    if bad:
        raise ValueError(
            f"{bad} of the {count} images of `ds` have NaN or inf values; "
            "drop or fix them before fine-tuning."
        )
    data = data.apply(tf.data.experimental.assert_cardinality(count))
    batches = data.shuffle(shuffle_buffer).batch(batch_size)
    augment = _augmentation(augment)
    if augment is not None:
        batches = batches.map(lambda x, y: (augment(x, training=True), y))
    if optimizer is None:
        steps = int(epochs) * math.ceil(count / batch_size)
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    logits = model.get_layer("class_probabilities").input
    trainer = Distiller(
        keras.Model(model.input, logits),
        sub.full_logits_model() if distill else None,
        columns,
        temperature,
        label_weight if distill else 1.0,
    )
    trainer.compile(optimizer, metrics=None if distill else ["accuracy"])
    model.history = trainer.fit(
        batches.prefetch(2),
        epochs=int(epochs),
        shuffle=False,  # done by the dataset
        # Keras's bar redraws a line with `\r` and ANSI codes: fine on a
        # terminal, noise in a log file, which gets one line per epoch.
        verbose=2 if verbose in ("auto", 1) and not sys.stdout.isatty()
        else verbose,
    )
    for layer in frozen:
        layer.trainable = True
    if freeze_batchnorm:
        return model
    if labelled:
        data = data.filter(lambda x, y: y >= 0)
    # Shuffled: the first images of data sorted by class are of one class.
    images = data.shuffle(shuffle_buffer).map(lambda x, y: x)
    record_statistics(
        model,
        batchnorm_layers(model),
        images.take(calibration_samples),
        calibration_samples,
    )
    return model


def _checked_start(start, sub):
    names = [sub.civs.class_names[i] for i in sub.cciv.classes]
    if not isinstance(start, keras.Model) or sorted(
        getattr(start, "class_names", [])
    ) != sorted(names):
        raise ValueError(
            "`start` must be a compact model of this sub-task (from "
            "`keras_drnet.compact(sub)` or `keras_drnet.repair(sub, ...)`), "
            f"with class_names {names}. Received: {start!r}"
        )
    return start


def _check_arguments(
    epochs, distill, temperature, label_weight, images, learning_rate, sizes
):
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)):
        raise TypeError(f"`epochs` must be an int. Received: epochs={epochs!r}")
    if epochs < 1:
        raise ValueError(
            f"`epochs` must be at least 1. Received: epochs={epochs}"
        )
    for name, value, low, high in (
        ("temperature", temperature, 0.0, math.inf),
        ("label_weight", label_weight, 0.0, 1.0),
        ("learning_rate", learning_rate, 0.0, math.inf),
    ):
        if not is_number(value):
            raise TypeError(
                f"`{name}` must be a number. Received: {name}={value!r}"
            )
        if not (low <= value <= high) or not math.isfinite(value):
            raise ValueError(
                f"`{name}` must be a finite number in [{low}, {high}]. "
                f"Received: {name}={value}"
            )
    if temperature == 0:
        raise ValueError("`temperature` must be > 0. Received: temperature=0")
    for name, value in sizes.items():
        if not is_int(value) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive int. Received: {name}={value!r}"
            )
    if images not in ("subtask", "all"):
        raise ValueError(
            f'`images` must be "subtask" or "all". Received: images={images!r}'
        )
    if images == "all" and not distill:
        raise ValueError(
            'images="all" needs `distill=True`: images of classes outside '
            "the sub-task have no label to learn from, only the teacher's "
            "answer."
        )


def _elements(sub, ds, columns, keep_all):
    """Unbatched `(image, column)` elements, column -1 where none; and
    whether `ds` had labels."""
    input_shape, _ = model_input_shape(sub.gated_model)
    paired = is_paired(ds)
    if paired:
        position = np.full(sub.civs.num_classes, -1, "int64")
        position[columns] = np.arange(len(columns))
        position = tf.constant(position)
        if keep_all:
            data = labelled_elements(ds, input_shape, sub.civs.num_classes)
        else:
            data = sub.live_elements(ds)
        column = lambda x, y: (x, tf.gather(position, tf.cast(y, tf.int64)))
        return data.map(column), True
    if not isinstance(ds, tf.data.Dataset):
        ds = np.asarray(ds)
        if ds.ndim != len(input_shape):
            raise ValueError(
                "Expected `(image, label)` pairs or an array of images of "
                f"shape (N,) + {tuple(input_shape[1:])}. Received: "
                f"shape={ds.shape}"
            )
        ds = tf.data.Dataset.from_tensor_slices(ds)
    spec = ds.element_spec
    if spec.shape.rank == len(input_shape):
        ds = ds.unbatch()
    check_image_shape(spec.shape[-len(input_shape) + 1 :], input_shape)
    return ds.map(lambda x: (x, tf.constant(-1, tf.int64))), False


def _augmentation(augment):
    if augment is False or augment is None:
        return None
    if augment is True:
        return keras.Sequential(
            [
                keras.layers.RandomFlip("horizontal"),
                keras.layers.RandomTranslation(
                    0.125, 0.125, fill_mode="reflect"
                ),
            ],
            name="augmentation",
        )
    if not callable(augment):
        raise TypeError(
            "`augment` must be a bool or a Keras layer applied to batches of "
            f"images. Received: augment={augment!r}"
        )
    return augment
