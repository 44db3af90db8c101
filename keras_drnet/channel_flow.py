"""Which channels of a gated model carry signal, are needed, and what runs.

A channel is *live* if it can be non-zero (forward pass: a closed gate kills
it, a convolution reading any live channel makes all its outputs live) and
*needed* if something downstream reads it (backward pass: a closed gate makes
its input unneeded, a convolution needs all its inputs if any output is
needed). A weight *runs* iff the input channel it reads is live and the
output channel it writes is needed. Channels are on the last axis.
"""

import dataclasses
import math

import keras
import numpy as np

from keras_drnet.channel_gate import ChannelGate
from keras_drnet.model_surgery import as_functional

_CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
_SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
_MERGE_ANY = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)


@dataclasses.dataclass
class FlatNode:
    """One call of a layer or op, with nested models expanded inline."""

    op: object
    node: object
    inputs: list
    outputs: list


def flat_nodes(model):
    """Call sites of `model` in topological order, nested models inlined.

    Returns `(nodes, input_keys, output_keys)`; tensors are identified by
    keys that are unique per call site of a nested model.
    """
    functional = as_functional(model)
    root = ()
    input_keys = [(root, id(t)) for t in functional.inputs]
    nodes, output_keys = _expand(functional, input_keys, root)
    return nodes, input_keys, output_keys


def _expand(functional, input_keys, prefix):
    alias = {
        (prefix, id(t)): key for t, key in zip(functional.inputs, input_keys)
    }

    def resolve(tensor):
        key = (prefix, id(tensor))
        return alias.get(key, key)

    nodes = []
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            if node.is_input or not node.operation:
                continue
            op = node.operation
            inputs = [resolve(t) for t in node.input_tensors]
            if isinstance(op, keras.Model):
                inner = as_functional(op)
                sub_nodes, sub_outputs = _expand(
                    inner, inputs, prefix + (id(node),)
                )
                nodes.extend(sub_nodes)
                for tensor, key in zip(node.output_tensors, sub_outputs):
                    alias[(prefix, id(tensor))] = key
            else:
                outputs = [(prefix, id(t)) for t in node.output_tensors]
                nodes.append(FlatNode(op, node, inputs, outputs))
    return nodes, [resolve(t) for t in functional.outputs]


def _channels(tensor):
    return int(tensor.shape[-1])


