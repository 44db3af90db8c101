"""Compaction: a sub-task as a physically smaller plain Keras model."""

import keras
import numpy as np

from keras_drnet.channel_gate import ChannelGate
from keras_drnet.graph.flow import layer_costs
from keras_drnet.graph.kinds import zero_response
from keras_drnet.graph.plan import ChannelPlan
from keras_drnet.model_surgery import as_functional
from keras_drnet.subtask import SubtaskModel


def _sliced_layer(flat, kept_in, kept_out, name):
    """A new layer computing only `kept_out` from the `kept_in` channels."""
    config = flat.op.get_config()
    config["name"] = name
    config, weights = flat.kind.slice(
        flat, config, flat.op.get_weights(), kept_in, kept_out
    )
    return flat.op.__class__.from_config(config), weights


def _fold_mask(graph, gate_flat, closed, layers, kept):
    """Folds a gate's remaining 0 entries into the weights upstream of it.

    Walks back from the gate through ops that map 0 to 0 on the closed
    channels (ReLU, pooling, ...) to the Conv/Dense/BatchNorm producing
    them, and zeroes those output channels there. Every tensor on the way
    must have the walk as its only reader. Returns False (nothing changed)
    where that is not possible, e.g. after a residual Add.
    """
    key = gate_flat.inputs[0]
    while key in graph.producers and graph.reads[key] == 1:
        flat = graph.producers[key]
        if graph.calls[id(flat.op)] != 1:
            return False
        if flat.kind.sets_channels:
            return flat.kind.zero_outputs(flat, layers[id(flat.op)][1], closed)
        if not flat.kind.carries_zero or zero_response(flat)[
            kept[key][closed]
        ].any():
            return False
        key = flat.inputs[0]
    return False


def _plan(sub):
    """The sub-task's `ChannelPlan`."""
    if not isinstance(sub, SubtaskModel):
        raise TypeError(
            "`compact` takes the `SubtaskModel` from `keras_drnet.subtask("
            "model, civs, classes, ...)`, which says which channels and "
            f"classes to keep. Received: {type(sub).__name__}"
        )
    return ChannelPlan(sub.logits_model, sub.cciv.classes)


def subtask_costs(sub):
    """Per-layer `LayerCost`s of a sub-task, from one channel analysis.

    Returns `(running, compact)`: in `running` the `running_*` fields are
    what the masked sub-task runs (see `keras_drnet.graph.running_costs`); in
    `compact` they are what `compact(sub)` has, without building it.
    """
    plan = _plan(sub)
    masks = plan.masks()
    running = layer_costs(plan.graph, plan.flow.live, plan.flow.need)
    return running, layer_costs(plan.graph, masks, masks)


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
    plan = _plan(sub)
    graph, kept = plan.graph, plan.kept
    functional = as_functional(sub.logits_model)
    tensors = {}
    for key, tensor in zip(graph.input_keys, functional.inputs):
        tensors[key] = keras.Input(
            shape=tensor.shape[1:], dtype=tensor.dtype, name=tensor.name
        )
    inputs = [tensors[key] for key in graph.input_keys]
    # The output's name is taken first: `finetune` and users look it up.
    layers, sliced = {}, []
    names = {"class_probabilities"} if include_softmax else set()

    def unique(name):
        base, k = name, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    for flat in graph.nodes:
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
                    graph.calls[id(op)] == 1
                    and _fold_mask(graph, flat, closed, layers, kept)
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
    outputs = tensors[graph.output_keys[0]]
    names_out = [sub.civs.class_names[i] for i in plan.classes]
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
