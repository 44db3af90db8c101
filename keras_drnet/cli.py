"""`keras-drnet`: dissect, compact, export and detect from a shell.

    keras-drnet dissect --model=m.keras --dataset=cifar10 --out=civs.npz
    keras-drnet subtask --model=m.keras --civs=civs.npz --classes=cat,dog \\
        --budget=0.33 --out=cat_dog/
    keras-drnet report --model=m.keras --civs=civs.npz --classes=cat,dog \\
        --budget=0.33 --dataset=cifar10 --split=test
    keras-drnet report --subtask=cat_dog/ --dataset=cifar10
    keras-drnet similarity --civs=civs.npz --out=similarity.png
    keras-drnet detect --model=m.keras --civs=civs.npz --dataset=cifar10 \\
        --fit_data=test[:1000] --data=test[1000:2000] --out=scores.csv

`keras-drnet COMMAND --help` lists a command's flags. A user error prints
one line on stderr and exits with status 2; `--verbosity=1` shows the
Python traceback instead.
"""

import json
import os
import sys

from absl import flags

# Its own flag registry: importing the CLI (e.g. in tests) must not clash
# with the flags of the user's absl program.
FLAGS = flags.FlagValues()

_S, _I, _F, _B, _L = (
    flags.DEFINE_string,
    flags.DEFINE_integer,
    flags.DEFINE_float,
    flags.DEFINE_bool,
    flags.DEFINE_list,
)
for _define, _name, _default, _help in [
    (_S, "model", None, "The trained classifier, a .keras file."),
    (_S, "civs", None, "A CIVs file written by `dissect` (detect: one or "
     "several, e.g. act.npz,taylor.npz, whose paths it combines)."),
    (_S, "out", None, "Where to write the result."),
    (_S, "dataset", None, "A tfds dataset name, e.g. cifar10."),
    (_S, "split", None, "The tfds split (dissect and subtask: train, "
     "report: test)."),
    (_S, "data", None, "Instead of --dataset: a folder of class subfolders "
     "of images, or an .npz with `images` and `labels` (and optionally "
     "`class_names`)."),
    (_S, "rescale", None, "Multiply pixel values by this, e.g. 1/255, as "
     "the model expects."),
    (_L, "class_names", None, "The model's class names in its output "
     "order, e.g. airplane,automobile,... (needed for a --data folder, "
     "whose subfolders are matched to them by name)."),
    (_I, "samples_per_class", 100, "Images dissected per class."),
    (_S, "method", "cdrp", "cdrp, activation, frat or taylor (detect: "
     "default the CIVs' own)."),
    (_S, "checkpoint_dir", None, "Resumable progress (default: --out + "
     "'.ckpt'); rerun the same command to resume."),
    (_L, "classes", None, "The sub-task's classes, e.g. cat,dog (dissect: "
     "CIVs for that sub-task only, with --method=taylor or frat)."),
    (_F, "budget", None, "Fraction of channels to keep (with "
     "--budget_scope=params: of the running parameters)."),
    (_S, "budget_scope", None, "gate, model, or params (the parameter "
     "budget spread over the layers by the cost of their channels). "
     "Default: the Python API's, gate for --budget and params for "
     "--max_drop."),
    (_F, "threshold", None, "The paper's union threshold."),
    (_F, "max_drop", None, "Search the smallest per-gate budget within this "
     "accuracy drop (pp) on --validation."),
    (_S, "validation", None, "Held-out data for --max_drop and the report: "
     "a split of --dataset (e.g. test), or a folder / .npz."),
    (_B, "calibrate", False, "Re-estimate BatchNorm statistics on the "
     "sub-task's images of the data."),
    (_B, "repair", False, "Refit the compact model to the full network "
     "by least squares on the sub-task's images of the data (no training)."),
    (_I, "finetune_epochs", 0, "Fine-tune the compact model on the "
     "sub-task's images of the data (after --repair: from the repaired "
     "model)."),
    (_B, "distill", True, "With --finetune_epochs: learn from the full "
     "network's answers (the default); --nodistill: from the data's "
     "labels."),
    (_B, "tflite", False, "Also write model.tflite."),
    (_S, "subtask", None, "Instead of --civs/--classes/--budget: a folder "
     "written by `subtask --out`, whose model (calibrated, repaired or "
     "fine-tuned as it was built) is reported; --model and --rescale "
     "default to the ones it was built with."),
    (_S, "fit_data", None, "Clean held-out images to fit the detector on "
     "(a split of --dataset, a folder or an .npz; labels are not used)."),
    (_S, "detector", None, "A fitted detector (.npz): written after "
     "--fit_data, read without it."),
    (_F, "false_positive_rate", 0.05, "The detector's rate on --fit_data."),
    (_I, "verbosity", 0, "1 shows the Python traceback of an error."),
]:
    _define(_name, _default, _help, flag_values=FLAGS)

