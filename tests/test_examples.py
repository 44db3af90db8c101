"""The examples run end to end (in their quick modes), and the quickstart
meets a newcomer well: bad flags and a missing dataset end in one line."""

import importlib.util
import os
import socket
import subprocess
import sys

import keras
import pytest
import tensorflow as tf

import keras_drnet as kd

import _subtask_models as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_example(script, *flags):
    result = subprocess.run(
        [sys.executable, f"examples/{script}", "--quick", *flags],
        cwd=ROOT,
        env=sm.env_with_tfds(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quickstart_quick_mode_writes_the_plot_and_the_savedmodel(tmp_path):
    out = tmp_path / "quickstart"
    stdout = _run_example(
        "quickstart.py",
        f"--output_dir={out}",
        # Never touch the user's model cache (quick mode should not).
        f"--model_path={tmp_path / 'unused.keras'}",
        "--max_drop=50",  # a bound that ~50 validation images can resolve
    )
    png = out / "running_channels.png"
    assert _is_png(png)
    assert _is_png(out / "similarity.png")
    assert kd.CIVs.load(out / "civs.npz").class_names[3:6] == [
        "cat", "deer", "dog"]
    saved = out / "saved_model"
    assert (saved / "saved_model.pb").is_file()
    assert not (tmp_path / "unused.keras").exists()
    # The report and the SavedModel check were printed.
    assert "sub-task cat-dog" in stdout
    assert "max |served - keras|" in stdout
    served = tf.saved_model.load(str(saved))
    names = [n.decode() for n in served.class_names().numpy()]
    assert [names[i] for i in sorted(served.live_classes().numpy())] == [
        "cat",
        "dog",
    ]
    # The smallest sub-task within 50 pp, fine-tuned, saved and loadable.
    assert "Smallest: per-gate budget" in stdout
    small = keras.models.load_model(out / "smallest.keras")
    assert small.output.shape[-1] == 2
    assert kd.read_class_names(out / "smallest.keras") == ["cat", "dog"]


@pytest.mark.slow
def test_paper_mnist_quick_mode_draws_the_similarity_heat_maps(tmp_path):
    out = _run_example("paper_mnist.py", f"--output_dir={tmp_path}")
    assert "'1' stands apart" in out
    for policy in ("reset", "keep_best"):
        assert _is_png(tmp_path / f"mnist_similarity_{policy}.png")
    text = (tmp_path / "mnist_similarity.md").read_text()
    assert "Paper's close pairs" in text and "2~5" in text


@pytest.mark.slow
def test_paper_cifar_quick_mode_writes_tables_and_plots(tmp_path):
    _run_example("paper_cifar.py", f"--output_dir={tmp_path}")
    tag = "vgg16_w0.5_quick"
    text = (tmp_path / f"{tag}.md").read_text()
    for heading in ("The paper's sub-tasks", "two-class sub-tasks",
                    "Threshold sweep"):
        assert heading in text
    assert "| airplane-truck |" in text and "| dog-horse-truck |" in text
    assert _is_png(tmp_path / f"{tag}_plane_truck_layers.png")
    assert _is_png(tmp_path / f"{tag}_tradeoff.png")
    rows = (tmp_path / f"{tag}_pairs.csv").read_text().splitlines()
    assert rows[0].startswith("classes,full_net_acc,sub_net_acc")
    assert len(rows) == 3  # header + the 2 pairs of quick mode


def _quickstart_in_a_fresh_process(*flags):
    """Runs the quickstart's `main` with `flags` in a new interpreter.

    Returns its exit code, its stderr, and whether TensorFlow was imported
    by then (a bad flag must be reported before that slow import).
    """
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['quickstart.py', *{list(flags)!r}]\n"
        "try:\n"
        "    runpy.run_path('examples/quickstart.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('TF loaded:', 'tensorflow' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=sm.env_with_tfds(),
        capture_output=True, text=True, timeout=120,
    )
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--classes=cat,cow", "unknown class 'cow'"),
        ("--classes=cat,cat", "two or more distinct class names"),
        ("--budget=1.5", "--budget must be in (0, 1]"),
        ("--threshold=-1", "--threshold must be a number >= 0"),
        ("--samples_per_class=0", "--samples_per_class must be at least 1"),
        ("--max_drop=-0.5", "--max_drop must be a number of pp >= 0"),
        ("--finetune_epochs=-1", "--finetune_epochs must be 0 or more"),
    ],
)
def test_quickstart_refuses_a_bad_flag_in_one_line_before_any_work(
    flag, message
):
    code, stdout, stderr = _quickstart_in_a_fresh_process(flag)
    assert code != 0
    assert stderr.strip().count("\n") == 0, stderr  # one line, no traceback
    assert message in stderr and flag in stderr
    assert "TF loaded: False" in stdout


def test_quickstart_help_answers_without_loading_tensorflow():
    code, stdout, _ = _quickstart_in_a_fresh_process("--help")
    assert code == 0  # help asked for is a success (absl alone exits 1)
    assert "--classes" in stdout and "--budget_scope" in stdout
    assert "TF loaded: False" in stdout


def test_quickstart_without_data_or_network_ends_in_one_clear_message(
    tmp_path, monkeypatch
):
    """tfds's real download path runs (it needs `importlib_resources`, a
    dependency of ours for that reason) and fails for want of a network."""
    from tensorflow_datasets.core.download import downloader

    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(ROOT, "examples", "quickstart.py")
    )
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # fail at once
    with pytest.raises(SystemExit) as exit_info:
        quickstart.load_cifar10(data_dir=str(tmp_path))
    message = exit_info.value.code
    assert "Could not download CIFAR-10" in message
    assert "TFDS_DATA_DIR" in message and "\n" not in message


@pytest.mark.parametrize("script", ["repair_study.py", "detect_study.py"])
def test_study_help_exits_zero_and_lists_its_flags(script):
    # (Every study ends in `cifar_models.run_app`; two stand for them.)
    result = subprocess.run(
        [sys.executable, f"examples/{script}", "--help"], cwd=ROOT,
        env=sm.env_with_tfds(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_path" in result.stdout
