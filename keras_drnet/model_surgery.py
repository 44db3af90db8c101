"""Put a `ChannelGate` after every ReLU of a Keras model, and list the gates."""

import collections
import contextlib
import dataclasses
import warnings

import keras

from keras_drnet.channel_gate import ChannelGate
from keras_drnet.civ import CIVs
from keras_drnet.civ import gate_layout
from keras_drnet.civ import model_fingerprint

_RELU_ACTIVATIONS = ("relu", "relu6")
# Op classes of `keras.ops.relu`, `keras.ops.relu6` and `keras.activations.relu`.
_RELU_OPS = ("Relu", "Relu6", "ReLU", "LeakyRelu")
_SELECTIONS = ("all", "conv", "dense")


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """One gate of a gated model.

    Attributes:
        name: path of the gate in the model, `"submodel/conv1_gate"` for a
            gate inside a nested model.
        source: name of the layer or op whose output the gate scales.
        channels: number of gated channels.
        layer: the `ChannelGate` layer itself.
    """

    name: str
    source: str
    channels: int
    layer: ChannelGate


def _activation_name(op):
    """Name of the ReLU-family activation `op` ends with, or `None`."""
    if isinstance(op, ChannelGate):
        return None
    if isinstance(op, (keras.layers.ReLU, keras.layers.LeakyReLU)):
        # A leaky ReLU passes negative values: not a ReLU in DRNet's sense,
        # unless its slope is 0.
        return "relu" if not op.negative_slope else None
    if type(op).__name__ in _RELU_OPS and not isinstance(op, keras.Layer):
        return "relu" if not getattr(op, "negative_slope", 0) else None
    activation = getattr(op, "activation", None)
    if callable(activation):
        name = getattr(activation, "__name__", None)
        if name in _RELU_ACTIVATIONS and activation is keras.activations.get(
            name
        ):
            return name
    return None


def _channel_axis(op, tensor):
    """Channel axis of `op`'s output: the nearest data format upstream."""
    while True:
        if getattr(op, "data_format", None) is not None:
            return 1 if op.data_format == "channels_first" else -1
        if isinstance(op, keras.layers.BatchNormalization):
            return 1 if op.axis in (1, [1]) else -1
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return -1
        op = history.operation
        node = op._inbound_nodes[history.node_index]
        if not node.input_tensors:
            return -1
        tensor = node.input_tensors[0]


def _selected(select, op, output):
    if callable(select):
        return bool(select(op, output))
    rank = len(output.shape)
    return select == "all" or (select == "conv") == (rank > 2)


def as_functional(model):
    """A built Sequential model as a functional one on the same layers."""
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ValueError(
                f"Sequential model '{model.name}' is not built, so its graph "
                "is unknown. Build it first, e.g. start it with "
                "`keras.Input(shape)` or call `model.build(input_shape)`."
            )
        unwrap = lambda t: t[0] if len(t) == 1 else t
        return keras.Model(
            unwrap(model.inputs), unwrap(model.outputs), name=model.name
        )
    return model


