"""How images reach the per-image computations.

Datasets and arrays become labelled elements or fixed-size numpy batches;
`BatchRunner` spreads a batch over a strategy's replicas; `Progress` counts
images.
"""

import numbers
import sys
import time

import keras
import numpy as np
import tensorflow as tf


def is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value):
    """A real number (numpy's too), not a bool nor a numeric string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_paired(ds):
    """Whether `ds` holds `(image, label)` pairs (a 2-tuple of arrays, or a
    dataset of 2-tuples) rather than images alone; anything else that is
    not images (other tuples, dicts) is refused here, by name."""
    if isinstance(ds, tuple):
        if len(ds) != 2:
            raise TypeError(
                "A tuple is read as `(images, labels)`. Received: a tuple of "
                f"{len(ds)}; pass `(images, labels)` (sample weights are not "
                "used)."
            )
        return True
    if isinstance(ds, dict):
        raise TypeError(
            "Pass images as an array, or `(images, labels)`. Received: a "
            f"dict with keys {sorted(ds)}."
        )
    if isinstance(ds, tf.data.Dataset):
        spec = ds.element_spec
        if isinstance(spec, tuple) and len(spec) == 2:
            return True
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(
                "A dataset must yield images, or `(image, label)` pairs (as "
                "`tfds.load(..., as_supervised=True)` gives). Received: "
                f"element_spec={spec}"
            )
    return False


def image_batches(images, batch_size, input_shape, dtype):
    """Yields numpy image batches of `batch_size` from an array or dataset."""
    is_paired(images)  # refuses what is neither images nor pairs
    if isinstance(images, tuple):
        images = tf.data.Dataset.from_tensor_slices(images)
    if isinstance(images, tf.data.Dataset):
        spec = images.element_spec
        if isinstance(spec, tuple):
            images = images.map(lambda x, *_: x)
            spec = spec[0]
        if spec.shape.rank == len(input_shape):
            images = images.unbatch()
        elif spec.shape.rank != len(input_shape) - 1:
            raise ValueError(
                f"Expected images of shape {tuple(input_shape[1:])} (or "
                f"batches of them). Received: element_spec={spec}"
            )
        check_image_shape(spec.shape[-len(input_shape) + 1 :], input_shape)
        for batch in images.batch(batch_size).as_numpy_iterator():
            yield batch.astype(dtype, copy=False)
        return
    images = np.asarray(images)
    if images.ndim != len(input_shape):
        raise ValueError(
            f"Expected an array of images of shape (N,) + "
            f"{tuple(input_shape[1:])}. Received: shape={images.shape}"
        )
    check_image_shape(images.shape[1:], input_shape)
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size].astype(dtype, copy=False)


def check_image_shape(shape, input_shape):
    expected = tuple(input_shape[1:])
    shape = tuple(shape)
    if len(shape) != len(expected) or any(
        e is not None and s is not None and e != s
        for s, e in zip(shape, expected)
    ):
        raise ValueError(
            f"Images must have the model's input shape {expected}. "
            f"Received: image shape {shape}. Resize them first, e.g. "
            "`ds.map(lambda x, y: (keras.ops.image.resize(x, size), y))`."
        )


def model_input_shape(model):
    if len(model.inputs) != 1:
        raise ValueError(
            f"Model '{model.name}' has {len(model.inputs)} inputs; gate "
            "fitting needs a classifier with one image input."
        )
    return tuple(model.inputs[0].shape), model.inputs[0].dtype


def labelled_elements(ds, input_shape, num_classes):
    """`ds` as unbatched `(image, int label)` elements."""
    if isinstance(ds, tuple) and len(ds) == 2:
        lengths = [len(part) for part in ds]
        if lengths[0] != lengths[1]:
            raise ValueError(
                "`(images, labels)` must have one label per image. Received: "
                f"{lengths[0]} images and {lengths[1]} labels"
            )
        ds = tf.data.Dataset.from_tensor_slices(ds)
    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(
            "`ds` must be a `tf.data.Dataset` of `(image, label)` pairs (as "
            "`tfds.load(..., as_supervised=True)` gives) or a tuple "
            f"`(images, labels)` of arrays. Received: {type(ds).__name__}"
        )
    spec = ds.element_spec
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(
            "`ds` must yield `(image, label)` pairs; use "
            "`tfds.load(..., as_supervised=True)`. Received: "
            f"element_spec={spec}"
        )
    image_spec, label_spec = spec
    rank = len(input_shape)
    if image_spec.shape.rank == rank:
        ds = ds.unbatch()
        label_rank = label_spec.shape.rank - 1
    elif image_spec.shape.rank == rank - 1:
        label_rank = label_spec.shape.rank
    else:
        raise ValueError(
            f"Images must have the model's input shape "
            f"{tuple(input_shape[1:])} (batched or not). Received: "
            f"element_spec={spec}"
        )
    check_image_shape(image_spec.shape[-rank + 1 :], input_shape)
    if label_rank == 1 and label_spec.shape[-1] == num_classes:
        # One-hot (or soft) labels: the class is the largest entry.
        ds = ds.map(lambda x, y: (x, tf.argmax(y, axis=-1)))
    elif label_rank != 0 or not label_spec.dtype.is_integer:
        raise ValueError(
            "Labels must be integer class indices (or one-hot vectors of "
            f"length {num_classes}). Received: label spec {label_spec}"
        )
    return ds


class BatchRunner:
    """Runs a per-image computation over fixed-size batches, compiled once.

    `step(images, labels)` must return per-image tensors (first axis the
    batch), e.g. `GateFitter.fit_batch` or `Attribution.fit_batch`. Batches
    are padded to `batch_size` (a multiple of the replica count), so the
    function is traced once and a short last batch costs no retrace; padding
    rows are computed and dropped, which changes nothing for the real images
    since images do not interact. Under a `tf.distribute` strategy, each
    replica runs its slice of the batch and every worker gets all the
    results (per-image scores, not images), so with
    `MultiWorkerMirroredStrategy` each worker reads the same batches and
    computes its own replicas' share.
    """

    def __init__(self, step, batch_size, strategy=None, jit_compile=False):
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        self.batch_size = -(-batch_size // replicas) * replicas
        self._per_replica = self.batch_size // replicas
        self._step = tf.function(step, jit_compile=jit_compile)
        self._run = tf.function(self._distributed)

    def _distributed(self, images, labels):
        def shard(tensor):
            def slice_for(context):
                start = context.replica_id_in_sync_group * self._per_replica
                return tensor[start : start + self._per_replica]

            return self.strategy.experimental_distribute_values_from_function(
                slice_for
            )

        def step(images, labels):
            # `gather` has no bool kernel: bools travel as int32.
            outputs = self._step(images, labels)
            self._bools = [o.dtype == tf.bool for o in outputs]
            return [tf.cast(o, tf.int32) if b else o
                    for o, b in zip(outputs, self._bools)]

        results = self.strategy.run(step, args=(shard(images), shard(labels)))
        # Every replica's rows, also those of other workers: each worker
        # then holds the whole batch's results, as one process would.
        return [self.strategy.gather(r, axis=0) for r in results]

    def __call__(self, images, labels=None):
        """The step's outputs for a numpy batch, as numpy arrays.

        `labels` (int, one per image) default to -1: "none given".
        """
        count = len(images)
        if labels is None:
            labels = np.full(count, -1, "int64")
        if count < self.batch_size:
            pad = self.batch_size - count
            images = np.concatenate(
                [images, np.zeros((pad,) + images.shape[1:], images.dtype)]
            )
            labels = np.concatenate([labels, np.full(pad, -1, "int64")])
        results = self._run(tf.constant(images), tf.constant(labels, tf.int64))
        return tuple(
            r.numpy()[:count].astype(bool) if b else r.numpy()[:count]
            for r, b in zip(results, self._bools)
        )


class Progress:
    """A `keras.utils.Progbar` counting images, with images/s.

    Keras's bar redraws itself with ANSI codes and carriage returns even
    when stdout is a file; there, a plain line is written at every tenth of
    the target (every 30 s without one) and at the end instead.
    """

    def __init__(self, target, verbose):
        self.target = target
        self.verbose = verbose
        self.done = 0
        self._start = time.perf_counter()
        self._next_line = 0.0
        self._bar = None
        if verbose and sys.stdout.isatty():
            self._bar = keras.utils.Progbar(
                target, unit_name="image", stateful_metrics=["images/s"]
            )

    def add(self, count):
        self.done += count
        if self._bar is not None:
            self._bar.update(self.done, values=[("images/s", self._rate())])
        elif self.verbose and count:
            if self.target:
                progress, step = self.done / self.target, 0.1
            else:
                progress, step = time.perf_counter() - self._start, 30.0
            if progress >= self._next_line or (self.target and progress >= 1):
                self._next_line = progress + step
                self._line()

    def finish(self):
        if self._bar is not None and self._bar.target is None:
            self._bar.update(self.done, finalize=True)
        elif self._bar is None and self.verbose and not (
            self.target and self.done >= self.target
        ):
            self._line()

    def _rate(self):
        return self.done / max(time.perf_counter() - self._start, 1e-9)

    def _line(self):
        of = f"/{self.target}" if self.target else ""
        print(f"{self.done}{of} images - "
              f"{time.perf_counter() - self._start:.0f}s - "
              f"{self._rate():.1f} images/s", flush=True)



def class_elements(ds, input_shape, num_classes, classes):
    """The unbatched `(image, label)` elements of `ds` whose label is one
    of `classes` (indices)."""
    wanted = tf.constant(list(classes), tf.int64)
    return labelled_elements(ds, input_shape, num_classes).filter(
        lambda x, y: tf.reduce_any(tf.equal(tf.cast(y, tf.int64), wanted))
    )


def class_images(ds, input_shape, num_classes, classes):
    """The images of `classes` in `(image, label)` pairs (dataset or tuple
    of arrays); images alone (array or dataset) are passed through, taken
    to be of those classes."""
    if not is_paired(ds):
        return ds
    return class_elements(ds, input_shape, num_classes, classes).map(
        lambda x, y: x
    )

def is_chief(strategy):
    """Whether this process writes shared files (checkpoints) for the
    strategy's cluster: always, unless another worker is the chief."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if "chief" in resolver.cluster_spec().as_dict():
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def first_batch(model, images, max_images, purpose):
    """Up to `max_images` of `images` as one numpy batch; never empty."""
    input_shape, dtype = model_input_shape(model)
    batch = next(image_batches(images, max_images, input_shape, dtype), None)
    if batch is None or len(batch) == 0:
        raise ValueError(
            f"`images` is empty: {purpose} needs images of the sub-task's "
            "classes."
        )
    finite = np.isfinite(batch.reshape(len(batch), -1)).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        raise ValueError(
            f"{purpose} would average NaN or inf into every statistic: "
            f"images {bad[:10]}{' ...' if len(bad) > 10 else ''} of the "
            f"{len(batch)} taken have non-finite values. Remove them first."
        )
    return batch
