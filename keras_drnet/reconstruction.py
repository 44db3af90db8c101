"""CIVs of a sub-task's classes -> one 0/1 vector of channels to run (CCIV)."""

import dataclasses
import warnings

import numpy as np

from keras_drnet.civ import CIVs
from keras_drnet.selection import as_selection


@dataclasses.dataclass(frozen=True)
class CCIV:
    """A Combined Channel Importance Vector: which channels a sub-task runs.

    Attributes:
        mask: float32 0/1 array over all gated channels, in `layout` order.
        layout: tuple of `LayoutEntry` (gate path, source, channels).
        classes: indices of the sub-task's classes.
        method: `"union"` or `"xor"`.
        threshold: the threshold applied to the scores (chosen by the
            budget when one was given).
        scores: the per-channel scores the threshold was applied to.
    """

    mask: np.ndarray
    layout: tuple
    classes: tuple
    method: str
    threshold: float
    scores: np.ndarray

    def __array__(self, dtype=None, copy=None):
        return self.mask if dtype is None else self.mask.astype(dtype)

    @property
    def kept_fraction(self):
        return float(self.mask.mean())

    def per_gate(self):
        """`{gate name: 0/1 mask}`, one array per gate."""
        splits = np.cumsum([entry.channels for entry in self.layout])[:-1]
        names = [entry.name for entry in self.layout]
        return dict(zip(names, np.split(self.mask, splits)))


def resolve_classes(civs, classes):
    """Validated class indices, in the given order, from names or indices."""
    if isinstance(classes, (str, int, np.integer)):
        raise TypeError(
            "`classes` must be a list of class names or indices, e.g. "
            f"['cat', 'dog']. Received: classes={classes!r}"
        )
    classes = list(classes)
    if not classes:
        raise ValueError(
            "`classes` is empty: a sub-task needs at least one class. "
            f"Known classes: {civs.class_names}"
        )
    indices = [civs.index(cls) for cls in classes]
    if len(set(indices)) != len(indices):
        seen, duplicates = set(), []
        for cls, index in zip(classes, indices):
            if index in seen:
                duplicates.append(cls)
            seen.add(index)
        raise ValueError(
            f"`classes` names the same class more than once: {duplicates}. "
            f"Received: classes={classes}"
        )
    subtask = civs.subtask_classes
    if subtask and sorted(indices) != civs.config["classes"]:
        raise ValueError(
            f"These CIVs were dissected for the sub-task {subtask} (`dissect("
            "..., classes=...)`): they rank channels for telling those "
            "classes apart, not for a sub-task of some of them. Dissect "
            f"with these classes, or without `classes`. Received: "
            f"classes={classes}"
        )
    return tuple(indices)


def combine(
    civs,
    classes,
    method=None,
    threshold=None,
    budget=None,
    empty_gates=None,
    budget_scope=None,
    selection=None,
):
    """Combines the CIVs of `classes` into a CCIV.

    How channels are chosen is a `keras_drnet.Selection`: pass one as
    `selection=`, or its fields as keywords (`method`, `threshold` or
    `budget`, `budget_scope`, `empty_gates`); see `Selection` for what each
    does and its defaults.

    Args:
        civs: `keras_drnet.CIVs`.
        classes: list of class names or indices.
        method, threshold, budget, empty_gates, budget_scope: the fields of
            a `Selection`.
        selection: a `Selection`, instead of the keywords.

    Returns:
        `CCIV`.

    Example:

    ```python
    cciv = keras_drnet.combine(civs, ["cat", "dog"], threshold=6e-3)
    cciv.kept_fraction
    ```
    """
    if not isinstance(civs, CIVs):
        raise TypeError(
            "`civs` must be `keras_drnet.CIVs` (from `keras_drnet.dissect()` "
            f"or `CIVs.load()`). Received: {type(civs).__name__}"
        )
    selection = as_selection(
        selection, method=method, threshold=threshold, budget=budget,
        empty_gates=empty_gates, budget_scope=budget_scope,
    )
    selection.check_layout(civs.layout)
    indices = resolve_classes(civs, classes)
    vectors = civs.vectors[list(indices)]
    if selection.method == "union":
        scores = vectors.max(axis=0)
    else:
        if len(indices) != 2:
            raise ValueError(
                "`method='xor'` (soft XOR, paper formula 4) combines exactly "
                f"two classes. Received: {len(indices)} classes "
                f"{list(classes)}; use method='union' for other counts."
            )
        scores = np.abs(vectors[0] - vectors[1])
    mask = np.asarray(selection.mask(scores, civs.layout), "float32")
    threshold = selection.threshold
    if threshold is None:
        # The threshold the budget amounts to, before the empty-gate rule.
        budgeted = dataclasses.replace(selection, empty_gates="allow")
        kept = np.asarray(budgeted.mask(scores, civs.layout)) > 0
        threshold = float(scores[kept].min())
    elif selection.method == "union":
        _warn_if_resets_open_everything(civs, indices, threshold)
    return CCIV(
        mask=mask,
        layout=tuple(civs.layout),
        classes=indices,
        method=selection.method,
        threshold=float(threshold),
        scores=scores,
    )


def _warn_if_resets_open_everything(civs, indices, threshold):
    # A reset image adds 1/count to every channel of its class's CIV.
    if civs.config.get("on_top1_change", "reset") != "reset":
        return
    for index in indices:
        floor = civs.top1_changed[index] / max(civs.counts[index], 1)
        if civs.top1_changed[index] and threshold <= floor:
            name = civs.class_names[index]
            warnings.warn(
                f"{civs.top1_changed[index]} of the {civs.counts[index]} "
                f"images of class '{name}' were reset to all-ones gates (the "
                f"paper's top-1 guard), which adds {floor:.3g} to every "
                f"channel of its CIV: threshold={threshold:g} keeps every "
                "channel. Dissect with `on_top1_change='keep_best'` or "
                f"'exclude', or use a threshold above {floor:.3g} or a "
                "`budget`.",
                stacklevel=3,
            )
