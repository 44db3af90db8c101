"""The sub-task report: accuracy and running channels, parameters, FLOPs."""

import dataclasses
import weakref

import numpy as np
import tensorflow as tf
from keras import ops

from keras_drnet.batching import model_input_shape
from keras_drnet.channel_gate import per_sample_gates
from keras_drnet.compaction import subtask_costs
from keras_drnet.graph import Graph


@dataclasses.dataclass
class SubtaskReport:
    """A row of the paper's Table 1 plus its Figure 7, for one sub-task.

    Attributes:
        classes: the sub-task's class names.
        images: number of test images of those classes evaluated.
        full_net_accuracy: all channels, masked softmax ("Full-Net Acc.").
        sub_net_accuracy: the sub-task's channels, masked softmax.
        running_channels: fraction of gated channels that run.
        params, running_params: parameters of the model and those that run
            (the masked ideal).
        flops, running_flops: multiply-accumulates per image, total and
            running.
        compact_params, compact_flops: what `keras_drnet.compact(sub)`
            really has: at least the running figures, more where residual
            adds or concatenations tie a closed channel to a kept one.
        gates: per gate, `(name, total channels, kept channels)`.
        layers: per layer, `keras_drnet.graph.LayerCost`.
    """

    classes: list
    images: int
    full_net_accuracy: float
    sub_net_accuracy: float
    running_channels: float
    params: int
    running_params: int
    flops: int
    running_flops: int
    compact_params: int
    compact_flops: int
    gates: list
    layers: list

    @property
    def running_params_fraction(self):
        return self.running_params / self.params

    @property
    def running_flops_fraction(self):
        return self.running_flops / self.flops

    def __str__(self):
        return (
            f"sub-task {'-'.join(self.classes)} ({self.images} test images)\n"
            f"  full-net accuracy (masked softmax): "
            f"{self.full_net_accuracy:.2%}\n"
            f"  sub-net accuracy:                   "
            f"{self.sub_net_accuracy:.2%}\n"
            f"  running channels: {self.running_channels:.1%}\n"
            f"  running params:   {self.running_params:,} of "
            f"{self.params:,} ({self.running_params_fraction:.1%})\n"
            f"  running FLOPs:    {self.running_flops:,} of {self.flops:,} "
            f"MACs/image ({self.running_flops_fraction:.1%})\n"
            f"  compact model:    {self.compact_params:,} params "
            f"({self.compact_params / self.params:.1%}), "
            f"{self.compact_flops:,} MACs/image "
            f"({self.compact_flops / self.flops:.1%})"
        )

    def plot(self, path=None):
        """Bar chart of total vs running channels per gate (paper Fig. 7).

        Returns the matplotlib figure; also saves it when `path` is given.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [name.split("/")[-1].removesuffix("_gate") for name, *_ in
                 self.gates]
        totals = [total for _, total, _ in self.gates]
        kept = [k for _, _, k in self.gates]
        width = max(6.0, 0.35 * len(names))
        fig, ax = plt.subplots(figsize=(width, 4))
        x = np.arange(len(names))
        ax.bar(x, totals, color="#6fa8dc", label="channels")
        ax.bar(x, kept, color="#ea9999", label="running channels")
        ax.set_xticks(x, names, rotation=90, fontsize=7)
        ax.set_xlabel("gated layer (input to output)")
        ax.set_ylabel("channels")
        ax.set_title(
            f"{'-'.join(self.classes)}: {self.running_channels:.0%} channels,"
            f" {self.running_params_fraction:.0%} params running"
        )
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


# One traced function per sub-task, reused across calls and set_classes().
_PREDICTIONS = weakref.WeakKeyDictionary()


def _predictions(sub, dtype):
    """`images -> (top-1 of the full network, top-1 of the sub-task)`."""
    full_logits, full_gates = sub.full_network()
    cached = _PREDICTIONS.get(sub)
    if cached is not None and cached[0] is full_logits:
        return cached[1]
    ones = [ops.ones((1, gate.channels)) for gate in full_gates]

    # TensorFlow runs NCHW convolutions on CPU only when compiled with XLA.
    channels_first = Graph(full_logits).channels_first

    # One trace per sub-task, whatever the batch sizes (a search builds a
    # sub-task per candidate: a trace per batch shape would make TensorFlow
    # warn about retracing).
    input_shape, _ = model_input_shape(sub.gated_model)
    spec = tf.TensorSpec((None,) + tuple(input_shape[1:]), dtype)

    @tf.function(jit_compile=channels_first or None, input_signature=[spec])
    def predict(images):
        images = ops.cast(images, dtype)
        batch = ops.shape(images)[0]
        tiled = [ops.tile(o, [batch, 1]) for o in ones]
        with per_sample_gates(full_gates, tiled):
            full = sub.masked_softmax(full_logits(images, training=False))
        return ops.argmax(full, -1), ops.argmax(sub(images), -1)

    _PREDICTIONS[sub] = (full_logits, predict)
    return predict


def evaluate_subtask(sub, ds, batch_size=256):
    """Evaluates a `SubtaskModel` on the test images of its classes.

    Accuracy is counted over the images of `ds` whose label is one of the
    sub-task's classes, predicting with the masked softmax, once with every
    channel running (the paper's "Full-Net Acc.") and once with the
    sub-task's channels. Running parameters and FLOPs count a weight of a
    Conv/Dense/Depthwise/Separable layer only if the input channel it reads
    can be non-zero and the output channel it writes is read downstream (see
    `keras_drnet.graph`), so the classifier's rows for classes outside
    the sub-task do not run; a BatchNormalization channel runs if it is read
    downstream; other layers' weights always run; gates are not counted.
    FLOPs are multiply-accumulates of the convolution and dense layers per
    image. `compact_params`/`compact_flops` are those of the model
    `keras_drnet.compact(sub)` builds (counted from the same plan).

    Args:
        sub: `keras_drnet.SubtaskModel`.
        ds: `tf.data.Dataset` of `(image, label)` pairs (or batches), or a
            tuple `(images, labels)`, preprocessed as the model expects.
        batch_size: int. Images evaluated at once.

    Returns:
        `SubtaskReport`.

    Example:

    ```python
    report = keras_drnet.evaluate_subtask(sub, test_ds)
    print(report)
    report.plot("cat_dog_layers.png")
    ```
    """
    _, dtype = model_input_shape(sub.gated_model)
    costs, small_costs = subtask_costs(sub)
    elements = sub.live_elements(ds)
    predict = _predictions(sub, dtype)
    full_correct = sub_correct = count = 0
    for images, labels in elements.batch(batch_size):
        if not np.isfinite(images.numpy()).all():
            raise ValueError(
                "`ds` has images with NaN or inf values among those of the "
                f"sub-task's classes {sub.live_class_names}: accuracies on "
                "them would mean nothing. Drop or fix them."
            )
        full, reduced = predict(tf.cast(images, dtype))
        labels = labels.numpy()
        full_correct += int((full.numpy() == labels).sum())
        sub_correct += int((reduced.numpy() == labels).sum())
        count += len(labels)
    if count == 0:
        raise ValueError(
            f"`ds` has no image of the sub-task's classes "
            f"{sub.live_class_names}: nothing to evaluate."
        )
    mask = sub.cciv.mask
    return SubtaskReport(
        classes=sub.live_class_names,
        images=count,
        full_net_accuracy=full_correct / count,
        sub_net_accuracy=sub_correct / count,
        running_channels=float(mask.mean()),
        params=sum(c.params for c in costs),
        running_params=sum(c.running_params for c in costs),
        flops=sum(c.macs for c in costs),
        running_flops=sum(c.running_macs for c in costs),
        compact_params=sum(c.running_params for c in small_costs),
        compact_flops=sum(c.running_macs for c in small_costs),
        gates=[
            (entry.name, entry.channels, int(m.sum()))
            for entry, m in zip(sub.cciv.layout, sub.cciv.per_gate().values())
        ],
        layers=costs,
    )


def compact_accuracy(model, class_names, images, labels):
    """Top-1 accuracy of a compact model (`keras_drnet.compact`) on images
    labelled with the original model's class indices into `class_names`."""
    columns = np.array([class_names.index(n) for n in model.class_names])
    predicted = np.asarray(model.predict(images, verbose=0)).argmax(-1)
    return float(np.mean(columns[predicted] == labels))
