"""README.md's "Use it" snippet runs as written.

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
