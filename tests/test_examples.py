"""The examples run end to end (in their quick modes)."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

import _subtask_models as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_quick_mode_writes_the_plot_and_the_savedmodel(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run(
        [
            sys.executable,
            "examples/quickstart.py",
            "--quick",
            f"--output_dir={out}",
            # Never touch the user's model cache (quick mode should not).
            f"--model_path={tmp_path / 'unused.keras'}",
        ],
        cwd=ROOT,
        env=sm.env_with_tfds(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    png = out / "running_channels.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = out / "saved_model"
    assert (saved / "saved_model.pb").is_file()
    assert not (tmp_path / "unused.keras").exists()
    # The report and the SavedModel check were printed.
    assert "sub-task cat-dog" in result.stdout
    assert "max |served - keras|" in result.stdout
    served = tf.saved_model.load(str(saved))
    names = [n.decode() for n in served.class_names().numpy()]
    assert [names[i] for i in sorted(served.live_classes().numpy())] == [
        "cat",
        "dog",
    ]
