"""`SubtaskModel`: the network running only a sub-task's channels and classes."""

import contextlib
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_drnet.batching import class_elements
from keras_drnet.batching import class_images
from keras_drnet.batching import model_input_shape
from keras_drnet.calibration import batchnorm_statistics
from keras_drnet.calibration import calibrate_batchnorm
from keras_drnet.calibration import set_batchnorm_statistics
from keras_drnet.civ import CIVs
from keras_drnet.model_surgery import copy_model
from keras_drnet.model_surgery import gated_copy
from keras_drnet.model_surgery import list_gates
from keras_drnet.model_surgery import split_softmax
from keras_drnet.reconstruction import combine
from keras_drnet.saved_model import write_saved_model
from keras_drnet.selection import as_selection


@keras.saving.register_keras_serializable(package="keras_drnet")
class SubtaskModel(keras.Model):
    """A classifier restricted to a sub-task: some channels off, some classes.

    Runs the gated network with the sub-task's CCIV written into the gates
    and a masked softmax over the sub-task's classes: classes outside it get
    probability exactly 0 and the others sum to 1. The output keeps all
    `num_classes` columns so class indices keep their meaning. Masks live in
    variables: `set_classes()` switches to another sub-task without
    retracing or rebuilding anything.

    Create it with `keras_drnet.subtask()`.

    Args:
        gated_model: a model returned by `keras_drnet.inject_gates()`.
        civs: `keras_drnet.CIVs` for that model (or their config when loading).
        classes: list of class names or indices.
        method, threshold, budget, empty_gates, budget_scope: the fields
            of a `keras_drnet.Selection`, which picks the channels.
        calibrated_for: class indices the BatchNorm statistics were
            recalibrated for (see `calibrate()`), or `None`.
        selection: a `keras_drnet.Selection`, instead of the keywords.
        **kwargs: Base model keyword arguments, such as `name`.

    Example:

    ```python
    sub = keras_drnet.subtask(model, civs, ["cat", "dog"], threshold=6e-3)
    probabilities = sub.predict(images)  # zero outside cat and dog
    sub.predict_class_names(images)      # ['cat', 'dog', 'dog', ...]
    sub.set_classes(["airplane", "truck"])  # no retracing
    ```

    Reference:
        DRNet, sec. 3.2 (CCIV) and sec. 4.2 (masked softmax).
    """

    def __init__(
        self,
        gated_model,
        civs,
        classes,
        method=None,
        threshold=None,
        budget=None,
        empty_gates=None,
        budget_scope=None,
        calibrated_for=None,
        selection=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(civs, dict):
            civs = _civs_from_config(civs)
        self.gated_model = gated_model
        self.civs = civs
        self.classes = classes
        self.selection = as_selection(
            selection, method=method, threshold=threshold, budget=budget,
            empty_gates=empty_gates, budget_scope=budget_scope,
        )
        self.calibrated_for = calibrated_for
        self._logits_model, self.ends_in_softmax = split_softmax(gated_model)
        self._gates = [spec.layer for spec in list_gates(gated_model)]
        # Stored as weights so that a saved sub-task can switch classes.
        self.civ_vectors = self.add_weight(
            shape=civs.vectors.shape,
            initializer=keras.initializers.Constant(civs.vectors),
            trainable=False,
            name="civ_vectors",
        )
        self.class_mask = self.add_weight(
            shape=(civs.num_classes,),
            initializer="zeros",
            trainable=False,
            name="class_mask",
        )
        # The BatchNorm statistics the sub-task was built with, so that the
        # full network stays the original one after `calibrate()`.
        statistics = batchnorm_statistics(gated_model)
        self.reference_statistics = self.add_weight(
            shape=statistics.shape,
            initializer=keras.initializers.Constant(
                statistics if statistics.size else 0.0
            ),
            trainable=False,
            name="reference_statistics",
        )
        self.cciv = None
        self._switch = _Switch()
        self.set_classes(classes, selection=self.selection)
        self.build(gated_model.inputs[0].shape)

    # Read-only views; stored under private names, which are the paths of
    # their weights in `.keras` files saved before these existed.
    @property
    def logits_model(self):
        """The gated network without its softmax (logits of all classes)."""
        return self._logits_model

    @property
    def gates(self):
        """The gated network's `ChannelGate` layers, in CIV order."""
        return self._gates

    def build(self, input_shape):
        # Everything inside is built already (the gated model, the masks).
        self.built = True

    @property
    def class_names(self):
        """Names of all classes, in output order."""
        return list(self.civs.class_names)

    @property
    def live_class_names(self):
        """Names of the sub-task's classes."""
        return [self.civs.class_names[i] for i in self.cciv.classes]

    # The selection's fields, read-only: `set_classes` changes them.
    method = property(lambda self: self.selection.method)
    threshold = property(lambda self: self.selection.threshold)
    budget = property(lambda self: self.selection.get_config()["budget"])
    empty_gates = property(lambda self: self.selection.empty_gates)
    budget_scope = property(lambda self: self.selection.budget_scope)

    def set_classes(
        self,
        classes,
        method=None,
        threshold=None,
        budget=None,
        empty_gates=None,
        budget_scope=None,
        selection=None,
    ):
        """Switches to another sub-task by rewriting the masks in place.

        The channels are chosen as before (`self.selection`) unless a new
        `selection`, or some of its fields, are given: arguments left `None`
        keep their current value, and a new `threshold` replaces the
        `budget` and vice versa.
        """
        if selection is None:
            selection = self.selection.replace(
                method=method, threshold=threshold, budget=budget,
                empty_gates=empty_gates, budget_scope=budget_scope,
            )
        else:
            selection = as_selection(
                selection, method=method, threshold=threshold, budget=budget,
                empty_gates=empty_gates, budget_scope=budget_scope,
            )
        cciv = combine(self.civs, classes, selection=selection)
        if self.calibrated_for is not None and list(cciv.classes) != list(
            self.calibrated_for
        ):
            warnings.warn(
                "This sub-task's BatchNorm statistics were recalibrated for "
                f"classes {[self.civs.class_names[i] for i in self.calibrated_for]}"
                " and stay as they are; call `calibrate()` with images of "
                "the new classes.",
                stacklevel=2,
            )
        live = np.zeros(self.civs.num_classes, "float32")
        live[list(cciv.classes)] = 1.0
        # Readers (`__call__`, `predict`) see all of the old masks or all
        # of the new ones, never half of each.
        with self._switch.writing():
            for gate, mask in zip(self.gates, cciv.per_gate().values()):
                gate.set_gate(mask)
            self.class_mask.assign(live)
        self.cciv = cciv
        self.classes = list(classes)
        self.selection = selection

    def masked_softmax(self, logits):
        """Softmax over the live classes; exactly 0 elsewhere."""
        logits = ops.cast(logits, "float32")
        live = ops.greater(self.class_mask, 0.0)
        return ops.softmax(ops.where(live, logits, float("-inf")), axis=-1)

    def call(self, inputs, training=False):
        return self.masked_softmax(self.logits_model(inputs, training=False))

    def __call__(self, *args, **kwargs):
        with self._switch.reading():
            return super().__call__(*args, **kwargs)

    def predict(self, *args, **kwargs):
        # The compiled function reads the masks without `__call__`.
        with self._switch.reading():
            return super().predict(*args, **kwargs)

    def calibrate(self, ds, samples=512):
        """Re-estimates BatchNorm statistics for this sub-task's channels.

        With channels off, the layers after them see other activation
        statistics than in training; the BatchNorm layers downstream of a
        closed gate get the statistics of the masked network on images of
        the sub-task's classes (see `keras_drnet.calibrate_batchnorm()`). No
        label is learned from: labels only pick the sub-task's images.

        Args:
            ds: `(image, label)` pairs (dataset or tuple of arrays), of which
                those of the sub-task's classes are used; or images alone
                (array or dataset), all assumed to be of those classes.
            samples: int. Images used (at most).

        Returns:
            The names of the recalibrated layers.
        """
        ds = self.subtask_images(ds)
        if isinstance(ds, tf.data.Dataset):
            ds = ds.take(samples)
        names = calibrate_batchnorm(self.gated_model, ds, max_images=samples)
        self.calibrated_for = list(self.cciv.classes)
        return names

    def full_network(self):
        """The paper's full net, as a logits model and its gates to open.

        This sub-task's own network unless its BatchNorm statistics were
        recalibrated since it was built; then a copy with the original ones.
        """
        reference = ops.convert_to_numpy(self.reference_statistics)
        if np.array_equal(batchnorm_statistics(self.gated_model), reference):
            return self.logits_model, self.gates
        copy = self.reference_copy()
        return split_softmax(copy)[0], [s.layer for s in list_gates(copy)]

    def full_logits_model(self):
        """A copy of the full network as a logits model: every channel on,
        the BatchNorm statistics the sub-task was built with (the teacher of
        `keras_drnet.finetune(..., distill=True)`)."""
        copy = self.reference_copy()
        for spec in list_gates(copy):
            spec.layer.set_gate(np.ones(spec.layer.channels, "float32"))
        return split_softmax(copy)[0]

    def reference_copy(self):
        """A copy of the gated model with the reference statistics."""
        copy = copy_model(self.gated_model)
        set_batchnorm_statistics(
            copy, ops.convert_to_numpy(self.reference_statistics)
        )
        return copy

    def subtask_images(self, ds):
        """The images of `ds` to use for this sub-task: of `(image, label)`
        pairs those of its classes, else all of them (assumed to be)."""
        input_shape, _ = model_input_shape(self.gated_model)
        return class_images(ds, input_shape, self.civs.num_classes,
                            self.cciv.classes)

    def live_elements(self, ds):
        """The unbatched `(image, label)` elements of the sub-task's classes."""
        input_shape, _ = model_input_shape(self.gated_model)
        return class_elements(ds, input_shape, self.civs.num_classes,
                              self.cciv.classes)

    def predict_class_names(self, images, batch_size=None, verbose=0):
        """The predicted class name of every image."""
        probabilities = self.predict(images, batch_size=batch_size, verbose=verbose)
        return [self.civs.class_names[i] for i in np.argmax(probabilities, -1)]

    def export(self, filepath, verbose=True):
        """Writes a SavedModel for serving.

        Endpoints: `serve(images)` returns the masked probabilities
        `[batch, num_classes]`; `class_names()` returns all class names and
        `live_classes()` the sub-task's class indices, so a server knows what
        the columns mean.
        """
        spec = self.gated_model.inputs[0]
        write_saved_model(
            filepath, [self],
            {"serve": (self.call, [tf.TensorSpec(spec.shape, spec.dtype)])},
            {"class_names": self.class_names,
             "live_classes": tf.constant(list(self.cciv.classes), "int32")},
            verbose,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "gated_model": keras.saving.serialize_keras_object(
                    self.gated_model
                ),
                "civs": _civs_config(self.civs),
                "classes": [
                    int(c) if isinstance(c, (int, np.integer)) else c
                    for c in self.classes
                ],
                **self.selection.get_config(),
                "calibrated_for": self.calibrated_for,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config["gated_model"] = keras.saving.deserialize_keras_object(
            config["gated_model"]
        )
        return cls(**config)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        # `__init__` ran on placeholder CIVs; now the real ones are restored,
        # recompute the CCIV (and the gates) from them.
        self.civs = CIVs(
            keras.ops.convert_to_numpy(self.civ_vectors),
            self.civs.class_names,
            self.civs.counts,
            self.civs.layout,
            self.civs.fingerprint,
            self.civs.config,
            self.civs.top1_changed,
        )
        self.set_classes(self.classes)


class _Switch:
    """A readers-writer lock: calls share it, `set_classes` excludes them."""

    def __init__(self):
        self._condition = threading.Condition()
        self._readers = 0

    @contextlib.contextmanager
    def reading(self):
        with self._condition:
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._condition:
            self._condition.wait_for(lambda: self._readers == 0)
            yield


def _civs_config(civs):
    return {
        "class_names": civs.class_names,
        "counts": civs.counts.tolist(),
        "layout": [[e.name, e.source, e.channels] for e in civs.layout],
        "fingerprint": civs.fingerprint,
        "config": civs.config,
        "top1_changed": civs.top1_changed.tolist(),
    }


def _civs_from_config(config):
    # Vectors are weights of the model; they are restored after __init__.
    total = sum(entry[2] for entry in config["layout"])
    vectors = np.zeros((len(config["class_names"]), total), "float32")
    return CIVs(
        vectors,
        config["class_names"],
        config["counts"],
        config["layout"],
        config["fingerprint"],
        config["config"],
        config.get("top1_changed"),
    )


def subtask(
    model,
    civs,
    classes,
    method=None,
    threshold=None,
    budget=None,
    empty_gates=None,
    budget_scope=None,
    calibrate=None,
    calibration_samples=512,
    selection=None,
):
    """Builds the `SubtaskModel` of `model` for `classes`.

    Args:
        model: the classifier `civs` were dissected from.
        civs: `keras_drnet.CIVs` from `keras_drnet.dissect(model, ...)`.
        classes: list of class names or indices, e.g. `["cat", "dog"]`.
        method, threshold, budget, empty_gates, budget_scope: how the
            channels are chosen, the fields of a `keras_drnet.Selection`
            (exactly one of `threshold` / `budget`).
        calibrate: `None`, or images to recalibrate the BatchNorm
            statistics of the masked network on (`(image, label)` pairs of
            which the sub-task's classes are used, or images alone); see
            `SubtaskModel.calibrate()`. `model` itself is never changed.
        calibration_samples: int. Images used to recalibrate (at most).
        selection: a `keras_drnet.Selection`, instead of the keywords.

    Returns:
        `SubtaskModel`.

    Example:

    ```python
    civs = keras_drnet.dissect(model, train_ds, class_names=names)
    sub = keras_drnet.subtask(model, civs, ["cat", "dog"], threshold=6e-3)
    keras_drnet.evaluate_subtask(sub, test_ds).plot("layers.png")
    sub.export("cat_dog_savedmodel")
    ```
    """
    gated_model = gated_copy(model, civs)
    sub = SubtaskModel(
        gated_model,
        civs,
        classes,
        method=method,
        threshold=threshold,
        budget=budget,
        empty_gates=empty_gates,
        budget_scope=budget_scope,
        selection=selection,
        name=f"{model.name}_subtask",
    )
    if calibrate is not None:
        sub.calibrate(calibrate, calibration_samples)
    return sub
