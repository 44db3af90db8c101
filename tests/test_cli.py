"""Tests for `keras-drnet` (keras_drnet.cli): end to end in a subprocess on
a tiny model, against the Python API's result; help and every error case
(one line on stderr, status 2) in process."""

import functools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import _subtask_models as sm
import keras_drnet as kd
from keras_drnet import budget_search
from keras_drnet import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = sm.bn_relu_cnn("softmax")
    model.save(folder / "m.keras")
    rng = np.random.default_rng(0)
    x, y = sm.images(rng, 40), np.arange(40) % 5
    np.savez(folder / "data.npz", images=x, labels=y,
             class_names=np.array(sm.NAMES))
    other = sm.bn_relu_cnn("softmax", seed=1)
    civs = kd.dissect(other, (x, y), samples_per_class=2,
                      method="activation", class_names=sm.NAMES, verbose=0)
    civs.save(folder / "other_civs.npz")
    kd.dissect(model, (x, y), samples_per_class=2, method="activation",
               class_names=sm.NAMES, verbose=0).save(folder / "own_civs.npz")
    return folder, model, x, y


def _cli(folder, *args):
    # As a user runs it: no TF_CPP_MIN_LOG_LEVEL of ours.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "keras_drnet", *args],
                          cwd=folder, env=env, capture_output=True,
                          text=True)


def test_dissect_then_subtask_end_to_end(files):
    folder, model, x, y = files
    done = _cli(folder, "dissect", "--model=m.keras", "--data=data.npz",
                "--samples_per_class=3", "--method=activation",
                "--out=civs.npz")
    assert done.returncode == 0, done.stderr
    # The package's own lines only: no TensorFlow start-up chatter.
    assert done.stderr == "", done.stderr
    assert "Wrote civs.npz: 5 classes, 18 channels in 3 gates." in done.stdout
    civs = kd.CIVs.load(folder / "civs.npz")
    want = kd.dissect(model, (x, y), samples_per_class=3,
                      method="activation", class_names=sm.NAMES, verbose=0)
    np.testing.assert_allclose(civs.vectors, want.vectors, rtol=1e-6)
    assert civs.class_names == sm.NAMES
    # The default checkpoint is gone after success: a rerun with other
    # data must not resume it.
    assert not (folder / "civs.npz.ckpt").exists()

    done = _cli(folder, "subtask", "--model=m.keras", "--civs=civs.npz",
                "--classes=cat,dog", "--budget=0.5", "--validation=data.npz",
                "--tflite", "--out=cat_dog")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert "sub-task cat-dog (16 test images)" in done.stdout
    out = folder / "cat_dog"
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=0.5,
                     budget_scope="gate")
    small = keras.models.load_model(out / "model.keras")
    np.testing.assert_allclose(np.asarray(small(x)),
                               np.asarray(kd.compact(sub)(x)), atol=1e-6)
    for artifact in ("model.keras", "saved_model", "model.tflite"):
        assert kd.read_class_names(out / artifact) == ["cat", "dog"]
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["cat", "dog"]
    assert report["compact_params"] == small.count_params()
    assert report["images"] == 16
    settings = report["settings"]
    assert settings["classes"] == ["cat", "dog"] and settings["budget"] == 0.5
    assert settings["budget_scope"] == "gate"
    assert settings["keras_drnet_version"] == kd.__version__
    assert settings["model_fingerprint"] == civs.fingerprint
    # Rounded for people: no 0.3295454680919647.
    assert all(len(repr(v)) <= 7 for v in report.values()
               if isinstance(v, float)), report
    assert (out / "running_channels.png").stat().st_size > 1000


def test_a_user_error_is_one_line_and_status_2_without_traceback(files):
    folder, _, _, _ = files
    done = _cli(folder, "report", "--model=m.keras", "--civs=other_civs.npz",
                "--classes=cat,dog", "--budget=0.5", "--data=data.npz")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("keras-drnet report: These CIVs were dissected "
                           "from another model"), last


