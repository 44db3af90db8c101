"""Layer kinds: everything the package knows about one type of layer.

A *kind* says how a layer call maps channels: which outputs are live given
the live inputs (forward), which inputs are needed given the needed outputs
(backward), which tensors must keep the same channels (coupling), how
index sets map through it (`Concatenate`, `Flatten`, depth multipliers),
what it costs, how to slice its weights to kept channels and how to zero
an output channel in them. Every other module asks the kind of a call
(`FlatNode.kind`) instead of testing layer types, so adding a layer type
is one `register_layer_kind` call.

Channels are on the channel axis (`axes.channel_axis`); a call of a type
nothing here knows is a `MIXING` call (every output reads every input, no
channel removed through it), and a custom layer is named in a warning.
"""

import math
import warnings

import keras
import numpy as np

from keras_drnet.channel_gate import ChannelGate
from keras_drnet.graph.axes import channel_axis
from keras_drnet.graph.axes import channels


def _bias_nonzero(op, size):
    if getattr(op, "use_bias", False):
        return keras.ops.convert_to_numpy(op.bias) != 0
    return np.zeros(size, bool)


def _spatial(flat):
    out = flat.node.output_tensors[0]
    axis = channel_axis(out, flat.channels_first)
    return math.prod(
        int(d) for i, d in enumerate(out.shape) if i not in (0, axis) and d
    )


class LayerKind:
    """How channels flow through a kind of layer call (the base: mixing).

    Subclass it for a custom layer and register it with
    `keras_drnet.register_layer_kind`. The base behaviour is the safe one
    for any layer: every output channel reads every input channel, none of
    them can be removed through the layer, and its weights are its cost.

    Attributes:
        name: str. The kind's name, e.g. `"channelwise"`.
        couples: bool. The call's inputs and outputs are the same channels
            (a channel removed from one is removed from all).
        keeps_channels: bool. The call's tensors keep all their channels
            in a compact model (set for layers that cannot be sliced).
        carries_zero: bool. A closed channel stays 0 through the call, so
            the zero may be folded into the weights upstream of it.
        keeps_constant: bool. A constant channel stays the same constant.
        linear: bool. The call is `x @ W + b` over its input channels (or
            per channel), so a constant input folds into its bias.
        sets_channels: bool. Its weights write each output channel, so
            zeroing them there (`zero_outputs`) zeroes the channel.
        maps_indices: bool. Kept channel indices map through the call
            (`index_map`) rather than staying the same.
    """

    name = "mixing"
    couples = False
    keeps_channels = True
    carries_zero = False
    keeps_constant = False
    linear = False
    sets_channels = False
    maps_indices = False

    def coupled(self, flat):
        """Whether this call's inputs and outputs are the same channels."""
        return self.couples

    def forward(self, flat, live_in, size):
        """Output channels that can be non-zero, given the live inputs."""
        return np.ones(size, bool)

    def backward(self, flat, need_out, live_in):
        """Per input, the channels the needed output channels read."""
        return [np.full(x.size, need_out.any()) for x in live_in]

    def index_map(self, flat, kept_in, kept_out):
        """`(output channels the kept inputs imply, per input the channels
        the kept output implies)`, as bool arrays (`maps_indices` kinds)."""
        raise NotImplementedError

    def cost(self, flat, live_in, need_out):
        """`(params, running params, MACs, running MACs)` of the call."""
        if isinstance(flat.op, _CONV):  # grouped: no channel is removed
            return _kernel_cost(flat, live_in, need_out)
        params = sum(math.prod(w.shape) for w in getattr(flat.op, "weights",
                                                         ()))
        return params, params, 0, 0

    def slice(self, flat, config, weights, kept_in, kept_out):
        """The config and weights computing only `kept_out` from
        `kept_in`; the base keeps both as they are."""
        return config, weights

    def zero_outputs(self, flat, weights, positions):
        """Zeroes output channels `positions` in sliced `weights` so the
        call outputs exactly 0 there; False where it cannot."""
        return False

    def refit_form(self, flat):
        """How `keras_drnet.repair` refits the call's weights by least
        squares: `"dense"` (`x @ W + b`), `"conv"` (2-D patches `@ W + b`),
        `"depthwise"` (each channel its own 2-D kernel), or `None` (the
        weights stay as compacted)."""
        return None

    def __repr__(self):
        return f"<LayerKind {self.name}>"


