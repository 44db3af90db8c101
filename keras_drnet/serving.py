"""One SavedModel that serves any sub-task, chosen per request."""

import re

import tensorflow as tf

from keras_drnet.channel_gate import per_sample_gates
from keras_drnet.model_surgery import gated_copy
from keras_drnet.model_surgery import list_gates
from keras_drnet.model_surgery import split_softmax
from keras_drnet.saved_model import write_saved_model
from keras_drnet.selection import as_selection
from keras_drnet.subtask import SubtaskModel


def _cciv_fn(civs, selection):
    """`classes (multi-hot) -> 0/1 mask`: `combine`'s union, in the graph."""
    vectors = tf.constant(civs.vectors, tf.float32)

    def cciv(selected):
        scores = tf.reduce_max(
            tf.where(selected[:, None], vectors, float("-inf")), axis=0
        )
        return selection.mask(scores, civs.layout)

    return cciv


def export_dynamic(
    model,
    civs,
    filepath,
    threshold=None,
    budget=None,
    budget_scope=None,
    empty_gates=None,
    subtasks=None,
    selection=None,
    verbose=False,
):
    """Writes one SavedModel whose sub-task is chosen by each request.

    The device stores one network and the CIVs (paper, sec. 1). Endpoints:

    - `serve(images, classes)`: `classes` is a multi-hot vector
      `[num_classes]` (bool or int32). The CCIV is computed in the graph
      from the CIVs (union, with `threshold` or `budget`, as
      `keras_drnet.combine()`), the masks are applied per request, and the
      result is the masked softmax `[batch, num_classes]` (0 outside the
      classes). Nothing is shared between requests, so concurrent calls
      cannot see each other's sub-task. The BatchNorm statistics are the
      model's own.
    - `serve_named(images, name)`: one of the pre-built `subtasks` (e.g.
      recalibrated with `calibrate=`), by name; each bundles its own copy
      of the weights.
    - `class_names()`, `subtask_names()`.

    Args:
        model: the classifier the CIVs were dissected from.
        civs: `keras_drnet.CIVs`.
        filepath: str, the SavedModel directory.
        threshold, budget, budget_scope, empty_gates: the fields of a
            `keras_drnet.Selection` (method `"union"`).
        subtasks: optional sub-tasks of the same model to bundle: a list
            (each named by its classes, e.g. `"cat-dog"`) or a dict
            `{name: SubtaskModel}`. A name made of class names must name
            the sub-task's own classes.
        verbose: bool, whether Keras prints what it writes.
        selection: a `keras_drnet.Selection` (method `"union"`), instead
            of the keywords.

    Example:

    ```python
    keras_drnet.export_dynamic(model, civs, "drnet_served", budget=0.33,
                               subtasks=[cat_dog_sub])  # named "cat-dog"
    served = tf.saved_model.load("drnet_served")
    classes = tf.constant([0, 0, 0, 1, 0, 1, 0, 0, 0, 0])  # cat, dog
    served.serve(images, classes)
    served.serve_named(images, tf.constant("cat-dog"))
    ```
    """
    gated_model = gated_copy(model, civs)
    selection = as_selection(
        selection, threshold=threshold, budget=budget,
        budget_scope=budget_scope, empty_gates=empty_gates,
    )
    if selection.method != "union":
        raise ValueError(
            "`export_dynamic` combines the requested classes by union; "
            f"Received: selection={selection}"
        )
    selection.check_layout(civs.layout)
    if civs.subtask_classes:
        raise ValueError(
            "`export_dynamic` serves any sub-task a request names, but these "
            f"CIVs were dissected for the sub-task {civs.subtask_classes} "
            "only (`dissect(..., classes=...)`). Dissect without `classes`, "
            "or export that sub-task: `kd.export(kd.repair(sub, images), "
            "...)`."
        )
    subtasks = _named_subtasks(subtasks, civs)
    logits_model, _ = split_softmax(gated_model)
    gates = [spec.layer for spec in list_gates(gated_model)]
    sizes = [gate.channels for gate in gates]
    cciv = _cciv_fn(civs, selection)
    spec = gated_model.inputs[0]
    num_classes = civs.num_classes

    # A class whose CIV is missing (NaN) has no channels to choose from.
    no_civ = tf.constant([name in civs.missing for name in civs.class_names])
    missing_message = (
        f"`classes` selects a class without a CIV ({', '.join(civs.missing)}"
        "): dissect it with images of those classes."
    )

    @tf.function
    def serve(images, classes):
        selected = tf.cast(classes, tf.bool)
        tf.debugging.assert_equal(
            tf.reduce_any(selected), True,
            message="`classes` selects no class: set at least one entry.",
        )
        tf.debugging.assert_equal(
            tf.reduce_any(selected & no_civ), False, message=missing_message
        )
        masks = tf.split(cciv(selected), sizes)
        batch = tf.shape(images)[0]
        tiled = [tf.tile(m[None], [batch, 1]) for m in masks]
        with per_sample_gates(gates, tiled):
            logits = logits_model(images, training=False)
        logits = tf.cast(logits, tf.float32)
        return tf.nn.softmax(
            tf.where(selected[None], logits, float("-inf")), axis=-1
        )

    image_spec = tf.TensorSpec(spec.shape, spec.dtype)
    for dtype in (tf.bool, tf.int32):
        serve.get_concrete_function(
            image_spec, tf.TensorSpec([num_classes], dtype)
        )
    endpoints = {"serve": (serve, None)}
    names = list(subtasks)
    if subtasks:
        known = tf.constant(names)

        def serve_named(images, name):
            found = tf.equal(known, name)
            tf.debugging.assert_equal(
                tf.reduce_any(found), True,
                message="Unknown sub-task name; known: " + ", ".join(names),
            )
            return tf.switch_case(
                tf.cast(tf.argmax(tf.cast(found, tf.int32)), tf.int32),
                [lambda sub=sub: sub(images) for sub in subtasks.values()],
            )

        endpoints["serve_named"] = (
            serve_named, [image_spec, tf.TensorSpec([], tf.string)]
        )
    write_saved_model(
        filepath, [gated_model, *subtasks.values()], endpoints,
        {"class_names": list(civs.class_names),
         "subtask_names": tf.constant(names, tf.string)},
        verbose,
    )
    return filepath


