"""Where the budget goes: per-gate channel fractions under a size budget.

One fraction for every gate spends a network's parameters where its
channels are expensive: in a CIFAR VGG16 the last six convolutions hold
~95% of the weights, so 33% of every layer's channels is ~11% of the
parameters, most of it cut from the early layers that cost nothing.
`allocate_budget` gives each gate a fraction that falls with what one of
its channels costs (the parameters, or multiply-accumulates, that removing
it saves, measured on the network's own graph), scaled so that the whole
sub-task meets a parameter or FLOP budget.
"""

import numpy as np

from keras_drnet.batching import is_number
from keras_drnet.graph import running_costs
from keras_drnet.model_surgery import gated_copy
from keras_drnet.model_surgery import list_gates
from keras_drnet.model_surgery import split_softmax
from keras_drnet.reconstruction import combine
from keras_drnet.reconstruction import resolve_classes

# Chosen on the CIFAR-10 VGG16 w0.5 (docs/results.md): 0 is one fraction
# for every gate.
EXPONENT = 2.0


def allocate_budget(
    model, civs, classes, max_params=None, max_flops=None, exponent=EXPONENT
):
    """Per-gate channel fractions for a sub-task of a given size.

    Gate `g` keeps the fraction `f_g = clip(s * (c_g / c)^-exponent,
    1 / width_g, 1)` of its channels (its highest-scoring ones, as
    `budget_scope="gate"` does), where `c_g` is what one of its channels
    costs (parameters or MACs that run only for it, measured by closing half
    of the gate in `model`'s graph), `c` the geometric mean of the `c_g`,
    and the scale `s` is the largest (found by bisection) for which the
    sub-task's running parameters (or FLOPs) stay within the budget.
    `exponent=0` is one fraction for every gate; larger values keep more of
    the cheap layers and less of the expensive ones.

    Args:
        model: the classifier `civs` were dissected from; not modified.
        civs: `keras_drnet.CIVs` of `model`.
        classes: list of class names or indices.
        max_params: float in (0, 1]. Running parameters, as a fraction of
            the model's.
        max_flops: float in (0, 1]. Running multiply-accumulates per image,
            as a fraction of the model's (instead of `max_params`).
        exponent: float >= 0. How fast the fraction falls with the cost.

    Returns:
        A list of fractions, one per gate (`keras_drnet.list_gates` order),
        to pass as `budget=` to `keras_drnet.subtask()` or `combine()`.

    Example:

    ```python
    fractions = keras_drnet.allocate_budget(model, civs, ["cat", "dog"],
                                            max_params=0.1)
    sub = keras_drnet.subtask(model, civs, ["cat", "dog"], budget=fractions)
    ```
    """
    if (max_params is None) == (max_flops is None):
        raise ValueError(
            "Pass exactly one of `max_params` or `max_flops` (a fraction of "
            f"the model's, e.g. 0.1). Received: max_params={max_params!r}, "
            f"max_flops={max_flops!r}"
        )
    limit = max_params if max_flops is None else max_flops
    name = "max_params" if max_flops is None else "max_flops"
    if not (is_number(limit) and 0 < limit <= 1):
        raise ValueError(
            f"`{name}` is a fraction of the model's size, a number in "
            f"(0, 1]. Received: {name}={limit!r}"
        )
    if not (is_number(exponent) and np.isfinite(exponent) and exponent >= 0):
        raise ValueError(
            f"`exponent` must be a finite number >= 0. Received: "
            f"exponent={exponent!r}"
        )
    indices = resolve_classes(civs, classes)
    size = _Size(model, civs, indices, flops=max_flops is not None)
    widths = np.array([entry.channels for entry in civs.layout], float)
    full = size([1.0] * len(widths))
    costs = np.empty(len(widths))
    for g, width in enumerate(widths):
        fractions = [1.0] * len(widths)
        fractions[g] = 0.5
        removed = width - max(1, round(0.5 * width))
        costs[g] = (full - size(fractions)) / max(removed, 1)
    # A gate whose channels cost nothing (unread) keeps what the others do.
    costs = np.where(costs > 0, costs, np.nan)
    relative = costs / np.exp(np.nanmean(np.log(costs)))
    relative = np.where(np.isnan(relative), 1.0, relative)

    def fractions_at(scale):
        return list(np.clip(scale * relative ** -exponent, 1 / widths, 1.0))

    # The size grows with the scale: bisect log(scale) for the budget.
    low, high = np.log(1e-4), np.log(relative.max() ** exponent + 1.0)
    if size(fractions_at(np.exp(high))) <= limit * size.total:
        return [float(f) for f in fractions_at(np.exp(high))]
    for _ in range(24):  # log-scale: ~1e-6 relative
        middle = (low + high) / 2
        if size(fractions_at(np.exp(middle))) <= limit * size.total:
            low = middle
        else:
            high = middle
    return [float(f) for f in fractions_at(np.exp(low))]


class _Size:
    """Running parameters (or MACs) of a sub-task for per-gate fractions."""

    def __init__(self, model, civs, indices, flops):
        gated_model = gated_copy(model, civs)
        self.logits, _ = split_softmax(gated_model)
        self.gates = [spec.layer for spec in list_gates(gated_model)]
        self.civs, self.indices, self.flops = civs, indices, flops
        self.output_mask = np.zeros(civs.num_classes, bool)
        self.output_mask[list(indices)] = True
        costs = running_costs(self.logits)
        self.total = sum(c.macs if flops else c.params for c in costs)

    def __call__(self, fractions):
        cciv = combine(self.civs, list(self.indices), budget=list(fractions))
        for gate, mask in zip(self.gates, cciv.per_gate().values()):
            gate.set_gate(mask)
        costs = running_costs(self.logits, self.output_mask)
        return sum(
            c.running_macs if self.flops else c.running_params for c in costs
        )
