"""The smallest sub-task that keeps the full network's accuracy."""

import inspect
import math
import time
import warnings

import numpy as np

from keras_drnet.allocation import EXPONENT
from keras_drnet.allocation import allocate_budget
from keras_drnet.batching import is_number
from keras_drnet.batching import class_elements
from keras_drnet.batching import model_input_shape
from keras_drnet.civ import CIVs
from keras_drnet.finetuning import finetune as finetune_subtask
from keras_drnet.reconstruction import resolve_classes
from keras_drnet.repair import repair as repair_subtask
from keras_drnet.reporting import compact_accuracy
from keras_drnet.reporting import evaluate_subtask
from keras_drnet.subtask import subtask

BUDGETS = (
    0.05, 0.08, 0.11, 0.15, 0.2, 0.25, 0.33, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0
)
# Allocation exponents tried for the most accurate sub-task of a size.
EXPONENTS = (0.0, 0.75, 1.5, 2.5)


def smallest_subtask(
    model,
    civs,
    classes,
    max_drop=0.5,
    validation_data=None,
    budgets=BUDGETS,
    budget_scope="params",
    calibrate=None,
    calibration_samples=512,
    finetune=None,
    repair="auto",
    max_params=None,
    exponents=EXPONENTS,
    verbose=1,
):
    """Searches the smallest channel budget whose accuracy drop is bounded.

    The drop is the full network's accuracy (masked softmax over `classes`,
    every channel on) minus the sub-task's, in percentage points, on the
    images of `classes` in `validation_data`. The search bisects over
    `budgets`, assuming a larger budget never drops more (true up to the
    noise of the validation set), so it builds about log2(len(budgets))
    sub-tasks; every one it built is in the returned table.

    Args:
        model: the classifier `civs` were dissected from; not modified.
        civs: `keras_drnet.CIVs` of `model`.
        classes: list of class names or indices.
        max_drop: float >= 0. The largest accepted drop, in pp.
        validation_data: `(image, label)` pairs (dataset or tuple of
            arrays), held out from dissection, calibration and fine-tuning;
            its images of `classes` are used (all kept in memory). One
            image must move the accuracy by at most `max_drop`: it needs at
            least `100 / max_drop` of them.
        budgets: increasing fractions of channels to try (see
            `keras_drnet.combine()`), or of running parameters with
            `budget_scope="params"`.
        budget_scope: `"params"` (default): each budget is a fraction of
            the running parameters, spread over the gates by the cost of
            their channels (`keras_drnet.allocate_budget()`); `"gate"`:
            every layer keeps that fraction of its channels; `"model"`: see
            `keras_drnet.combine()`. On the CIFAR-10 VGG16 w0.5 at 10.8% of
            the parameters, over 45 pairs, "params" lost 0.82 pp with
            `repair` (uniform per-gate: 4.89) and 14.45 pp with BatchNorm
            recalibration alone (uniform: 37.06).
        calibrate, calibration_samples: see `keras_drnet.subtask()`.
        finetune: `None`, or a dict of `keras_drnet.finetune()` arguments,
            with at least `"ds"`, e.g. `{"ds": train_ds}` (3 epochs of
            distillation): every candidate is compacted, fine-tuned and
            measured after the fine-tune.
        repair: `"auto"` (default): the best recovery measured on the
            VGG16 w0.5: without `finetune`, a repair on the `calibrate`
            images when given (see `budget_scope`); with `finetune`, none:
            the fine-tune starts from the BatchNorm-recalibrated compact
            model (3 epochs from there: 0.61 pp on nine pairs at 10.8%;
            at 1 epoch the starts tie: from the repair 0.86, from the
            recalibrated compact 0.93). Or images of
            the sub-task (see `keras_drnet.repair()`): every candidate is
            compacted and refit to the full network by least squares,
            without training, and measured so (then fine-tuned from there
            with `finetune`); or `None` / `False`: no repair.
        max_params: `None`, or a fraction of the model's parameters: answer
            the other question instead, the most accurate sub-task of that
            many running parameters. One candidate per value of `exponents`
            (`keras_drnet.allocate_budget()`; 0 is one fraction for every
            gate), the most accurate on `validation_data` is returned;
            `budgets` and `budget_scope` are not used.
        exponents: the allocation exponents `max_params` tries.
        verbose: 0 (silent) or 1 (a line per candidate).

    Returns:
        A tuple `(result, table)`: `result` is the `SubtaskModel` of the
        smallest budget that met `max_drop` (with `repair` / `finetune`:
        its repaired / fine-tuned compact model; with `max_params`: the
        most accurate candidate); `table` is a list of dicts, one per
        candidate, in budget order: `budget`, `exponent` (the allocation's,
        or None), `running_params` (and
        `running_params_fraction`), `running_flops` (and fraction),
        `compact_params` and `compact_flops` (what the compact model has),
        `accuracy`, `full_net_accuracy`, `drop` (pp), `met` and `seconds`.
        If no budget meets `max_drop`, the largest is returned with a
        warning.

    Example:

    ```python
    sub, table = keras_drnet.smallest_subtask(
        model, civs, ["cat", "dog"], max_drop=0.5,
        validation_data=(val_images, val_labels), calibrate=train_ds)
    for row in table:
        print(row["budget"], row["running_params_fraction"], row["drop"])
    ```
    """
    max_drop = _checked_max_drop(max_drop)
    if not isinstance(civs, CIVs):
        raise TypeError(
            "`civs` must be `keras_drnet.CIVs` (from `keras_drnet.dissect()` "
            f"or `CIVs.load()`). Received: {type(civs).__name__}"
        )
    indices = resolve_classes(civs, classes)
    budgets = _checked_budgets(budgets)
    if finetune is not None and not (
        isinstance(finetune, dict) and "ds" in finetune
    ):
        raise ValueError(
            "`finetune` must be `None` or a dict of `keras_drnet.finetune()` "
            'arguments with at least "ds", e.g. {"ds": train_ds}. '
            f"Received: finetune={finetune!r}"
        )
    if finetune is not None:
        known = set(inspect.signature(finetune_subtask).parameters) - {"sub"}
        unknown = sorted(set(finetune) - known)
        if unknown:
            raise ValueError(
                f"`finetune` has keys {unknown} that `keras_drnet.finetune()`"
                f" does not take; it takes {sorted(known)}. Received: "
                f"finetune keys {sorted(finetune)}"
            )
    if budget_scope not in ("gate", "model", "params"):
        raise ValueError(
            "`budget_scope` must be one of ['gate', 'model', 'params']. "
            f"Received: budget_scope={budget_scope!r}"
        )
    images, labels = _validation_images(
        model, civs, indices, validation_data, max_drop
    )
    if isinstance(repair, str):
        if repair != "auto":
            raise ValueError(
                '`repair` must be "auto", images of the sub-task, or None. '
                f"Received: repair={repair!r}"
            )
        repair = calibrate if finetune is None else None
    elif repair is False:
        repair = None

    def measure(budget, exponent=None):
        start = time.time()
        fractions = budget
        if exponent is not None or budget_scope == "params":
            exponent = EXPONENT if exponent is None else exponent
            fractions = allocate_budget(
                model, civs, classes, max_params=budget, exponent=exponent
            )
        sub = subtask(
            model,
            civs,
            classes,
            budget=fractions,
            budget_scope="gate" if budget_scope == "params" else budget_scope,
            calibrate=calibrate,
            calibration_samples=calibration_samples,
        )
        report = evaluate_subtask(sub, (images, labels))
        result, accuracy = sub, report.sub_net_accuracy
        if repair is not None:
            result = repair_subtask(sub, repair)
            accuracy = compact_accuracy(
                result, civs.class_names, images, labels
            )
        if finetune is not None:
            arguments = {"verbose": 0, **finetune}
            if repair is not None:
                arguments["start"] = result
            result = finetune_subtask(sub, **arguments)
            accuracy = compact_accuracy(
                result, civs.class_names, images, labels
            )
        drop = 100.0 * (report.full_net_accuracy - accuracy)
        row = {
            "budget": budget,
            "exponent": exponent,
            "running_params": report.running_params,
            "running_params_fraction": report.running_params_fraction,
            "running_flops": report.running_flops,
            "running_flops_fraction": report.running_flops_fraction,
            "compact_params": report.compact_params,
            "compact_flops": report.compact_flops,
            "accuracy": accuracy,
            "full_net_accuracy": report.full_net_accuracy,
            "drop": drop,
            # A hair of float slack: a drop of exactly max_drop meets it.
            "met": drop <= max_drop + 1e-9,
            "seconds": time.time() - start,
        }
        if verbose:
            print(
                f"budget {budget:g}"
                + ("" if exponent is None else f" (exponent {exponent:g})")
                + f": {row['running_params_fraction']:.1%} "
                f"params, accuracy {accuracy:.2%} (full net "
                f"{report.full_net_accuracy:.2%}), drop {drop:.2f} pp "
                f"[{row['seconds']:.0f} s]"
            )
        return row, result

    if max_params is not None:
        if not (is_number(max_params) and 0 < max_params <= 1):
            raise ValueError(
                "`max_params` is a fraction of the model's parameters, a "
                f"number in (0, 1]. Received: max_params={max_params!r}"
            )
        best = None
        table = []
        for exponent in exponents:
            row, result = measure(float(max_params), float(exponent))
            table.append(row)
            if best is None or row["accuracy"] > best[0]["accuracy"]:
                best = row, result
        return best[1], table

    # Bisection: `low` is known to fail (or is -1), `high` assumed to pass.
    tried = {}
    low, high = -1, len(budgets) - 1
    while high - low > 1:
        middle = (low + high) // 2
        row, result = measure(budgets[middle])
        if row["met"]:
            high = middle
        else:
            low, result = middle, None  # never returned: free it
        tried[middle] = row, result
    if high not in tried:
        tried[high] = measure(budgets[high])
    table = [tried[i][0] for i in sorted(tried)]
    if not tried[high][0]["met"]:
        warnings.warn(
            f"No budget up to {budgets[high]:g} keeps the drop within "
            f"max_drop={max_drop:g} pp (drop {tried[high][0]['drop']:.2f} pp);"
            " returning the largest.",
            stacklevel=2,
        )
    return tried[high][1], table


