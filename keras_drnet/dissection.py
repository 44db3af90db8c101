"""`dissect()`: a classifier's per-class Channel Importance Vectors."""

import hashlib
import json
import os
import warnings

import numpy as np
import tensorflow as tf

from keras_drnet.attribution import Attribution
from keras_drnet.attribution import check_method
from keras_drnet.batching import BatchRunner
from keras_drnet.batching import Progress
from keras_drnet.batching import check_image_shape
from keras_drnet.batching import is_chief
from keras_drnet.batching import is_int
from keras_drnet.batching import labelled_elements
from keras_drnet.batching import model_input_shape
from keras_drnet.civ import CIVs
from keras_drnet.civ import atomic_savez
from keras_drnet.civ import gate_layout
from keras_drnet.civ import model_fingerprint
from keras_drnet.gate_fitting import CDRP
from keras_drnet.gate_fitting import method_options
from keras_drnet.model_surgery import check_classifier
from keras_drnet.model_surgery import gated
from keras_drnet.reconstruction import resolve_classes


class _Checkpoint:
    """Sums, counts, top-1 changes and position, saved after every batch."""

    def __init__(self, directory, settings, writer=True):
        self.path = os.path.join(directory, "dissect_state.npz")
        self.settings = settings
        # Under a multi-worker strategy only the chief writes; every worker
        # reads (all hold the same sums).
        self.writer = writer
        os.makedirs(directory, exist_ok=True)

    def load(self):
        if not os.path.exists(self.path):
            return None
        with np.load(self.path, allow_pickle=False) as data:
            settings = json.loads(str(data["settings"]))
            method = settings.get("method", "cdrp")
            if method != self.settings["method"]:
                raise ValueError(
                    f"The checkpoint in {os.path.dirname(self.path)!r} is "
                    f"of a dissection with method={method!r}; this one has "
                    f"method={self.settings['method']!r}. Pass "
                    f"method={method!r} to resume it, or use another "
                    "`checkpoint_dir`."
                )
            data_digest = settings.get("data")
            if data_digest != self.settings["data"]:
                raise ValueError(
                    f"The checkpoint in {os.path.dirname(self.path)!r} was "
                    "made from another dataset (its first images differ), "
                    "or the dataset's order changes between runs (e.g. "
                    "shuffled each time): resuming would mix two datasets. "
                    "Pass the same dataset in a fixed order, or use another "
                    "`checkpoint_dir`."
                )
            if settings != self.settings:
                raise ValueError(
                    f"The checkpoint in {os.path.dirname(self.path)!r} was "
                    "made by a dissection with other settings or another "
                    f"model ({settings} vs now {self.settings}). Use another "
                    "`checkpoint_dir` or delete it to start over."
                )
            # Checkpoints from before the running digest have none.
            stream = str(data["stream"]) if "stream" in data.files else None
            return (data["sums"], data["counts"], data["changed"],
                    int(data["position"]), stream)

    def save(self, sums, counts, changed, position, stream):
        if not self.writer:
            return
        atomic_savez(
            self.path,
            sums=sums,
            counts=counts,
            changed=changed,
            position=np.array(position),
            stream=np.array(stream),
            settings=np.array(json.dumps(self.settings)),
        )

    def changed_data_error(self):
        return ValueError(
            f"The checkpoint in {os.path.dirname(self.path)!r} was made "
            "from other data: the dataset's elements up to where it stopped "
            "differ now (images, labels or order). Resuming would mix two "
            "datasets: delete the checkpoint to start over, or use another "
            "`checkpoint_dir`."
        )


def _chained(digest, image, label):
    """The running digest of a stream after one more element."""
    step = hashlib.sha256(digest.encode())
    step.update(np.ascontiguousarray(image).tobytes())
    step.update(np.int64(label).tobytes())
    return step.hexdigest()


def _data_digest(elements, count=4):
    """A short digest of the first elements: a resumed run must read the
    same data in the same order."""
    digest = hashlib.sha256()
    for image, label in elements.take(count).as_numpy_iterator():
        digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(np.int64(label).tobytes())
    return digest.hexdigest()[:16]


def _subtask_classes(classes, class_names, method):
    """`dissect`'s `classes` as sorted output indices, or None."""
    if classes is None:
        return None
    if method not in ("taylor", "frat"):
        raise ValueError(
            "`classes` scores channels by the gradient of a sub-task's own "
            "softmax: it needs `method='taylor'` or `'frat'`. Received: "
            f"method={method!r}, classes={classes!r}"
        )
    # The checks (names, indices, duplicates) of a sub-task's classes, on
    # CIVs that have no channel yet.
    indices = resolve_classes(
        CIVs(np.zeros((len(class_names), 0)), class_names,
             np.ones(len(class_names)), []),
        classes,
    )
    if len(indices) < 2:
        raise ValueError(
            "`classes` needs at least two classes: the softmax of one class "
            f"is 1 whatever the channels do. Received: classes={classes!r}"
        )
    return sorted(indices)