class Gate(LayerKind):
    name = "gate"
    couples = True
    keeps_channels = False

    def forward(self, flat, live_in, size):
        return live_in[0] & (keras.ops.convert_to_numpy(flat.op.gate) != 0)

    def backward(self, flat, need_out, live_in):
        return [need_out & (keras.ops.convert_to_numpy(flat.op.gate) != 0)]

    def cost(self, flat, live_in, need_out):
        return 0, 0, 0, 0  # gates are not part of the user's network


class Channelwise(LayerKind):
    """Each channel on its own (BatchNorm, activations, pooling, ...)."""

    name = "channelwise"
    couples = True
    keeps_channels = False
    carries_zero = True

    def __init__(self, keeps_constant=False):
        self.keeps_constant = keeps_constant

    def forward(self, flat, live_in, size):
        return live_in[0] | zero_response(flat)

    def backward(self, flat, need_out, live_in):
        return [need_out.copy()]

    def slice(self, flat, config, weights, kept_in, kept_out):
        return config, [w[kept_out] for w in weights]


class PerChannelConstant(Channelwise):
    """`Rescaling`: `x * scale + offset`, where `scale` and `offset` may
    hold one value per channel (as the masks `compact` leaves do)."""

    name = "rescaling"

    def slice(self, flat, config, weights, kept_in, kept_out):
        x = flat.node.input_tensors[0]
        axis = channel_axis(x, flat.channels_first)
        for key in ("scale", "offset"):
            value = np.asarray(getattr(flat.op, key))
            # The value's axis that broadcasts against the channel axis.
            own = axis - (len(x.shape) - value.ndim)
            if value.ndim and own >= 0 and value.shape[own] > 1:
                config[key] = keras.saving.serialize_keras_object(
                    np.take(value, kept_out, axis=own)
                )
        return config, weights


class BatchNorm(Channelwise):
    """`BatchNormalization`: four numbers per channel."""

    name = "batchnorm"
    sets_channels = True

    def cost(self, flat, live_in, need_out):
        params = sum(math.prod(w.shape) for w in flat.op.weights)
        per_channel = params // need_out.size
        return params, per_channel * int(need_out.sum()), 0, 0

    def zero_outputs(self, flat, weights, positions):
        if not (flat.op.scale and flat.op.center):
            return False
        weights[0][positions] = weights[1][positions] = 0
        return True


class Merge(LayerKind):
    """Two or more tensors of the same channels combined channel by
    channel: live if any input is (`Add`, ...) or all are (`Multiply`)."""

    couples = True
    keeps_channels = False

    def __init__(self, any_live):
        self.any_live = any_live
        self.name = "merge_any" if any_live else "merge_all"

    def forward(self, flat, live_in, size):
        reduce = np.logical_or if self.any_live else np.logical_and
        return reduce.reduce(live_in)

    def backward(self, flat, need_out, live_in):
        return [need_out.copy() for _ in live_in]


def _kernel_cost(flat, live_in, need_out):
    """Costs of a Conv (any `groups`) or Dense kernel."""
    op = flat.op
    kernel = tuple(op.kernel.shape)
    window = math.prod(kernel[:-2])
    groups = getattr(op, "groups", 1)
    bias = 1 if getattr(op, "use_bias", False) else 0
    live, need = int(live_in[0].sum()), int(need_out.sum())
    spatial = _spatial(flat)
    params = window * kernel[-2] * kernel[-1] + bias * kernel[-1]
    running = window * live * need // groups + bias * need
    macs = window * kernel[-2] * kernel[-1] * spatial
    running_macs = window * live * need * spatial // groups
    return params, running, macs, running_macs


def _summed_kernel(op):
    """`[in, out]` (or `[in, multiplier]`): the kernel summed over its
    window positions."""
    kernel = keras.ops.convert_to_numpy(op.kernel).astype("float64")
    return kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0)


def _activation_keeps_zero(op):
    activation = getattr(op, "activation", None)
    if activation is None:
        return True
    at_zero = keras.ops.convert_to_numpy(activation(keras.ops.zeros(1)))
    return at_zero[0] == 0


