"""Subprocess worker for test_civ.py: one `kd.dissect` run with a checkpoint.

Usage: python _dissect_worker.py --model M.keras --data D.npz
           --checkpoint-dir DIR --result R.npz [--delay S] ...

The images come from a generator that can sleep before each element, so a
run lasts long enough to be killed mid-way. The worker counts the images it
actually fits (wrapping `BatchRunner.__call__`, instrumentation only) and
writes `R.npz` (the CIVs) and `R.npz.json` (the count) only at the very end.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_drnet as kd  # noqa: E402
from keras_drnet import batching  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--result", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()

    fitted = [0]
    original_call = batching.BatchRunner.__call__

    def counting_call(self, images, labels=None):
        fitted[0] += len(images)
        return original_call(self, images, labels)

    batching.BatchRunner.__call__ = counting_call

    model = keras.saving.load_model(args.model)
    with np.load(args.data) as data:
        x, y = data["x"], data["y"]

    def elements():
        for image, label in zip(x, y):
            if args.delay:
                time.sleep(args.delay)
            yield image, label

    ds = tf.data.Dataset.from_generator(
        elements,
        output_signature=(
            tf.TensorSpec(x.shape[1:], tf.float32),
            tf.TensorSpec((), tf.int64),
        ),
    )
    civs = kd.dissect(
        model,
        ds,
        samples_per_class=args.samples_per_class,
        batch_size=args.batch_size,
        iterations=args.iterations,
        checkpoint_dir=args.checkpoint_dir,
        verbose=0,
    )
    with open(args.result + ".json", "w") as f:
        json.dump({"fitted": fitted[0]}, f)
    civs.save(args.result)


if __name__ == "__main__":
    main()