def check_cloneable(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Expected a `keras.Model` (Sequential or functional). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    is_graph = isinstance(model, keras.Sequential) or hasattr(
        model, "_nodes_by_depth"
    )
    if not is_graph:
        raise ValueError(
            f"Model '{model.name}' is a subclassed `keras.Model` "
            f"({type(model).__name__}); its layer graph is hidden in `call()`, "
            "so gates cannot be placed. Rebuild it with the functional API or "
            "`keras.Sequential` (subclassed layers inside are fine)."
        )
    try:
        inputs = model.inputs
    except AttributeError:
        inputs = None
    if not inputs:
        raise ValueError(
            f"Model '{model.name}' is not built: it has no inputs yet. Start "
            "it with `keras.Input(shape)`, or call `model.build(input_shape)`"
            " before passing it."
        )


def copy_layer(layer):
    """A fresh layer with `layer`'s config (weights are copied by callers).

    A `Lambda` is rebuilt around its in-memory function: going through its
    config would refuse a Python lambda (Keras's safe mode is for files,
    and nothing is loaded here).
    """
    if isinstance(layer, keras.layers.Lambda):
        config = layer.get_config()
        return keras.layers.Lambda(
            layer.function,
            output_shape=layer._output_shape,
            mask=layer.mask,
            arguments=layer.arguments,
            name=config["name"],
            dtype=config.get("dtype"),
        )
    return layer.__class__.from_config(layer.get_config())


def copy_model(model):
    """A copy of a functional or Sequential model sharing nothing with it."""
    copy = keras.models.clone_model(model, clone_function=copy_layer)
    copy.set_weights(model.get_weights())
    return copy


def inject_gates(model, select="all"):
    """Returns a copy of `model` with a `ChannelGate` after every ReLU.

    ReLU-family means any layer with a fused `relu`/`relu6` activation
    (Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, Dense, `Activation`),
    `keras.layers.ReLU` with any arguments, and `keras.ops.relu` /
    `keras.ops.relu6` called in a functional graph. A fused activation's
    output is already post-ReLU, so its gate goes right after the layer.
    Nested models are gated recursively; a layer called at several places
    gets one gate per call site. A nested model called at several places
    keeps its weights shared, so its gates are shared too. The channel axis
    is the last one unless the nearest layer upstream with a `data_format`
    (or a BatchNormalization) says `channels_first`. Layers are copied with their weights: the
    gated model shares nothing with `model`, and with all gates at 1 it
    computes exactly the same function.

    Args:
        model: a built Sequential or functional `keras.Model`.
        select: which activations get a gate: `"all"` (default), `"conv"`
            (feature maps: rank > 2), `"dense"` (rank-2 outputs), or a callable
            `fn(source, output) -> bool` receiving the activation's layer or op
            and its output `KerasTensor`.

    Returns:
        A functional `keras.Model` whose gates are `ChannelGate` layers; list
        them with `list_gates()`.

    Example:

    ```python
    model = keras.applications.VGG16(
        weights=None, input_shape=(32, 32, 3), classes=10
    )
    gated = keras_drnet.model_surgery.inject_gates(model)
    [g.name for g in keras_drnet.model_surgery.list_gates(gated)][:2]
    # ['block1_conv1_gate', 'block1_conv2_gate']
    ```
    """
    check_cloneable(model)
    if list_gates(model):
        raise ValueError(
            f"Model '{model.name}' already has `ChannelGate`s: gating it "
            "again would put a second gate after every ReLU. Pass the "
            "original model, or use this one as it is."
        )
    if not (callable(select) or select in _SELECTIONS):
        raise ValueError(
            f"`select` must be one of {list(_SELECTIONS)} or a callable "
            f"`fn(source, output) -> bool`. Received: select={select!r}"
        )
    gated = _inject(model, select)
    ungated = _ungated_activations(model)
    if ungated and list_gates(gated):
        kinds = ", ".join(
            f"{n} {name} channels" for name, n in sorted(ungated.items())
        )
        warnings.warn(
            f"Model '{model.name}' also has activations that DRNet does not "
            f"gate: {kinds}. Only ReLU channels get "
            "a gate; these always run, so CIVs, sub-tasks and compaction "
            "leave them whole.",
            stacklevel=2,
        )
    if not list_gates(gated):
        found = sorted(_activations_in(model))
        raise ValueError(
            f"Model '{model.name}' has no ReLU activation that `select` "
            f"accepts, so there is nothing to gate. DRNet gates ReLU/ReLU6 "
            f"channels. Activations found: {found}. Received: "
            f"select={select!r}"
        )
    return gated


def _inject(model, select):
    functional = as_functional(model)
    originals = {}
    call_sites = {}
    names = {layer.name for layer in functional.layers}

    def clone_function(op):
        if isinstance(op, keras.layers.InputLayer) or not isinstance(
            op, keras.Layer
        ):
            return op
        if isinstance(op, keras.Model):
            check_cloneable(op)
            return _inject(op, select)
        clone = copy_layer(op)
        originals[id(clone)] = (op, clone)
        return clone

    def unique_name(base):
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    def call_function(op, *args, **kwargs):
        outputs = op(*args, **kwargs)
        if _activation_name(op) is None or not _selected(select, op, outputs):
            return outputs
        site = call_sites.get(op.name, 0)
        call_sites[op.name] = site + 1
        base = f"{op.name}_gate" if site == 0 else f"{op.name}_{site}_gate"
        axis = _channel_axis(op, args[0]) if len(outputs.shape) > 2 else -1
        gate = ChannelGate(axis=axis, source=op.name, name=unique_name(base))
        return gate(outputs)

    gated = keras.models.clone_model(
        functional, clone_function=clone_function, call_function=call_function
    )
    for original, clone in originals.values():
        clone.set_weights(original.get_weights())
    return gated


def _activations_in(model):
    found = set()
    for op in as_functional(model).operations:
        if isinstance(op, keras.Model):
            found |= _activations_in(op)
        elif isinstance(op, keras.layers.ReLU):
            found.add("relu")
        elif getattr(op, "activation", None) is not None:
            found.add(getattr(op.activation, "__name__", repr(op.activation)))
        elif not isinstance(op, keras.Layer):
            found.add(type(op).__name__.lower())
    return found


# Feature activations that DRNet leaves ungated (gating functions such as
# sigmoid in squeeze-excite blocks, and output softmaxes, are not counted).
_UNGATED = ("gelu", "silu", "swish", "hard_silu", "hard_swish", "elu",
            "selu", "celu", "tanh", "softplus", "softsign", "mish",
            "leaky_relu")


def _ungated_activations(model):
    """`{activation name: channels}` of the feature activations without a
    gate, over every call site."""
    found = collections.Counter()
    functional = as_functional(model)
    for nodes in functional._nodes_by_depth.values():
        for node in nodes:
            op = node.operation
            if isinstance(op, keras.Model):
                found.update(_ungated_activations(op))
                continue
            if _activation_name(op) is not None:
                continue
            activation = getattr(op, "activation", None)
            if activation is not None:
                name = getattr(activation, "__name__", "")
            else:
                name = _snake(type(op).__name__)
            if name in _UNGATED:
                for tensor in node.output_tensors:
                    found[name] += int(tensor.shape[-1] or 0)
    return dict(found)


def _snake(name):
    return "".join(
        f"_{c.lower()}" if c.isupper() and i else c.lower()
        for i, c in enumerate(name)
    )


def list_gates(model):
    """Lists the gates of a gated model in topological order.

    The order (and each gate's channel count) defines the layout of CDRPs
    and CIVs: gate after gate, channels in order.

    Args:
        model: a model returned by `inject_gates()`.

    Returns:
        A list of `GateSpec`.
    """
    specs = []
    for op in getattr(model, "operations", model.layers):
        if isinstance(op, ChannelGate):
            specs.append(GateSpec(op.name, op.source, op.channels, op))
        elif isinstance(op, keras.Model):
            for spec in list_gates(op):
                specs.append(
                    dataclasses.replace(spec, name=f"{op.name}/{spec.name}")
                )
    return specs


def gate_layers(gated_model):
    """The `ChannelGate` layers of `list_gates()`; an error if there is none."""
    gates = [spec.layer for spec in list_gates(gated_model)]
    if not gates:
        raise ValueError(
            f"Model '{gated_model.name}' has no `ChannelGate`. Pass the "
            "model returned by `keras_drnet.inject_gates(model)`."
        )
    return gates


@contextlib.contextmanager
def calls_replaced(layers, make_call):
    """Runs each layer's `make_call(layer)` instead of its `call` inside.

    Keras has no forward hooks: an instance attribute shadows the class's
    `call` while the context lasts (e.g. to record a layer's input).
    """
    try:
        for layer in layers:
            object.__setattr__(layer, "call", make_call(layer))
        yield
    finally:
        for layer in layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")


def _is_softmax(op):
    if isinstance(op, keras.layers.Softmax):
        return True
    if type(op).__name__ == "Softmax" and not isinstance(op, keras.Layer):
        return True
    activation = getattr(op, "activation", None)
    return activation is keras.activations.softmax


def _is_sigmoid(op):
    if type(op).__name__ == "Sigmoid" and not isinstance(op, keras.Layer):
        return True
    activation = getattr(op, "activation", None)
    return activation is keras.activations.sigmoid


def split_softmax(model):
    """Returns `(logits_model, ended_in_softmax)` for a one-output classifier.

    Gate fitting and the masked softmax need the pre-softmax logits: taking
    the log of a softmax output loses everything below float precision. If
    the model's output comes from a softmax (a `Softmax` or
    `Activation("softmax")` layer, `keras.ops.softmax`, or a layer with a
    fused `activation="softmax"`, as in all of `keras.applications`), the
    returned model stops just before it, sharing all layers with `model`
    (a fused layer gets a linear twin holding a copy of its weights).
    Otherwise the output is taken to be logits already.

    Args:
        model: a functional or Sequential `keras.Model` with one output.
    """
    check_cloneable(model)
    functional = as_functional(model)
    if len(functional.outputs) != 1:
        raise ValueError(
            f"Model '{model.name}' has {len(functional.outputs)} outputs; "
            "DRNet needs a classifier with one output of class scores. Pick "
            "it with `keras.Model(model.inputs, model.outputs[k])`."
        )
    output = functional.outputs[0]
    op, node_index, _ = output._keras_history
    if _is_sigmoid(op):
        raise ValueError(
            f"Model '{model.name}' ends in a sigmoid: a multi-label output, "
            "whose classes do not compete. DRNet's CIVs and masked softmax "
            "need a single-label classifier ending in a softmax or in logits."
        )
    if not _is_softmax(op):
        return functional, False
    if not hasattr(op, "activation") or isinstance(
        op, keras.layers.Activation
    ):
        logits = op._inbound_nodes[node_index].input_tensors[0]
        inputs = functional.inputs
        inputs = inputs[0] if len(inputs) == 1 else inputs
        return keras.Model(inputs, logits, name=model.name), True

    linear = {}

    def clone_function(layer):
        if layer is not op:
            return layer
        config = layer.get_config()
        config.update(activation="linear")
        linear[0] = layer.__class__.from_config(config)
        return linear[0]

    logits_model = keras.models.clone_model(
        functional, clone_function=clone_function
    )
    linear[0].set_weights(op.get_weights())
    return logits_model, True


def gated(model, select="all"):
    """`model` itself if it already has gates, else `inject_gates(model)`."""
    if isinstance(model, keras.Model) and list_gates(model):
        return model
    return inject_gates(model, select=select)


def check_classifier(model):
    """A built full classifier with one tensor output, not a sub-task."""
    # Imported here: `SubtaskModel` is built on this module.
    from keras_drnet.subtask import SubtaskModel

    if isinstance(model, SubtaskModel):
        raise TypeError(
            "`model` is a `SubtaskModel`; pass the original classifier it "
            "was built from (dissect the full network once, then build "
            "sub-tasks from its CIVs)."
        )
    check_cloneable(model)
    # (A Sequential's output is one tensor, and may not be traced yet.)
    if not isinstance(model, keras.Sequential) and isinstance(
        model.output, dict
    ):
        raise ValueError(
            f"Model '{model.name}' has a dict output (keys "
            f"{sorted(model.output)}); DRNet needs one tensor of class "
            "scores, e.g. `keras.Model(model.inputs, model.output[key])`."
        )


def gated_copy(model, civs):
    """A gated model matching `civs` that shares no state with `model`.

    Checks that `model` is a classifier that the CIVs were dissected from.
    """
    if not isinstance(civs, CIVs):
        raise TypeError(
            "`civs` must be `keras_drnet.CIVs` (from `keras_drnet.dissect()` "
            f"or `CIVs.load()`). Received: {type(civs).__name__}"
        )
    check_classifier(model)
    if civs.fingerprint != model_fingerprint(model):
        raise ValueError(
            "These CIVs were dissected from another model (or from this "
            "architecture with other weights): their fingerprint does not "
            "match `model`. Run `keras_drnet.dissect(model, ...)` on this "
            "model, or load the CIVs file made for it."
        )
    select = civs.config.get("select", "all")
    gated_model = gated(model, select if isinstance(select, str) else "all")
    if gate_layout(gated_model) != civs.layout:
        raise ValueError(
            "The gates of `model` do not match the CIVs' layout (the "
            "dissection used another `select`). Pass the gated model used "
            "for the dissection instead."
        )
    if gated_model is model:
        # Masks (and calibration's BatchNorm statistics) are written into the
        # gated model: never into the user's, nor one another sub-task has.
        gated_model = copy_model(model)
    return gated_model
