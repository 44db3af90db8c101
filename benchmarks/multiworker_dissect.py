"""Dissection throughput with 1 process vs 2 `MultiWorkerMirroredStrategy`
workers on this machine (issue 18).

Both runs dissect the same images (CDRP, T=30, batch 64) of the CIFAR
VGG16-BN at width 0.25 with random weights (throughput does not depend on
them); the workers are subprocesses of this script on localhost ports,
started together, and the chief reports its wall time. All figures come
from one run.

    python -m benchmarks.multiworker_dissect
"""

import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SAMPLES_PER_CLASS = 20


def _dissect(strategy=None):
    import keras
    import numpy as np

    from examples import cifar_models
    import keras_drnet as kd

    keras.utils.set_random_seed(0)
    model = cifar_models.vgg16_cifar(0.25)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (10 * SAMPLES_PER_CLASS, 32, 32, 3)).astype("float32")
    y = np.arange(len(x)) % 10
    start = time.perf_counter()
    civs = kd.dissect(model, (x, y), samples_per_class=SAMPLES_PER_CLASS,
                      strategy=strategy, verbose=0)
    return len(x) / (time.perf_counter() - start), civs.vectors


def _worker(ports, index):
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    import tensorflow as tf

    rate, _ = _dissect(tf.distribute.MultiWorkerMirroredStrategy())
    if index == 0:
        print(json.dumps({"rate": rate}))


def main():
    if len(sys.argv) == 3:  # a worker
        return _worker(json.loads(sys.argv[1]), int(sys.argv[2]))
    rate_one, _ = _dissect()
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    workers = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.multiworker_dissect",
                          json.dumps(ports), str(i)],
                         stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [w.communicate()[0] for w in workers]
    rate_two = json.loads(outputs[0].strip().splitlines()[-1])["rate"]
    print(f"{10 * SAMPLES_PER_CLASS} images, CDRP T=30, VGG16-BN w0.25, "
          f"{os.cpu_count()} CPU cores")
    print(f"  1 process:   {rate_one:6.1f} images/s")
    print(f"  2 workers:   {rate_two:6.1f} images/s  "
          f"({rate_two / rate_one:.2f}x)")


if __name__ == "__main__":
    main()