_COMMANDS = {
    "dissect": (
        "Per-class channel importance vectors (CIVs) of a classifier.",
        ["model", "dataset", "split", "data", "rescale", "class_names",
         "samples_per_class", "method", "classes", "checkpoint_dir", "out"],
        ["model", "out"],
    ),
    "subtask": (
        "A sub-task's compact model (.keras, SavedModel, optionally .tflite),"
        " report.json and the per-layer plot.",
        ["model", "civs", "classes", "budget", "budget_scope", "threshold",
         "max_drop", "validation", "dataset", "split", "data", "rescale",
         "calibrate", "repair", "finetune_epochs", "distill", "tflite",
         "out"],
        ["model", "civs", "classes", "out"],
    ),
    "report": (
        "Accuracy and running/compact sizes of a sub-task on test data.",
        ["model", "civs", "classes", "budget", "budget_scope", "threshold",
         "subtask", "dataset", "split", "data", "rescale"],
        [],  # --model, --civs and --classes, or --subtask: see report()
    ),
    "detect": (
        "Scores images by how far their routing path is from their "
        "predicted class's (kd.PathDetector): a CSV of index, predicted "
        "class, score and flagged.",
        ["model", "civs", "method", "dataset", "data", "rescale",
         "fit_data", "detector", "false_positive_rate", "out"],
        ["model", "civs", "data", "out"],
    ),
    "similarity": (
        "The class-similarity heat map of a CIVs file (paper Fig. 8): "
        "the IoU of the channels each class keeps at --budget (default "
        "1/3 of each gate), or, with --threshold, of those above it (the "
        "paper's, 0).",
        ["civs", "budget", "threshold", "out"],
        ["civs", "out"],
    ),
}


class UsageError(Exception):
    """A mistake in the command line: reported in one line, status 2."""


def _usage():
    lines = [__doc__.strip().splitlines()[0], "", "Commands:"]
    for name, (summary, _, _) in _COMMANDS.items():
        lines.append(f"  {name:11} {summary}")
    return "\n".join(lines)


def _command_help(name):
    summary, names, required = _COMMANDS[name]
    lines = [f"keras-drnet {name}: {summary}", "", "Flags:"]
    for flag in names + ["verbosity"]:
        entry = FLAGS[flag]
        default = "" if entry.default is None else (
            f" (default: {entry.default_as_str})"
        )
        need = " [required]" if flag in required else ""
        lines.append(f"  --{flag}: {entry.help}{default}{need}")
    return "\n".join(lines)


def _check_flags(name):
    summary, names, required = _COMMANDS[name]
    for flag in required:
        if FLAGS[flag].value is None:
            raise UsageError(f"`{name}` needs --{flag}. See `keras-drnet "
                             f"{name} --help`.")
    stray = [f for f in _COMMANDS_FLAGS - set(names) if FLAGS[f].present]
    if stray:
        hint = ""
        if name == "report" and {"calibrate", "repair", "finetune_epochs",
                                 "distill"} & set(stray):
            hint = (" To report a sub-task as `subtask` built it, pass the "
                    "folder it wrote: --subtask=DIR.")
        raise UsageError(
            f"`{name}` does not take --{', --'.join(sorted(stray))}.{hint} "
            f"See `keras-drnet {name} --help`."
        )
    for flag in ("model", "civs"):
        value = FLAGS[flag].value
        if flag not in names or value is None:
            continue
        paths = value.split(",") if flag == "civs" else [value]
        if len(paths) > 1 and name != "detect":
            raise UsageError(f"--civs={value}: `{name}` takes one CIVs file "
                             "(`detect` combines several).")
        for path in paths:
            if not os.path.exists(path):
                raise UsageError(f"--{flag}={path}: no such file.")


