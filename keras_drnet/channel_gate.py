"""The control gate DRNet puts after every ReLU."""

import contextlib

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_drnet")
class ChannelGate(keras.layers.Layer):
    """Multiplies each channel of its input by a gate value.

    The gate holds one non-trainable value per channel (`gate`, initialised
    to 1, so a fresh gate is the identity). Sub-task inference writes a 0/1
    mask into it with `set_gate()`: the value lives in a variable, so a
    compiled model picks it up without retracing. Gate fitting instead gives
    every image its own gate vector through `per_sample_gates()`, which
    routes a `[batch, channels]` tensor into the layer while a model is
    traced, so gradients flow to those per-image values.

    Args:
        axis: int. The channel axis of the input. Defaults to `-1`.
        source: str or `None`. Name of the layer or op whose output is gated;
            only recorded, it ties the gate to the original model.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Example:

    ```python
    gate = keras_drnet.ChannelGate()
    x = np.ones((2, 4, 4, 3), "float32")
    gate(x)  # identity
    gate.set_gate([1.0, 0.0, 1.0])
    gate(x)[..., 1]  # all zeros
    ```

    Reference:
        DRNet, sec. 3.1: "a control gate after the ReLU operation of each
        channel ... straightly multiplied to the output feature map".
    """

    def __init__(self, axis=-1, source=None, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis
        self.source = source
        self.supports_masking = True
        self._per_sample = None

    def build(self, input_shape):
        channels = input_shape[self.axis]
        if channels is None:
            raise ValueError(
                "ChannelGate needs a known number of channels on axis "
                f"{self.axis}. Received: input_shape={input_shape}"
            )
        self.gate = self.add_weight(
            shape=(channels,),
            initializer="ones",
            trainable=False,
            name="gate",
        )

    @property
    def channels(self):
        return int(self.gate.shape[0])

    def set_gate(self, values):
        """Assigns the per-channel gate values (e.g. a 0/1 mask)."""
        values = ops.convert_to_tensor(values, dtype=self.gate.dtype)
        if tuple(values.shape) != tuple(self.gate.shape):
            raise ValueError(
                f"Gate '{self.name}' has {self.channels} channels; expected "
                f"values of shape ({self.channels},). "
                f"Received: shape={tuple(values.shape)}"
            )
        self.gate.assign(values)

    def call(self, inputs):
        rank = len(inputs.shape)
        axis = self.axis % rank
        if self._per_sample is None:
            gate = self.gate
            shape = [1] * rank
            shape[axis] = self.channels
        else:
            gate = self._per_sample
            shape = [-1] + [1] * (rank - 1)
            shape[axis] = self.channels
        gate = ops.reshape(ops.cast(gate, inputs.dtype), shape)
        return inputs * gate

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"axis": self.axis, "source": self.source})
        return config


@contextlib.contextmanager
def per_sample_gates(gates, values):
    """Feeds each image its own gate vector while a model is called.

    Inside the context, gate `i` multiplies its input by `values[i]`, a
    `[batch, channels_i]` tensor, instead of its variable. Use it around a
    model call inside a traced function; gradients flow to `values`.

    Args:
        gates: list of `ChannelGate` layers.
        values: list of tensors, one `[batch, channels]` tensor per gate.
    """
    if len(gates) != len(values):
        raise ValueError(
            f"Expected one gate tensor per gate ({len(gates)}). "
            f"Received: {len(values)} tensors"
        )
    try:
        # Bypass Keras attribute tracking: the value is transient, not state.
        for gate, value in zip(gates, values):
            object.__setattr__(gate, "_per_sample", value)
        yield
    finally:
        for gate in gates:
            object.__setattr__(gate, "_per_sample", None)
