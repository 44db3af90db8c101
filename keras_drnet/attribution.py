"""Per-image channel importance without fitting: activation, FRAT, Taylor."""

import tensorflow as tf
from keras import ops

from keras_drnet.model_surgery import calls_replaced
from keras_drnet.model_surgery import gate_layers
from keras_drnet.model_surgery import split_softmax

# `"cdrp"` (gate fitting, `keras_drnet.GateFitter`) is the paper's method;
# the others read the network once per image.
METHODS = ("cdrp", "activation", "frat", "taylor")


def check_method(method):
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {list(METHODS)}. Received: "
            f"method={method!r}"
        )


class Attribution:
    """Channel scores of every image from one pass through a gated model.

    Each gate's input (a post-ReLU feature map `a`, all gates open) gives
    one score per channel and image, averaged over the spatial positions
    `m` of the map (a Dense layer's output has one position):

    - `"activation"`: `mean_m a` (one forward pass);
    - `"frat"` (CNN LEGO's feature-route attribution, its first step):
      `mean_m max(0, d p_y / d a_m)`, the positive part of the derivative of
      the probability of class `y` (softmax of the logits) w.r.t. the map;
    - `"taylor"` (first-order Taylor importance, Molchanov et al. 2017):
      `|mean_m a_m * d log p_y / d a_m|`.

    `y` is the image's label when one is given (the class whose importance
    vector the image joins), else (or where it is -1) the model's top-1.
    With `classes`, `p` is the softmax over those classes only (the
    sub-task's own output; the top-1 is taken among them), so a channel
    scores by what it does for telling them apart. A gate called at
    several call sites (a shared nested model) gets the mean of its sites.
    `keras_drnet.dissect(model, ds, method=...)` runs it.

    Args:
        gated_model: a model returned by `keras_drnet.inject_gates()`.
        method: `"activation"`, `"frat"` or `"taylor"`.
        classes: `None` (every class) or the class indices of a sub-task,
            for `"frat"` and `"taylor"`.

    Example:

    ```python
    attribution = Attribution(keras_drnet.inject_gates(model), "taylor")
    scores, _ = attribution.fit_batch(images, labels)  # [batch, channels]
    ```
    """

    def __init__(self, gated_model, method, classes=None):
        if method not in METHODS or method == "cdrp":
            raise ValueError(
                "`method` must be one of ['activation', 'frat', 'taylor'] "
                f"(`GateFitter` computes 'cdrp'). Received: method={method!r}"
            )
        if classes is not None and method == "activation":
            raise ValueError(
                "`classes` sets the softmax whose gradient scores a channel; "
                "'activation' reads no gradient. Received: "
                f"method='activation', classes={classes!r}"
            )
        self.gated_model = gated_model
        self.classes = None if classes is None else tuple(classes)
        self.method = method
        self.logits_model, _ = split_softmax(gated_model)
        self._gates = gate_layers(gated_model)

    @property
    def total_channels(self):
        return sum(gate.channels for gate in self._gates)

    def fit_batch(self, images, labels=None):
        """`(scores [batch, total], top1_changed [batch])` of a batch.

        Nothing is fitted, so no top-1 ever changes: the flags are all
        False (the same return value as `GateFitter.fit_batch`).
        """
        scores, _ = self.path_batch(images, labels)
        return scores, ops.zeros((ops.shape(images)[0],), "bool")

    def path_batch(self, images, labels=None):
        """`(scores [batch, total], logits [batch, classes])` of a batch:
        each image's path and the model's output (`PathDetector`)."""
        features = {id(gate): [] for gate in self._gates}

        def recording_call(gate):
            def call(inputs):  # the gate passes its input on, all open
                tape.watch(inputs)
                features[id(gate)].append(inputs)
                return inputs

            return call

        with tf.GradientTape(watch_accessed_variables=False) as tape:
            with calls_replaced(self._gates, recording_call):
                logits = ops.cast(
                    self.logits_model(images, training=False), "float32"
                )
            scored = logits
            if self.classes is not None:  # the other classes' p is 0
                outside = [0.0 if c in self.classes else -float("inf")
                           for c in range(logits.shape[-1])]
                scored = logits + ops.convert_to_tensor(outside)
            top1 = ops.argmax(scored, axis=-1)
            if labels is None:
                labels = top1
            # -1: no label given (or a padding row).
            labels = ops.where(ops.greater_equal(labels, 0), labels, top1)
            picked = ops.one_hot(ops.cast(labels, "int32"), logits.shape[-1])
            if self.method == "frat":
                values = ops.softmax(scored)
            else:
                values = ops.log_softmax(scored)
            # `where`, not a product: log p is -inf outside `classes`.
            target = ops.sum(ops.where(picked > 0, values, 0.0))
        sites = [(g, a) for g in self._gates for a in features[id(g)]]
        if self.method == "activation":
            grads = [None] * len(sites)
        else:
            grads = tape.gradient(target, [a for _, a in sites])
        per_gate = {id(gate): [] for gate in self._gates}
        for (gate, a), grad in zip(sites, grads):
            per_gate[id(gate)].append(self._score(a, grad, gate))
        scores = [
            ops.mean(ops.stack(per_gate[id(gate)]), axis=0)
            for gate in self._gates
        ]
        return ops.concatenate(scores, axis=1), logits

    def _score(self, a, grad, gate):
        a = ops.cast(a, "float32")
        rank = len(a.shape)
        axis = gate.axis % rank
        spatial = [i for i in range(1, rank) if i != axis]

        def mean(x):
            return ops.mean(x, axis=spatial) if spatial else x

        if self.method == "activation":
            return mean(a)
        grad = ops.cast(grad, "float32")
        if self.method == "frat":
            return mean(ops.relu(grad))
        return ops.abs(mean(a * grad))