_COMMANDS_FLAGS = {f for _, names, _ in _COMMANDS.values() for f in names}


def _rescale():
    import math

    text = FLAGS.rescale
    if text is None:
        return None
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or not math.isfinite(value) or value == 0:
        raise UsageError(
            f"--rescale must be a number or a fraction such as 1/255, "
            f"finite and not zero. Received: --rescale={text}"
        )
    return value


def _by_name(ds, found, names, source):
    """`ds` with labels indexing `found` (the data's class names) mapped to
    indices of `names` (the model's), matched by name."""
    import tensorflow as tf

    if names is None or list(found) == list(names):
        return ds
    unknown = [n for n in found if n not in names]
    if unknown:
        raise UsageError(
            f"{source} has classes {unknown} that the model does not know; "
            f"its classes are {list(names)}. Rename or remove them."
        )
    table = tf.constant([list(names).index(n) for n in found], tf.int64)
    return ds.map(lambda x, y: (x, tf.gather(table, tf.cast(y, tf.int64))))


def _data(spec, names=None):
    """`(dataset of (image, label), class names or None)` for `spec`: a
    folder of class subfolders, an .npz, or a split of --dataset.

    With `names` (the model's classes, from the CIVs or --class_names), the
    data's own class names are matched to them by name, so a label always
    means the model's class: a folder's subfolders sort alphabetically,
    which is rarely the model's order.
    """
    import numpy as np
    import tensorflow as tf

    scale = _rescale()
    found = None
    if spec.endswith(".npz") or os.sep in spec or os.path.isdir(spec):
        if not os.path.exists(spec):
            raise UsageError(f"{spec}: no such file or folder.")
        if spec.endswith(".npz"):
            with np.load(spec) as archive:
                missing = {"images", "labels"} - set(archive.files)
                if missing:
                    raise UsageError(
                        f"{spec} has no {', '.join(sorted(missing))}: save "
                        "`np.savez(path, images=..., labels=...)`."
                    )
                ds = tf.data.Dataset.from_tensor_slices(
                    (archive["images"], archive["labels"])
                )
                if "class_names" in archive.files:
                    found = [str(n) for n in archive["class_names"]]
        else:
            ds, found = _folder(spec)
            if names is None:
                if not all(n.isdigit() for n in found):
                    raise UsageError(
                        f"The subfolders of {spec} ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}) sort "
                        "alphabetically, which need not be the model's "
                        "output order: pass --class_names in the model's "
                        "order (subfolders are matched to them by name)."
                    )
                # Folders named 0, 1, ... are the model's output indices.
                names = [str(i) for i in range(max(map(int, found)) + 1)]
    elif FLAGS.dataset is not None:
        import tensorflow_datasets as tfds

        try:
            ds, info = tfds.load(FLAGS.dataset, split=spec,
                                 as_supervised=True, with_info=True)
        except Exception as error:  # tfds raises many kinds
            first = str(error).strip().splitlines()[0][:200]
            raise UsageError(
                f"--dataset={FLAGS.dataset} --split={spec}: {first}"
            ) from None
        label = info.features["label"]
        found = list(getattr(label, "names", []) or []) or None
    else:
        raise UsageError(
            f"{spec!r} is not a folder or an .npz file; for a tfds split, "
            "pass --dataset=NAME too."
        )
    if found is not None:
        ds = _by_name(ds, found, names, spec)
    if scale is not None:
        ds = ds.map(lambda x, y: (tf.cast(x, "float32") * scale, y))
    return ds, (names if names is not None else found)


