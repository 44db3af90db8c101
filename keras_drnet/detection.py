"""Routing paths as a detector: images whose path is unlike their class's.

An adversarial or out-of-distribution image reaches its (wrong) class
through channels that the class's own images do not use (CDRP, CVPR 2018;
"effective paths", CVPR 2019; INND, ECCV 2020). `PathDetector` measures
that with the package's own parts: an image's path is its per-channel
scores from a dissection method, its class is the model's top-1, and the
class's path is its CIV.
"""

import json
import os

import numpy as np
from keras import ops

from keras_drnet.batching import BatchRunner
from keras_drnet.batching import Progress
from keras_drnet.batching import image_batches
from keras_drnet.batching import is_int
from keras_drnet.batching import is_number
from keras_drnet.batching import model_input_shape
from keras_drnet.civ import CIVs
from keras_drnet.civ import atomic_savez
from keras_drnet.civ import model_fingerprint
from keras_drnet.dissection import path_scorer
from keras_drnet.gate_fitting import CDRP
from keras_drnet.model_surgery import gated_copy
from keras_drnet.selection import gate_spans

MEASURES = ("cosine", "overlap", "norm")
_FORMAT_VERSION = 1


class PathDetector:
    """Scores how far each image's routing path is from its class's.

    For an image predicted as class `c`, every gate `g` gives similarities
    between the image's path on that gate and `c`'s CIV: `"cosine"`,
    `"overlap"` (the IoU of their top `budget` channels, the paper
    family's measure) and `"norm"` (the log ratio of their lengths: how
    strongly the image drives the gate, against the class's images).
    `fit(clean_images)` learns, on held-out clean images, each class's mean
    of these per-gate numbers and their pooled covariance; an image's score
    is the Mahalanobis distance of its numbers from its class's mean (a
    combination over layers learned on clean images only), in units of the
    clean distances' `1 - false_positive_rate` quantile: higher is less
    like its class, and above about 1 is unusual. With a list of CIVs (one
    model, e.g. activation and Taylor) each CIVs' method gives a path and a
    distance so scaled, and the largest is the score: an image is as odd
    as its oddest path (activation paths catch images of another data set,
    Taylor paths adversarial ones; docs/results.md). The threshold is the
    clean scores' quantile.

    Args:
        model: the classifier the CIVs were dissected from.
        civs: `keras_drnet.CIVs` of `model`, with every class's vector, or
            a list of them.
        method: the path: `"taylor"`, `"activation"`, `"frat"` or
            `"cdrp"`; defaults to the CIVs' own method (their scale).
        measures: tuple of `"cosine"`, `"overlap"`, `"norm"`.
        budget: float in (0, 1], the fraction of a gate's channels
            `"overlap"` compares.
        false_positive_rate: float in (0, 1), on the `fit` images.
        batch_size: int, images scored at once (compiled once).
        ridge: float >= 0, added to the covariance's diagonal, relative to
            its mean variance.

    Example:

    ```python
    detector = keras_drnet.PathDetector(model, civs).fit(clean_images)
    scores = detector.score(images)       # higher: less like its class
    flagged = detector.predict(images)    # scores above the threshold
    detector.save("detector.npz")
    detector = keras_drnet.PathDetector.load("detector.npz", model, civs)
    ```
    """

    def __init__(self, model, civs, method=None, measures=MEASURES,
                 budget=1 / 3, false_positive_rate=0.05, batch_size=64,
                 ridge=1e-3):
        several = isinstance(civs, (list, tuple))
        civs_list = list(civs) if several else [civs]
        for one in civs_list:
            if not isinstance(one, CIVs):
                raise TypeError(
                    "`civs` must be `keras_drnet.CIVs` (from `keras_drnet."
                    "dissect()` or `CIVs.load()`), or a list of them. "
                    f"Received: {type(one).__name__}"
                )
            if one.subtask_classes:
                raise ValueError(
                    "The CIVs were dissected for the sub-task "
                    f"{one.subtask_classes} (`dissect(..., classes=...)`): "
                    "the detector compares an image with the class the "
                    "model predicts, out of all of them. Dissect without "
                    "`classes`."
                )
            missing = [n for n, c in zip(one.class_names, one.counts)
                       if not c]
            if missing:
                raise ValueError(
                    f"The CIVs have no vector for {missing}: the detector "
                    "compares an image with the class the model predicts, "
                    "so it needs every class's. Dissect images of those "
                    "classes too."
                )
        if not civs_list:
            raise ValueError("`civs` is an empty list: pass one CIVs or more.")
        if several and method is not None:
            raise ValueError(
                "With a list of CIVs each gives its path method (its own): "
                f"drop `method`. Received: method={method!r}"
            )
        if len({(c.fingerprint, tuple(c.class_names), tuple(c.layout))
                for c in civs_list}) > 1:
            raise ValueError(
                "The CIVs of the list come from different models (or gate "
                "them differently, or name "
                "the classes differently): pass CIVs of one model."
            )
        measures = tuple(measures)
        if not measures or any(m not in MEASURES for m in measures):
            raise ValueError(
                f"`measures` must be a non-empty tuple of {list(MEASURES)}. "
                f"Received: measures={measures!r}"
            )
        for name, value, low, high in [
            ("budget", budget, 0, 1),
            ("false_positive_rate", false_positive_rate, 0, 1),
        ]:
            if not (is_number(value) and low < value <= high) or (
                name == "false_positive_rate" and value >= 1
            ):
                raise ValueError(
                    f"`{name}` must be a number in ({low}, {high}"
                    f"{')' if name == 'false_positive_rate' else ']'}. "
                    f"Received: {name}={value!r}"
                )
        if not (is_number(ridge) and 0 < ridge < float("inf")):
            raise ValueError(
                "`ridge` must be a finite number > 0 (it keeps the "
                f"covariance invertible). Received: ridge={ridge!r}"
            )
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError("`batch_size` must be a positive int. Received: "
                             f"batch_size={batch_size!r}")
        self.methods = tuple(
            c.config.get("method", "cdrp") if method is None else method
            for c in civs_list
        )
        self.model = model
        self.civs = civs
        self._civs_list = civs_list
        self._several = several
        self.measures = measures
        self.budget = float(budget)
        self.false_positive_rate = float(false_positive_rate)
        self.ridge = float(ridge)
        self.means = self.precision = self.scales = self.threshold = None
        scorers = []
        for one, name in zip(civs_list, self.methods):
            options = None
            if name == "cdrp" and one.config.get("method", "cdrp") == "cdrp":
                # The CIVs' own fitting options: the references' scale.
                fields = CDRP.__dataclass_fields__
                options = CDRP(**{k: v for k, v in one.config.items()
                                  if k in fields})
            scorers.append(path_scorer(gated_copy(model, one), name, options))
        self._input_shape, self._dtype = model_input_shape(model)
        self._run = BatchRunner(self._step(scorers), batch_size)

    @property
    def method(self):
        """The path method(s), e.g. `"taylor"` or `"activation+taylor"`."""
        return "+".join(self.methods)

    def _step(self, scorers):
        """`(images, labels) -> (similarities [batch, F], logits)`."""
        references = [ops.convert_to_tensor(c.vectors, "float32")
                      for c in self._civs_list]
        spans = gate_spans(self._civs_list[0].layout)
        counts = [max(1, int(round(self.budget * (b - a)))) for a, b in spans]
        measures = self.measures

        def top(part, count):
            # 0/1: each row's `count` highest, as `top_k` picks them (the
            # lower index first among ties), scattered by (row, channel):
            # a one-hot of the indices would be [batch, count, channels].
            _, order = ops.top_k(part, count)
            rows = ops.tile(ops.arange(ops.shape(part)[0])[:, None],
                            [1, count])
            where = ops.stack([ops.cast(rows, order.dtype), order], axis=-1)
            return ops.scatter(where, ops.ones(ops.shape(order), "float32"),
                               ops.shape(part))

        def step(images, labels):
            features, logits = [], None
            for scorer, vectors in zip(scorers, references):
                paths, logits = scorer.path_batch(images)
                features += similarities(ops.cast(paths, "float32"),
                                         vectors, ops.argmax(logits, -1))
            return ops.stack(features, axis=1), logits

        def similarities(paths, vectors, classes):
            reference = ops.take(vectors, classes, axis=0)
            features = []
            for (a, b), count in zip(spans, counts):
                p, r = paths[:, a:b], reference[:, a:b]
                if "cosine" in measures:
                    norms = ops.norm(p, axis=1) * ops.norm(r, axis=1)
                    features.append(ops.sum(p * r, axis=1)
                                    / ops.maximum(norms, 1e-12))
                if "overlap" in measures:
                    mp, mr = top(p, count), top(r, count)
                    shared = ops.sum(mp * mr, axis=1)
                    union = ops.sum(mp, axis=1) + ops.sum(mr, axis=1) - shared
                    features.append(shared / ops.maximum(union, 1.0))
                if "norm" in measures:
                    features.append(ops.log(ops.norm(p, axis=1) + 1e-12)
                                    - ops.log(ops.norm(r, axis=1) + 1e-12))
            return features

        return step

    def similarities(self, images, verbose=0):
        """`(similarities [N, F], logits [N, classes])` of `images` (an
        array or a dataset of images, preprocessed as the model expects);
        `verbose=1` shows progress."""
        features, logits = [], []
        target = len(images) if isinstance(images, np.ndarray) else None
        progress = Progress(target, verbose)
        for batch in image_batches(images, self._run.batch_size,
                                   self._input_shape, self._dtype):
            if not np.isfinite(batch).all():
                raise ValueError(
                    "`images` has NaN or inf values: a path through them "
                    "means nothing. Drop or fix those images."
                )
            f, z = self._run(batch)
            features.append(f)
            logits.append(z)
            progress.add(len(batch))
        progress.finish()
        if not features:
            raise ValueError("`images` is empty: nothing to score.")
        return np.concatenate(features), np.concatenate(logits)

    def fit(self, clean_images, verbose=0):
        """Learns the clean statistics and the threshold; returns `self`.

        `clean_images`: held out from the dissection, not labelled (the
        predicted class is the one compared). Every class the model
        predicts on them should have a few dozen images. The statistics
        and the threshold come from the same images, so on new clean
        images the rate is somewhat above `false_positive_rate` (8.3% of 300
        held-out digits at 5% on the MNIST model of the tests).
        """
        features, logits = self.similarities(clean_images, verbose)
        classes = logits.argmax(-1)
        num_classes = self._civs_list[0].num_classes
        blocks = np.split(features, len(self._civs_list), axis=1)
        means, precisions, scales = [], [], []
        for block in blocks:
            mean = np.zeros((num_classes, block.shape[1]))
            for c in range(num_classes):
                mine = block[classes == c]
                # A class predicted for no clean image falls back on the
                # mean of all (its images are scored against everyone's).
                mean[c] = mine.mean(axis=0) if len(mine) else block.mean(0)
            centred = block - mean[classes]
            covariance = centred.T @ centred / max(len(block) - 1, 1)
            size = float(np.mean(np.diag(covariance))) or 1.0
            covariance += self.ridge * size * np.eye(len(covariance))
            means.append(mean)
            precisions.append(np.linalg.inv(covariance))
            scales.append(1.0)
        self.means = np.stack(means).astype("float32")
        self.precision = np.stack(precisions).astype("float32")
        quantile = 1 - self.false_positive_rate
        # Each path's distance in units of its own clean quantile, so that
        # the largest (the path that looks least like its class) decides.
        self.scales = np.array(
            [np.quantile(d, quantile) or 1.0
             for d in self._distances(features, classes)], "float32")
        self.threshold = float(np.quantile(
            self._combined(features, classes), quantile))
        return self

    def _distances(self, features, classes):
        """Each path's Mahalanobis distance from its class's clean mean."""
        blocks = np.split(features, len(self.means), axis=1)
        out = []
        for block, mean, precision in zip(blocks, self.means, self.precision):
            centred = block - mean[classes]
            out.append(np.sqrt(np.maximum(np.einsum(
                "ij,jk,ik->i", centred, precision, centred), 0)))
        return out

    def _combined(self, features, classes):
        distances = self._distances(features, classes)
        return np.max([d / s for d, s in zip(distances, self.scales)],
                      axis=0)

    def _check_fitted(self):
        if self.threshold is None:
            raise ValueError(
                "This PathDetector is not fitted: call "
                "`detector.fit(clean_images)` (or `PathDetector.load`) first."
            )

    def score(self, images, return_logits=False, verbose=0):
        """One anomaly score per image (higher: less like its predicted
        class's path); with `return_logits`, `(scores, logits)`."""
        self._check_fitted()
        features, logits = self.similarities(images, verbose)
        scores = self._combined(features, logits.argmax(-1))
        return (scores, logits) if return_logits else scores

    def predict(self, images):
        """Booleans: the images whose score is above the threshold."""
        return self.score(images) > self.threshold

    def get_config(self):
        return {
            # With several CIVs, each gives its own.
            "method": None if self._several else self.method,
            "measures": list(self.measures),
            "budget": self.budget,
            "false_positive_rate": self.false_positive_rate,
            "batch_size": self._run.batch_size,
            "ridge": self.ridge,
        }

    def save(self, path):
        """Writes the fitted detector to an `.npz` (no pickle)."""
        self._check_fitted()
        path = os.fspath(path)
        if not path.endswith(".npz"):
            raise ValueError(
                f"A PathDetector is saved as `.npz`. Received: path={path!r}"
            )
        metadata = {
            "format_version": _FORMAT_VERSION,
            "config": self.get_config(),
            "threshold": self.threshold,
            "scales": self.scales.tolist(),
            "model_fingerprint": self._civs_list[0].fingerprint,
            "civs_checksum": _civs_checksum(self.civs),
        }
        atomic_savez(path, means=self.means, precision=self.precision,
                     metadata=np.array(json.dumps(metadata)))

    @classmethod
    def load(cls, path, model, civs):
        """A detector written by `save()`, for `model` and its `civs`."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                metadata = json.loads(str(data["metadata"]))
                version = metadata["format_version"]
                if version != _FORMAT_VERSION:
                    raise _Version(version)
                means, precision = data["means"], data["precision"]
            config = metadata["config"]
            fitted = (metadata["model_fingerprint"],
                      metadata["civs_checksum"], metadata["scales"],
                      metadata["threshold"])
        except FileNotFoundError:
            raise
        except _Version as error:
            raise ValueError(
                f"{path!r} is a PathDetector of format {error.args[0]}; this "
                f"version reads {_FORMAT_VERSION}."
            ) from None
        except Exception as error:  # numpy and zipfile raise many kinds
            raise ValueError(
                f"Could not read a PathDetector from {path!r}: the file is "
                f"damaged or not one ({type(error).__name__}: {error})."
            ) from None
        fingerprint, checksum, scales, threshold = fitted
        if (fingerprint != model_fingerprint(model)
                or checksum != _civs_checksum(civs)):
            raise ValueError(
                f"{path!r} was fitted for another model or other CIVs: pass "
                "the model and CIVs it was fitted with, or fit it again."
            )
        detector = cls(model, civs, **config)
        detector.means, detector.precision = means, precision
        detector.scales = np.asarray(scales, "float32")
        detector.threshold = float(threshold)
        return detector


class _Version(Exception):
    """A detector file of another format version."""


def _civs_checksum(civs):
    import hashlib

    digest = hashlib.sha256()
    for one in civs if isinstance(civs, (list, tuple)) else [civs]:
        if not isinstance(one, CIVs):
            raise TypeError(f"`civs` must be `keras_drnet.CIVs`, or a list "
                            f"of them. Received: {type(one).__name__}")
        digest.update(np.ascontiguousarray(one.vectors, "float32").tobytes())
    return digest.hexdigest()


def auroc(negatives, positives):
    """Area under the ROC curve of scores where `positives` should be
    higher (the probability that a random positive outscores a random
    negative, ties counting half)."""
    negatives = np.asarray(negatives, "float64").ravel()
    positives = np.asarray(positives, "float64").ravel()
    if not (len(negatives) and len(positives)):
        raise ValueError("`auroc` needs scores on both sides. Received: "
                         f"{len(negatives)} and {len(positives)}")
    if not (np.isfinite(negatives).all() and np.isfinite(positives).all()):
        raise ValueError("`auroc` needs finite scores.")
    scores = np.concatenate([negatives, positives])
    ranks = _average_ranks(scores)
    n, p = len(negatives), len(positives)
    return float((ranks[n:].sum() - p * (p + 1) / 2) / (n * p))


def _average_ranks(values):
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    # Ties share their average rank.
    _, inverse, counts = np.unique(values, return_inverse=True,
                                        return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]
