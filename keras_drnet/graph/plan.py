"""The channel plan: which channels of every tensor a compact model keeps."""

import collections

import keras
import numpy as np

from keras_drnet.graph.flow import ChannelFlow
from keras_drnet.graph.kinds import DENSE
from keras_drnet.graph.kinds import FLATTEN
from keras_drnet.graph.kinds import Channelwise
from keras_drnet.graph.kinds import Gate


class _Groups:
    """Union-find over tensors that must keep the same channels."""

    def __init__(self):
        self.parent = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, *keys):
        roots = [self.find(k) for k in keys]
        for root in roots[1:]:
            self.parent[root] = roots[0]


class ChannelPlan:
    """Kept channels per tensor of a gated logits model, for some classes.

    A channel is kept if it is live and needed (`ChannelFlow`), unioned over
    the tensors its kind couples (a residual `Add`, BatchNorm, a layer
    called twice), with index sets mapped through `Concatenate`, `Flatten`
    and depth multipliers until they agree. The classifier keeps the given
    classes, in their order where it maps 1:1 onto the output.

    Args:
        model: a gated model returning logits over all classes.
        classes: list of int, the output columns wanted, in order.

    Attributes:
        flow: the `ChannelFlow` (and through it, the `Graph`).
        kept: `{tensor key: sorted int array of kept channel indices}`.
        classes: the output columns in the compact model's order (sorted
            where the head cannot be reordered).
    """

    def __init__(self, model, classes):
        classes = list(classes)
        num_classes = int(model.outputs[0].shape[-1])
        # Logits of the classes outside the sub-task are never read.
        class_mask = np.zeros(num_classes, bool)
        class_mask[classes] = True
        self.flow = ChannelFlow(model, class_mask)
        self.graph = self.flow.graph
        self.kept = _kept_channels(self.flow, class_mask)
        head = _classifier_keys(self.flow)
        if head:
            for key in head:
                self.kept[key] = np.asarray(classes)
        else:
            classes = sorted(classes)
        self.classes = classes

    def masks(self):
        """`{tensor key: bool array}` of the kept channels."""
        masks = {}
        for key, live in self.flow.live.items():
            masks[key] = np.zeros(live.size, bool)
            masks[key][self.kept[key]] = True
        return masks


def _kept_channels(flow, class_mask):
    """Channels to keep per tensor key, consistent across coupled tensors."""
    graph = flow.graph
    groups = _Groups()
    by_layer = collections.defaultdict(list)
    for flat in graph.nodes:
        if flat.kind.coupled(flat):
            groups.union(*(flat.inputs + flat.outputs))
        if isinstance(flat.op, keras.Layer):
            by_layer[id(flat.op)].append(flat)
    # A layer called at several places gets one set of sliced weights.
    for flats in by_layer.values():
        if len(flats) > 1:
            for position in range(len(flats[0].inputs)):
                groups.union(*(f.inputs[position] for f in flats))
            groups.union(*(f.outputs[0] for f in flats))

    keep = {}
    for key, live in flow.live.items():
        root = groups.find(key)
        wanted = live & flow.need.get(key, np.zeros_like(live))
        keep[root] = keep.get(root, np.zeros_like(live)) | wanted

    def full(key):
        keep[groups.find(key)][:] = True

    for key in graph.input_keys:
        full(key)
    for flat in graph.nodes:
        if flat.kind.keeps_channels:
            for key in flat.inputs + flat.outputs:
                full(key)
    final = graph.nodes[-1]
    keep[groups.find(final.outputs[0])] = np.asarray(class_mask, bool).copy()

    # Concatenate, Flatten and depth multipliers tie index sets together:
    # propagate until they agree (bits are only ever set, so this ends). No
    # tensor may end with zero channels: it keeps its first (a zero or unread
    # channel, so outputs do not change), which must propagate as well.
    mapping = [flat for flat in graph.nodes if flat.kind.maps_indices]
    changed = True
    while changed:
        changed = False
        for array in keep.values():
            if not array.any():
                array[0] = True
                changed = True
        for flat in mapping:
            ins = [keep[groups.find(k)] for k in flat.inputs]
            out = keep[groups.find(flat.outputs[0])]
            derived, back = flat.kind.index_map(flat, ins, out)
            if (derived & ~out).any():
                out |= derived
                changed = True
            for array, value in zip(ins, back):
                if (value & ~array).any():
                    array |= value
                    changed = True
    return {key: np.flatnonzero(keep[groups.find(key)]) for key in flow.live}


def _classifier_keys(flow):
    """Tensors from the last Dense/Conv to the output, if it maps 1:1.

    The classifier's rows can then be taken in the sub-task's class order;
    a 1x1 Conv followed by Flatten (MobileNet) counts as a Dense.
    """
    graph = flow.graph
    keys = [graph.output_keys[0]]
    while keys[-1] in graph.producers:
        flat = graph.producers[keys[-1]]
        if flat.kind is DENSE:
            return keys
        one_to_one = isinstance(flat.kind, (Channelwise, Gate)) or (
            flat.kind is FLATTEN
            and flow.live[flat.inputs[0]].size == flow.live[keys[-1]].size
        )
        if not one_to_one:
            return []
        keys.append(flat.inputs[0])
    return []
