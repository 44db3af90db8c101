"""Channel Importance Vectors: per-class mean channel scores, saved and loaded."""

import dataclasses
import difflib
import hashlib
import json
import math
import os
import tempfile
import zipfile

import numpy as np


# 3: the checksum also covers the metadata; 2: it covers the arrays only.
_FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, 3)


@dataclasses.dataclass(frozen=True)
class LayoutEntry:
    """One gate's slice of a CIV: gate path, source layer, channel count."""

    name: str
    source: str
    channels: int


def gate_layout(gated_model):
    """The CIV layout of a gated model, in `list_gates()` order."""
    # Imported here: reading a CIVs file needs neither Keras nor TensorFlow
    # (the command line checks class names before loading the model).
    from keras_drnet.model_surgery import list_gates

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
    import keras

    from keras_drnet.model_surgery import list_gates

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

    `vectors[c]` is the mean channel score of the images of class `c` used
    in the dissection (their CDRPs with the paper's method, "cdrp";
    `config["method"]` says which); the channels follow `layout` (gate
    after gate, in the gated model's topological order). A class for which no image was seen is
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
    def subtask_classes(self):
        """Names of the one sub-task's classes these CIVs were dissected
        for (`dissect(..., classes=...)`), or `None` (every class)."""
        indices = self.config.get("classes")
        if indices is None:
            return None
        return [self.class_names[i] for i in indices]

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
        subtask = self.subtask_classes
        if self.counts[index] == 0 and subtask and (
            self.class_names[index] not in subtask
        ):
            raise ValueError(
                f"Class '{self.class_names[index]}' has no CIV: these CIVs "
                f"were dissected for the sub-task {subtask} only "
                "(`dissect(..., classes=...)`). Dissect without `classes` "
                "for other sub-tasks."
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

    def similarity(self, budget=None, threshold=None):
        """Class-by-class IoU of the channels each class uses (paper
        formula 5).

        By default a class's channels are the ones its one-class sub-task
        keeps at `budget` (the top third of every gate's channels by its
        CIV, as `keras_drnet.Selection(budget=...)` picks them), so the IoU
        says how much of their sub-networks two classes share. With
        `threshold` they are the paper's: the channels whose CIV is above
        it (paper: 0, i.e. non-zero). The paper's sets saturate on the
        models people have: on the CIFAR-10 VGG16 w0.5 every class uses
        almost every channel (IoU 0.99-1.00 for every pair), where the
        budget's sets range from 0.15 (frog-truck) to 0.57 (cat-dog).

        Missing classes give NaN rows and columns; two classes with no
        channel have IoU 0.

        Args:
            budget: float in (0, 1], the fraction of each gate's channels a
                class keeps. Defaults to 1/3 (the README's budget).
            threshold: float, instead of `budget`: the paper's sets.

        Returns:
            float array `[num_classes, num_classes]`, 1 on the diagonal.

        Example:

        ```python
        iou = civs.similarity()  # top third of each gate
        paper = civs.similarity(threshold=0.0)
        ```
        """
        used = self._used_channels(budget, threshold)
        inter = used.astype("int64") @ used.T.astype("int64")
        sizes = used.sum(axis=1)
        union = sizes[:, None] + sizes[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        np.fill_diagonal(iou, 1.0)
        missing = self.counts == 0
        iou[missing, :] = np.nan
        iou[:, missing] = np.nan
        return iou

    def _used_channels(self, budget, threshold):
        """`[num_classes, total_channels]` bools: the channels of each
        class that `similarity` compares."""
        if budget is not None and threshold is not None:
            raise ValueError(
                "Pass `budget` or `threshold`, not both. Received: "
                f"budget={budget}, threshold={threshold}"
            )
        if threshold is not None:
            return self.vectors > threshold
        from keras_drnet.selection import Selection

        selection = Selection(budget=1 / 3 if budget is None else budget,
                              empty_gates="allow")
        used = np.zeros(self.vectors.shape, bool)
        for i, vector in enumerate(self.vectors):
            if self.counts[i]:
                used[i] = np.asarray(selection.mask(vector, self.layout)) > 0
        return used

    def plot_similarity(self, path=None, budget=None, threshold=None):
        """Heat map of `similarity()` (paper Figure 8).

        The colour scale spans the off-diagonal values, so that classes
        stand apart however much they share.

        Returns the matplotlib figure; also saves it when `path` is given.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        iou = self.similarity(budget, threshold)
        off = iou[~np.eye(self.num_classes, dtype=bool)]
        off = off[~np.isnan(off)]
        low = float(off.min()) if off.size else 0.0
        size = max(4.0, 0.5 * self.num_classes + 2)
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        high = float(off.max()) if off.size else 1.0
        image = ax.imshow(iou, cmap="viridis", vmin=low, vmax=high)
        ticks = np.arange(self.num_classes)
        ax.set_xticks(ticks, self.class_names, rotation=90)
        ax.set_yticks(ticks, self.class_names)
        digits = 3 if off.size and off.max() - low < 0.05 else 2
        for i in ticks:
            for j in ticks:
                if not np.isnan(iou[i, j]):
                    bright = iou[i, j] - low > 0.6 * (high - low)
                    ax.text(j, i, f"{iou[i, j]:.{digits}f}", ha="center",
                            va="center", fontsize=6,
                            color="k" if bright else "w")
        if threshold is not None:
            what = f"CIV > {threshold:g}"
        else:
            what = f"top {1 / 3 if budget is None else budget:.0%} of each gate"
        ax.set_title(f"IoU of the channels each class uses ({what})",
                     fontsize=9)
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
        method = self.config.get("method", "cdrp")
        if self.subtask_classes:
            method += f", for the sub-task {self.subtask_classes}"
        text = (
            f"<CIVs ({method}) {self.num_classes} classes x "
            f"{self.total_channels} channels in {len(self.layout)} gates; "
            f"images per class: {{{counts}}}"
        )
        if method != "cdrp":
            return text + ">"
        policy = self.config.get("on_top1_change", "reset")
        return text + f"; top-1 changed ({policy}): {{{changed}}}>"

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
        }
        metadata["sha256"] = _checksum(
            self.vectors, self.counts, self.top1_changed, metadata=metadata
        )
        atomic_savez(
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
                for name in _ARRAYS:
                    _check_stored_size(data, name)
                vectors = data["vectors"]
                counts = data["counts"]
                top1_changed = data["top1_changed"]
                metadata = json.loads(str(data["metadata"]))
            if not isinstance(metadata, dict):
                raise ValueError("its metadata is not a JSON object")
            missing = [k for k in _METADATA_KEYS if k not in metadata]
            if missing:
                raise ValueError(f"its metadata lacks {missing}")
        except FileNotFoundError:
            raise
        except (
            zipfile.BadZipFile,
            ValueError,
            KeyError,
            OSError,
            EOFError,
            NotImplementedError,
            RecursionError,  # deeply nested JSON
            MemoryError,
        ) as e:
            raise ValueError(
                f"Could not read CIVs from {path!r}: the file is corrupted, "
                f"truncated or not a CIVs file ({type(e).__name__}: "
                f"{str(e)[:200]}). Re-run `keras_drnet.dissect()` and save "
                "again."
            ) from None
        version = metadata.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(
                f"CIVs file {path!r} has format_version {version!r}; this "
                f"keras_drnet reads versions {list(_READABLE_VERSIONS)}. Use "
                "the keras_drnet that wrote it, or re-run "
                "`keras_drnet.dissect()`."
            )
        covered = metadata if version >= 3 else None
        expected = _checksum(vectors, counts, top1_changed, metadata=covered)
        if metadata.get("sha256") != expected:
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


_ARRAYS = ("vectors", "counts", "top1_changed", "metadata")
_METADATA_KEYS = ("format_version", "class_names", "layout", "fingerprint",
                  "config")


def _check_stored_size(data, name):
    """Refuses an array whose header claims more data than the file holds,
    before anything is allocated for it."""
    member = data.zip.getinfo(f"{name}.npy")
    with data.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"'{name}' has .npy format version {version}")
        shape, _, dtype = readers[version](f)
    if dtype.hasobject:
        raise ValueError(f"'{name}' holds Python objects")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > member.file_size:
        raise ValueError(
            f"'{name}' claims shape {shape} ({claimed:,} bytes) but the file "
            f"holds {member.file_size:,}"
        )


def _checksum(*arrays, metadata=None):
    """SHA-256 of the arrays and of every metadata field but the checksum."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    if metadata is not None:
        fields = {k: v for k, v in metadata.items() if k != "sha256"}
        digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def atomic_savez(path, **arrays):
    # Write then rename: a kill mid-write never leaves a half file behind;
    # a unique temporary name, so that two writers never share one.
    handle, tmp = tempfile.mkstemp(
        suffix=".tmp.npz", dir=os.path.dirname(os.path.abspath(path))
    )
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **arrays)
        # `mkstemp` creates the file 0600; give it the mode any other output
        # gets (0666 less the umask), so that others can read it as usual.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