def _forward(flat, live_in):
    op, node = flat.op, flat.node
    out = node.output_tensors[0]
    size = _channels(out)
    if isinstance(op, ChannelGate):
        mask = keras.ops.convert_to_numpy(op.gate) != 0
        return live_in[0] & mask
    if isinstance(op, _DEPTHWISE):
        return np.repeat(live_in[0], op.depth_multiplier)
    if isinstance(op, _CONV + _SEPARABLE + (keras.layers.Dense,)):
        return np.ones(size, bool)
    if isinstance(op, keras.layers.Multiply) and _same_sizes(live_in, size):
        return np.logical_and.reduce(live_in)
    if isinstance(op, _MERGE_ANY + (keras.layers.Multiply,)) and _same_sizes(
        live_in, size
    ):
        return np.logical_or.reduce(live_in)
    if isinstance(op, keras.layers.Concatenate) and op.axis in (
        -1,
        len(out.shape) - 1,
    ):
        return np.concatenate(live_in)
    if len(live_in) == 1:
        if live_in[0].size == size:
            return live_in[0]
        if size % live_in[0].size == 0 and len(out.shape) == 2:
            # Flatten of channels-last maps: channel c repeats every C.
            return np.tile(live_in[0], size // live_in[0].size)
    return np.ones(size, bool)


def _backward(flat, need_out, live_in):
    op = flat.op
    sizes = [x.size for x in live_in]
    if isinstance(op, ChannelGate):
        mask = keras.ops.convert_to_numpy(op.gate) != 0
        return [need_out & mask]
    if isinstance(op, _DEPTHWISE):
        return [need_out.reshape(-1, op.depth_multiplier).any(axis=1)]
    if isinstance(op, _CONV + _SEPARABLE + (keras.layers.Dense,)):
        return [np.full(sizes[0], need_out.any())]
    if isinstance(op, keras.layers.Concatenate) and len(
        np.concatenate(live_in)
    ) == need_out.size:
        return np.split(need_out, np.cumsum(sizes)[:-1])
    result = []
    for size in sizes:
        if size == need_out.size:
            result.append(need_out.copy())
        elif need_out.size % size == 0:
            result.append(need_out.reshape(-1, size).any(axis=0))
        else:
            result.append(np.full(size, need_out.any()))
    return result


def _same_sizes(arrays, size):
    return all(a.size == size for a in arrays)


@dataclasses.dataclass
class LayerCost:
    """Parameters and multiply-accumulates of one layer: total and running."""

    name: str
    params: int
    running_params: int
    macs: int
    running_macs: int


def _layer_cost(flat, live_in, need_out):
    op = flat.op
    out = flat.node.output_tensors[0]
    spatial = math.prod(int(d) for d in out.shape[1:-1] if d is not None)
    bias = 1 if getattr(op, "use_bias", False) else 0
    if isinstance(op, _CONV + (keras.layers.Dense,)):
        kernel = tuple(op.kernel.shape)
        window = math.prod(kernel[:-2])
        groups = getattr(op, "groups", 1)
        live, need = int(live_in[0].sum()), int(need_out.sum())
        params = window * kernel[-2] * kernel[-1] + bias * kernel[-1]
        running = window * live * need // groups + bias * need
        macs = window * kernel[-2] * kernel[-1] * spatial
        running_macs = window * live * need * spatial // groups
        return params, running, macs, running_macs
    if isinstance(op, _DEPTHWISE + _SEPARABLE):
        kernel = tuple(op.depthwise_kernel.shape if isinstance(
            op, _SEPARABLE) else op.kernel.shape)
        window = math.prod(kernel[:-2])
        mid_live = np.repeat(live_in[0], op.depth_multiplier)
        if isinstance(op, _DEPTHWISE):
            mid_need = need_out
        else:
            mid_need = np.full(mid_live.size, need_out.any())
        depth = window * mid_live.size
        depth_running = window * int((mid_live & mid_need).sum())
        params, running = depth, depth_running
        macs, running_macs = depth * spatial, depth_running * spatial
        if isinstance(op, _SEPARABLE):
            point = mid_live.size * need_out.size
            point_running = int(mid_live.sum()) * int(need_out.sum())
            params, running = params + point, running + point_running
            macs += point * spatial
            running_macs += point_running * spatial
        params += bias * need_out.size
        running += bias * int(need_out.sum())
        return params, running, macs, running_macs
    params = sum(math.prod(w.shape) for w in op.weights)
    if isinstance(op, keras.layers.BatchNormalization):
        per_channel = params // need_out.size
        return params, per_channel * int(need_out.sum()), 0, 0
    return params, params, 0, 0


def running_costs(gated_model):
    """Per-layer total and running parameters and MACs of a gated model.

    Gates are not counted. A layer called at several places counts its
    parameters once (running if they run at any call site) and its MACs at
    every call.

    Returns:
        list of `LayerCost`, one per layer with weights or MACs.
    """
    nodes, input_keys, output_keys = flat_nodes(gated_model)
    live = {}
    for key, tensor in zip(input_keys, as_functional(gated_model).inputs):
        live[key] = np.ones(_channels(tensor), bool)
    for flat in nodes:
        out = _forward(flat, [live[k] for k in flat.inputs])
        for key in flat.outputs:
            live[key] = out
    need = {key: np.ones_like(live[key]) for key in output_keys}
    for flat in reversed(nodes):
        need_out = np.zeros_like(live[flat.outputs[0]])
        for key in flat.outputs:
            if key in need:
                need_out |= need[key]
        flat.need_out = need_out
        ins = _backward(flat, need_out, [live[k] for k in flat.inputs])
        for key, value in zip(flat.inputs, ins):
            need[key] = need[key] | value if key in need else value
    costs = {}
    for flat in nodes:
        if isinstance(flat.op, ChannelGate):
            continue
        params, running, macs, running_macs = _layer_cost(
            flat, [live[k] for k in flat.inputs], flat.need_out
        )
        if not (params or macs):
            continue
        if id(flat.op) in costs:
            cost = costs[id(flat.op)]
            cost.running_params = max(cost.running_params, running)
            cost.macs += macs
            cost.running_macs += running_macs
        else:
            costs[id(flat.op)] = LayerCost(
                flat.op.name, params, running, macs, running_macs
            )
    return list(costs.values())
