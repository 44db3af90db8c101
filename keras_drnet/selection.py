"""`Selection`: how a sub-task's channels are chosen from its CIV scores.

One validated, serialisable object for the settings that `combine`,
`SubtaskModel`, `subtask` and `export_dynamic` share, and one function,
written with `keras.ops`, that turns per-channel scores into the 0/1 mask:
`combine` calls it on NumPy scores, `export_dynamic`'s SavedModel calls it
inside its graph, so the two cannot disagree.
"""

import dataclasses
import math

import numpy as np
from keras import ops

from keras_drnet.batching import is_number

METHODS = ("union", "xor")
EMPTY_GATES = ("keep_best", "allow")
BUDGET_SCOPES = ("gate", "model")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which channels a sub-task keeps, given its classes' CIVs.

    - `method="union"` (paper formula 3): channel j's score is
      `max_c civs[c, j]` over the sub-task's classes; `"xor"` (formula 4,
      two classes) is `|civs[a, j] - civs[b, j]|`.
    - Exactly one of `threshold` (keep scores `>= threshold`) or `budget`
      (keep that fraction of the channels, the highest scores; ties go to
      the lower channel index). With `budget_scope="gate"` (the default)
      every gate keeps that fraction of its own channels, at least one;
      `"model"` ranks all channels together. A list of fractions, one per
      gate (e.g. from `keras_drnet.allocate_budget()`), is always per gate.
    - `empty_gates="keep_best"` (default): a gate left with no channel
      keeps its highest-scoring one, since every layer after a closed gate
      sees a constant; `"allow"` is the paper's semantics exactly.

    Why `"gate"`: CIV magnitudes differ from layer to layer (on the CIFAR
    VGG16 w0.5 the first blocks score 4x the last ones), so one ranking
    over the whole model fills a budget with early channels and leaves the
    later gates one channel each: 25% of the channels ran 5% of the
    parameters at chance accuracy (BUILD_NOTES.md).

    Args:
        method: `"union"` or `"xor"`.
        threshold: float >= 0, the paper's `union_thr` / `xor_thr`.
        budget: float in (0, 1], or a list of them, one per gate.
        budget_scope: `"gate"` or `"model"`.
        empty_gates: `"keep_best"` or `"allow"`.

    Example:

    ```python
    selection = keras_drnet.Selection(budget=0.33)
    sub = keras_drnet.subtask(model, civs, ["cat", "dog"],
                              selection=selection)
    sub.set_classes(["airplane", "truck"])  # the same selection
    ```
    """

    method: str = "union"
    threshold: float = None
    budget: object = None
    budget_scope: str = "gate"
    empty_gates: str = "keep_best"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"`method` must be one of {list(METHODS)}. "
                f"Received: method={self.method!r}"
            )
        if self.empty_gates not in EMPTY_GATES:
            raise ValueError(
                f"`empty_gates` must be one of {list(EMPTY_GATES)}. "
                f"Received: empty_gates={self.empty_gates!r}"
            )
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(
                f"`budget_scope` must be one of {list(BUDGET_SCOPES)}. "
                f"Received: budget_scope={self.budget_scope!r}"
            )
        if (self.threshold is None) == (self.budget is None):
            raise ValueError(
                "Pass exactly one of `threshold` (e.g. the paper's union_thr "
                "6e-3) or `budget` (fraction of channels to keep, e.g. 0.3). "
                f"Received: threshold={self.threshold!r}, "
                f"budget={self.budget!r}"
            )
        if self.threshold is not None:
            if not (
                is_number(self.threshold)
                and math.isfinite(self.threshold)
                and self.threshold >= 0
            ):
                raise ValueError(
                    "`threshold` must be a finite number >= 0 (e.g. the "
                    "paper's union_thr 6e-3). Received: "
                    f"threshold={self.threshold!r}"
                )
            object.__setattr__(self, "threshold", float(self.threshold))
        else:
            object.__setattr__(self, "budget", _checked_budget(self.budget))

    @property
    def per_gate(self):
        """Whether the budget is spent gate by gate."""
        return self.budget_scope == "gate" or isinstance(self.budget, tuple)

    def replace(self, **changes):
        """A copy with `changes`; `None` keeps a value, and a new
        `threshold` replaces the budget (and vice versa)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "threshold" in changes:
            changes.setdefault("budget", None)
        elif "budget" in changes:
            changes["threshold"] = None
        return dataclasses.replace(self, **changes)

    def get_config(self):
        budget = self.budget
        return {
            "method": self.method,
            "threshold": self.threshold,
            "budget": list(budget) if isinstance(budget, tuple) else budget,
            "budget_scope": self.budget_scope,
            "empty_gates": self.empty_gates,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def check_layout(self, layout):
        """Refuses a per-gate budget list of the wrong length."""
        if isinstance(self.budget, tuple) and len(self.budget) != len(layout):
            raise ValueError(
                "A `budget` list gives one fraction per gate, in the order of "
                f"`keras_drnet.list_gates` ({len(layout)} gates here). "
                f"Received: {len(self.budget)} values"
            )

    def mask(self, scores, layout):
        """The 0/1 float32 mask over all channels for per-channel `scores`.

        Written with `keras.ops`: NumPy scores in, a tensor out, and the
        same code runs inside a traced function.
        """
        self.check_layout(layout)
        spans = gate_spans(layout)
        scores = ops.convert_to_tensor(scores, "float32")
        if self.budget is not None:
            budget_spans = spans if self.per_gate else [(0, spans[-1][1])]
            fractions = (
                self.budget
                if isinstance(self.budget, tuple)
                else [self.budget] * len(budget_spans)
            )
            mask = ops.concatenate(
                [
                    _top(scores[a:b], max(1, int(round(f * (b - a)))))
                    for (a, b), f in zip(budget_spans, fractions)
                ]
            )
        else:
            mask = ops.cast(ops.greater_equal(scores, self.threshold),
                            "float32")
        if self.empty_gates == "keep_best":
            mask = ops.concatenate(
                [
                    ops.where(
                        ops.any(mask[a:b] > 0), mask[a:b],
                        _top(scores[a:b], 1),
                    )
                    for a, b in spans
                ]
            )
        return mask


def _top(part, count):
    """0/1 over `part`: its `count` highest entries."""
    # `top_k` puts the lower index first among equal values, as a stable
    # sort of the negated scores would.
    _, order = ops.top_k(part, count)
    return ops.scatter(
        ops.expand_dims(order, 1), ops.ones((count,), "float32"),
        (part.shape[0],),
    )


def _checked_budget(budget):
    """`budget` as a float, or a tuple of floats (one per gate)."""
    many = isinstance(budget, (list, tuple, np.ndarray))
    values = list(np.asarray(budget).ravel()) if many else [budget]
    for value in values:
        if not (is_number(value) and 0 < value <= 1):
            raise ValueError(
                "`budget` is the fraction of channels to keep, a number in "
                "(0, 1] (or a list of them, one per gate). Received: "
                f"budget={budget!r}"
            )
    values = tuple(float(v) for v in values)
    return values if many else values[0]


def gate_spans(layout):
    """`(start, stop)` of each gate's channels in the CIV layout."""
    stops = np.cumsum([entry.channels for entry in layout])
    return list(zip(stops - [entry.channels for entry in layout], stops))


def as_selection(selection=None, **settings):
    """`selection`, or a `Selection` of the keyword `settings` given (not
    `None`); both at once is refused, since one would silently lose."""
    given = {k: v for k, v in settings.items() if v is not None}
    if selection is None:
        return Selection(**given)
    if not isinstance(selection, Selection):
        raise TypeError(
            "`selection` must be a `keras_drnet.Selection`. Received: "
            f"selection={selection!r}"
        )
    if given:
        raise ValueError(
            "Pass the sub-task's settings either as `selection=` or as "
            f"keywords, not both. Received: selection={selection}, and "
            + ", ".join(f"{k}={v!r}" for k, v in given.items())
        )
    return selection