def _checked_max_drop(max_drop):
    if not is_number(max_drop):
        raise TypeError(
            "`max_drop` must be a number of percentage points, e.g. 0.5. "
            f"Received: max_drop={max_drop!r}"
        )
    if not math.isfinite(max_drop) or max_drop < 0:
        raise ValueError(
            "`max_drop` must be a finite number of percentage points >= 0, "
            f"e.g. 0.5. Received: max_drop={max_drop}"
        )
    return float(max_drop)


def _checked_budgets(budgets):
    many = isinstance(budgets, (list, tuple, np.ndarray))
    values = [b for b in np.ravel(budgets)] if many else []
    numbers = all(is_number(b) for b in values)
    values = [float(b) for b in values] if numbers else []
    in_range = all(0 < b <= 1 for b in values)
    if not values or not in_range or values != sorted(set(values)):
        raise ValueError(
            "`budgets` must be increasing fractions in (0, 1], e.g. "
            f"(0.1, 0.25, 0.5, 1.0). Received: budgets={budgets}"
        )
    return values


def _validation_images(model, civs, indices, validation_data, max_drop):
    """The validation images of the sub-task's classes, as arrays."""
    if validation_data is None:
        raise ValueError(
            "`validation_data` is required: held-out `(image, label)` pairs "
            "of the sub-task's classes, to measure the drop on."
        )
    input_shape, dtype = model_input_shape(model)
    elements = class_elements(validation_data, input_shape, civs.num_classes,
                              indices)
    images, labels = [], []
    for x, y in elements.batch(512).as_numpy_iterator():
        images.append(x.astype(dtype, copy=False))
        labels.append(y.astype("int64"))
    labels = np.concatenate(labels) if labels else np.zeros(0, "int64")
    bad = sum(int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
              for x in images)
    if bad:
        raise ValueError(
            f"{bad} of the {len(labels)} validation images of the sub-task's "
            "classes have NaN or inf values: a budget chosen on them would "
            "mean nothing. Drop or fix them."
        )
    missing = [civs.class_names[i] for i in indices if not (labels == i).any()]
    if missing:
        raise ValueError(
            f"`validation_data` has no image of {missing}: the drop must be "
            "measured on images of every class of the sub-task."
        )
    needed = math.ceil(100.0 / max_drop) if max_drop > 0 else len(indices)
    if len(labels) < needed:
        raise ValueError(
            f"`validation_data` has {len(labels)} images of the sub-task's "
            f"classes; measuring a drop of max_drop={max_drop:g} pp needs at "
            f"least {needed} (one image moves the accuracy by 100 / "
            f"{len(labels)} = {100 / len(labels):.2g} pp). Pass more images "
            "or a larger `max_drop`."
        )
    return np.concatenate(images), labels
