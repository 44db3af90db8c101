"""Mask-aware BatchNorm recalibration of a gated model."""

import keras
import numpy as np
from keras import ops

from keras_drnet.batching import image_batches
from keras_drnet.batching import model_input_shape
from keras_drnet.channel_flow import flat_nodes
from keras_drnet.channel_gate import ChannelGate


def batchnorm_layers(model):
    """`model`'s BatchNormalization layers (nested ones too), each once."""
    layers = {}
    for flat in flat_nodes(model)[0]:
        if isinstance(flat.op, keras.layers.BatchNormalization):
            layers.setdefault(id(flat.op), flat.op)
    return list(layers.values())


def affected_batchnorms(gated_model):
    """BatchNormalization layers whose input depends on a closed gate.

    Only these see other statistics once the gates are set; the others keep
    the ones they were trained with.
    """
    nodes, _, _ = flat_nodes(gated_model)
    affected, layers = set(), {}
    for flat in nodes:
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
    input_shape, dtype = model_input_shape(model)
    batch = next(image_batches(images, max_images, input_shape, dtype), None)
    if batch is None or len(batch) == 0:
        raise ValueError(
            "`images` is empty: BatchNorm recalibration needs images of the "
            "sub-task's classes."
        )

    def recording_call(layer, original):
        def call(inputs, training=None, mask=None):
            x = ops.cast(inputs, "float32")
            channel_axis = layer.axis % len(x.shape)
            axes = [a for a in range(len(x.shape)) if a != channel_axis]
            layer.moving_mean.assign(ops.mean(x, axis=axes))
            layer.moving_variance.assign(ops.var(x, axis=axes))
            return original(inputs, training=False, mask=mask)

        return call

    try:
        for layer in layers:
            # An instance attribute shadows the class's `call` for this run.
            object.__setattr__(layer, "call", recording_call(layer, layer.call))
        model(batch, training=False)
    finally:
        for layer in layers:
            object.__delattr__(layer, "call")
    return [layer.name for layer in layers]
