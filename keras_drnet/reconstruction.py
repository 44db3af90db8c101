"""CIVs of a sub-task's classes -> one 0/1 vector of channels to run (CCIV)."""

import dataclasses
import math
import warnings

import numpy as np

from keras_drnet.batching import is_number
from keras_drnet.civ import CIVs

_METHODS = ("union", "xor")
_EMPTY_GATES = ("keep_best", "allow")
_BUDGET_SCOPES = ("model", "gate")


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
    return tuple(indices)


def combine(
    civs,
    classes,
    method="union",
    threshold=None,
    budget=None,
    empty_gates="keep_best",
    budget_scope="model",
):
    """Combines the CIVs of `classes` into a CCIV.

    - `"union"` (paper formula 3): channel j runs iff
      `max_c civs[c, j] >= threshold`.
    - `"xor"` (formula 4, two classes only): channel j runs iff
      `|civs[a, j] - civs[b, j]| >= threshold`.

    Instead of a threshold, `budget` keeps that fraction of all gated
    channels: the `round(budget * total)` highest scores (ties broken by
    channel order), which is the threshold that meets the budget. With
    `budget_scope="gate"`, every gate keeps that fraction of its own
    channels instead (at least one): scores are only compared within a
    layer, so layers whose importances are low overall (often the last
    ones) are not starved by the others.

    A gate whose channels would all be switched off makes every layer after
    it see a constant, so by default (`empty_gates="keep_best"`) such a gate
    keeps its single highest-scoring channel, which can add at most one
    channel per gate to the count the threshold or budget gives.
    `empty_gates="allow"` keeps the paper's semantics exactly.

    Args:
        civs: `keras_drnet.CIVs`.
        classes: list of class names or indices.
        method: `"union"` or `"xor"`.
        threshold: float, the paper's `union_thr` / `xor_thr`.
        budget: float in (0, 1], fraction of channels to keep; or a list
            of such fractions, one per gate (per-gate budgets, e.g. from
            `keras_drnet.allocate_budget()`).
        empty_gates: `"keep_best"` or `"allow"`.
        budget_scope: `"model"` (one ranking over all channels) or
            `"gate"` (the fraction of every gate's channels).

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
    if method not in _METHODS:
        raise ValueError(
            f"`method` must be one of {list(_METHODS)}. "
            f"Received: method={method!r}"
        )
    if empty_gates not in _EMPTY_GATES:
        raise ValueError(
            f"`empty_gates` must be one of {list(_EMPTY_GATES)}. "
            f"Received: empty_gates={empty_gates!r}"
        )
    if (threshold is None) == (budget is None):
        raise ValueError(
            "Pass exactly one of `threshold` (e.g. the paper's union_thr "
            "6e-3) or `budget` (fraction of channels to keep, e.g. 0.3). "
            f"Received: threshold={threshold!r}, budget={budget!r}"
        )
    if budget_scope not in _BUDGET_SCOPES:
        raise ValueError(
            f"`budget_scope` must be one of {list(_BUDGET_SCOPES)}. "
            f"Received: budget_scope={budget_scope!r}"
        )
    if budget is not None:
        fractions = _checked_budget(budget, civs.layout)
    if threshold is not None and not (
        is_number(threshold) and math.isfinite(threshold) and threshold >= 0
    ):
        raise ValueError(
            "`threshold` must be a finite number >= 0 (e.g. the paper's "
            f"union_thr 6e-3). Received: threshold={threshold!r}"
        )
    indices = resolve_classes(civs, classes)
    vectors = civs.vectors[list(indices)]
    if method == "union":
        scores = vectors.max(axis=0)
    else:
        if len(indices) != 2:
            raise ValueError(
                "`method='xor'` (soft XOR, paper formula 4) combines exactly "
                f"two classes. Received: {len(indices)} classes "
                f"{list(classes)}; use method='union' for other counts."
            )
        scores = np.abs(vectors[0] - vectors[1])
    if budget is not None:
        mask = np.zeros(scores.size, "float32")
        per_gate = budget_scope == "gate" or len(fractions) > 1
        spans = gate_spans(civs.layout) if per_gate else [(0, scores.size)]
        if len(fractions) == 1:
            fractions = fractions * len(spans)
        for (start, stop), fraction in zip(spans, fractions):
            part = scores[start:stop]
            keep = max(1, int(round(fraction * part.size)))
            order = np.argsort(-part, kind="stable")
            mask[start + order[:keep]] = 1.0
        threshold = float(scores[mask > 0].min())
    else:
        mask = (scores >= threshold).astype("float32")
        if method == "union":
            _warn_if_resets_open_everything(civs, indices, threshold)
    if empty_gates == "keep_best":
        for start, stop in gate_spans(civs.layout):
            if not mask[start:stop].any():
                mask[start + int(np.argmax(scores[start:stop]))] = 1.0
    return CCIV(
        mask=mask,
        layout=tuple(civs.layout),
        classes=indices,
        method=method,
        threshold=float(threshold),
        scores=scores,
    )


def _checked_budget(budget, layout):
    """`budget` as a list of fractions: one, or one per gate."""
    many = isinstance(budget, (list, tuple, np.ndarray))
    fractions = list(np.asarray(budget).ravel()) if many else [budget]
    if many and len(fractions) != len(layout):
        raise ValueError(
            "A `budget` list gives one fraction per gate, in the order of "
            f"`keras_drnet.list_gates` ({len(layout)} gates here). Received: "
            f"{len(fractions)} values"
        )
    for value in fractions:
        if not (is_number(value) and 0 < value <= 1):
            raise ValueError(
                "`budget` is the fraction of channels to keep, a number in "
                "(0, 1] (or a list of them, one per gate). Received: "
                f"budget={budget!r}"
            )
    return [float(v) for v in fractions]


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


def gate_spans(layout):
    stops = np.cumsum([entry.channels for entry in layout])
    return list(zip(stops - [entry.channels for entry in layout], stops))
