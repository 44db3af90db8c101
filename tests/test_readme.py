"""README.md's "Use it" and "Deploy" snippets run as written (the
recommended path's run in test_repair.py).

On a small CIFAR-10 CNN saved as the snippet's `my_cifar10_cnn.keras`,
with `tfds.load` reading only a few hundred images of each split, so that
the whole tour (dissect, sub-task, report, compact, LiteRT, fine-tune,
served SavedModel, set_classes) takes a minute here.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from _readme import readme_blocks


@pytest.mark.slow
def test_use_it_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ]).save("my_cifar10_cnn.keras")
    load = tfds.load
    sizes = {"train": 400, "test": 200}
    monkeypatch.setattr(tfds, "load", lambda name, split, **kwargs: load(
        name, split=f"{split}[:{sizes[split]}]", **kwargs))
    (use_it,) = readme_blocks("## Use it", 1)
    scope = {}
    exec(use_it, scope)
    sub, served = scope["sub"], scope["served"]
    assert sub.live_class_names == ["airplane", "truck"]
    assert scope["small"].class_names == ["cat", "dog"]
    probabilities = served.serve_named(scope["images"],
                                       tf.constant("cat-dog")).numpy()
    assert np.count_nonzero(probabilities.sum(axis=0)) <= 2
    assert (tmp_path / "cat_dog.tflite").exists()
    assert (tmp_path / "plane_truck_savedmodel").is_dir()


_DEPLOY_SCRIPT = """
import sys
import keras, numpy as np, tensorflow as tf
import keras_drnet as kd
sys.path.insert(0, {tests!r})
from _readme import readme_blocks

model = keras.models.load_model("m.keras")
with np.load("data.npz") as data:
    x, y = data["x"], data["y"]
train = tf.data.Dataset.from_tensor_slices((x, y))
(block,) = readme_blocks("## Deploy", 1)
scope = {{"tf": tf, "kd": kd, "model": model, "train": train}}
exec(block, scope)
scope["civs"].save("civs.npz")
"""


@pytest.mark.slow
def test_the_multi_worker_snippet_runs_as_written(tmp_path):
    # A strategy must be made before TensorFlow runs anything, hence a
    # fresh process; without TF_CONFIG it is one worker, whose CIVs must
    # be one process's.
    import os
    import subprocess
    import sys

    import keras_drnet as kd

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(30, 8, 8, 3)).astype("float32")
    y = np.arange(30) % 3
    np.savez(tmp_path / "data.npz", x=x, y=y)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-c", _DEPLOY_SCRIPT.format(tests=tests)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    civs = kd.CIVs.load(tmp_path / "civs.npz")
    with pytest.warns(UserWarning, match="Fewer than samples_per_class"):
        want = kd.dissect(model, (x, y), verbose=0)  # as the snippet: 100
    np.testing.assert_allclose(civs.vectors, want.vectors, rtol=1e-4,
                               atol=1e-7)
