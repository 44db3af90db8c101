"""Per-request sub-task selection vs a fixed sub-task (issue 16).

`kd.export_dynamic` computes the CCIV from the CIVs inside every request
(a max over the chosen classes' CIVs, a top-k, per-sample gates). This
measures what that costs against `SubtaskModel.export` of the same sub-task
(masks fixed in variables), both as reloaded SavedModels, interleaved in one
run: batch-1 latency (median) and batch-256 throughput; ratios are times
relative to the fixed sub-task. Weights and CIVs are random (latency does
not depend on them).

    python -m benchmarks.serving_overhead --width=0.5
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402

from examples import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402
# Its flags too: --keep, --width, --repeats, --rounds.
from benchmarks.subtask_latency import _KEEP  # noqa: E402
from benchmarks.subtask_latency import _REPEATS  # noqa: E402
from benchmarks.subtask_latency import _ROUNDS  # noqa: E402
from benchmarks.subtask_latency import _WIDTH  # noqa: E402
from benchmarks.subtask_latency import measure  # noqa: E402
from benchmarks.subtask_latency import random_subtask  # noqa: E402


def main(_):
    rng = np.random.default_rng(0)
    x1 = tf.constant(rng.normal(size=(1, 32, 32, 3)).astype("float32"))
    x256 = tf.constant(rng.normal(size=(256, 32, 32, 3)).astype("float32"))
    print(f"keep={_KEEP.value:.0%} of channels (budget, whole model), width "
          f"{_WIDTH.value}, CPU {os.cpu_count()} cores")
    folder = tempfile.mkdtemp()
    for build in (cifar_models.vgg16_cifar, cifar_models.resnet18_cifar):
        base = build(_WIDTH.value)
        sub = random_subtask(base, _KEEP.value, rng)
        fixed_path = os.path.join(folder, f"{base.name}_fixed")
        dynamic_path = os.path.join(folder, f"{base.name}_dynamic")
        sub.export(fixed_path, verbose=False)
        kd.export_dynamic(base, sub.civs, dynamic_path, budget=_KEEP.value)
        fixed = tf.saved_model.load(fixed_path)
        dynamic = tf.saved_model.load(dynamic_path)
        hot = tf.constant(np.isin(np.arange(10), [0, 9]))
        difference = np.abs(
            dynamic.serve(x256, hot).numpy() - fixed.serve(x256).numpy()
        ).max()
        fns = {
            "fixed": lambda x: fixed.serve(x),
            "per-request": lambda x: dynamic.serve(x, hot),
        }
        times = measure(fns, x1, x256, _REPEATS.value, _ROUNDS.value)
        f1, f256 = times["fixed"]
        print(f"\n{base.name}: {base.count_params():,} params; max |per-"
              f"request - fixed| = {difference:.1e}")
        print(f"  {'served':12} {'batch-1 ms':>10} {'ratio':>6} "
              f"{'img/s @256':>10} {'ratio':>6}")
        for name, (t1, t256) in times.items():
            print(f"  {name:12} {t1 * 1e3:>10.2f} {t1 / f1:>6.2f} "
                  f"{256 / t256:>10.1f} {t256 / f256:>6.2f}")


if __name__ == "__main__":
    app.run(main)
