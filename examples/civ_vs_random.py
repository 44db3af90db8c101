"""Control: CIV-ranked vs random channels, with and without BN recalibration.

On the VGG16-BN width 0.5 of `paper_cifar.py` (its cache) with keep_best
CIVs, three sub-tasks at per-gate budgets, 300 test images per class:
does the CIV ranking beat a random one, and what does BatchNorm
recalibration (128 training images per class) change? The output is kept
in `examples/results/vgg16_w0.5_civ_vs_random.txt`.

    python examples/civ_vs_random.py
"""

import numpy as np
import tensorflow as tf

import cifar_models
import keras_drnet as kd


def main(argv):
    del argv  # no flags
    model, _, _ = cifar_models.trained("vgg16", 0.5, 30)
    civs = cifar_models.dissected(model, "vgg16_w0.5_e30_s0", 100,
                                  on_top1_change="keep_best")
    rng = np.random.default_rng(0)
    random = kd.CIVs(rng.uniform(size=civs.vectors.shape), civs.class_names,
                     civs.counts, civs.layout, civs.fingerprint, civs.config)
    scale = cifar_models.pixel_scale(model)  # what its entry expects
    train, _ = cifar_models.cifar10("train", scale)
    test_ds, _ = cifar_models.cifar10("test", scale)
    test = cifar_models.per_class(test_ds, 300)
    calibration = cifar_models.per_class(train.skip(10_000), 128)
    base = tf.function(lambda x: model(x, training=False))
    for pair in [(0, 9), (1, 4), (3, 5)]:
        full = cifar_models.pair_accuracy(base, test, pair)
        images = np.concatenate([calibration[c] for c in pair])
        for label, ranking in (("civ", civs), ("random", random)):
            for budget in (0.33, 0.5, 0.75):
                for calibrate in (None, images):
                    sub = kd.subtask(model, ranking, list(pair), budget=budget,
                                     budget_scope="gate", calibrate=calibrate)
                    logits = tf.function(
                        lambda x, s=sub: s.logits_model(x, training=False))
                    accuracy = cifar_models.pair_accuracy(logits, test, pair)
                    print(f"{pair} {label:6s} budget {budget:.2f} "
                          f"{'BN' if calibrate is not None else '  '} full "
                          f"{full:.3f} sub {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    cifar_models.run_app(main)
