"""Subprocess script for test_civ.py: dissection under MirroredStrategy.

Usage: python _dissect_mirrored.py --model M.keras --data D.npz --out O.npz

Splits the CPU into two logical devices before TensorFlow initialises its
devices (hence a separate process), then runs the same dissection and CDRPs
on one device and on a `MirroredStrategy` over both (CDRP and the one-pass
methods), and saves all results.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_drnet as kd  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model = keras.saving.load_model(args.model)
    with np.load(args.data) as data:
        x, y = data["x"], data["y"]
    settings = dict(samples_per_class=3, batch_size=5, verbose=0)

    single = kd.dissect(model, (x, y), **settings)
    cdrp_single = kd.cdrp(model, x[:13], batch_size=5)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored = kd.dissect(model, (x, y), strategy=strategy, **settings)
    cdrp_mirrored = kd.cdrp(model, x[:13], batch_size=5, strategy=strategy)
    with strategy.scope():
        cdrp_in_scope = kd.cdrp(model, x[:13], batch_size=5)
    # The one-pass methods, labels sharded with the images.
    methods = {}
    for method in ("activation", "frat", "taylor"):
        for name, kwargs in (("single", {}), ("mirrored", {"strategy": strategy})):
            methods[f"{method}_{name}"] = kd.dissect(
                model, (x, y), method=method, **settings, **kwargs).vectors

    np.savez(
        args.out,
        logical_devices=len(tf.config.list_logical_devices("CPU")),
        replicas=strategy.num_replicas_in_sync,
        single_vectors=single.vectors,
        single_counts=single.counts,
        mirrored_vectors=mirrored.vectors,
        mirrored_counts=mirrored.counts,
        cdrp_single=cdrp_single,
        cdrp_mirrored=cdrp_mirrored,
        cdrp_in_scope=cdrp_in_scope,
        **methods,
    )


if __name__ == "__main__":
    main()