@pytest.mark.parametrize("command", list(cli._COMMANDS))
def test_each_command_has_help(command, capsys):
    assert cli.run(["keras-drnet", command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"keras-drnet {command}: ")
    for flag in cli._COMMANDS[command][1]:
        assert f"  --{flag}: " in out
    assert cli.run(["keras-drnet", "--help"]) == 0
    assert command in capsys.readouterr().out


def _error(capsys, *args):
    code = cli.run(["keras-drnet", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err


def test_user_errors_name_the_fix(files, capsys):
    folder, _, _, _ = files
    model, civs = f"--model={folder / 'm.keras'}", f"--civs={folder}/x.npz"
    assert _error(capsys, "dissect", "--model=nope.keras", "--out=a.npz") == (
        "keras-drnet dissect: --model=nope.keras: no such file.")
    assert _error(capsys, "subtask", model, "--classes=cat") == (
        "keras-drnet subtask: `subtask` needs --civs. See `keras-drnet "
        "subtask --help`.")
    assert "`dissect` does not take --budget" in _error(
        capsys, "dissect", model, "--out=a.npz", "--budget=0.5")
    assert "flag --budget=abc" in _error(
        capsys, "subtask", model, civs, "--budget=abc").lower()
    assert "unknown command 'disect'" in _error(capsys, "disect")
    civs = f"--civs={folder / 'own_civs.npz'}"
    assert "Did you mean 'dog'?" in _error(
        capsys, "report", model, civs, "--classes=cat,dgo", "--budget=0.5",
        f"--data={folder / 'data.npz'}")
    assert "Pass exactly one of --budget, --threshold or --max_drop" in (
        _error(capsys, "subtask", model, civs, "--classes=cat,dog",
               "--out=o"))
    assert "--rescale must be a number or a fraction such as 1/255" in (
        _error(capsys, "dissect", model, "--data=x.npz", "--out=a.npz",
               "--rescale=1/x"))
    assert "is not a folder or an .npz file; for a tfds split, pass " in (
        _error(capsys, "dissect", model, "--out=a.npz"))


def test_dissect_for_one_subtask(files, capsys, tmp_path):
    folder, model, x, y = files
    out = tmp_path / "cat_dog.npz"
    cli.run(["keras-drnet", "dissect", f"--model={folder / 'm.keras'}",
             f"--data={folder / 'data.npz'}", "--samples_per_class=3",
             "--method=taylor", "--classes=cat,dog", f"--out={out}"])
    civs = kd.CIVs.load(out)
    want = kd.dissect(model, (x, y), samples_per_class=3, method="taylor",
                      classes=["cat", "dog"], class_names=sm.NAMES,
                      verbose=0)
    np.testing.assert_allclose(civs.vectors, want.vectors, rtol=1e-6)
    assert civs.config["classes"] == want.config["classes"]
    assert "needs `method='taylor'` or `'frat'`" in _error(
        capsys, "dissect", f"--model={folder / 'm.keras'}",
        f"--data={folder / 'data.npz'}", "--classes=cat,dog",
        f"--out={tmp_path / 'b.npz'}")


def test_verbosity_shows_the_traceback(files):
    folder, _, _, _ = files
    with pytest.raises(cli.UsageError, match="no such file"):
        cli.run(["keras-drnet", "dissect", "--model=nope.keras",
                 "--out=a.npz", "--verbosity=1"])


def test_ctrl_c_in_dissect_says_how_to_resume(files, capsys, monkeypatch,
                                             tmp_path):
    folder, _, _, _ = files

    def interrupted(*args, checkpoint_dir=None, **kwargs):
        os.makedirs(checkpoint_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(kd, "dissect", interrupted)
    out = tmp_path / "civs.npz"
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["keras-drnet", "dissect", f"--model={folder / 'm.keras'}",
                 f"--data={folder / 'data.npz'}", f"--out={out}"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert f"Progress is in {out}.ckpt: run the same command again to " \
           "resume." in err
    assert not out.exists()


def test_subtask_with_a_parameter_budget_and_repair(files, capsys, tmp_path):
    folder, model, x, y = files
    civs = kd.CIVs.load(folder / "own_civs.npz")
    out = tmp_path / "repaired"
    data = f"--data={folder / 'data.npz'}"
    assert cli.run(["keras-drnet", "subtask", f"--model={folder / 'm.keras'}",
                    f"--civs={folder / 'own_civs.npz'}", "--classes=cat,dog",
                    "--budget=0.5", "--budget_scope=params", "--repair", data,
                    f"--validation={folder / 'data.npz'}",
                    f"--out={out}"]) == 0
    assert "repaired compact model:" in capsys.readouterr().out
    fractions = kd.allocate_budget(model, civs, ["cat", "dog"],
                                   max_params=0.5)
    sub = kd.subtask(model, civs, ["cat", "dog"], budget=fractions)
    want = kd.repair(sub, (x, y))
    small = keras.models.load_model(out / "model.keras")
    np.testing.assert_allclose(np.asarray(small(x)), np.asarray(want(x)),
                               rtol=1e-5, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["repaired_accuracy"] <= 1
    assert report["running_params"] <= 0.5 * report["params"]

    # `report --subtask` reports what `subtask` built (here repaired), with
    # the model it was built from, which it finds by itself.
    capsys.readouterr()
    assert cli.run(["keras-drnet", "report", f"--subtask={out}",
                    data]) == 0
    printed = capsys.readouterr().out
    accuracy = report["repaired_accuracy"]
    assert f"sub-task model accuracy: {accuracy:.2%}" in printed, printed
    assert f"full-net accuracy:       {report['full_net_accuracy']:.2%}" \
        in printed, printed
    assert f"{small.count_params():,} of {model.count_params():,}" in printed
    # Settings that would contradict the folder's, and a folder without a
    # report, are refused; --calibrate points at --subtask.
    assert "drop --budget" in _error(capsys, "report", f"--subtask={out}",
                                     "--budget=0.3", data)
    assert "no readable report.json" in _error(
        capsys, "report", f"--subtask={tmp_path}", data)
    assert "--subtask=DIR" in _error(
        capsys, "report", f"--model={folder / 'm.keras'}", "--calibrate")


def test_finetune_distills_by_default_and_nodistill_uses_labels(
        files, capsys, tmp_path, monkeypatch):
    folder, _, _, _ = files
    finetune = kd.finetune

    def spy(calls):
        @functools.wraps(finetune)  # its signature checks the search's keys
        def recorded(*args, **kwargs):
            calls.append(kwargs)
            return finetune(*args, **kwargs)
        return recorded

    calls, searched = [], []
    monkeypatch.setattr(kd, "finetune", spy(calls))
    args = ["subtask", f"--model={folder / 'm.keras'}",
            f"--civs={folder / 'own_civs.npz'}", "--classes=cat,dog",
            "--budget=0.5", f"--data={folder / 'data.npz'}"]
    for flags, distill in (([], True), (["--nodistill"], False)):
        out = tmp_path / f"tuned_{distill}"
        assert cli.run(["keras-drnet", *args, "--finetune_epochs=1",
                        *flags, f"--out={out}"]) == 0
        assert calls[-1]["distill"] is distill and calls[-1]["epochs"] == 1
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["distill"] is distill
        assert kd.read_class_names(out / "model.keras") == ["cat", "dog"]
    # The search fine-tunes every candidate with the same loss.
    monkeypatch.setattr(budget_search, "finetune_subtask", spy(searched))
    out = tmp_path / "searched"
    search = [a for a in args if not a.startswith("--budget")]
    assert cli.run(["keras-drnet", *search, "--max_drop=100",
                    f"--validation={folder / 'data.npz'}",
                    "--finetune_epochs=1", "--nodistill",
                    f"--out={out}"]) == 0
    assert searched and all(k["distill"] is False for k in searched)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["distill"] is False
    assert "pass --finetune_epochs too" in _error(
        capsys, *args, "--nodistill", f"--out={tmp_path / 'o'}")
    assert not (tmp_path / "o").exists()


def test_max_drop_takes_the_python_apis_budget_scope(files, capsys,
                                                     tmp_path):
    folder, model, x, y = files
    out = tmp_path / "searched"
    data = f"--validation={folder / 'data.npz'}"
    assert cli.run(["keras-drnet", "subtask", f"--model={folder / 'm.keras'}",
                    f"--civs={folder / 'own_civs.npz'}", "--classes=cat,dog",
                    "--max_drop=100", data, f"--out={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    # The search's own default (parameter budgets), as `smallest_subtask`.
    assert report["settings"]["budget_scope"] == "params"
    civs = kd.CIVs.load(folder / "own_civs.npz")
    _, table = kd.smallest_subtask(model, civs, ["cat", "dog"],
                                   max_drop=100, validation_data=(x, y),
                                   verbose=0)
    assert [row["budget"] for row in report["search"]] == [
        row["budget"] for row in table]


def test_detect_fits_scores_and_reuses_a_saved_detector(files, capsys,
                                                        tmp_path):
    folder, model, x, y = files
    common = [f"--model={folder / 'm.keras'}",
              f"--civs={folder / 'own_civs.npz'}",
              f"--data={folder / 'data.npz'}"]
    out, saved = tmp_path / "scores.csv", tmp_path / "detector.npz"
    assert cli.run(["keras-drnet", "detect", *common,
                    f"--fit_data={folder / 'data.npz'}",
                    f"--detector={saved}", f"--out={out}"]) == 0
    assert "Wrote" in capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "index,predicted,score,flagged" and len(rows) == 41
    civs = kd.CIVs.load(folder / "own_civs.npz")
    want = kd.PathDetector(model, civs).fit(x)
    scores = [float(r.split(",")[2]) for r in rows[1:]]
    np.testing.assert_allclose(scores, want.score(x), atol=1e-3)
    predicted = [r.split(",")[1] for r in rows[1:]]
    assert predicted == [sm.NAMES[i] for i in model.predict(
        x, verbose=0).argmax(-1)]
    # The saved detector alone gives the same file.
    again = tmp_path / "again.csv"
    assert cli.run(["keras-drnet", "detect", *common, f"--detector={saved}",
                    f"--out={again}"]) == 0
    assert again.read_text() == out.read_text()
    assert "needs --fit_data" in _error(capsys, "detect", *common,
                                        f"--out={tmp_path / 'x.csv'}")
    assert "no such file" in _error(capsys, "detect", *common,
                                    f"--detector={tmp_path / 'nope.npz'}",
                                    f"--out={tmp_path / 'x.csv'}")
    assert "fitted already" in _error(capsys, "detect", *common,
                                      f"--detector={saved}", "--method=taylor",
                                      f"--out={tmp_path / 'x.csv'}")
    assert "takes one CIVs file" in _error(
        capsys, "report", f"--civs={folder / 'own_civs.npz'},x.npz",
        "--model=" + str(folder / "m.keras"), "--classes=cat")
    assert ".csv file" in _error(capsys, "detect", *common,
                                 f"--fit_data={folder / 'data.npz'}",
                                 f"--out={tmp_path / 'x.txt'}")


# ---------------------------------------------------------------------------
# Nothing silently wrong (issue 25).
# ---------------------------------------------------------------------------

FRUIT = ["zebra", "apple", "mango"]  # the model's order, not alphabetical


@pytest.fixture(scope="module")
def fruit(tmp_path_factory):
    """A 3-class RGB model and a folder of PNGs, one subfolder per class."""
    folder = tmp_path_factory.mktemp("fruit")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, name="head"),
    ])
    model.save(folder / "m.keras")
    rng = np.random.default_rng(0)
    # Whole numbers: a PNG stores them exactly.
    x = rng.integers(0, 256, (18, 8, 8, 3)).astype("float32")
    y = np.arange(18) % 3
    for name in FRUIT:
        (folder / "images" / name).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(x, y)):
        keras.utils.save_img(folder / "images" / FRUIT[label] / f"{i}.png",
                             image, scale=False)
    return folder, model, x, y


def test_folder_classes_are_matched_to_the_models_by_name(fruit, capsys):
    folder, model, x, y = fruit
    args = ["keras-drnet", "dissect", f"--model={folder / 'm.keras'}",
            f"--data={folder / 'images'}", "--method=activation",
            "--samples_per_class=6"]
    err = _error(capsys, *args[1:], f"--out={folder / 'a.npz'}")
    assert "pass --class_names in the model's order" in err
    assert cli.run(args + [f"--class_names={','.join(FRUIT)}",
                           f"--out={folder / 'civs.npz'}"]) == 0
    civs = kd.CIVs.load(folder / "civs.npz")
    want = kd.dissect(model, (x, y), samples_per_class=6, method="activation",
                      class_names=FRUIT, verbose=0)
    assert civs.class_names == FRUIT
    np.testing.assert_allclose(civs.vectors, want.vectors, rtol=1e-5)
    # A folder read against the CIVs: labels are the model's classes.
    capsys.readouterr()
    assert cli.run(["keras-drnet", "report", f"--model={folder / 'm.keras'}",
                    f"--civs={folder / 'civs.npz'}", "--classes=zebra,mango",
                    "--budget=1.0", f"--data={folder / 'images'}"]) == 0
    sub = kd.subtask(model, civs, ["zebra", "mango"], budget=1.0)
    assert str(kd.evaluate_subtask(sub, (x, y))) in capsys.readouterr().out


def test_a_folder_class_the_model_lacks_and_a_corrupt_image(fruit, capsys,
                                                            tmp_path):
    folder, _, _, _ = fruit
    bad = tmp_path / "images"
    bad.mkdir()
    for name in ("zebra", "pear"):
        (bad / name).mkdir()
        (bad / name / "0.png").write_bytes(
            (folder / "images" / "zebra" / "0.png").read_bytes())
    args = ["dissect", f"--model={folder / 'm.keras'}", f"--data={bad}",
            f"--class_names={','.join(FRUIT)}", f"--out={tmp_path / 'c.npz'}"]
    assert "has classes ['pear'] that the model does not know" in _error(
        capsys, *args)
    (bad / "pear" / "0.png").unlink()
    (bad / "pear").rmdir()
    (bad / "zebra" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert "1.png is not a readable image" in _error(capsys, *args)


def test_stray_words_and_bad_paths_are_refused_before_any_work(
        files, capsys, tmp_path):
    folder, _, _, _ = files
    model, civs = f"--model={folder / 'm.keras'}", (
        f"--civs={folder / 'own_civs.npz'}")
    sub = ["subtask", model, civs, "--classes=cat,dog", "--budget=0.5"]
    out = tmp_path / "o"
    assert "Unexpected arguments: false" in _error(
        capsys, *sub, "--tflite", "false", f"--out={out}")
    assert not out.exists()
    assert "Unexpected arguments: extra" in _error(
        capsys, "similarity", civs, f"--out={tmp_path / 's.png'}", "extra")
    existing = tmp_path / "file"
    existing.write_text("x")
    assert f"--out={existing} is a file" in _error(
        capsys, *sub, f"--out={existing}")
    data = f"--data={folder / 'data.npz'}"
    for bad_out in (tmp_path / "civs.txt", tmp_path):
        assert "the CIVs are written to an .npz file" in _error(
            capsys, "dissect", model, data, f"--out={bad_out}")
    assert "is a file; the checkpoint is a folder" in _error(
        capsys, "dissect", model, data, f"--out={tmp_path / 'c.npz'}",
        f"--checkpoint_dir={existing}")
    assert "such as 1/255, finite and not zero. Received: --rescale=nan" in _error(
        capsys, "report", model, civs, "--classes=cat,dog", "--budget=0.5",
        data, "--rescale=nan")
    # No image of a class in --validation: refused before the fine-tune.
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cats.npz", images=sm.images(rng, 4),
             labels=np.zeros(4, int), class_names=np.array(sm.NAMES))
    assert "--validation has no image of dog" in _error(
        capsys, *sub, data, "--finetune_epochs=1",
        f"--validation={tmp_path / 'cats.npz'}", f"--out={out}")
    assert not out.exists()


def test_a_truncated_model_file_is_named_as_such(files, capsys, tmp_path):
    folder, _, _, _ = files
    truncated = tmp_path / "m.keras"
    truncated.write_bytes((folder / "m.keras").read_bytes()[:500])
    err = _error(capsys, "dissect", f"--model={truncated}",
                 f"--data={folder / 'data.npz'}",
                 f"--out={tmp_path / 'c.npz'}")
    assert "cannot be read as a Keras model (a truncated or corrupt" in err


def test_an_unknown_dataset_is_one_short_line(files, capsys, tmp_path):
    folder, _, _, _ = files
    err = _error(capsys, "dissect", f"--model={folder / 'm.keras'}",
                 "--dataset=no_such_dataset", f"--out={tmp_path / 'c.npz'}")
    assert "--dataset=no_such_dataset --split=train:" in err
    assert len(err) < 400


@pytest.mark.parametrize("args", [
    ["--help"], ["--version"], ["subtask", "--help"],
    ["subtask", "--model=m.keras", "--civs=civs.npz", "--classes=cat,dgo",
     "--budget=0.5", "--out=o"],
])
def test_help_version_and_a_bad_class_answer_without_tensorflow(
        files, tmp_path, args):
    folder, _, _, _ = files
    (tmp_path / "m.keras").write_bytes(b"")  # never read: the class is bad
    kd.CIVs.load(folder / "own_civs.npz").save(tmp_path / "civs.npz")
    code = ("import sys; from keras_drnet import cli; "
            f"code = cli.run(['keras-drnet', *{args!r}]); "
            "print('tensorflow' in sys.modules, code)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.stdout.split()[-2:] == ["False",
                                        "2" if "dgo" in str(args) else "0"]
    if "dgo" in str(args):
        assert done.stderr.strip() == (
            "keras-drnet subtask: Unknown class name 'dgo'. Known classes: "
            "['cat', 'dog', 'bird', 'frog', 'ship']. Did you mean 'dog'?")
    if args == ["--version"]:
        assert done.stdout.startswith(f"keras-drnet {kd.__version__}")
