"""Channel Importance Vectors: per-class means of CDRPs, saved and loaded."""

import dataclasses
import difflib
import hashlib
import json
import os
import warnings
import zipfile

import keras
import numpy as np
import tensorflow as tf

from keras_drnet.gate_fitting import BatchFitter
from keras_drnet.gate_fitting import GateFitter
from keras_drnet.gate_fitting import Progress
from keras_drnet.gate_fitting import is_int
from keras_drnet.gate_fitting import check_image_shape
from keras_drnet.gate_fitting import gated
from keras_drnet.gate_fitting import model_input_shape
from keras_drnet.model_surgery import list_gates

_FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class LayoutEntry:
    """One gate's slice of a CIV: gate path, source layer, channel count."""

    name: str
    source: str
    channels: int


def gate_layout(gated_model):
    """The CIV layout of a gated model, in `list_gates()` order."""
    return tuple(
        LayoutEntry(spec.name, spec.source, spec.channels)
        for spec in list_gates(gated_model)
    )


def model_fingerprint(model):
    """SHA-256 over the shapes and values of all of `model`'s weights.

    CIVs carry it so that a later stage can refuse CIVs fitted on another
    model (or on the same architecture with other weights). Gate values are
    left out: a gated copy has the fingerprint of its original.
    """
    gate_weights = {id(spec.layer.gate) for spec in list_gates(model)}
    digest = hashlib.sha256()
    for weight in model.weights:
        if id(weight) in gate_weights:
            continue
        value = keras.ops.convert_to_numpy(weight)
        digest.update(str((value.shape, str(value.dtype))).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class CIVs:
    """The Channel Importance Vector of every class of a classifier.

    `vectors[c]` is the mean CDRP of the images of class `c` used in the
    dissection; the channels follow `layout` (gate after gate, in the gated
    model's topological order). A class for which no image was seen is
    *missing*: its row is NaN, and asking for it raises an error.

    Args:
        vectors: float array `[num_classes, total_channels]`.
        class_names: list of `num_classes` strings.
        counts: int array `[num_classes]`, images averaged per class.
        top1_changed: int array `[num_classes]` or `None` (zeros): images per
            class whose fitted gates changed the top-1 (reset, excluded or
            replaced by their best gates, as `config["on_top1_change"]`
            says).
        layout: sequence of `LayoutEntry` (or `(name, source, channels)`).
        fingerprint: str, `model_fingerprint()` of the dissected model.
        config: dict, the fitting settings, kept for the record.

    Example:

    ```python
    civs = keras_drnet.dissect(model, train_ds, class_names=names)
    civs.for_class("cat")["block5_conv3_gate"]  # one layer's importances
    civs.save("civs.npz")
    civs = keras_drnet.CIVs.load("civs.npz")
    ```

    Reference:
        DRNet, sec. 3.1: "we use the average value of CDRPs in one class to
        generate the CIV of that class".
    """

    def __init__(
        self,
        vectors,
        class_names,
        counts,
        layout,
        fingerprint=None,
        config=None,
        top1_changed=None,
    ):
        self.vectors = np.asarray(vectors, dtype="float32")
        self.class_names = [str(name) for name in class_names]
        self.counts = np.asarray(counts, dtype="int64")
        self.top1_changed = np.asarray(
            np.zeros_like(self.counts) if top1_changed is None
            else top1_changed, dtype="int64",
        )
        self.layout = tuple(
            e if isinstance(e, LayoutEntry) else LayoutEntry(*e)
            for e in layout
        )
        self.fingerprint = fingerprint
        self.config = dict(config or {})
        total = sum(entry.channels for entry in self.layout)
        num_classes = len(self.class_names)
        if self.vectors.shape != (num_classes, total):
            raise ValueError(
                f"`vectors` must have shape (num_classes, total_channels) = "
                f"({num_classes}, {total}) from `class_names` and `layout`. "
                f"Received: vectors.shape={self.vectors.shape}"
            )
        for name in ("counts", "top1_changed"):
            shape = getattr(self, name).shape
            if shape != (num_classes,):
                raise ValueError(
                    f"`{name}` must have shape ({num_classes},). Received: "
                    f"{name}.shape={shape}"
                )

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def total_channels(self):
        return self.vectors.shape[1]

    @property
    def missing(self):
        """Names of the classes no image was seen for."""
        return [n for n, c in zip(self.class_names, self.counts) if c == 0]

    def index(self, cls):
        """The row of a class given by name or integer index."""
        if isinstance(cls, (int, np.integer)) and not isinstance(cls, bool):
            if not 0 <= cls < self.num_classes:
                raise ValueError(
                    f"Class index {cls} is out of range: there are "
                    f"{self.num_classes} classes (0 to {self.num_classes - 1})."
                )
            index = int(cls)
        elif isinstance(cls, str):
            if cls not in self.class_names:
                close = difflib.get_close_matches(cls, self.class_names, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"Unknown class name '{cls}'. Known classes: "
                    f"{self.class_names}.{hint}"
                )
            index = self.class_names.index(cls)
        else:
            raise TypeError(
                "A class must be a name (str) or an index (int). "
                f"Received: {cls!r} of type {type(cls).__name__}"
            )
        if self.counts[index] == 0:
            excluded = self.top1_changed[index]
            raise ValueError(
                f"Class '{self.class_names[index]}' has no CIV: "
                + (
                    f"on_top1_change='exclude' left out all {excluded} of its "
                    "images (their fitted gates changed the top-1). Dissect "
                    "with on_top1_change='keep_best'."
                    if excluded
                    else "no image of it was seen during dissection. Dissect "
                    "a dataset that contains it."
                )
            )
        return index

    def for_class(self, cls):
        """A class's CIV split per gate: `{gate name: importances}`."""
        row = self.vectors[self.index(cls)]
        splits = np.cumsum([entry.channels for entry in self.layout])[:-1]
        return dict(
            zip(
                (entry.name for entry in self.layout),
                np.split(row, splits),
            )
        )

    def similarity(self, threshold=0.0):
        """Class-by-class IoU of important-channel sets (paper formula 5).

        A class's important channels are those whose CIV value is above
        `threshold` (paper: 0, i.e. non-zero). Missing classes give NaN rows
        and columns; two classes with no important channel have IoU 0.

        Returns:
            float array `[num_classes, num_classes]`, 1 on the diagonal.
        """
        important = self.vectors > threshold
        inter = important.astype("int64") @ important.T.astype("int64")
        sizes = important.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        np.fill_diagonal(iou, 1.0)
        missing = self.counts == 0
        iou[missing, :] = np.nan
        iou[:, missing] = np.nan
        return iou

    def plot_similarity(self, path=None, threshold=0.0):
        """Heat map of `similarity()` (paper Figure 8).

        Returns the matplotlib figure; also saves it when `path` is given.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        iou = self.similarity(threshold)
        size = max(4.0, 0.5 * self.num_classes + 2)
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        image = ax.imshow(iou, cmap="viridis")
        ticks = np.arange(self.num_classes)
        ax.set_xticks(ticks, self.class_names, rotation=90)
        ax.set_yticks(ticks, self.class_names)
        for i in ticks:
            for j in ticks:
                if i != j and not np.isnan(iou[i, j]):
                    ax.text(j, i, f"{iou[i, j]:.2f}", ha="center",
                            va="center", fontsize=6, color="w")
        ax.set_title(f"IoU of important channels (CIV > {threshold:g})")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig

    def __repr__(self):
        counts = ", ".join(
            f"{n}: {c}" for n, c in zip(self.class_names, self.counts)
        )
        changed = ", ".join(
            f"{n}: {c}"
            for n, c in zip(self.class_names, self.top1_changed)
            if c
        )
        policy = self.config.get("on_top1_change", "reset")
        return (
            f"<CIVs {self.num_classes} classes x {self.total_channels} "
            f"channels in {len(self.layout)} gates; images per class: "
            f"{{{counts}}}; top-1 changed ({policy}): {{{changed}}}>"
        )

    def save(self, path):
        """Saves to a `.npz` file (no pickle)."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            raise ValueError(
                f"CIVs are saved as `.npz`. Received: path={path!r}; use a "
                "path ending in '.npz'."
            )
        metadata = {
            "format_version": _FORMAT_VERSION,
            "class_names": self.class_names,
            "layout": [dataclasses.astuple(entry) for entry in self.layout],
            "fingerprint": self.fingerprint,
            "config": self.config,
            "sha256": _checksum(self.vectors, self.counts, self.top1_changed),
        }
        _atomic_savez(
            path,
            vectors=self.vectors,
            counts=self.counts,
            top1_changed=self.top1_changed,
            metadata=np.array(json.dumps(metadata)),
        )

    @classmethod
    def load(cls, path):
        """Loads CIVs written by `save()`; refuses damaged files."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                vectors = data["vectors"]
                counts = data["counts"]
                top1_changed = data["top1_changed"]
                metadata = json.loads(str(data["metadata"]))
        except FileNotFoundError:
            raise
        except (
            zipfile.BadZipFile,
            ValueError,
            KeyError,
            OSError,
            EOFError,
            NotImplementedError,
        ) as e:
            raise ValueError(
                f"Could not read CIVs from {path!r}: the file is corrupted, "
                f"truncated or not a CIVs file ({type(e).__name__}: {e}). "
                "Re-run `keras_drnet.dissect()` and save again."
            ) from e
        if metadata.get("sha256") != _checksum(vectors, counts, top1_changed):
            raise ValueError(
                f"CIVs file {path!r} is corrupted: its checksum does not "
                "match its contents. Re-run `keras_drnet.dissect()`."
            )
        return cls(
            vectors,
            metadata["class_names"],
            counts,
            metadata["layout"],
            fingerprint=metadata["fingerprint"],
            config=metadata["config"],
            top1_changed=top1_changed,
        )


def _checksum(*arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _atomic_savez(path, **arrays):
    # Write then rename: a kill mid-write never leaves a half file behind.
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def labelled_elements(ds, input_shape, num_classes):
    """`ds` as unbatched `(image, int label)` elements."""
    if isinstance(ds, tuple) and len(ds) == 2:
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


class _Checkpoint:
    """Sums, counts, top-1 changes and position, saved after every batch."""

    def __init__(self, directory, settings):
        self.path = os.path.join(directory, "dissect_state.npz")
        self.settings = settings
        os.makedirs(directory, exist_ok=True)

    def load(self):
        if not os.path.exists(self.path):
            return None
        with np.load(self.path, allow_pickle=False) as data:
            settings = json.loads(str(data["settings"]))
            if settings != self.settings:
                raise ValueError(
                    f"The checkpoint in {os.path.dirname(self.path)!r} was "
                    "made by a dissection with other settings or another "
                    f"model ({settings} vs now {self.settings}). Use another "
                    "`checkpoint_dir` or delete it to start over."
                )
            return (data["sums"], data["counts"], data["changed"],
                    int(data["position"]))

    def save(self, sums, counts, changed, position):
        _atomic_savez(
            self.path,
            sums=sums,
            counts=counts,
            changed=changed,
            position=np.array(position),
            settings=np.array(json.dumps(self.settings)),
        )


def dissect(
    model,
    ds,
    samples_per_class=100,
    class_names=None,
    batch_size=64,
    iterations=30,
    learning_rate=0.1,
    momentum=0.9,
    gamma=0.05,
    clip=(0.0, 10.0),
    on_top1_change="keep_best",
    select="all",
    checkpoint_dir=None,
    strategy=None,
    jit_compile=False,
    verbose=1,
):
    """Dissects a classifier into per-class Channel Importance Vectors.

    Fits the CDRP of the first `samples_per_class` images of every class
    (in dataset order) and averages them per class. CDRPs are summed as they
    come, so memory does not grow with the dataset, and reading stops once
    every class has its images.

    Args:
        model: a Keras classifier (logits or softmax output) that takes the
            images of `ds` as they are: apply your preprocessing (e.g.
            scaling to [0, 1]) to `ds` first.
        ds: a `tf.data.Dataset` of `(image, label)` pairs or batches of them
            (integer or one-hot labels), or a tuple `(images, labels)`.
        samples_per_class: int, or `None` for every image (paper: 100).
        class_names: list of names, one per model output; defaults to
            `["0", "1", ...]`.
        batch_size: int. Images fitted at once.
        iterations, learning_rate, momentum, gamma, clip: fitting
            hyperparameters, defaults from the paper (sec. 4.1); see
            `GateFitter`.
        on_top1_change: for an image whose top-1 the fitted gates change:
            `"keep_best"` (default: its last gates that kept the top-1),
            `"reset"` its gates to 1 (the paper), or `"exclude"` it from its
            class average.
            `CIVs.top1_changed` counts these images per class.
        select: which ReLUs get gates; see `inject_gates()`.
        checkpoint_dir: str or `None`. If set, progress is saved there after
            every batch, and a dissection restarted with the same arguments
            resumes and gives exactly the result of an uninterrupted run
            (the dataset must yield the same order each time).
        strategy: a `tf.distribute.Strategy` spreading each batch over its
            replicas; defaults to the current one.
        jit_compile: bool. Compile the fitting step with XLA.
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
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a `keras.Model`. Received: model of type "
            f"{type(model).__name__}"
        )
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

    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        fitter = GateFitter(
            gated(model, select),
            iterations=iterations,
            learning_rate=learning_rate,
            momentum=momentum,
            gamma=gamma,
            clip=clip,
            on_top1_change=on_top1_change,
        )
    run = BatchFitter(fitter, batch_size, strategy, jit_compile)
    layout = gate_layout(fitter.gated_model)
    fingerprint = model_fingerprint(model)
    # Plain Python numbers: the settings are written as JSON.
    config = {
        "samples_per_class": (
            None if samples_per_class is None else int(samples_per_class)
        ),
        "iterations": fitter.iterations,
        "learning_rate": fitter.learning_rate,
        "momentum": fitter.momentum,
        "gamma": fitter.gamma,
        "clip": list(fitter.clip),
        "on_top1_change": on_top1_change,
        "select": select if isinstance(select, str) else repr(select),
    }

    sums = np.zeros((num_classes, fitter.total_channels), "float64")
    counts = np.zeros(num_classes, "int64")
    changed = np.zeros(num_classes, "int64")
    position = 0
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = _Checkpoint(
            checkpoint_dir,
            dict(config, batch_size=int(batch_size), fingerprint=fingerprint),
        )
        state = checkpoint.load()
        if state is not None:
            sums, counts, changed, position = state

    limit = samples_per_class
    target = None if limit is None else limit * num_classes
    progress = Progress(target, verbose)
    progress.add(int(counts.sum()))
    # Images taken so far (a resumed run skips them), excluded ones too.
    selected = counts + (changed if on_top1_change == "exclude" else 0)
    images, labels = [], []

    def flush():
        cdrps, top1_changed = run(np.stack(images))
        batch_labels = np.asarray(labels)
        used = ~np.isnan(cdrps).any(axis=1)  # "exclude" gives NaN rows
        np.add.at(sums, batch_labels[used], cdrps[used].astype("float64"))
        counts[:] += np.bincount(batch_labels[used], minlength=num_classes)
        changed[:] += np.bincount(
            batch_labels[top1_changed], minlength=num_classes
        )
        if checkpoint is not None:
            checkpoint.save(sums, counts, changed, position)
        progress.add(len(images))
        images.clear()
        labels.clear()

    for image, label in elements.skip(position).as_numpy_iterator():
        if limit is not None and selected.min() >= limit:
            break
        position += 1
        label = int(label)
        if not 0 <= label < num_classes:
            raise ValueError(
                f"Label {label} of dataset element {position - 1} is out of "
                f"range for a model with {num_classes} outputs (0 to "
                f"{num_classes - 1}). Map labels to class indices first."
            )
        if limit is not None and selected[label] >= limit:
            continue
        selected[label] += 1
        images.append(image.astype(dtype, copy=False))
        labels.append(label)
        if len(images) == run.batch_size:
            flush()
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
    if civs.missing:
        warnings.warn(
            f"No image was averaged for classes {civs.missing} (none was "
            "found, or `on_top1_change='exclude'` excluded them all): their "
            "CIVs are missing (NaN) and sub-tasks cannot use them.",
            stacklevel=2,
        )
    return civs
