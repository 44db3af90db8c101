"""Mask-aware BatchNorm recalibration of a gated model."""

import keras
import numpy as np
from keras import ops

from keras_drnet.batching import first_batch
from keras_drnet.channel_gate import ChannelGate
from keras_drnet.graph import Graph
from keras_drnet.graph.kinds import BATCHNORM
from keras_drnet.graph.kinds import FLATTEN
from keras_drnet.model_surgery import calls_replaced


def batchnorm_layers(model):
    """`model`'s BatchNormalization layers (nested ones too), each once."""
    layers = {}
    for flat in Graph(model, kinds=False).nodes:
        if isinstance(flat.op, keras.layers.BatchNormalization):
            layers.setdefault(id(flat.op), flat.op)
    return list(layers.values())


def batchnorm_statistics(model):
    """Every BatchNorm's moving mean and variance in `model`, one array."""
    values = [
        ops.convert_to_numpy(v) for v in _statistic_variables(model)
    ]
    return np.concatenate(values) if values else np.zeros(0, "float32")


def set_batchnorm_statistics(model, values):
    """Writes `batchnorm_statistics()` of an equal model into `model`."""
    variables = _statistic_variables(model)
    offsets = np.cumsum([0] + [v.shape[0] for v in variables])
    for variable, start, stop in zip(variables, offsets, offsets[1:]):
        variable.assign(values[start:stop])


def _statistic_variables(model):
    return [
        v for bn in batchnorm_layers(model)
        for v in (bn.moving_mean, bn.moving_variance)
    ]


def affected_batchnorms(gated_model):
    """BatchNormalization layers whose input depends on a closed gate.

    Only these see other statistics once the gates are set; the others keep
    the ones they were trained with.
    """
    affected, layers = set(), {}
    for flat in Graph(gated_model, kinds=False).nodes:
        op = flat.op
        closed = isinstance(op, ChannelGate) and bool(
            np.any(ops.convert_to_numpy(op.gate) != 1.0)
        )
        if closed or any(key in affected for key in flat.inputs):
            affected.update(flat.outputs)
            if isinstance(op, keras.layers.BatchNormalization):
                layers[id(op)] = op
    return list(layers.values())


def calibrate_batchnorm(gated_model, images, max_images=1024):
    """Re-estimates BatchNorm statistics under the gates' current masks.

    Every BatchNormalization layer downstream of a closed gate gets the mean
    and (population) variance of its input over `images`, as the masked
    network computes it; the others are left alone, so a model whose gates
    are all open is unchanged. The images run as one batch, in inference
    mode, so each layer is calibrated on inputs that the layers before it
    already normalize with their new statistics (Dropout etc. stay off).

    Args:
        gated_model: a model returned by `keras_drnet.inject_gates()`, with
            its gates set (e.g. a `SubtaskModel`'s `gated_model`).
        images: numpy array or `tf.data.Dataset` of images (or `(image,
            label)` pairs), preprocessed as the model expects, typically a few
            hundred of the sub-task's classes.
        max_images: int. At most this many images are used.

    Returns:
        The names of the recalibrated layers.

    Example:

    ```python
    keras_drnet.calibrate_batchnorm(sub.gated_model, cat_dog_images)
    ```
    """
    return record_statistics(
        gated_model, affected_batchnorms(gated_model), images, max_images
    )


def record_statistics(model, layers, images, max_images):
    """Sets the moving mean and variance of `layers` to those on `images`.

    The images run as one inference batch; each layer records its input's
    moments, then normalizes with them, so later layers see the earlier
    ones already recalibrated. Returns the names of the layers.
    """
    if not layers:
        return []
    batch = first_batch(model, images, max_images, "BatchNorm recalibration")

    def recording_call(layer):
        original = layer.call

        def call(inputs, training=None, mask=None):
            x = ops.cast(inputs, "float32")
            channel_axis = layer.axis % len(x.shape)
            axes = [a for a in range(len(x.shape)) if a != channel_axis]
            layer.moving_mean.assign(ops.mean(x, axis=axes))
            layer.moving_variance.assign(ops.var(x, axis=axes))
            return original(inputs, training=False, mask=mask)

        return call

    with calls_replaced(layers, recording_call):
        model(batch, training=False)
    return [layer.name for layer in layers]


