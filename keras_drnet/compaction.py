"""Compaction: a sub-task as a physically smaller plain Keras model."""

import collections

import keras
import numpy as np

from keras_drnet.channel_flow import ChannelFlow
from keras_drnet.channel_flow import expand_flat
from keras_drnet.channel_flow import kind
from keras_drnet.channel_flow import layer_costs
from keras_drnet.channel_flow import reduce_flat
from keras_drnet.channel_flow import zero_response
from keras_drnet.channel_gate import ChannelGate
from keras_drnet.model_surgery import as_functional
from keras_drnet.subtask import SubtaskModel


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


def _kept_channels(flow, final, class_mask):
    """Channels to keep per tensor key, consistent across coupled tensors."""
    groups = _Groups()
    by_layer = collections.defaultdict(list)
    for flat in flow.nodes:
        node_kind = kind(flat)
        keys = flat.inputs + flat.outputs
        if node_kind in ("gate", "channelwise", "merge_any", "merge_all"):
            groups.union(*keys)
        elif node_kind == "depthwise" and flat.op.depth_multiplier == 1:
            groups.union(*keys)
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

    for key in flow.input_keys:
        full(key)
    for flat in flow.nodes:
        node_kind = kind(flat)
        if node_kind == "other":
            for key in flat.inputs + flat.outputs:
                full(key)
    keep[groups.find(final.outputs[0])] = np.asarray(class_mask, bool).copy()

    # Concatenate, Flatten and depth multipliers tie index sets together:
    # propagate until they agree (bits are only ever set, so this ends). No
    # tensor may end with zero channels: it keeps its first (a zero or unread
    # channel, so outputs do not change), which must propagate as well.
    changed = True
    while changed:
        changed = False
        for array in keep.values():
            if not array.any():
                array[0] = True
                changed = True
        for flat in flow.nodes:
            node_kind = kind(flat)
            if node_kind not in ("concat", "flatten", "depthwise"):
                continue
            ins = [keep[groups.find(k)] for k in flat.inputs]
            out = keep[groups.find(flat.outputs[0])]
            if node_kind == "concat":
                derived = np.concatenate(ins)
                back = np.split(
                    out | derived, np.cumsum([i.size for i in ins])[:-1]
                )
            elif node_kind == "flatten":
                derived = expand_flat(flat, ins[0], out.size)
                back = [reduce_flat(flat, out | derived, ins[0].size)]
            else:
                m = flat.op.depth_multiplier
                derived = np.repeat(ins[0], m)
                back = [(out | derived).reshape(-1, m).any(axis=1)]
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
    keys = [flow.output_keys[0]]
    while keys[-1] in flow.producers:
        flat = flow.producers[keys[-1]]
        node_kind = kind(flat)
        if node_kind == "dense":
            return keys
        one_to_one = node_kind in ("channelwise", "gate") or (
            node_kind == "flatten"
            and flow.live[flat.inputs[0]].size == flow.live[keys[-1]].size
        )
        if not one_to_one:
            return []
        keys.append(flat.inputs[0])
    return []


def _sliced_layer(flat, kept_in, kept_out, name):
    """A new layer computing only `kept_out` from the `kept_in` channels."""
    op = flat.op
    node_kind = kind(flat)
    config = op.get_config()
    config["name"] = name
    weights = op.get_weights()
    if node_kind == "dense":
        key = "units" if isinstance(op, keras.layers.Dense) else "filters"
        config[key] = len(kept_out)
        kernel = weights[0][..., kept_in, :][..., kept_out]
        weights = [kernel] + [w[kept_out] for w in weights[1:]]
    elif node_kind == "depthwise":
        weights = [weights[0][..., kept_in, :]] + [
            w[kept_out] for w in weights[1:]
        ]
    elif node_kind == "separable":
        m = op.depth_multiplier
        config["filters"] = len(kept_out)
        middle = (kept_in[:, None] * m + np.arange(m)).ravel()
        weights = [
            weights[0][..., kept_in, :],
            weights[1][..., middle, :][..., kept_out],
        ] + [w[kept_out] for w in weights[2:]]
    elif node_kind == "channelwise":
        weights = [w[kept_out] for w in weights]
    elif node_kind == "flatten" and isinstance(op, keras.layers.Reshape):
        config["target_shape"] = (len(kept_out),)
    layer = op.__class__.from_config(config)
    return layer, weights


