"""Subprocess script for test_civ.py: one worker of a two-worker
`MultiWorkerMirroredStrategy` dissection on localhost.

Usage: python _dissect_multiworker.py --model M.keras --data D.npz
           --ports P0,P1 --index I --out O.npz [--checkpoint-dir DIR]
           [--delay S]

`TF_CONFIG` is set from the ports and index before TensorFlow starts; the
worker saves the CIVs it returns (every worker returns them).
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds before each element: a slow reader")
    args = parser.parse_args()
    workers = [f"localhost:{p}" for p in args.ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": workers},
        "task": {"type": "worker", "index": args.index},
    })

    import time

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_drnet as kd

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    model = keras.saving.load_model(args.model)
    with np.load(args.data) as data:
        x, y = data["x"], data["y"]
    def elements():
        for image, label in zip(x, y):
            time.sleep(args.delay)
            yield image, label

    ds = tf.data.Dataset.from_generator(elements, output_signature=(
        tf.TensorSpec(x.shape[1:], tf.float32), tf.TensorSpec((), tf.int64)))
    civs = kd.dissect(model, ds, samples_per_class=5, batch_size=8,
                      strategy=strategy, checkpoint_dir=args.checkpoint_dir,
                      verbose=0)
    cdrps = kd.cdrp(model, x[:13], batch_size=8, strategy=strategy)
    try:
        with strategy.scope():
            sub = kd.subtask(model, civs, [0, 1], budget=0.5)
            kd.finetune(sub, (x, y), epochs=1, verbose=0)
        refusal = ""
    except ValueError as error:
        refusal = str(error)
    np.savez(args.out, vectors=civs.vectors, counts=civs.counts, cdrps=cdrps,
             replicas=strategy.num_replicas_in_sync, refusal=refusal)


if __name__ == "__main__":
    main()
