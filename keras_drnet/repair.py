"""Repair without training: refit a compact sub-task to the full network.

Removing channels changes what every later layer reads. The classic
channel-pruning reconstruction (He et al., ICCV 2017; ThiNet, ICCV 2017)
refits each layer that reads pruned input so that it reproduces the full
network's output from what is left, by linear least squares: a layer's
pre-activation output is linear in its weights. `repair` does that on the
compact model, layer by layer in graph order, each layer reading the
*repaired* network's input (so errors do not accumulate), with the full
network's BatchNorm statistics restored (once a layer matches the full
network again, recalibrated statistics would be the wrong ones).
"""

import numpy as np
import tensorflow as tf

import keras

from keras_drnet.batching import first_batch
from keras_drnet.batching import is_int
from keras_drnet.batching import is_number
from keras_drnet.compaction import build_compact
from keras_drnet.graph import Graph
from keras_drnet.graph.kinds import BATCHNORM
from keras_drnet.subtask import SubtaskModel


def repair(
    sub,
    images,
    max_images=1024,
    positions=64,
    ridge=1e-3,
    seed=0,
    batch_size=128,
    include_softmax=True,
):
    """Compacts a sub-task and refits its weights to the full network.

    Every Conv2D (`groups=1`), Dense and DepthwiseConv2D (multiplier 1) of
    `keras_drnet.compact(sub)` whose input differs from the full network's
    gets new weights: the ridge-regularised least-squares solution that
    maps its (pruned) input on `images` to the full network's
    pre-activation output at its kept channels, in closed form (normal
    equations; convolutions through `positions` sampled patches per image).
    Layers are refit in graph order, each reading the repaired network's
    input. BatchNorm layers get the statistics the sub-task was built with
    (the full network's, also after `calibrate`), and the classifier is
    refit to the full network's logits of the sub-task's classes, so the
    output is the full network's masked softmax, approximately. No label
    is used. Output channels the compact model zeroes (a closed channel a
    residual group keeps) stay zero. With nothing pruned the result equals
    `compact(sub)` exactly. Other layers (Conv1D/3D, separable and grouped
    convolutions, layers called more than once) keep their compact
    weights.

    Args:
        sub: `keras_drnet.SubtaskModel`; not modified.
        images: images of the sub-task's classes (array or dataset), or
            `(image, label)` pairs of which the sub-task's classes are
            used; a few hundred do (the error says how many a layer needs).
        max_images: int. Images used (at most), in one pass per layer.
        positions: int. Sampled output positions per image and layer (all
            of them where the feature map is smaller).
        ridge: float >= 0. Regulariser, relative to the mean diagonal of
            each layer's normal equations (the bias is not penalised).
        seed: int. Seed of the position sampling.
        batch_size: int. Images per forward pass.
        include_softmax: bool. End in `Softmax` (default) or in logits.

    Returns:
        A plain functional `keras.Model` like `keras_drnet.compact(sub)`
        (same layers and shapes, `class_names`), with refit weights.

    Example:

    ```python
    sub = keras_drnet.subtask(model, civs, ["cat", "dog"], budget=0.33,
                              budget_scope="gate")
    small = keras_drnet.repair(sub, cat_dog_images)   # no training
    keras_drnet.export(small, "cat_dog.keras", format="keras")
    ```
    """
    if not isinstance(sub, SubtaskModel):
        raise TypeError(
            "`repair` takes the `SubtaskModel` from `keras_drnet.subtask("
            "model, civs, classes, ...)`: it refits the compact model of a "
            "sub-task to the network it came from. Received: "
            f"{type(sub).__name__}"
        )
    for name, value in (("max_images", max_images), ("positions", positions),
                        ("batch_size", batch_size)):
        if not is_int(value) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer. Received: "
                f"{name}={value!r}"
            )
    if not is_number(ridge) or not np.isfinite(ridge) or ridge < 0:
        raise ValueError(
            f"`ridge` must be a finite number >= 0. Received: ridge={ridge!r}"
        )
    batch = first_batch(
        sub.gated_model, sub.subtask_images(images), max_images, "`repair`"
    )
    masked = _twin(sub, open_gates=False)
    small, sliced = build_compact(masked, include_softmax)
    full, full_sliced = build_compact(
        _twin(sub, open_gates=True), include_softmax=False
    )
    graph = Graph(small)
    kinds = {id(flat.op): flat.kind for flat in graph.nodes}
    # One set of weights for several calls cannot match each call's target.
    forms = {
        id(flat.op): flat.kind.refit_form(flat) for flat in graph.nodes
        if graph.calls[id(flat.op)] == 1
    }
    targets = [
        _Target(layer, full_layer, kept_in, full_in, kept_out, full_out,
                forms[id(layer)], kinds)
        for (_, layer, kept_in, kept_out), (_, full_layer, full_in, full_out)
        in zip(sliced, full_sliced)
        if forms.get(id(layer))
    ]
    # Layers before the first one that loses input channels read what the
    # full network's read (a chain's; elsewhere the check below is a bound).
    first = next((i for i, (_, _, kept_in, _) in enumerate(sliced)
                  if len(kept_in) < len(full_sliced[i][2])), len(sliced))
    cut = {id(entry[1]) for entry in sliced[first:]}
    for target in targets:
        if id(target.layer) in cut:
            target.check_rows(len(batch), positions)
    rng = np.random.default_rng(seed)
    for target in targets:
        target.sample(rng, len(batch), positions)
    _full_targets(full, targets, batch, batch_size)
    reader = _Reader(small, batch, batch_size)
    for target in targets:
        target.refit(reader.inputs_of(target.layer), batch_size, ridge)
    return small