def _named_subtasks(subtasks, civs):
    """`subtasks` as `{name: SubtaskModel}`, every one checked."""
    if subtasks is None:
        return {}
    if isinstance(subtasks, (list, tuple)):
        subtasks = {"-".join(getattr(sub, "live_class_names", ["?"])): sub
                    for sub in subtasks}
    if not isinstance(subtasks, dict):
        raise TypeError(
            "`subtasks` must be a list of `SubtaskModel`s or a dict "
            f"`{{name: SubtaskModel}}`. Received: {type(subtasks).__name__}"
        )
    for name, sub in subtasks.items():
        if not isinstance(sub, SubtaskModel) or sub.civs.fingerprint != (
            civs.fingerprint
        ):
            raise ValueError(
                "`subtasks` maps names to `SubtaskModel`s built from this "
                f"model and CIVs. Received: {name!r}: {type(sub).__name__}"
                + (" of another model" if isinstance(sub, SubtaskModel)
                   else "")
            )
        # A name that lists classes must list this sub-task's: a sub-task
        # switched with `set_classes` after it was named would answer for
        # other classes under the old name.
        words = [w for w in re.split(r"[-+,/_\s]+|\bvs\b", str(name)) if w]
        if words and all(w in civs.class_names for w in words) and set(
            words
        ) != set(sub.live_class_names):
            raise ValueError(
                f"Sub-task {name!r} runs classes {sub.live_class_names}, not "
                f"{words} (was `set_classes` called after naming it?). Name "
                "it after its classes, or pass a list to name them for you."
            )
    return subtasks
