"""The model as a graph, flattened once: call sites, producers, readers."""

import collections
import dataclasses

import keras

from keras_drnet.channel_gate import ChannelGate
from keras_drnet.graph.kinds import kind_of
from keras_drnet.model_surgery import as_functional


@dataclasses.dataclass
class FlatNode:
    """One call of a layer or op, with nested models expanded inline.

    Attributes:
        op: the layer or op called.
        node: its Keras node (input tensors, arguments).
        inputs, outputs: keys of the tensors it reads and writes.
        channels_first: whether the model's channel axis is 1.
        kind: its `keras_drnet.LayerKind`.
    """

    op: object
    node: object
    inputs: list
    outputs: list
    channels_first: bool = False
    kind: object = None


class Graph:
    """A model's call sites in topological order, nested models inlined.

    Tensors are identified by keys unique per call site of a nested model.
    Every call gets its `LayerKind` once, here.

    Args:
        model: a functional or Sequential model (gated or not).
        kinds: bool. Also find the channel axis and each call's kind (a
            model mixing data formats is refused); `False` for the calls
            and their tensors alone.

    Attributes:
        nodes: list of `FlatNode`.
        input_keys, output_keys: the model's inputs and outputs.
        producers: `{tensor key: the FlatNode that computes it}`.
        readers: `{tensor key: [FlatNode reading it]}`.
        reads: `{tensor key: number of calls and outputs reading it}`.
        channels_first: bool. The channel axis of every tensor of rank > 2
            is 1 (else the last).
    """

    def __init__(self, model, kinds=True):
        self.model = model
        functional = as_functional(model)
        self.input_keys = [((), id(t)) for t in functional.inputs]
        self.nodes, self.output_keys = _expand(functional, self.input_keys, ())
        self.producers = {k: f for f in self.nodes for k in f.outputs}
        self.readers = collections.defaultdict(list)
        for flat in self.nodes:
            for key in flat.inputs:
                self.readers[key].append(flat)
        self.reads = collections.Counter(
            k for f in self.nodes for k in f.inputs
        )
        self.reads.update(self.output_keys)
        self.calls = collections.Counter(id(f.op) for f in self.nodes)
        self.channels_first = None
        if kinds:
            self._find_kinds()

    def _find_kinds(self):
        formats = data_formats(self.nodes)
        if len(formats) > 1:
            raise ValueError(
                f"Model '{self.model.name}' mixes channels_first layers (e.g. "
                f"'{formats[True]}') with channels_last ones (e.g. "
                f"'{formats[False]}'), so its channel axis is ambiguous. "
                "Build every layer with the same `data_format` (or "
                "`keras.config.set_image_data_format`)."
            )
        self.channels_first = formats.get(True, False)
        for flat in self.nodes:
            flat.channels_first = self.channels_first
            flat.kind = kind_of(flat)


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