def _twin(sub, open_gates):
    """A sub-task on a copy of `sub`'s network with the reference BatchNorm
    statistics and `sub`'s masks (or every gate open)."""
    twin = SubtaskModel(
        sub.reference_copy(),
        sub.civs,
        sub.classes,
        selection=sub.selection,
    )
    for gate, own in zip(twin.gates, sub.gates):
        value = keras.ops.convert_to_numpy(own.gate)
        gate.set_gate(np.ones_like(value) if open_gates else value)
    return twin


class _Target:
    """One layer to refit: its patches, the full network's outputs there."""

    def __init__(self, layer, full_layer, kept_in, full_in, kept_out,
                 full_out, form, kinds):
        self.layer = layer
        self.full_layer = full_layer
        self.depthwise = form == "depthwise"
        self.conv = form in ("conv", "depthwise")
        self.kinds = kinds
        # Positions of this layer's kept channels in the full layer's.
        self.inputs = _positions(kept_in, full_in)
        self.all_inputs = len(kept_in) == len(full_in)
        self.full_channels = len(full_in)
        self.columns = _positions(kept_out, full_out)
        self.first_full = None
        self.targets = []

    def _grid(self, layer):
        shape = layer.output.shape
        if self.conv:
            first = layer.data_format == "channels_first"
            return int(np.prod(shape[2:] if first else shape[1:-1]))
        return int(np.prod(shape[1:-1])) if len(shape) > 2 else 1

    def unknowns(self):
        """Unknowns per output channel (bias included)."""
        kernel = self.layer.get_weights()[0]
        if self.depthwise:
            return int(np.prod(kernel.shape[:2])) + 1
        return int(np.prod(kernel.shape[:-1])) + 1

    def check_rows(self, count, positions):
        per_image = min(positions, self._grid(self.layer))
        needed = -(-self.unknowns() // per_image)
        if count < needed:
            raise ValueError(
                f"`repair` needs at least {needed} images to refit layer "
                f"'{self.layer.name}' ({self.unknowns()} unknowns per output "
                f"channel, {per_image} positions per image). Received: "
                f"{count} images; pass more of the sub-task's images (a few "
                "hundred), or raise `positions`."
            )

    def sample(self, rng, count, positions):
        grid = self._grid(self.layer)
        take = min(positions, grid)
        self.index = np.argsort(rng.random((count, grid)), axis=1)[:, :take]

    def patches(self, layer, inputs, index):
        """`[batch, positions, unknowns - 1]` inputs of sampled outputs."""
        x = tf.convert_to_tensor(inputs)
        if self.conv:
            if layer.data_format == "channels_first":
                x = tf.transpose(x, [0, 2, 3, 1])
            kh, kw = layer.kernel_size
            sh, sw = layer.strides
            dh, dw = layer.dilation_rate
            x = tf.image.extract_patches(
                x, [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1],
                layer.padding.upper(),
            )
        x = tf.reshape(x, [x.shape[0], -1, x.shape[-1]])
        return tf.gather(x, index, axis=1, batch_dims=1).numpy()

    def linear(self, layer, patches):
        """The layer's pre-activation output from its patches."""
        weights = layer.get_weights()
        kernel = weights[0]
        bias = weights[1] if getattr(layer, "use_bias", False) else 0.0
        if self.depthwise:
            k = int(np.prod(kernel.shape[:2]))
            p = patches.reshape(*patches.shape[:2], k, -1)
            return np.einsum("bpkc,kc->bpc", p, kernel.reshape(k, -1)) + bias
        return patches @ kernel.reshape(-1, kernel.shape[-1]) + bias

    def sampled(self, layer, outputs, index):
        """`[batch, positions, channels]` outputs at the sampled positions."""
        y = tf.convert_to_tensor(outputs)
        if self.conv and layer.data_format == "channels_first":
            y = tf.transpose(y, [0, 2, 3, 1])
        y = tf.reshape(y, [y.shape[0], -1, y.shape[-1]])
        return tf.gather(y, index, axis=1, batch_dims=1).numpy()

    def reads_as_full(self, inputs):
        """Whether the layer's output already is the full network's: it
        reads the same values (a depthwise layer: on its own channels)."""
        if not (self.all_inputs or self.depthwise):
            return False
        first = self.conv and self.layer.data_format == "channels_first"
        full = np.take(self.first_full, self.inputs, axis=1 if first else -1)
        mine = inputs[: len(full)]
        return full.shape == mine.shape and np.array_equal(full, mine)

    def refit(self, inputs, batch_size, ridge):
        kernel, *rest = self.layer.get_weights()
        out = kernel.shape[-1] if not self.depthwise else kernel.shape[2]
        d = self.unknowns()
        gram = np.zeros((out, d, d) if self.depthwise else (d, d))
        cross = np.zeros((out, d) if self.depthwise else (d, out))
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size]
            if start == 0 and self.reads_as_full(x):
                return
            p = self.patches(self.layer, x, self.index[start:start + batch_size])
            # Products in float32 (BLAS, all cores), sums in float64.
            y = self.targets[start // batch_size].reshape(-1, out)
            if self.depthwise:
                p = p.reshape(-1, d - 1, out)
                p = np.concatenate([p, np.ones_like(p[:, :1])], axis=1)
                gram += np.einsum("nkc,nlc->ckl", p, p)
                cross += np.einsum("nkc,nc->ck", p, y)
            else:
                p = p.reshape(-1, d - 1)
                p = np.concatenate([p, np.ones_like(p[:, :1])], axis=1)
                gram += p.T @ p
                cross += p.T @ y
        solution = _ridge_solve(gram, cross, ridge)
        if self.depthwise:
            solution = solution.T  # [unknowns, channels]
        new_kernel = solution[:-1].reshape(kernel.shape).astype(kernel.dtype)
        new_bias = solution[-1].astype(kernel.dtype)
        # Channels compact() zeroes (closed by a gate, kept by their group)
        # stay zero.
        zeroed = ~np.any(kernel.reshape(-1, out) != 0, axis=0)
        if rest:
            zeroed &= rest[0] == 0
        if self.depthwise:
            new_kernel[:, :, zeroed, :] = 0
        else:
            new_kernel[..., zeroed] = 0
        new_bias[zeroed] = 0
        if getattr(self.layer, "use_bias", False):
            self.layer.set_weights([new_kernel, new_bias] + rest[1:])
            return
        self.layer.set_weights([new_kernel] + rest)
        # A bias-free layer (before a BatchNorm, as in ResNets): the fitted
        # offset goes into the BatchNorm's mean, where it acts the same.
        readers = [n.operation for n in self.layer._outbound_nodes]
        if len(readers) == 1 and self.kinds.get(id(readers[0])) is BATCHNORM:
            bn = readers[0]
            bn.moving_mean.assign(
                keras.ops.convert_to_numpy(bn.moving_mean) - new_bias
            )


class _Reader:
    """The repaired model's input to each layer in turn, on all images.

    The previous layer's input is kept, so that a chain runs only the
    segment between two refit layers (a graph where that segment does not
    stand alone, e.g. around a residual add, runs from the model's input).
    """

    def __init__(self, model, batch, batch_size):
        self.model, self.batch, self.batch_size = model, batch, batch_size
        self.cached = None

    def inputs_of(self, layer):
        tensor = layer.input
        reader, source = None, self.batch
        if self.cached is not None:
            try:
                reader = keras.Model(self.cached[0], tensor)
                source = self.cached[1]
            except ValueError:  # needs more than the cached tensor
                reader, source = None, self.batch
        if reader is None:
            reader = keras.Model(self.model.input, tensor)
        values = np.concatenate([
            keras.ops.convert_to_numpy(
                reader(source[start:start + self.batch_size], training=False)
            )
            for start in range(0, len(source), self.batch_size)
        ])
        self.cached = (tensor, values)
        return values


def _positions(kept, full):
    where = {int(c): i for i, c in enumerate(full)}
    return np.array([where[int(c)] for c in kept], int)


def _ridge_solve(gram, cross, ridge):
    """`(G + λ D) w = c` with λ relative to G's mean diagonal; the last
    unknown (the bias) is not penalised. Batched over a leading axis."""
    d = gram.shape[-1]
    penalty = np.ones(d)
    penalty[-1] = 0.0
    diagonal = np.diagonal(gram, axis1=-2, axis2=-1)
    scale = diagonal[..., :-1].mean(axis=-1, keepdims=True) + 1e-12
    regulariser = ridge * scale[..., None] * np.eye(d) * penalty
    if gram.ndim == 3:  # one small system per channel
        return np.linalg.solve(gram + regulariser, cross[..., None])[..., 0]
    return np.linalg.solve(gram + regulariser, cross)


def _full_targets(full, targets, batch, batch_size):
    """The full network's pre-activation outputs at every sampled position."""
    tensors = []
    for target in targets:
        tensors += [target.full_layer.input, target.full_layer.output]
    reader = keras.Model(full.input, tensors)
    for start in range(0, len(batch), batch_size):
        values = reader(batch[start:start + batch_size], training=False)
        for i, target in enumerate(targets):
            x, y = values[2 * i], values[2 * i + 1]
            index = target.index[start:start + batch_size]
            if start == 0:
                target.first_full = keras.ops.convert_to_numpy(x[:_COMPARED])
            if _linear(target.full_layer):  # the output is the target
                y = target.sampled(target.full_layer, y, index)
            else:
                y = target.linear(
                    target.full_layer,
                    target.patches(target.full_layer, x, index),
                )
            target.targets.append(y[..., target.columns].astype("float32"))


def _linear(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


# Images on which a layer's input is compared with the full network's.
_COMPARED = 16