def fill_closed_channels(gated_model, images, max_images=1024):
    """Mean replacement: closed channels read as their mean, not as 0.

    Each closed channel of a gate is given its mean activation over
    `images` (and positions), as the masked network computes it, and that
    constant is folded into the layers that read it: a Conv/Dense/Depthwise
    layer reached through pooling, dropout or Flatten gets the constant's
    contribution `sum_k W[k, c, :] * mean_c` added to its bias, or, without
    a bias, subtracted from the moving mean of the BatchNormalization that
    follows it. The gates stay closed, so `keras_drnet.compact()` removes
    the channels and keeps the fold: the compact model equals the filled
    masked one. (With "same" padding, positions at the border get the same
    shift as the interior: the fold, not a constant feature map, is what
    the filled network computes.) A gate whose output also reaches other
    layers (a residual add, a concatenation) is left as it is.

    Args:
        gated_model: a model returned by `keras_drnet.inject_gates()`, with
            its gates set (e.g. a `SubtaskModel`'s `gated_model`).
        images: numpy array or `tf.data.Dataset` of images (or `(image,
            label)` pairs) of the sub-task, preprocessed as the model
            expects.
        max_images: int. At most this many images are used.

    Returns:
        The names of the gates whose closed channels were filled.

    Example:

    ```python
    keras_drnet.fill_closed_channels(sub.gated_model, cat_dog_images)
    small = keras_drnet.compact(sub)  # the same outputs
    ```
    """
    graph = Graph(gated_model)
    plans = []
    for flat in graph.nodes:
        if not isinstance(flat.op, ChannelGate):
            continue
        mask = ops.convert_to_numpy(flat.op.gate)
        closed = mask == 0
        if closed.any():
            folds = _folds(graph.readers, flat.outputs[0], len(mask))
            if folds is not None:
                plans.append((flat.op, closed, folds))
    if not plans:
        return []
    means = _closed_means(gated_model, [gate for gate, _, _ in plans],
                          images, max_images)
    for (gate, closed, folds), mean in zip(plans, means):
        constant = np.where(closed, mean, 0.0)
        for flat, repeat, batchnorm in folds:
            shift = flat.kind.constant_shift(flat, np.tile(constant, repeat))
            consumer = flat.op
            if getattr(consumer, "use_bias", False):
                consumer.bias.assign(
                    ops.convert_to_numpy(consumer.bias) + shift)
            else:
                batchnorm.moving_mean.assign(
                    ops.convert_to_numpy(batchnorm.moving_mean) - shift)
    return [gate.name for gate, _, _ in plans]


def _folds(readers, key, channels):
    """`[(consumer call, repeat, batchnorm or None)]` for a gate's output, or
    None if some path reaches a layer the constant cannot be folded into."""
    folds, frontier = [], [(key, 1)]
    while frontier:
        key, repeat = frontier.pop()
        for flat in readers.get(key, []):
            op, kind = flat.op, flat.kind
            if kind.keeps_constant:
                frontier.append((flat.outputs[0], repeat))
            elif kind is FLATTEN and FLATTEN.tiled(flat):
                size = int(np.prod(flat.node.output_tensors[0].shape[1:]))
                frontier.append((flat.outputs[0], repeat * size // channels))
            elif kind.linear:
                batchnorm = None
                if not op.use_bias:
                    after = readers.get(flat.outputs[0], [])
                    if len(after) != 1 or after[0].kind is not BATCHNORM:
                        return None
                    batchnorm = after[0].op
                folds.append((flat, repeat, batchnorm))
            else:
                return None
    return folds


def _closed_means(gated_model, gates, images, max_images):
    """Per gate, the mean of its input per channel over `images`, in a
    pass where each gate already replaces its closed channels by them."""
    batch = first_batch(gated_model, images, max_images,
                         "Filling closed channels")
    means = {}

    def filling_call(gate):
        def call(inputs):
            x = ops.cast(inputs, "float32")
            axis = gate.axis % len(x.shape)
            mean = ops.mean(x, axis=[a for a in range(len(x.shape))
                                     if a != axis])
            means[id(gate)] = ops.convert_to_numpy(mean)
            shape = [1] * len(x.shape)
            shape[axis] = gate.channels
            g = ops.reshape(ops.cast(gate.gate, "float32"), shape)
            filled = x * g + (1.0 - g) * ops.reshape(mean, shape)
            return ops.cast(filled, inputs.dtype)

        return call

    with calls_replaced(gates, filling_call):
        gated_model(batch, training=False)
    return [means[id(gate)] for gate in gates]