def _folder(spec):
    """A folder of class subfolders as `(dataset, subfolder names)`; every
    image is decoded once first, so a corrupt file is named up front."""
    import keras
    import tensorflow as tf

    size = _model().inputs[0].shape[1:3]
    ds = keras.utils.image_dataset_from_directory(
        spec, image_size=tuple(size), batch_size=None, shuffle=False,
        verbose=False,
    )
    found = list(ds.class_names)
    for path in ds.file_paths:
        try:
            tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except tf.errors.OpError:
            raise UsageError(
                f"{path} is not a readable image (corrupt, or not PNG / "
                "JPEG / GIF / BMP): remove or replace it."
            ) from None
    return ds, found


_LOADED = {}


def _model():
    if "model" not in _LOADED:
        import keras

        import keras_drnet  # noqa: F401 (registers the package's layers)

        try:
            _LOADED["model"] = keras.models.load_model(FLAGS.model)
        except Exception as error:  # Keras raises many kinds for a bad file
            first = str(error).strip().splitlines()[0][:200]
            raise UsageError(
                f"--model={FLAGS.model} cannot be read as a Keras model "
                "(a truncated or corrupt .keras file, or another format; "
                f"Keras says: {first})"
            ) from None
    return _LOADED["model"]


def _civs():
    from keras_drnet.civ import CIVs

    if "," in FLAGS.civs:  # detect's list (other commands refuse one)
        return [CIVs.load(path) for path in FLAGS.civs.split(",")]
    civs = CIVs.load(FLAGS.civs)
    # Class names are checked before TensorFlow starts (`index` raises
    # with the closest name).
    for name in FLAGS.classes or []:
        civs.index(name)
    return civs


def dissect():
    import shutil

    import keras_drnet as kd

    out = FLAGS.out
    if not out.endswith(".npz") or os.path.isdir(out):
        raise UsageError(f"--out={out}: the CIVs are written to an .npz "
                         "file, e.g. --out=civs.npz.")
    _check_writable(out)
    checkpoint = FLAGS.checkpoint_dir or out + ".ckpt"
    if os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
        raise UsageError(f"--checkpoint_dir={checkpoint} is a file; the "
                         "checkpoint is a folder: pass another path.")
    model = _model()
    ds, names = _data(FLAGS.data or FLAGS.split or "train",
                      FLAGS.class_names)
    try:
        civs = kd.dissect(
            model, ds, samples_per_class=FLAGS.samples_per_class,
            class_names=names, method=FLAGS.method,
            classes=FLAGS.classes, checkpoint_dir=checkpoint,
        )
    except KeyboardInterrupt:
        print(f"\nInterrupted. Progress is in {checkpoint}: run the same "
              "command again to resume.", file=sys.stderr)
        raise SystemExit(130)
    civs.save(out)
    if FLAGS.checkpoint_dir is None:
        # The default checkpoint has done its job; left behind, it would be
        # resumed by the next run with other data.
        shutil.rmtree(checkpoint, ignore_errors=True)
    scope = (f" for the sub-task {'-'.join(civs.subtask_classes)}"
             if civs.subtask_classes else "")
    print(f"Wrote {out}: {civs.num_classes} classes{scope}, "
          f"{civs.total_channels} channels in {len(civs.layout)} gates.")


def _check_writable(path, flag="out"):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--{flag}={path}: folder {folder} does not exist.")


def _subtask(model, civs, calibrate=None):
    import keras_drnet as kd

    if (FLAGS.budget is None) == (FLAGS.threshold is None):
        raise UsageError("Pass exactly one of --budget (e.g. 0.33) or "
                         "--threshold.")
    budget, scope = FLAGS.budget, FLAGS.budget_scope
    if scope == "params":
        if budget is None:
            raise UsageError("--budget_scope=params needs --budget (a "
                             "fraction of the running parameters).")
        budget = kd.allocate_budget(model, civs, FLAGS.classes,
                                    max_params=budget)
        scope = None  # a list of fractions is per gate
    return kd.subtask(model, civs, FLAGS.classes, budget=budget,
                      threshold=FLAGS.threshold, budget_scope=scope,
                      calibrate=calibrate)


