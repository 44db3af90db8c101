"""Routing paths as a detector of adversarial and out-of-distribution images
(issue 27).

For a trained CIFAR-10 model (`--model_path`; its input scale is read off
its entry), fits `kd.PathDetector` for each path method on clean CIFAR-10
test images (the first `--fit_images`), then scores held-out clean test
images against

- FGSM and PGD (10 steps of eps/4, random start) at eps = 2/255 and 8/255,
  untargeted, on the held-out images the model classifies correctly; only
  the successful adversarial images count;
- MNIST test digits, resized to 32x32 and copied to three channels.

It reports AUROC (clean vs each) and the detection rate at 5% false
positives (the held-out clean images' 95th percentile), for each path
method and for the baselines: the maximum softmax probability and the
energy score (-log-sum-exp of the logits); and seconds per 1,000 images of
each score against a plain forward pass. Attacks and scores are cached in
`--output_dir`, so a rerun resumes.

    python examples/detect_study.py \\
        --model_path=../shared/models/vgg16_w0.5_cifar10.keras
    python examples/detect_study.py --quick   # seconds, for the tests
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import cifar_models  # noqa: E402
import keras_drnet as kd  # noqa: E402
from keras_drnet.detection import MEASURES  # noqa: E402
from keras_drnet.detection import auroc  # noqa: E402

_MODEL = flags.DEFINE_string("model_path", None, "A CIFAR-10 classifier.")
_METHODS = flags.DEFINE_list(
    "methods", ["activation", "taylor", "activation+taylor", "cdrp"],
    "Path methods, each with its own CIVs; a+b: one detector over both "
    "(kd.PathDetector with a list of CIVs).")
_FIT = flags.DEFINE_integer("fit_images", 1000, "Clean images to fit on.")
_EVAL = flags.DEFINE_integer("eval_images", 1000, "Held-out clean images.")
_CDRP_IMAGES = flags.DEFINE_integer(
    "cdrp_images", 300, "CDRP fits 30 steps per image: at most this many "
    "images of each set for it.")
_SAMPLES = flags.DEFINE_integer("samples_per_class", 100, "CIV images.")
_OUTPUT = flags.DEFINE_string(
    "output_dir", os.path.join(os.path.dirname(__file__), "results"),
    "Where the table, plot and caches go.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny run to check it works.")

# (kind, eps in 1/255ths; C&W's L2 perturbation is found, not bounded).
ATTACKS = [("fgsm", 2), ("fgsm", 8), ("pgd", 2), ("pgd", 8), ("cw", 0)]


def _batched(fn, images, size=250):
    if not len(images):
        return np.zeros((0,) + images.shape[1:], "float32")
    return np.concatenate([np.asarray(fn(images[i:i + size]))
                           for i in range(0, len(images), size)])


def _cached(path, make):
    if os.path.exists(path):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    value = make()
    np.savez(path, **value)
    return value


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from keras_drnet.model_surgery import split_softmax

    quick = _QUICK.value
    os.makedirs(_OUTPUT.value, exist_ok=True)
    if quick:
        model, accuracy, names = cifar_models.trained("vgg16", 0.125, 1,
                                                      quick=True)
        tag, fit_n, eval_n, cdrp_n = "vgg16_w0.125_quick", 40, 40, 8
    else:
        model, accuracy, names = cifar_models.loaded(_MODEL.value)
        tag = os.path.splitext(os.path.basename(_MODEL.value))[0]
        fit_n, eval_n, cdrp_n = _FIT.value, _EVAL.value, _CDRP_IMAGES.value
    scale = cifar_models.pixel_scale(model)
    high = 255.0 * scale
    print(f"{tag}: test accuracy {accuracy:.2%}")
    logits_model, _ = split_softmax(model)
    logits_fn = tf.function(lambda x: logits_model(x, training=False))
    cache = os.path.join(_OUTPUT.value, f"{tag}_detect_cache")
    os.makedirs(cache, exist_ok=True)

    test, _ = cifar_models.cifar10(f"test[:{fit_n + eval_n}]", scale)
    x, y = (np.stack(a) for a in zip(*test.as_numpy_iterator()))
    fit_x, eval_x, eval_y = x[:fit_n], x[fit_n:], y[fit_n:]
    mnist = tfds.load("mnist", split=f"test[:{eval_n}]", as_supervised=True)
    ood = np.stack([
        np.asarray(tf.image.resize(tf.image.grayscale_to_rgb(
            tf.cast(image, "float32")), (32, 32))) * scale
        for image, _ in mnist.as_numpy_iterator()])

    clean_logits = _batched(logits_fn, eval_x)
    correct = clean_logits.argmax(-1) == eval_y
    sets = {"clean": eval_x, "mnist": ood}
    for kind, eps in ATTACKS:
        name = f"{kind}{eps or ''}"

        def make():
            adv = eval_x[correct]
            parts = [cifar_models.adversarial(logits_fn, adv[i:i + 250],
                            eval_y[correct][i:i + 250], kind, eps, high)
                     for i in range(0, len(adv), 250)]
            return {"images": np.concatenate(parts) if parts else adv}

        adv = _cached(os.path.join(cache, f"{name}.npz"), make)["images"]
        fooled = _batched(logits_fn, adv).argmax(-1) != eval_y[correct]
        print(f"{name}: {fooled.sum()} of {correct.sum()} attacks succeed")
        if fooled.any():  # only successful adversarial images count
            sets[name] = adv[fooled]

    rows = []
    forward = _timed(lambda a: _batched(logits_fn, a), eval_x)

    def add(method, scores, seconds):
        clean = scores["clean"]
        cut = np.quantile(clean, 0.95)
        for name in sets:
            if name == "clean":
                continue
            rows.append((method, name, len(scores[name]),
                         auroc(clean, scores[name]),
                         float(np.mean(scores[name] > cut)), seconds))

    def baseline(kind):
        def score(a):
            z = _batched(logits_fn, a)
            if kind == "msp":
                p = np.exp(z - z.max(1, keepdims=True))
                return -(p / p.sum(1, keepdims=True)).max(1)
            return -np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) \
                - z.max(1)
        return score

    for kind in ("msp", "energy"):
        score = baseline(kind)
        add(kind, {n: score(a) for n, a in sets.items()},
            _timed(score, eval_x) / forward)

    all_scores = {}
    for method in _METHODS.value:
        civs = [cifar_models.dissected(
            model, tag, 5 if quick else _SAMPLES.value, quick=quick,
            **({"on_top1_change": "keep_best"} if part == "cdrp"
               else {"method": part})) for part in method.split("+")]
        civs = civs[0] if len(civs) == 1 else civs
        limit = cdrp_n if "cdrp" in method else None
        subsets = {n: a[:limit] for n, a in sets.items()}

        # The key names the detector's default measures: other defaults,
        # another cache file; sets added since are scored and merged in.
        path = os.path.join(cache, f"{method}_{'_'.join(MEASURES)}.npz")
        scores = {}
        if os.path.exists(path):
            with np.load(path) as data:
                scores = {k: data[k] for k in data.files}
        missing = [n for n in subsets if n not in scores]
        if missing:
            detector = kd.PathDetector(model, civs)
            start = time.perf_counter()
            detector.fit(fit_x[:limit])
            if "seconds" not in scores:
                scores["fit_seconds"] = np.array(time.perf_counter() - start)
                scores["seconds"] = np.array(
                    _timed(detector.score, subsets["clean"])
                    / _timed(lambda a: _batched(logits_fn, a),
                             subsets["clean"]))
            scores.update({n: detector.score(subsets[n]) for n in missing})
            np.savez(path, **scores)
        all_scores[method] = scores
        add(f"path: {method}", scores, float(scores["seconds"]))

    _write(rows, tag, forward, len(eval_x))
    _plot(all_scores, sets, tag)


def _timed(fn, images):
    start = time.perf_counter()
    fn(images)
    return time.perf_counter() - start


def _write(rows, tag, forward, count):
    lines = [
        f"# Path detector: {tag}\n",
        f"Forward pass: {1000 * forward / count:.2f} s per 1,000 images.\n",
        "| score | against | images | AUROC | detected at 5% FPR | cost "
        "(x forward) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, name, n, area, rate, cost in rows:
        lines.append(f"| {method} | {name} | {n} | {area:.3f} | {rate:.1%} | "
                     f"{cost:.1f} |")
    path = os.path.join(_OUTPUT.value, f"{tag}_detect.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"Wrote {path}")


def _plot(all_scores, sets, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(all_scores)
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3),
                             squeeze=False)
    for ax, method in zip(axes[0], methods):
        scores = all_scores[method]
        for name in ("clean", "pgd8", "mnist"):
            if name in scores and len(scores[name]):
                ax.hist(scores[name], bins=40, alpha=0.5, density=True,
                        label=name)
        ax.set_title(f"path: {method}", fontsize=9)
        ax.set_xlabel("score (higher: less like its class)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(_OUTPUT.value, f"{tag}_detect.png")
    fig.savefig(path, dpi=110)
    print(f"Wrote {path}")


if __name__ == "__main__":
    cifar_models.run_app(main)