def _zero_output_channels(flat, weights, positions):
    """Zeroes output channels in a layer's sliced weights; False if its
    outputs there would not become exactly 0."""
    op, node_kind = flat.op, kind(flat)
    if isinstance(op, keras.layers.BatchNormalization):
        if not (op.scale and op.center):
            return False
        weights[0][positions] = weights[1][positions] = 0
        return True
    if node_kind not in ("dense", "depthwise", "separable") or (
        getattr(op, "depth_multiplier", 1) != 1
    ):
        return False
    activation = getattr(op, "activation", None)
    if activation is not None:
        at_zero = keras.ops.convert_to_numpy(activation(keras.ops.zeros(1)))
        if at_zero[0] != 0:
            return False
    if node_kind == "depthwise":
        weights[0][..., positions, :] = 0
    else:
        weights[1 if node_kind == "separable" else 0][..., positions] = 0
    if getattr(op, "use_bias", False):
        weights[-1][positions] = 0
    return True


def _fold_mask(flow, gate_flat, closed, layers, kept, calls):
    """Folds a gate's remaining 0 entries into the weights upstream of it.

    Walks back from the gate through ops that map 0 to 0 on the closed
    channels (ReLU, pooling, ...) to the Conv/Dense/BatchNorm producing
    them, and zeroes those output channels there. Every tensor on the way
    must have the walk as its only reader. Returns False (nothing changed)
    where that is not possible, e.g. after a residual Add.
    """
    key = gate_flat.inputs[0]
    while key in flow.producers and flow.readers[key] == 1:
        flat = flow.producers[key]
        op = flat.op
        if calls[id(op)] != 1:
            return False
        if isinstance(op, keras.layers.BatchNormalization) or kind(flat) in (
            "dense", "depthwise", "separable"
        ):
            return _zero_output_channels(flat, layers[id(op)][1], closed)
        if kind(flat) != "channelwise" or zero_response(flat)[
            kept[key][closed]
        ].any():
            return False
        key = flat.inputs[0]
    return False


def _plan(sub):
    """`(flow, kept channels per tensor key, output classes in order)`."""
    if not isinstance(sub, SubtaskModel):
        raise TypeError(
            "`compact` takes the `SubtaskModel` from `keras_drnet.subtask("
            "model, civs, classes, ...)`, which says which channels and "
            f"classes to keep. Received: {type(sub).__name__}"
        )
    classes = list(sub.cciv.classes)
    # Logits of the classes outside the sub-task are never read.
    class_mask = np.zeros(sub.civs.num_classes, bool)
    class_mask[classes] = True
    flow = ChannelFlow(sub._logits_model, class_mask)
    kept = _kept_channels(flow, flow.nodes[-1], class_mask)
    head = _classifier_keys(flow)
    if head:
        for key in head:
            kept[key] = np.asarray(classes)
    else:
        classes = sorted(classes)
    return flow, kept, classes


def subtask_costs(sub):
    """Per-layer `LayerCost`s of a sub-task, from one channel analysis.

    Returns `(running, compact)`: in `running` the `running_*` fields are
    what the masked sub-task runs (see `channel_flow.running_costs`); in
    `compact` they are what `compact(sub)` has, without building it.
    """
    flow, kept, _ = _plan(sub)
    masks = {}
    for key, live in flow.live.items():
        masks[key] = np.zeros(live.size, bool)
        masks[key][kept[key]] = True
    running = layer_costs(flow, flow.live, flow.need)
    return running, layer_costs(flow, masks, masks)


