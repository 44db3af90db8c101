"""Which channels of a gated model carry signal, are needed, and what runs.

A channel is *live* if it can be non-zero. Forward pass: a closed gate kills
it; a convolution reading any live channel makes all its outputs live, and a
bias makes its channel live; a channelwise layer (BatchNormalization, ReLU,
pooling, ...) keeps liveness, plus the channels it maps 0 to non-zero (a BN
shift). A channel is *needed* if something downstream reads it. Backward
pass: a closed gate makes its input unneeded; a convolution needs all its
inputs if any output is needed. A weight *runs* iff the input channel it
reads is live and the output channel it writes is needed. Channels are on
the last axis; unknown layers are assumed to mix all channels.
"""

import collections
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
    channels_first: bool = False


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


def data_formats(nodes):
    """`{channels_first: name of a layer that says so}` over call sites."""
    seen = {}
    for flat in nodes:
        op = flat.op
        if not flat.node.input_tensors:
            continue
        rank = len(flat.node.input_tensors[0].shape)
        if isinstance(op, keras.layers.Flatten) or rank < 3:
            continue  # Flatten's data_format only orders its output
        if isinstance(op, (keras.layers.BatchNormalization, ChannelGate)):
            axis = op.axis[0] if isinstance(op.axis, list) else op.axis
            first = {1: True, rank - 1: False}.get(axis % rank)
        else:
            data_format = getattr(op, "data_format", None)
            first = {"channels_first": True, "channels_last": False}.get(
                data_format
            )
        if first is not None:
            seen.setdefault(first, op.name)
    return seen


def channel_axis(tensor, channels_first):
    """The channel axis of a tensor: 1 for channels_first maps, else last."""
    rank = len(tensor.shape)
    return 1 if channels_first and rank > 2 else rank - 1


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


def _channels(tensor, channels_first):
    return int(tensor.shape[channel_axis(tensor, channels_first)])


POOLING = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
# Layers and ops that act on each channel on its own and keep the count.
_CHANNELWISE = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Activation,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    *POOLING,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    keras.layers.Rescaling,
    keras.layers.Identity,
)
# `keras.ops` calls (not layers) that act elementwise; with one tensor and
# scalar constants (`x + 3.0`, `ops.relu6(x)`) they are channelwise.
_ELEMENTWISE_OPS = {
    "Relu", "Relu6", "LeakyRelu", "Elu", "Selu", "Celu", "Gelu", "Silu",
    "HardSilu", "Sigmoid", "HardSigmoid", "Softplus", "Softsign", "Tanh",
    "Exp", "Expm1", "Log", "Log1p", "Sqrt", "Square", "Absolute", "Negative",
    "Sign", "Clip", "Cast", "Add", "Subtract", "Multiply", "TrueDivide",
    "Divide", "Maximum", "Minimum", "Power",
}
# The same ops on two tensors, as the Add/Multiply/... merge layers.
_MERGE_ANY_OPS = {"Add", "Subtract", "Maximum", "Minimum"}
_MERGE_ALL_OPS = {"Multiply"}


def _scalar_constants(node):
    """Whether every non-tensor argument of a call is a scalar."""
    tensors = {id(t) for t in node.input_tensors}
    leaves = keras.tree.flatten((node.arguments.args, node.arguments.kwargs))
    return all(
        id(leaf) in tensors or leaf is None or np.size(leaf) == 1
        for leaf in leaves
    )


def flatten_map(flat):
    """How a flattening call repeats its input channels in its output.

    `"tile"`: channel c at every C-th entry (channels last in memory);
    `"repeat"`: channel c in a contiguous block; `None`: neither.
    """
    op, x = flat.op, flat.node.input_tensors[0]
    last = channel_axis(x, flat.channels_first) == len(x.shape) - 1
    # Flatten(data_format="channels_first") moves axis 1 to the end first.
    moves = (
        isinstance(op, keras.layers.Flatten)
        and op.data_format == "channels_first"
        and len(x.shape) > 2
    )
    if last:
        return None if moves else "tile"
    return "tile" if moves else "repeat"


