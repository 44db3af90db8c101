"""Which channels of a gated model carry signal, are needed, and what runs.

A channel is *live* if it can be non-zero. Forward pass: a closed gate kills
it; a convolution reading any live channel makes all its outputs live, and a
bias makes its channel live; a channelwise layer (BatchNormalization, ReLU,
pooling, ...) keeps liveness, plus the channels it maps 0 to non-zero (a BN
shift). A channel is *needed* if something downstream reads it. Backward
pass: a closed gate makes its input unneeded; a convolution needs all its
inputs if any output is needed. A weight *runs* iff the input channel it
reads is live and the output channel it writes is needed. What each layer
does is its kind's (`graph.kinds`).
"""

import dataclasses

import numpy as np

from keras_drnet.graph.axes import channels
from keras_drnet.graph.trace import Graph
from keras_drnet.model_surgery import as_functional


class ChannelFlow:
    """Live and needed channels of every tensor of a gated model.

    Args:
        model: a gated functional or Sequential model, or its `Graph`.
        output_mask: bool array over the output's channels that are needed
            (e.g. the live classes of a sub-task); all by default.

    Attributes:
        graph: the model's `Graph` (nodes, producers, readers).
        live, need: `{tensor key: bool array}`.
    """

    def __init__(self, model, output_mask=None):
        graph = model if isinstance(model, Graph) else Graph(model)
        self.graph = graph
        first = graph.channels_first
        self.live = {}
        inputs = as_functional(graph.model).inputs
        for key, tensor in zip(graph.input_keys, inputs):
            self.live[key] = np.ones(channels(tensor, first), bool)
        for flat in graph.nodes:
            size = channels(flat.node.output_tensors[0], first)
            out = flat.kind.forward(
                flat, [self.live[k] for k in flat.inputs], size
            )
            for key in flat.outputs:
                self.live[key] = out
        self.need = {}
        for i, key in enumerate(graph.output_keys):
            mask = np.ones_like(self.live[key])
            if output_mask is not None and i == 0:
                mask = np.asarray(output_mask, bool)
            self.need[key] = mask
        for flat in reversed(graph.nodes):
            need_out = np.zeros_like(self.live[flat.outputs[0]])
            for key in flat.outputs:
                if key in self.need:
                    need_out = need_out | self.need[key]
            self.need[flat.outputs[0]] = need_out
            ins = flat.kind.backward(
                flat, need_out, [self.live[k] for k in flat.inputs]
            )
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
    return layer_costs(flow.graph, flow.live, flow.need)


def layer_costs(graph, live, need):
    """`LayerCost`s of a graph's layers given which channels of each tensor
    key are live (read by a weight) and needed (written by one)."""
    costs = {}
    for flat in graph.nodes:
        params, running, macs, running_macs = flat.kind.cost(
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