class Dense(LayerKind):
    """Every output reads every input channel: Dense on the channel axis,
    Conv1D/2D/3D with `groups=1`."""

    name = "dense"
    keeps_channels = False
    linear = True
    sets_channels = True

    def forward(self, flat, live_in, size):
        return np.full(size, live_in[0].any()) | _bias_nonzero(flat.op, size)

    def cost(self, flat, live_in, need_out):
        return _kernel_cost(flat, live_in, need_out)

    def constant_shift(self, flat, constant):
        """What a constant input (one value per input channel) adds to
        every output channel away from borders (`linear` kinds)."""
        return constant @ _summed_kernel(flat.op)

    def slice(self, flat, config, weights, kept_in, kept_out):
        key = "units" if isinstance(flat.op, keras.layers.Dense) else "filters"
        config[key] = len(kept_out)
        kernel = weights[0][..., kept_in, :][..., kept_out]
        return config, [kernel] + [w[kept_out] for w in weights[1:]]

    def zero_outputs(self, flat, weights, positions):
        if not _activation_keeps_zero(flat.op):
            return False
        weights[0][..., positions] = 0
        if getattr(flat.op, "use_bias", False):
            weights[-1][positions] = 0
        return True

    def refit_form(self, flat):
        # Exactly these classes: a subclass may compute something else.
        if type(flat.op) is keras.layers.Conv2D:
            return "conv"
        return "dense" if type(flat.op) is keras.layers.Dense else None


class Depthwise(LayerKind):
    """Output channel `c * m + j` reads input channel `c` only."""

    name = "depthwise"
    maps_indices = True
    keeps_channels = False
    linear = True
    sets_channels = True

    def multiplier(self, flat):
        return flat.op.depth_multiplier

    def coupled(self, flat):
        return self.multiplier(flat) == 1

    def forward(self, flat, live_in, size):
        repeated = np.repeat(live_in[0], self.multiplier(flat))
        return repeated | _bias_nonzero(flat.op, size)

    def backward(self, flat, need_out, live_in):
        return [need_out.reshape(-1, self.multiplier(flat)).any(axis=1)]

    def index_map(self, flat, kept_in, kept_out):
        m = self.multiplier(flat)
        derived = np.repeat(kept_in[0], m)
        return derived, [(kept_out | derived).reshape(-1, m).any(axis=1)]

    def cost(self, flat, live_in, need_out):
        return _depthwise_cost(flat, live_in, need_out, separable=False)

    def constant_shift(self, flat, constant):
        # Output channel c * multiplier + j reads input channel c only.
        return (_summed_kernel(flat.op) * constant[:, None]).reshape(-1)

    def slice(self, flat, config, weights, kept_in, kept_out):
        return config, [weights[0][..., kept_in, :]] + [
            w[kept_out] for w in weights[1:]
        ]

    def zero_outputs(self, flat, weights, positions):
        if self.multiplier(flat) != 1 or not _activation_keeps_zero(flat.op):
            return False
        weights[0][..., positions, :] = 0
        if getattr(flat.op, "use_bias", False):
            weights[-1][positions] = 0
        return True

    def refit_form(self, flat):
        two_d = isinstance(flat.op, keras.layers.DepthwiseConv2D)
        return "depthwise" if two_d and self.multiplier(flat) == 1 else None


class Separable(LayerKind):
    """A depthwise then a pointwise convolution: every output reads every
    input channel."""

    name = "separable"
    keeps_channels = False
    sets_channels = True

    def forward(self, flat, live_in, size):
        return np.full(size, live_in[0].any()) | _bias_nonzero(flat.op, size)

    def cost(self, flat, live_in, need_out):
        return _depthwise_cost(flat, live_in, need_out, separable=True)

    def slice(self, flat, config, weights, kept_in, kept_out):
        m = flat.op.depth_multiplier
        config["filters"] = len(kept_out)
        middle = (kept_in[:, None] * m + np.arange(m)).ravel()
        return config, [
            weights[0][..., kept_in, :],
            weights[1][..., middle, :][..., kept_out],
        ] + [w[kept_out] for w in weights[2:]]

    def zero_outputs(self, flat, weights, positions):
        if flat.op.depth_multiplier != 1 or not _activation_keeps_zero(
            flat.op
        ):
            return False
        weights[1][..., positions] = 0
        if getattr(flat.op, "use_bias", False):
            weights[-1][positions] = 0
        return True


def _depthwise_cost(flat, live_in, need_out, separable):
    op = flat.op
    kernel = tuple(op.depthwise_kernel.shape if separable else op.kernel.shape)
    window = math.prod(kernel[:-2])
    spatial = _spatial(flat)
    mid_live = np.repeat(live_in[0], op.depth_multiplier)
    mid_need = np.full(mid_live.size, need_out.any()) if separable else need_out
    depth = window * mid_live.size
    params, running = depth, window * int((mid_live & mid_need).sum())
    macs, running_macs = params * spatial, running * spatial
    if separable:
        point = mid_live.size * need_out.size
        point_running = int(mid_live.sum()) * int(need_out.sum())
        params, running = params + point, running + point_running
        macs += point * spatial
        running_macs += point_running * spatial
    bias = 1 if getattr(op, "use_bias", False) else 0
    params += bias * need_out.size
    running += bias * int(need_out.sum())
    return params, running, macs, running_macs