def expand_flat(flat, channel_mask, size):
    """A per-channel mask of a flattening call's input, on its output."""
    if flatten_map(flat) == "tile":
        return np.tile(channel_mask, size // channel_mask.size)
    return np.repeat(channel_mask, size // channel_mask.size)


def reduce_flat(flat, entry_mask, channels):
    """Input channels any of whose flattened entries is set."""
    if flatten_map(flat) == "tile":
        return entry_mask.reshape(-1, channels).any(axis=0)
    return entry_mask.reshape(channels, -1).any(axis=1)


def kind(flat):
    """How a call site maps channels: see the module docstring."""
    op, node = flat.op, flat.node
    out = node.output_tensors[0]
    ins = node.input_tensors
    first = flat.channels_first
    if isinstance(op, ChannelGate):
        return "gate"
    if isinstance(op, _DEPTHWISE):
        return "depthwise"
    if isinstance(op, _SEPARABLE):
        return "separable"
    if isinstance(op, _CONV) and getattr(op, "groups", 1) == 1:
        return "dense"
    if isinstance(op, keras.layers.Dense):
        # A Dense acts on the last axis: on channels_first maps, not channels.
        return "dense" if channel_axis(ins[0], first) == len(
            ins[0].shape) - 1 else "other"
    same = all(_channels(t, first) == _channels(out, first) for t in ins)
    mixing = getattr(op, "activation", None) in (
        keras.activations.softmax,
        keras.activations.log_softmax,
    )
    if isinstance(op, _CHANNELWISE) and len(ins) == 1 and same and not mixing:
        return "channelwise"
    name = "" if isinstance(op, keras.Layer) else type(op).__name__
    if name in _ELEMENTWISE_OPS and same and _scalar_constants(node):
        if len(ins) == 1:
            return "channelwise"
        if len(ins) == 2 and name in _MERGE_ANY_OPS:
            return "merge_any"
        if len(ins) == 2 and name in _MERGE_ALL_OPS:
            return "merge_all"
    if isinstance(op, _MERGE_ANY) and same:
        return "merge_any"
    if isinstance(op, keras.layers.Multiply) and same:
        return "merge_all"
    if (
        isinstance(op, keras.layers.Concatenate)
        and op.axis % len(out.shape) == channel_axis(out, first)
    ):
        return "concat"
    if (
        isinstance(op, (keras.layers.Flatten, keras.layers.Reshape))
        and len(ins) == 1
        and len(out.shape) == 2
        and _channels(out, first) % _channels(ins[0], first) == 0
        and flatten_map(flat) is not None
    ):
        return "flatten"
    return "other"


def zero_response(flat):
    """Channels a channelwise op makes non-zero from an all-zero input."""
    x = flat.node.input_tensors[0]
    zeros = keras.ops.zeros([1] + [d or 4 for d in x.shape[1:]], x.dtype)
    args, kwargs = flat.node.arguments.fill_in({id(x): zeros})
    if isinstance(flat.op, keras.Layer):
        kwargs["training"] = False
    response = keras.ops.convert_to_numpy(flat.op(*args, **kwargs))
    response = np.moveaxis(
        response, channel_axis(response, flat.channels_first), -1
    )
    return np.abs(response).reshape(-1, response.shape[-1]).max(axis=0) != 0


def _bias_nonzero(op, size):
    if getattr(op, "use_bias", False):
        return keras.ops.convert_to_numpy(op.bias) != 0
    return np.zeros(size, bool)


def _forward(flat, live_in):
    op, out = flat.op, flat.node.output_tensors[0]
    size = _channels(out, flat.channels_first)
    node_kind = kind(flat)
    if node_kind == "gate":
        mask = keras.ops.convert_to_numpy(op.gate) != 0
        return live_in[0] & mask
    if node_kind == "depthwise":
        repeated = np.repeat(live_in[0], op.depth_multiplier)
        return repeated | _bias_nonzero(op, size)
    if node_kind in ("dense", "separable"):
        return np.full(size, live_in[0].any()) | _bias_nonzero(op, size)
    if node_kind == "channelwise":
        return live_in[0] | zero_response(flat)
    if node_kind == "merge_any":
        return np.logical_or.reduce(live_in)
    if node_kind == "merge_all":
        return np.logical_and.reduce(live_in)
    if node_kind == "concat":
        return np.concatenate(live_in)
    if node_kind == "flatten":
        return expand_flat(flat, live_in[0], size)
    return np.ones(size, bool)


def _backward(flat, need_out, live_in):
    op = flat.op
    sizes = [x.size for x in live_in]
    node_kind = kind(flat)
    if node_kind == "gate":
        mask = keras.ops.convert_to_numpy(op.gate) != 0
        return [need_out & mask]
    if node_kind == "depthwise":
        return [need_out.reshape(-1, op.depth_multiplier).any(axis=1)]
    if node_kind in ("channelwise", "merge_any", "merge_all"):
        return [need_out.copy() for _ in sizes]
    if node_kind == "concat":
        return np.split(need_out, np.cumsum(sizes)[:-1])
    if node_kind == "flatten":
        return [reduce_flat(flat, need_out, sizes[0])]
    return [np.full(size, need_out.any()) for size in sizes]


class ChannelFlow:
    """Live and needed channels of every tensor of a gated model.

    Args:
        model: a gated functional or Sequential model.
        output_mask: bool array over the output's channels that are needed
            (e.g. the live classes of a sub-task); all by default.

    Attributes:
        nodes: `FlatNode`s in topological order (nested models inlined).
        live, need: `{tensor key: bool array}`.
        producers: `{tensor key: the FlatNode that computes it}`.
        readers: `{tensor key: number of calls (and outputs) reading it}`.
    """

    def __init__(self, model, output_mask=None):
        self.model = model
        self.nodes, self.input_keys, self.output_keys = flat_nodes(model)
        formats = data_formats(self.nodes)
        if len(formats) > 1:
            raise ValueError(
                f"Model '{model.name}' mixes channels_first layers (e.g. "
                f"'{formats[True]}') with channels_last ones (e.g. "
                f"'{formats[False]}'), so its channel axis is ambiguous. "
                "Build every layer with the same `data_format` (or "
                "`keras.config.set_image_data_format`)."
            )
        first = formats.get(True, False)
        for flat in self.nodes:
            flat.channels_first = first
        self.producers = {k: f for f in self.nodes for k in f.outputs}
        self.readers = collections.Counter(
            k for f in self.nodes for k in f.inputs
        )
        self.readers.update(self.output_keys)
        self.live = {}
        for key, tensor in zip(self.input_keys, as_functional(model).inputs):
            self.live[key] = np.ones(_channels(tensor, first), bool)
        for flat in self.nodes:
            out = _forward(flat, [self.live[k] for k in flat.inputs])
            for key in flat.outputs:
                self.live[key] = out
        self.need = {}
        for i, key in enumerate(self.output_keys):
            mask = np.ones_like(self.live[key])
            if output_mask is not None and i == 0:
                mask = np.asarray(output_mask, bool)
            self.need[key] = mask
        for flat in reversed(self.nodes):
            need_out = np.zeros_like(self.live[flat.outputs[0]])
            for key in flat.outputs:
                if key in self.need:
                    need_out = need_out | self.need[key]
            self.need[flat.outputs[0]] = need_out
            ins = _backward(flat, need_out, [self.live[k] for k in flat.inputs])
            for key, value in zip(flat.inputs, ins):
                self.need[key] = self.need.get(key, False) | value


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
    axis = channel_axis(out, flat.channels_first)
    spatial = math.prod(
        int(d) for i, d in enumerate(out.shape) if i not in (0, axis) and d
    )
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
    params = sum(math.prod(w.shape) for w in getattr(op, "weights", ()))
    if isinstance(op, keras.layers.BatchNormalization):
        per_channel = params // need_out.size
        return params, per_channel * int(need_out.sum()), 0, 0
    return params, params, 0, 0


def running_costs(gated_model, output_mask=None):
    """Per-layer total and running parameters and MACs of a gated model.

    Gates are not counted. A layer called at several places counts its
    parameters once (running if they run at any call site) and its MACs at
    every call.

    Args:
        gated_model: a gated model (use the logits model for a sub-task).
        output_mask: bool array, the output channels (classes) needed.

    Returns:
        list of `LayerCost`, one per layer with weights or MACs.
    """
    flow = ChannelFlow(gated_model, output_mask)
    return layer_costs(flow, flow.live, flow.need)


def layer_costs(flow, live, need):
    """`LayerCost`s of `flow`'s layers given which channels of each tensor
    key are live (read by a weight) and needed (written by one)."""
    costs = {}
    for flat in flow.nodes:
        if isinstance(flat.op, ChannelGate):
            continue
        params, running, macs, running_macs = _layer_cost(
            flat, [live[k] for k in flat.inputs], need[flat.outputs[0]]
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
