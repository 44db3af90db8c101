"""The model as a graph: one trace, one registry of layer kinds, one plan.

- `trace.Graph`: the model's calls flattened once (nested models inlined),
  producers and readers of every tensor, the channel axis, each call's kind.
- `kinds`: what each kind of layer does to channels (flow, coupling, cost,
  slicing, zeroing); `register_layer_kind` adds a custom layer.
- `flow.ChannelFlow`: live and needed channels, and the running costs.
- `plan.ChannelPlan`: the channels a compact model keeps.
"""

from keras_drnet.graph.flow import ChannelFlow
from keras_drnet.graph.flow import LayerCost
from keras_drnet.graph.flow import layer_costs
from keras_drnet.graph.flow import running_costs
from keras_drnet.graph.kinds import LayerKind
from keras_drnet.graph.kinds import register_layer_kind
from keras_drnet.graph.plan import ChannelPlan
from keras_drnet.graph.trace import FlatNode
from keras_drnet.graph.trace import Graph

__all__ = [
    "ChannelFlow", "ChannelPlan", "FlatNode", "Graph", "LayerCost",
    "LayerKind", "layer_costs", "register_layer_kind", "running_costs",
]