def path_scorer(gated_model, method, options=None, classes=None):
    """What scores each image's channels: CDRP's `GateFitter` (with its
    `CDRP` options) or a one-pass `Attribution`; both have `fit_batch`
    (dissection) and `path_batch` (`PathDetector`)."""
    if method == "cdrp":
        return (options or CDRP()).fitter(gated_model)
    return Attribution(gated_model, method, classes)


def dissect(
    model,
    ds,
    samples_per_class=100,
    class_names=None,
    method="cdrp",
    classes=None,
    batch_size=64,
    iterations=None,
    learning_rate=None,
    momentum=None,
    gamma=None,
    clip=None,
    on_top1_change=None,
    select="all",
    checkpoint_dir=None,
    strategy=None,
    jit_compile=False,
    verbose=1,
):
    """Dissects a classifier into per-class Channel Importance Vectors.

    Scores every gated channel on the first `samples_per_class` images of
    every class (in dataset order) and averages the scores per class. With
    `method="cdrp"` (the paper) an image's scores are its CDRP, gates fitted
    for it; the other methods read the network once per image (see
    `keras_drnet.attribution.Attribution`). Scores are summed as they come,
    so memory does not grow with the dataset, and reading stops once every
    class read (all of them, or those of `classes`) has its images.

    Args:
        model: a Keras classifier (logits or softmax output) that takes the
            images of `ds` as they are: apply your preprocessing (e.g.
            scaling to [0, 1]) to `ds` first.
        ds: a `tf.data.Dataset` of `(image, label)` pairs or batches of them
            (integer or one-hot labels), or a tuple `(images, labels)`.
        samples_per_class: int, or `None` for every image (paper: 100).
        class_names: list of names, one per model output; defaults to
            `["0", "1", ...]`.
        method: how an image's channels are scored: `"cdrp"` (default,
            fitted gates; `keras_drnet.CDRP(...)` for other fitting
            options), `"activation"` (mean post-ReLU activation),
            `"frat"` (positive gradient of the label's probability) or
            `"taylor"` (|activation x gradient of its log-probability|). The
            scale of the last three differs from layer to layer: combine
            them with `budget=..., budget_scope="gate"` rather than one
            `threshold`.
        classes: `None` (default: the CIVs of every class, for any
            sub-task) or the names or indices of one sub-task's classes,
            with `method="taylor"` or `"frat"`: the gradient is then that
            of the softmax over these classes, the sub-task's own output,
            and only their images are read. The CIVs serve that sub-task
            only (`subtask` refuses other classes); on the VGG16 w0.5 they
            keep the channels a repaired sub-task needs better (BUILD_NOTES).
        batch_size: int. Images fitted at once.
        iterations, learning_rate, momentum, gamma, clip, on_top1_change:
            CDRP's fitting options as keywords, the fields of
            `keras_drnet.CDRP` (defaults from the paper, sec. 4.1, and
            `on_top1_change="keep_best"`); an error with another method.
            `CIVs.top1_changed` counts the images whose top-1 the fitted
            gates changed, per class.
        select: which ReLUs get gates; see `inject_gates()`.
        checkpoint_dir: str or `None`. If set, progress is saved there after
            every batch, and a dissection restarted with the same arguments
            resumes and gives exactly the result of an uninterrupted run
            (the dataset must yield the same order each time).
        strategy: a `tf.distribute.Strategy` spreading each batch over its
            replicas; defaults to the current one.
        jit_compile: bool. Compile the per-batch step with XLA.
        verbose: 0 (silent) or 1 (progress bar with images/s).

    Returns:
        `CIVs`.

    Example:

    ```python
    ds = tfds.load("cifar10", split="train", as_supervised=True)
    ds = ds.map(lambda x, y: (tf.cast(x, "float32") / 255.0, y))
    civs = keras_drnet.dissect(model, ds, class_names=names)
    ```
    """
    check_classifier(model)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int. Received: "
            f"batch_size={batch_size!r}"
        )
    if samples_per_class is not None and (
        not is_int(samples_per_class) or samples_per_class < 1
    ):
        raise ValueError(
            "`samples_per_class` must be a positive int or None (all "
            f"images). Received: samples_per_class={samples_per_class!r}"
        )
    input_shape, dtype = model_input_shape(model)
    num_classes = model.outputs[0].shape[-1]
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = list(class_names)
    if len(class_names) != num_classes or len(set(class_names)) != num_classes:
        raise ValueError(
            f"`class_names` must be {num_classes} distinct names, one per "
            f"output of the model. Received: class_names={class_names}"
        )
    elements = labelled_elements(ds, input_shape, num_classes)

    method, options = method_options(
        method, iterations=iterations, learning_rate=learning_rate,
        momentum=momentum, gamma=gamma, clip=clip,
        on_top1_change=on_top1_change,
    )
    check_method(method)
    classes = _subtask_classes(classes, class_names, method)
    on_top1_change = options.on_top1_change if options else None
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        gated_model = gated(model, select)
        scorer = path_scorer(gated_model, method, options, classes)
    run = BatchRunner(scorer.fit_batch, batch_size, strategy, jit_compile)
    layout = gate_layout(gated_model)
    fingerprint = model_fingerprint(model)
    # Plain Python numbers: the settings are written as JSON.
    config = {
        "method": method,
        "samples_per_class": (
            None if samples_per_class is None else int(samples_per_class)
        ),
        "select": select if isinstance(select, str) else repr(select),
    }
    if classes is not None:
        config["classes"] = classes
    if options is not None:
        config.update(options.get_config())

    sums = np.zeros((num_classes, scorer.total_channels), "float64")
    counts = np.zeros(num_classes, "int64")
    changed = np.zeros(num_classes, "int64")
    position = resumed_at = 0
    resumed_stream = None
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = _Checkpoint(
            checkpoint_dir,
            dict(
                config,
                batch_size=int(batch_size),
                fingerprint=fingerprint,
                data=_data_digest(elements),
            ),
            writer=is_chief(strategy),
        )
        state = checkpoint.load()
        if state is not None:
            sums, counts, changed, resumed_at, resumed_stream = state
            if verbose:
                print(f"Resuming the dissection in {checkpoint_dir} "
                      f"({int(counts.sum())} images done); delete it to "
                      "start over.")

    limit = samples_per_class
    # The classes whose images are read: all, or the sub-task's.
    reading = np.isin(np.arange(num_classes),
                      np.arange(num_classes) if classes is None else classes)
    target = None if limit is None else limit * int(reading.sum())
    progress = Progress(target, verbose)
    progress.add(int(counts.sum()))
    # Images taken so far (a resumed run skips them), excluded ones too.
    selected = counts + (changed if on_top1_change == "exclude" else 0)
    images, labels, skipped = [], [], []
    # A dataset with `None` spatial dims is checked image by image.
    unknown_dims = not elements.element_spec[0].shape.is_fully_defined()

    stream = ""  # the running digest of every element read so far

    def flush():
        batch_labels = np.asarray(labels)
        cdrps, top1_changed = run(np.stack(images), batch_labels)
        used = ~np.isnan(cdrps).any(axis=1)  # "exclude" gives NaN rows
        np.add.at(sums, batch_labels[used], cdrps[used].astype("float64"))
        counts[:] += np.bincount(batch_labels[used], minlength=num_classes)
        changed[:] += np.bincount(
            batch_labels[top1_changed], minlength=num_classes
        )
        if checkpoint is not None:
            checkpoint.save(sums, counts, changed, position, stream)
        progress.add(len(images))
        images.clear()
        labels.clear()

    for image, label in elements.as_numpy_iterator():
        if position < resumed_at:
            # Done before: only re-read, so that a dataset changed since is
            # caught wherever it changed (not only in its first elements).
            stream = _chained(stream, image, label)
            position += 1
            if position == resumed_at and resumed_stream not in (None,
                                                                 stream):
                raise checkpoint.changed_data_error()
            continue
        if limit is not None and selected[reading].min() >= limit:
            break
        stream = _chained(stream, image, label)
        position += 1
        label = int(label)
        if not 0 <= label < num_classes:
            raise ValueError(
                f"Label {label} of dataset element {position - 1} is out of "
                f"range for a model with {num_classes} outputs (0 to "
                f"{num_classes - 1}). Map labels to class indices first."
            )
        if not reading[label] or (
            limit is not None and selected[label] >= limit
        ):
            continue
        if unknown_dims:
            check_image_shape(image.shape, input_shape)
        if not np.isfinite(image).all():
            # Its scores would be NaN (or all ones): never averaged.
            skipped.append(position - 1)
            continue
        selected[label] += 1
        images.append(image.astype(dtype, copy=False))
        labels.append(label)
        if len(images) == run.batch_size:
            flush()
    if position < resumed_at:
        raise checkpoint.changed_data_error()  # the dataset got shorter
    if images:
        flush()
    progress.finish()

    with np.errstate(invalid="ignore", divide="ignore"):
        vectors = sums / counts[:, None]
    civs = CIVs(vectors, class_names, counts, layout, fingerprint, config,
                changed)
    short = [
        f"{n} ({c})"
        for n, c in zip(class_names, selected)
        if limit is not None and 0 < c < limit
    ]
    if short:
        warnings.warn(
            f"Fewer than samples_per_class={limit} images were found for "
            f"{len(short)} classes; their CIVs average what there was: "
            f"{', '.join(short)}.",
            stacklevel=2,
        )
    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} images with NaN or inf values (dataset "
            f"elements {skipped[:10]}{' ...' if len(skipped) > 10 else ''}); "
            "the CIVs average the other images.",
            stacklevel=2,
        )
    missing = [n for n, c, r in zip(class_names, counts, reading)
               if r and c == 0]
    if missing:
        why = ["none was found"]
        if on_top1_change == "exclude":
            why.append("`on_top1_change='exclude'` excluded them all")
        why.append("their scores were NaN (does the model give NaN or inf?)")
        warnings.warn(
            f"No image was averaged for classes {missing} "
            f"({', or '.join(why)}): their CIVs are missing (NaN) and "
            "sub-tasks cannot use them.",
            stacklevel=2,
        )
    return civs
