"""Hand-made CIVs of 5 classes over 3 gates (3, 4 and 5 channels), with
values exact in binary so that ties with a threshold are exact; shared by
the reconstruction and selection tests."""

import numpy as np

import keras_drnet as kd
from keras_drnet.civ import LayoutEntry

NAMES = ["cat", "dog", "bird", "frog", "ship"]
LAYOUT = (
    LayoutEntry("conv1_gate", "conv1", 3),
    LayoutEntry("conv2_gate", "conv2", 4),
    LayoutEntry("fc1_gate", "fc1", 5),
)
TOTAL = 12
SIZES = [3, 4, 5]


def make_civs(vectors=None, counts=None, rng=None):
    if vectors is None:
        rng = rng or np.random.default_rng(0)
        # Multiples of 1/16 in [0, 1]: exact, with many ties.
        vectors = rng.integers(0, 17, (len(NAMES), TOTAL)) / 16.0
    if counts is None:
        counts = [4] * len(NAMES)
    return kd.CIVs(vectors, NAMES, counts, LAYOUT, "fp", {})


def gate_slices():
    stops = np.cumsum(SIZES)
    return [slice(stop - size, stop) for size, stop in zip(SIZES, stops)]


def nonempty_per_gate(mask):
    return all(mask[s].any() for s in gate_slices())


def expected_budget_mask(scores, budget):
    keep = int(round(budget * scores.size))
    order = sorted(range(scores.size), key=lambda j: (-scores[j], j))
    mask = np.zeros(scores.size, "float32")
    mask[order[:keep]] = 1.0
    return mask