def compact(sub, include_softmax=True):
    """Builds a physically smaller model computing a sub-task.

    Every channel the sub-task switches off is removed: a producer's output
    channels (Conv/Dense kernels and biases, the BatchNormalization
    statistics after them, depthwise channels with their inputs) and the
    consumers' matching input slices, including a Dense after Flatten where
    one channel is many inputs. Channels joined by a residual `Add` (or
    `Multiply`, ...) form one group, removed only where every member can
    lose it; `Concatenate` maps indices into each branch; a layer called
    twice is sliced once. The classifier keeps only the sub-task's classes,
    in the order of `sub.classes`, then a `Softmax` layer.

    A kept channel that the CCIV switches off somewhere in its group (e.g. a
    residual branch keeps a channel that one gate closes) is zeroed in the
    weights upstream of its gate (the Conv/Dense/BatchNorm producing it);
    where nothing upstream can carry the zero (after a residual `Add`), a
    `Rescaling` layer with the 0/1 mask and the gate's name stays. A group
    that would end with no channel keeps its first (zero or unread)
    channel. Nested models are inlined. The result is one flat functional
    model of standard Keras layers: its `.keras` file loads without this
    package.

    The model's `class_names` attribute names its output columns. Keras's
    own `save()`/`export()` do not write it: `keras_drnet.export(small,
    path, format=...)` writes it into every artifact (`.keras`, SavedModel,
    LiteRT, ONNX).

    Args:
        sub: `keras_drnet.SubtaskModel`.
        include_softmax: bool. End in `Softmax` (default) or in logits.

    Returns:
        A functional `keras.Model` with output `[batch, len(sub.classes)]`,
        equal to `sub(x)` restricted to the sub-task's classes.

    Example:

    ```python
    small = keras_drnet.compact(sub)
    small.count_params()
    small.class_names  # ['cat', 'dog']
    keras_drnet.export(small, "cat_dog.tflite", format="litert")
    ```
    """
    small, _ = build_compact(sub, include_softmax)
    return small


def build_compact(sub, include_softmax=True):
    """`compact(sub)` and where each of its layers came from.

    Returns `(small, sliced)`: `sliced` lists, in graph order, every sliced
    layer of the sub-task's network as `(its name, the new layer, kept input
    channels, kept output channels)`; two copies of one network list the
    same layers (`keras_drnet.repair` refits those weights).
    """
    flow, kept, classes = _plan(sub)
    functional = as_functional(sub._logits_model)
    tensors = {}
    for key, tensor in zip(flow.input_keys, functional.inputs):
        tensors[key] = keras.Input(
            shape=tensor.shape[1:], dtype=tensor.dtype, name=tensor.name
        )
    inputs = [tensors[key] for key in flow.input_keys]
    layers, names, sliced = {}, set(), []
    calls = collections.Counter(id(f.op) for f in flow.nodes)

    def unique(name):
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    for flat in flow.nodes:
        op = flat.op
        node_tensors = {
            id(t): tensors[key]
            for t, key in zip(flat.node.input_tensors, flat.inputs)
        }
        args, kwargs = flat.node.arguments.fill_in(node_tensors)
        kept_in = kept[flat.inputs[0]] if flat.inputs else None
        kept_out = kept[flat.outputs[0]]
        if isinstance(op, ChannelGate):
            if id(op) not in layers:
                mask = keras.ops.convert_to_numpy(op.gate)[kept_out]
                closed = np.flatnonzero(mask == 0)
                if not closed.size or (
                    calls[id(op)] == 1
                    and _fold_mask(flow, flat, closed, layers, kept, calls)
                ):
                    tensors[flat.outputs[0]] = args[0]
                    continue
                # Unfoldable (e.g. after a residual Add): a plain Keras mask.
                rank = len(flat.node.input_tensors[0].shape)
                shape = [1] * (rank - 1)
                shape[op.axis % rank - 1] = mask.size
                layers[id(op)] = (
                    keras.layers.Rescaling(
                        mask.reshape(shape), name=unique(op.name)
                    ),
                    [],
                )
            layer = layers[id(op)][0]
        elif not isinstance(op, keras.Layer):
            layer = op
        else:
            if id(op) not in layers:
                layers[id(op)] = _sliced_layer(
                    flat, kept_in, kept_out, unique(op.name)
                )
                sliced.append((op.name, layers[id(op)][0], kept_in, kept_out))
            layer = layers[id(op)][0]
        outputs = layer(*args, **kwargs)
        for key, value in zip(flat.outputs, keras.tree.flatten(outputs)):
            tensors[key] = value
    outputs = tensors[flow.output_keys[0]]
    names_out = [sub.civs.class_names[i] for i in classes]
    if include_softmax:
        outputs = keras.layers.Softmax(
            name="class_probabilities", dtype="float32"
        )(outputs)
    small = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs,
        name=f"{sub.name}_compact",
    )
    for layer, weights in layers.values():
        if weights:
            layer.set_weights(weights)
    small.class_names = names_out
    return small, sliced