def subtask():
    import numpy as np

    import keras_drnet as kd

    civs = _civs()
    chosen = [FLAGS.budget, FLAGS.threshold, FLAGS.max_drop]
    if sum(v is not None for v in chosen) != 1:
        raise UsageError("Pass exactly one of --budget, --threshold or "
                         "--max_drop (with --validation).")
    if FLAGS["distill"].present and not FLAGS.finetune_epochs:
        raise UsageError("--distill/--nodistill choose the fine-tune's "
                         "loss: pass --finetune_epochs too (e.g. 3).")
    model = _model()
    if os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
        raise UsageError(f"--out={FLAGS.out} is a file; the sub-task is "
                         "written to a folder: pass another path.")
    _check_writable(FLAGS.out)
    needs_data = FLAGS.calibrate or FLAGS.repair or FLAGS.finetune_epochs
    names = civs.class_names
    ds = None
    if needs_data:
        ds = _data(FLAGS.data or FLAGS.split or "train", names)[0]
    if FLAGS.max_drop is not None and FLAGS.validation is None:
        raise UsageError("--max_drop needs --validation: a split of "
                         "--dataset (e.g. test), or a folder / .npz.")
    validation = None
    if FLAGS.validation is not None:
        validation = _data(FLAGS.validation, names)[0]
        _check_has_classes(validation, civs, "--validation")
    if ds is not None:
        _check_has_classes(ds, civs, "--data" if FLAGS.data else "--split")
    if FLAGS.max_drop is not None:
        finetune = None
        if FLAGS.finetune_epochs:
            finetune = {"ds": ds, "epochs": FLAGS.finetune_epochs,
                        "distill": FLAGS.distill}
        result, table = kd.smallest_subtask(
            model, civs, FLAGS.classes, max_drop=FLAGS.max_drop,
            validation_data=validation, budget_scope=_budget_scope(),
            calibrate=ds if FLAGS.calibrate else None, finetune=finetune,
            repair=ds if FLAGS.repair else None, verbose=1,
        )
        trained = finetune or FLAGS.repair
        small = result if trained else kd.compact(result)
        sub = None if trained else result
        report = {"search": table}
    else:
        sub = _subtask(model, civs, ds if FLAGS.calibrate else None)
        small = kd.repair(sub, ds) if FLAGS.repair else kd.compact(sub)
        if FLAGS.finetune_epochs:
            small = kd.finetune(sub, ds, epochs=FLAGS.finetune_epochs,
                                distill=FLAGS.distill,
                                start=small if FLAGS.repair else None)
        report = {}
    os.makedirs(FLAGS.out, exist_ok=True)
    if sub is not None and validation is not None:
        evaluated = kd.evaluate_subtask(sub, validation)
        print(evaluated)
        evaluated.plot(os.path.join(FLAGS.out, "running_channels.png"))
        report.update(_report_dict(evaluated))
        if FLAGS.finetune_epochs or FLAGS.repair:
            from keras_drnet.reporting import compact_accuracy

            batches = sub.live_elements(validation).batch(1024)
            images, labels = zip(*batches.as_numpy_iterator())
            accuracy = compact_accuracy(small, civs.class_names,
                                        np.concatenate(images),
                                        np.concatenate(labels))
            what = "fine-tuned" if FLAGS.finetune_epochs else "repaired"
            report[f"{what.replace('-', '')}_accuracy"] = accuracy
            print(f"  {what} compact model:{' ' * (20 - len(what))}"
                  f"{accuracy:.2%}")
    report.update({"classes": small.class_names,
                   "compact_params": small.count_params(),
                   "model_params": model.count_params(),
                   "settings": _settings(civs)})
    kd.export(small, os.path.join(FLAGS.out, "model.keras"), format="keras")
    kd.export(small, os.path.join(FLAGS.out, "saved_model"),
              format="tf_saved_model")
    if FLAGS.tflite:
        kd.export(small, os.path.join(FLAGS.out, "model.tflite"),
                  format="litert")
    with open(os.path.join(FLAGS.out, "report.json"), "w") as f:
        json.dump(_rounded(report), f, indent=2, default=float)
    print(f"Wrote {FLAGS.out}: model.keras, saved_model/"
          + (", model.tflite" if FLAGS.tflite else "") + ", report.json; "
          f"{small.count_params():,} of {model.count_params():,} params.")