class Concat(LayerKind):
    """`Concatenate` on the channel axis: the inputs' channels in order."""

    name = "concat"
    maps_indices = True
    keeps_channels = False

    def forward(self, flat, live_in, size):
        return np.concatenate(live_in)

    def backward(self, flat, need_out, live_in):
        return np.split(need_out, np.cumsum([x.size for x in live_in])[:-1])

    def index_map(self, flat, kept_in, kept_out):
        derived = np.concatenate(kept_in)
        return derived, np.split(
            kept_out | derived, np.cumsum([i.size for i in kept_in])[:-1]
        )


class Flatten(LayerKind):
    """`Flatten` (or `Reshape` to one axis): channel `c` becomes several
    entries, every C-th (channels last in memory) or a block."""

    name = "flatten"
    maps_indices = True
    keeps_channels = False

    def tiled(self, flat):
        op, x = flat.op, flat.node.input_tensors[0]
        last = channel_axis(x, flat.channels_first) == len(x.shape) - 1
        # Flatten(data_format="channels_first") moves axis 1 to the end.
        moves = (
            isinstance(op, keras.layers.Flatten)
            and op.data_format == "channels_first"
            and len(x.shape) > 2
        )
        if last:
            return None if moves else True
        return bool(moves)

    def expand(self, flat, channel_mask, size):
        """A per-channel mask of the input, on the flattened output."""
        if self.tiled(flat):
            return np.tile(channel_mask, size // channel_mask.size)
        return np.repeat(channel_mask, size // channel_mask.size)

    def reduce(self, flat, entry_mask, size):
        """Input channels any of whose flattened entries is set."""
        if self.tiled(flat):
            return entry_mask.reshape(-1, size).any(axis=0)
        return entry_mask.reshape(size, -1).any(axis=1)

    def forward(self, flat, live_in, size):
        return self.expand(flat, live_in[0], size)

    def backward(self, flat, need_out, live_in):
        return [self.reduce(flat, need_out, live_in[0].size)]

    def index_map(self, flat, kept_in, kept_out):
        derived = self.expand(flat, kept_in[0], kept_out.size)
        return derived, [self.reduce(flat, kept_out | derived,
                                     kept_in[0].size)]

    def slice(self, flat, config, weights, kept_in, kept_out):
        if isinstance(flat.op, keras.layers.Reshape):
            config["target_shape"] = (len(kept_out),)
        return config, weights


MIXING = LayerKind()
GATE = Gate()
CHANNELWISE = Channelwise()
CHANNELWISE_CONSTANT = Channelwise(keeps_constant=True)
BATCHNORM = BatchNorm()
RESCALING = PerChannelConstant()
DENSE = Dense()
DEPTHWISE = Depthwise()
SEPARABLE = Separable()
CONCAT = Concat()
FLATTEN = Flatten()
MERGE_ANY = Merge(any_live=True)
MERGE_ALL = Merge(any_live=False)
BUILT_IN = {
    kind.name: kind
    for kind in (MIXING, GATE, CHANNELWISE, BATCHNORM, DENSE, DEPTHWISE, SEPARABLE,
                 CONCAT, FLATTEN, MERGE_ANY, MERGE_ALL)
}

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
# A constant channel stays the same constant through these.
_KEEP_CONSTANT = (
    *POOLING,
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.Identity,
)
# Layers that act on each channel on its own and keep the count.
_CHANNELWISE = (
    *_KEEP_CONSTANT,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Activation,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.UpSampling1D,
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
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

_REGISTERED = {}


def register_layer_kind(layer_class, kind):
    """Tells the package how channels flow through a custom layer.

    Every stage (dissection, the channel analysis, costs, `compact`,
    `repair`, calibration) then treats the layer by its kind. Without
    registration a custom layer is a "mixing" layer: it keeps all its
    channels (safe, but nothing is removed through it), with a warning.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        kind: one of `"channelwise"` (each channel on its own, same count:
            per-channel weights are sliced along their first axis),
            `"merge_any"`, `"merge_all"`, `"dense"` (a `kernel` of shape
            `[..., in, out]` and `bias`, sliced on both), `"mixing"`; or a
            `keras_drnet.LayerKind` instance for anything else.

    Example:

    ```python
    @keras.saving.register_keras_serializable()
    class Scale(keras.layers.Layer):  # one learned factor per channel
        def build(self, input_shape):
            self.factor = self.add_weight(shape=(input_shape[-1],))
        def call(self, x):
            return x * self.factor

    keras_drnet.register_layer_kind(Scale, "channelwise")
    ```
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class,
                                                          keras.Layer)):
        raise TypeError(
            "`layer_class` must be a `keras.layers.Layer` subclass. "
            f"Received: layer_class={layer_class!r}"
        )
    if isinstance(kind, str):
        choices = ["channelwise", "merge_any", "merge_all", "dense", "mixing"]
        if kind not in choices:
            raise ValueError(
                f"`kind` must be one of {choices} or a `LayerKind` instance. "
                f"Received: kind={kind!r}"
            )
        kind = BUILT_IN[kind]
    elif not isinstance(kind, LayerKind):
        raise TypeError(
            "`kind` must be a kind's name or a `keras_drnet.LayerKind` "
            f"instance. Received: kind={kind!r}"
        )
    _REGISTERED[layer_class] = kind


def _scalar_constants(node):
    """Whether every non-tensor argument of a call is a scalar."""
    tensors = {id(t) for t in node.input_tensors}
    leaves = keras.tree.flatten((node.arguments.args, node.arguments.kwargs))
    return all(
        id(leaf) in tensors or leaf is None or np.size(leaf) == 1
        for leaf in leaves
    )


def kind_of(flat):
    """The `LayerKind` of one call site (a `trace.FlatNode`)."""
    op, node = flat.op, flat.node
    out = node.output_tensors[0]
    ins = node.input_tensors
    first = flat.channels_first
    for cls in type(op).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    if isinstance(op, ChannelGate):
        return GATE
    if isinstance(op, _DEPTHWISE):
        return DEPTHWISE
    if isinstance(op, _SEPARABLE):
        return SEPARABLE
    if isinstance(op, _CONV) and getattr(op, "groups", 1) == 1:
        return DENSE
    if isinstance(op, keras.layers.Dense):
        # A Dense acts on the last axis: on channels_first maps, not channels.
        last = channel_axis(ins[0], first) == len(ins[0].shape) - 1
        return DENSE if last else MIXING
    same = all(channels(t, first) == channels(out, first) for t in ins)
    mixing = getattr(op, "activation", None) in (
        keras.activations.softmax,
        keras.activations.log_softmax,
    )
    if isinstance(op, keras.layers.BatchNormalization) and len(ins) == 1:
        return BATCHNORM
    if isinstance(op, keras.layers.Rescaling) and len(ins) == 1 and same:
        return RESCALING
    if isinstance(op, _CHANNELWISE) and len(ins) == 1 and same and not mixing:
        constant = isinstance(op, _KEEP_CONSTANT)
        return CHANNELWISE_CONSTANT if constant else CHANNELWISE
    name = "" if isinstance(op, keras.Layer) else type(op).__name__
    if name in _ELEMENTWISE_OPS and same and _scalar_constants(node):
        if len(ins) == 1:
            return CHANNELWISE
        if len(ins) == 2 and name in _MERGE_ANY_OPS:
            return MERGE_ANY
        if len(ins) == 2 and name in _MERGE_ALL_OPS:
            return MERGE_ALL
    if isinstance(op, _MERGE_ANY) and same:
        return MERGE_ANY
    if isinstance(op, keras.layers.Multiply) and same:
        return MERGE_ALL
    if (
        isinstance(op, keras.layers.Concatenate)
        and op.axis % len(out.shape) == channel_axis(out, first)
    ):
        return CONCAT
    if (
        isinstance(op, (keras.layers.Flatten, keras.layers.Reshape))
        and len(ins) == 1
        and len(out.shape) == 2
        and channels(out, first) % channels(ins[0], first) == 0
        and FLATTEN.tiled(flat) is not None
    ):
        return FLATTEN
    if isinstance(op, keras.Layer) and not type(op).__module__.startswith(
        "keras."
    ):
        warnings.warn(
            f"Layer '{op.name}' ({type(op).__name__}) is of a type "
            "keras_drnet does not know: all its channels are kept, and no "
            "channel is removed through it. If it acts on each channel on "
            "its own, say so with `keras_drnet.register_layer_kind("
            f"{type(op).__name__}, 'channelwise')` (or another kind).",
            stacklevel=2,
        )
    return MIXING


def zero_response(flat):
    """Channels a channelwise call makes non-zero from an all-zero input."""
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