def _settings(civs):
    """Everything that made this sub-task, so that it can be rebuilt."""
    from keras_drnet import __version__

    names = ("classes", "budget", "budget_scope", "threshold", "max_drop",
             "calibrate", "repair", "finetune_epochs", "data", "dataset",
             "split", "validation", "rescale")
    return {**{n: FLAGS[n].value for n in names},
            # Only a fine-tune has a loss to record.
            "distill": FLAGS.distill if FLAGS.finetune_epochs else None,
            "budget_scope": _budget_scope(),
            "model": os.path.abspath(FLAGS.model),
            "model_class_names": civs.class_names,
            "civs_method": civs.config.get("method", "cdrp"),
            "model_fingerprint": civs.fingerprint,
            "keras_drnet_version": __version__}


def _budget_scope():
    """--budget_scope, or the default of the Python call it goes to."""
    if FLAGS.budget_scope is not None:
        return FLAGS.budget_scope
    import inspect

    import keras_drnet as kd

    if FLAGS.max_drop is not None:
        signature = inspect.signature(kd.smallest_subtask)
        return signature.parameters["budget_scope"].default
    return kd.Selection.budget_scope


def _rounded(value):
    """Floats to 4 significant decimals (accuracies, fractions): a report
    for people, not 0.3295454680919647."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if abs(value) < 1 else round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _report_dict(report):
    fields = ("classes", "images", "full_net_accuracy", "sub_net_accuracy",
              "running_channels", "params", "running_params", "flops",
              "running_flops", "compact_params", "compact_flops")
    return {f: getattr(report, f) for f in fields}


def report():
    import keras_drnet as kd

    if FLAGS.subtask is not None:
        return _report_folder(FLAGS.subtask)
    for flag in ("model", "civs", "classes"):
        if FLAGS[flag].value is None:
            raise UsageError(f"`report` needs --{flag} (or --subtask=DIR, a "
                             "folder written by `subtask`). See "
                             "`keras-drnet report --help`.")
    civs = _civs()
    model = _model()
    ds = _data(FLAGS.data or FLAGS.split or "test", civs.class_names)[0]
    sub = _subtask(model, civs)
    print(kd.evaluate_subtask(sub, ds))


def _report_folder(folder):
    """Reports the model a `subtask --out` folder holds, against the full
    network on the same images: what `subtask` built, calibration, repair
    and fine-tuning included, without rebuilding it."""
    import keras
    import numpy as np

    from keras_drnet.batching import class_elements
    from keras_drnet.civ import model_fingerprint
    from keras_drnet.reporting import compact_accuracy

    given = [f for f in ("civs", "classes", "budget", "threshold",
                         "budget_scope") if FLAGS[f].present]
    if given:
        raise UsageError(
            f"--subtask={folder} brings its own settings (in its "
            f"report.json): drop --{', --'.join(given)}."
        )
    path = os.path.join(folder, "report.json")
    try:
        with open(path) as f:
            settings = json.load(f)["settings"]
        names = settings["model_class_names"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"--subtask={folder}: no readable report.json with the sub-task's "
            "settings; pass a folder written by `keras-drnet subtask --out` "
            "(version 0.2.0 or later)."
        ) from None
    for flag in ("model", "rescale", "dataset"):
        # The settings it was built with, unless overridden.
        if not FLAGS[flag].present and settings.get(flag) is not None:
            FLAGS[flag].value = settings[flag]
    if FLAGS.model is None or not os.path.exists(FLAGS.model):
        raise UsageError(f"The full model of --subtask={folder} "
                         f"({FLAGS.model}) is not there: pass --model.")
    model = _model()
    if model_fingerprint(model) != settings["model_fingerprint"]:
        raise UsageError(f"--model={FLAGS.model} is not the model the "
                         f"sub-task in {folder} was built from.")
    small = keras.models.load_model(os.path.join(folder, "model.keras"))
    from keras_drnet.export import read_class_names

    classes = read_class_names(os.path.join(folder, "model.keras"))
    small.class_names = classes  # as `kd.compact` names them
    columns = np.array([names.index(n) for n in classes])
    ds = _data(FLAGS.data or FLAGS.split or "test", names)[0]
    elements = class_elements(ds, model.inputs[0].shape, len(names), columns)
    images = [np.zeros((0,) + tuple(model.inputs[0].shape[1:]), "float32")]
    labels = [np.zeros((0,), "int64")]
    for x, y in elements.batch(1024).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    images, labels = np.concatenate(images), np.concatenate(labels)
    missing = sorted(set(classes) - {names[i] for i in np.unique(labels)})
    if missing:
        raise UsageError(f"The data has no image of {', '.join(missing)}: "
                         "pass data with images of every class of the "
                         "sub-task.")
    if not np.isfinite(images).all():
        raise UsageError("The data has images with NaN or inf values among "
                         "the sub-task's classes: drop or fix them.")
    full = np.asarray(model.predict(images, batch_size=256, verbose=0))
    full_accuracy = float(np.mean(columns[full[:, columns].argmax(-1)]
                                  == labels))
    accuracy = compact_accuracy(small, names, images, labels)
    params = small.count_params()
    print(f"{folder}: sub-task {'-'.join(classes)} ({len(labels)} test "
          f"images)\n"
          f"  full-net accuracy:       {full_accuracy:.2%}\n"
          f"  sub-task model accuracy: {accuracy:.2%}  (its model.keras)\n"
          f"  params:                  {params:,} of "
          f"{model.count_params():,} ({params / model.count_params():.2%})")


def _check_has_classes(ds, civs, flag):
    """Refuses data without an image of some class of --classes, before
    any work (a search or a fine-tune would fail only at its end)."""
    import numpy as np

    from keras_drnet.reconstruction import resolve_classes

    wanted = set(resolve_classes(civs, FLAGS.classes))
    seen = set()
    for _, label in ds.as_numpy_iterator():
        seen.update(np.ravel(label).astype(int).tolist())
        if wanted <= seen:
            return
    missing = [civs.class_names[i] for i in sorted(wanted - seen)]
    raise UsageError(f"{flag} has no image of {', '.join(missing)}: pass "
                     "data with images of every class of --classes.")


def similarity():
    civs = _civs()
    civs.plot_similarity(FLAGS.out, budget=FLAGS.budget,
                         threshold=FLAGS.threshold)
    print(f"Wrote {FLAGS.out} ({civs.num_classes} classes).")


def detect():
    import csv

    import numpy as np

    import keras_drnet as kd

    if not FLAGS.out.endswith(".csv"):
        raise UsageError(f"--out={FLAGS.out}: the scores are written to a "
                         ".csv file, e.g. --out=scores.csv.")
    _check_writable(FLAGS.out)
    if FLAGS.detector is not None:
        if not FLAGS.detector.endswith(".npz"):
            raise UsageError(f"--detector={FLAGS.detector}: a detector is "
                             "an .npz file.")
        _check_writable(FLAGS.detector, "detector")
    if FLAGS.fit_data is None:
        if FLAGS.detector is None:
            raise UsageError("`detect` needs --fit_data (clean held-out "
                             "images to fit on) or --detector=FILE written by "
                             "an earlier fit.")
        if not os.path.exists(FLAGS.detector):
            raise UsageError(f"--detector={FLAGS.detector}: no such file "
                             "(pass --fit_data to fit and write it).")
        given = [f for f in ("method", "false_positive_rate")
                 if FLAGS[f].present]
        if given:
            raise UsageError(
                f"--{', --'.join(given)} set how a detector is fitted; "
                f"--detector={FLAGS.detector} is fitted already: drop them, "
                "or pass --fit_data to fit anew."
            )
    civs = _civs()
    model = _model()
    names = (civs[0] if isinstance(civs, list) else civs).class_names

    def images(spec):
        # Streamed: the detector reads datasets batch by batch.
        return _data(spec, names)[0].map(lambda x, y: x)

    # The method flag's default is dissect's; the detector's default is
    # the CIVs' own method, unless --method is given.
    method = FLAGS.method if FLAGS["method"].present else None
    if FLAGS.fit_data is not None:
        detector = kd.PathDetector(
            model, civs, method=method,
            false_positive_rate=FLAGS.false_positive_rate,
        ).fit(images(FLAGS.fit_data), verbose=1)
        if FLAGS.detector is not None:
            detector.save(FLAGS.detector)
    else:
        detector = kd.PathDetector.load(FLAGS.detector, model, civs)
    scores, logits = detector.score(images(FLAGS.data), return_logits=True,
                                    verbose=1)
    flagged = scores > detector.threshold
    with open(FLAGS.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "predicted", "score", "flagged"])
        for i, (score, z, flag) in enumerate(zip(scores, logits, flagged)):
            writer.writerow([i, names[int(np.argmax(z))], f"{score:.4f}",
                             int(flag)])
    print(f"Wrote {FLAGS.out}: {len(scores)} images, {int(flagged.sum())} "
          f"flagged ({flagged.mean():.1%}; threshold {detector.threshold:.3f}"
          f", {detector.method} paths).")


# What runs each command of `_COMMANDS`.
_HANDLERS = {"dissect": dissect, "subtask": subtask, "report": report,
             "detect": detect, "similarity": similarity}


def _quiet():
    """Only the package's own lines and real errors: TensorFlow's start-up
    chatter (C++ logs, absl warnings) is off unless --verbosity >= 1."""
    if FLAGS.verbosity >= 1:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    if "tensorflow" not in sys.modules:
        sys.meta_path.insert(0, _SilentImport("tensorflow"))


class _SilentImport:
    """Imports one module with C-level stderr sent to /dev/null.

    While TensorFlow is imported, its C++ core probes for CUDA and logs it
    (twice) through absl before any log level applies, so
    TF_CPP_MIN_LOG_LEVEL cannot silence it. Python-level errors of the
    import still surface: they are exceptions, raised after stderr is back.
    """

    def __init__(self, name):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _SilentLoader(spec.loader)
        return spec


class _SilentLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # The module keeps the real loader (resources, reloads).
        module.__loader__ = module.__spec__.loader = self.loader
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            self.loader.exec_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)


def _main(argv):
    name = argv[1]
    _quiet()
    if len(argv) > 2:
        raise UsageError(
            f"Unexpected arguments: {' '.join(argv[2:])}. Flags are written "
            "--name=value, switches --name or --noname (e.g. --notflite)."
        )
    _check_flags(name)
    try:
        _HANDLERS[name]()
    except (ValueError, TypeError, FileNotFoundError) as error:
        if FLAGS.verbosity >= 1:
            raise
        raise UsageError(str(error)) from None


def run(argv=None):
    """The console entry point."""
    argv = list(sys.argv if argv is None else argv)
    command = argv[1] if len(argv) > 1 else None
    if command in (None, "-h", "--help", "help"):
        print(_usage() + "\n\n`keras-drnet COMMAND --help` for its flags.")
        return 0 if command else 2
    if command == "--version":
        from keras_drnet import __version__

        print(f"keras-drnet {__version__}")
        return 0
    if command not in _COMMANDS:
        print(f"keras-drnet: unknown command {command!r}; one of "
              f"{', '.join(_COMMANDS)}.", file=sys.stderr)
        return 2
    # Defaults (and no cached model) again when called twice in a process.
    FLAGS.unparse_flags()
    _LOADED.clear()
    if "--help" in argv or "-h" in argv:
        FLAGS(argv[:1], known_only=True)
        print(_command_help(command))
        return 0
    try:
        rest = FLAGS(argv[:1] + argv[2:])[1:]
    except flags.Error as error:
        print(f"keras-drnet {command}: {error}", file=sys.stderr)
        return 2
    try:
        _main(argv[:1] + [command] + rest)
    except UsageError as error:
        if FLAGS.verbosity >= 1:
            raise
        message = " ".join(str(error).split())
        print(f"keras-drnet {command}: {message}", file=sys.stderr)
        return 2
    return 0


def main():
    sys.exit(run())
