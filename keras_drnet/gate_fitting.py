"""Per-image gate fitting: the CDRP of every image, a whole batch at a time."""

import dataclasses
import math
import numbers

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_drnet.batching import BatchRunner
from keras_drnet.batching import Progress
from keras_drnet.batching import image_batches
from keras_drnet.batching import is_int
from keras_drnet.batching import is_number
from keras_drnet.batching import model_input_shape
from keras_drnet.channel_gate import per_sample_gates
from keras_drnet.model_surgery import gate_layers
from keras_drnet.model_surgery import gated
from keras_drnet.model_surgery import split_softmax


@keras.saving.register_keras_serializable(package="keras_drnet")
class GateFitter(keras.Model):
    """Fits one gate vector per image on a frozen gated model.

    For every image `x`, gates `λ` (one per gated channel) start at 1 and take
    `iterations` SGD-with-momentum steps on
    `KL(softmax f(x) || softmax f(x; λ)) + gamma * ||λ||_1`, clipped to `clip`
    after each step. The result is the image's CDRP. If the fitted gates
    change the top-1 class, `on_top1_change` decides:

    - `"reset"` (the paper): the CDRP is all ones;
    - `"exclude"`: the CDRP is NaN, so averages can leave the image out;
    - `"keep_best"` (the default; as the CDRP authors' code): the last gates
      of the fitting that still kept the top-1 (at worst the initial
      all-ones). On our CIFAR VGG16 the paper's reset opened every channel
      of the classes where most images were reset (BUILD_NOTES.md).

    A batch is fitted at once, each image with its own gates and momentum:
    the batch loss is the *sum* of the per-image losses, so each image's
    gradient is exactly its own (a mean would scale it by 1/batch). The
    state (gates, velocity) is carried as tensors, not variables, so every
    replica of a `tf.distribute` strategy fits its own images. The backbone
    runs in inference mode (BatchNorm uses its moving statistics) and only
    the gates are differentiated: no weight gradient is ever computed.

    `train_step` is one fitting iteration; `fit_batch` fits a batch and
    returns its CDRPs and which images' top-1 the fitted gates changed;
    `predict_step` returns the CDRPs alone, so `fitter.predict(images)` works
    like any Keras model.

    Args:
        gated_model: a model returned by `keras_drnet.inject_gates()`.
        iterations: int. SGD iterations per image (paper: T = 30).
        learning_rate: float. SGD learning rate (paper: 0.1).
        momentum: float. SGD momentum (paper: 0.9).
        gamma: float, weight of the L1 term (paper: 0.05), or one float
            per gate (in `list_gates()` order), e.g. scaled by the layers'
            widths.
        clip: `(min, max)` gate range enforced after each step (paper: [0, 10]).
        on_top1_change: `"keep_best"` (default), `"reset"` (paper) or
            `"exclude"`.
        **kwargs: Base model keyword arguments, such as `name`.

    Example:

    ```python
    gated = keras_drnet.inject_gates(model)
    fitter = keras_drnet.GateFitter(gated)
    cdrps = fitter.predict(images, batch_size=64)  # [N, total_channels]
    ```

    Reference:
        DRNet, sec. 3.1 (formulas 1, 2) and sec. 4.1 (hyperparameters).
    """

    def __init__(
        self,
        gated_model,
        iterations=30,
        learning_rate=0.1,
        momentum=0.9,
        gamma=0.05,
        clip=(0.0, 10.0),
        on_top1_change="keep_best",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_hyperparameters(iterations, learning_rate, momentum, gamma, clip)
        check_top1_policy(on_top1_change)
        self.gated_model = gated_model
        self.iterations = int(iterations)
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.gamma = (
            float(gamma)
            if isinstance(gamma, numbers.Real)
            else [float(g) for g in gamma]
        )
        self.clip = (float(clip[0]), float(clip[1]))
        self.on_top1_change = on_top1_change
        self.logits_model, _ = split_softmax(gated_model)
        self._gates = gate_layers(gated_model)
        self._sizes = [gate.channels for gate in self._gates]
        if isinstance(self.gamma, list):
            if len(self.gamma) != len(self._gates):
                raise ValueError(
                    "`gamma` must be a number or one number per gate "
                    f"({len(self._gates)} gates). Received: gamma={gamma!r}"
                )
            self._l1_weights = np.repeat(self.gamma, self._sizes).astype(
                "float32"
            )

    @property
    def total_channels(self):
        return sum(self._sizes)

    def logits(self, images, gates):
        """Logits of the gated model with per-image gates `[batch, total]`."""
        with per_sample_gates(self._gates, tf.split(gates, self._sizes, 1)):
            return ops.cast(
                self.logits_model(images, training=False), "float32"
            )

    def train_step(self, state):
        """One SGD iteration for every image's gates.

        Args:
            state: dict with `images`, `target` (log-probabilities of the
                ungated model), `gates` and `velocity` (`[batch, total]`),
                and optionally `best`: the last gates that kept the top-1.

        Returns:
            The state with updated `gates` and `velocity`, the per-image
            `loss` before the update, and `best` updated with the gates
            before the update if they kept the top-1.
        """
        gates = state["gates"]
        with tf.GradientTape() as tape:
            tape.watch(gates)
            logits = self.logits(state["images"], gates)
            log_q = ops.log_softmax(logits)
            target = state["target"]
            kl = ops.sum(ops.exp(target) * (target - log_q), axis=-1)
            if isinstance(self.gamma, list):
                l1 = ops.sum(self._l1_weights * ops.abs(gates), axis=-1)
            else:
                l1 = self.gamma * ops.sum(ops.abs(gates), axis=-1)
            loss = kl + l1
            total = ops.sum(loss)
        grads = tape.gradient(total, gates)
        # Same update as keras.optimizers.SGD(momentum=...), and as torch's
        # SGD for a constant learning rate.
        velocity = self.momentum * state["velocity"] - self.learning_rate * grads
        # Paper sec. 4.1: clip the gates after every iteration.
        new_gates = ops.clip(gates + velocity, self.clip[0], self.clip[1])
        state = dict(state, gates=new_gates, velocity=velocity, loss=loss)
        if "best" in state:
            kept = _same_top1(logits, target)
            state["best"] = ops.where(kept[:, None], gates, state["best"])
        return state

    def fit_batch(self, images, labels=None):
        """Fits a batch: `(cdrps [batch, total], top1_changed [batch])`.

        `labels` are not used: a CDRP reproduces the model's own output.
        """
        ones = ops.ones((ops.shape(images)[0], self.total_channels))
        target = ops.log_softmax(self.logits(images, ones))
        state = {
            "images": images,
            "target": target,
            "gates": ones,
            "velocity": ops.zeros_like(ones),
            "loss": ops.zeros_like(ones[:, 0]),
        }
        if self.on_top1_change == "keep_best":
            state["best"] = ones
        state = ops.fori_loop(
            0, self.iterations, lambda _, state: self.train_step(state), state
        )
        gates = state["gates"]
        kept = _same_top1(self.logits(images, gates), target)
        # Paper sec. 4.1 resets the gates of an image whose top-1 changed.
        fallback = {
            "reset": ones,
            "exclude": ops.full_like(ones, np.nan),
            "keep_best": state.get("best"),
        }[self.on_top1_change]
        return ops.where(kept[:, None], gates, fallback), ops.logical_not(kept)

    def path_batch(self, images, labels=None):
        """`(cdrps [batch, total], logits [batch, classes])` of a batch:
        each image's path and the model's output (`PathDetector`)."""
        cdrps, _ = self.fit_batch(images)
        ones = ops.ones((ops.shape(images)[0], self.total_channels))
        return cdrps, self.logits(images, ones)

    def predict_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        return self.fit_batch(images)[0]

    def fit(self, *args, **kwargs):
        raise NotImplementedError(
            "GateFitter fits gates per image inside `predict()`; call "
            "`fitter.predict(images)` or `keras_drnet.cdrp(model, images)`."
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "gated_model": keras.saving.serialize_keras_object(
                    self.gated_model
                ),
                "iterations": self.iterations,
                "learning_rate": self.learning_rate,
                "momentum": self.momentum,
                "gamma": self.gamma,
                "clip": tuple(self.clip),
                "on_top1_change": self.on_top1_change,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config["gated_model"] = keras.saving.deserialize_keras_object(
            config["gated_model"]
        )
        return cls(**config)


TOP1_POLICIES = ("reset", "exclude", "keep_best")


def check_top1_policy(on_top1_change):
    if on_top1_change not in TOP1_POLICIES:
        raise ValueError(
            f"`on_top1_change` must be one of {list(TOP1_POLICIES)}. "
            f"Received: on_top1_change={on_top1_change!r}"
        )


def _same_top1(logits, target):
    return ops.equal(ops.argmax(logits, axis=-1), ops.argmax(target, axis=-1))


def _check_hyperparameters(iterations, learning_rate, momentum, gamma, clip):
    if not is_int(iterations) or iterations < 1:
        raise ValueError(
            f"`iterations` must be a positive int. Received: "
            f"iterations={iterations!r}"
        )
    gammas = (
        [gamma]
        if isinstance(gamma, (numbers.Real, str))
        else list(np.ravel(np.asarray(gamma, dtype=object)))
    )
    for name, value in [
        ("learning_rate", learning_rate),
        ("momentum", momentum),
        *[("gamma", g) for g in gammas],
    ]:
        if (
            not is_number(value)
            or not math.isfinite(value)
            or value < 0
        ):
            shown = gamma if name == "gamma" else value
            hint = " (or one per gate)" if name == "gamma" else ""
            raise ValueError(
                f"`{name}` must be a finite number >= 0{hint}. Received: "
                f"{name}={shown!r}"
            )
    if len(tuple(clip)) != 2 or not clip[0] < clip[1]:
        raise ValueError(
            "`clip` must be a pair `(min, max)` with min < max. "
            f"Received: clip={clip!r}"
        )


@dataclasses.dataclass(frozen=True)
class CDRP:
    """The paper's channel scoring, with its fitting options, for `dissect`.

    `keras_drnet.dissect(model, ds, method=keras_drnet.CDRP(gamma=0.01))`
    fits every image's gates with these options (see `GateFitter`); the
    string `method="cdrp"` is `CDRP()`, the paper's defaults (sec. 4.1).
    The other methods (`"activation"`, `"frat"`, `"taylor"`) have no
    options, so CDRP's cannot be passed to them by mistake.

    Args:
        iterations: int. SGD iterations per image (paper: T = 30).
        learning_rate: float. SGD learning rate (paper: 0.1).
        momentum: float. SGD momentum (paper: 0.9).
        gamma: float, weight of the L1 term (paper: 0.05), or one per gate.
        clip: `(min, max)` gate range (paper: [0, 10]).
        on_top1_change: `"keep_best"` (default), `"reset"` (paper) or
            `"exclude"`.

    Example:

    ```python
    civs = keras_drnet.dissect(model, ds, method=keras_drnet.CDRP(gamma=0.01))
    ```
    """

    iterations: int = 30
    learning_rate: float = 0.1
    momentum: float = 0.9
    gamma: object = 0.05
    clip: tuple = (0.0, 10.0)
    on_top1_change: str = "keep_best"

    def __post_init__(self):
        _check_hyperparameters(self.iterations, self.learning_rate,
                               self.momentum, self.gamma, self.clip)
        check_top1_policy(self.on_top1_change)
        gamma = (
            float(self.gamma)
            if isinstance(self.gamma, numbers.Real)
            else tuple(float(g) for g in self.gamma)
        )
        for name, value in [
            ("iterations", int(self.iterations)),
            ("learning_rate", float(self.learning_rate)),
            ("momentum", float(self.momentum)),
            ("gamma", gamma),
            ("clip", (float(self.clip[0]), float(self.clip[1]))),
        ]:
            object.__setattr__(self, name, value)

    def get_config(self):
        """Plain Python values (the CIVs' metadata is JSON)."""
        config = dataclasses.asdict(self)
        config["clip"] = list(self.clip)
        if isinstance(self.gamma, tuple):
            config["gamma"] = list(self.gamma)
        return config

    def fitter(self, gated_model):
        """The `GateFitter` fitting these options on `gated_model`."""
        return GateFitter(gated_model, **dataclasses.asdict(self))


def method_options(method, **options):
    """`method` (a name or `CDRP`) and the CDRP `options` given as keywords
    (not `None`) as `(name, CDRP or None)`."""
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(method, CDRP):
        if given:
            raise ValueError(
                "Pass CDRP's options in `keras_drnet.CDRP(...)` or as "
                f"keywords, not both. Received: method={method}, and "
                + ", ".join(f"{k}={v!r}" for k, v in given.items())
            )
        return "cdrp", method
    if method == "cdrp":
        return "cdrp", CDRP(**given)
    if given:
        raise ValueError(
            f"{sorted(given)} are options of CDRP's gate fitting; "
            f"method={method!r} reads the network once and takes none. Drop "
            "them, or use method='cdrp' (or `keras_drnet.CDRP(...)`)."
        )
    return method, None


def cdrp(
    model,
    images,
    iterations=30,
    learning_rate=0.1,
    momentum=0.9,
    gamma=0.05,
    clip=(0.0, 10.0),
    on_top1_change="keep_best",
    batch_size=64,
    select="all",
    strategy=None,
    jit_compile=False,
    verbose=0,
):
    """Computes the CDRP (fitted gate vector) of every image.

    Args:
        model: a Keras classifier (ending in logits or in a softmax), or a
            model already returned by `inject_gates()`.
        images: numpy array `[N, ...]` or `tf.data.Dataset` of images (or of
            `(image, label)` pairs, batched or not), preprocessed as `model`
            expects them.
        iterations, learning_rate, momentum, gamma, clip: the fitting
            hyperparameters; defaults are the paper's (sec. 4.1).
        on_top1_change: `"keep_best"` (default), `"reset"` (paper:
            all-ones CDRP) or `"exclude"` (NaN CDRP); see `GateFitter`.
        batch_size: int. Images fitted at once.
        select: which ReLUs get gates when `model` has none yet; see
            `inject_gates()`.
        strategy: a `tf.distribute.Strategy`; defaults to the current one.
        jit_compile: bool. Compile the fitting step with XLA.
        verbose: 0 or 1, show a progress bar.

    Returns:
        float32 array `[N, total_gated_channels]`, channels in the order of
        `list_gates()`; with `on_top1_change="exclude"`, the rows of the
        images whose top-1 changed are NaN.

    Example:

    ```python
    cdrps = keras_drnet.cdrp(model, x_test[:100])
    ```
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive int. Received: "
            f"batch_size={batch_size!r}"
        )
    input_shape, dtype = model_input_shape(model)
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        fitter = GateFitter(
            gated(model, select),
            iterations=iterations,
            learning_rate=learning_rate,
            momentum=momentum,
            gamma=gamma,
            clip=clip,
            on_top1_change=on_top1_change,
        )
    run = BatchRunner(fitter.fit_batch, batch_size, strategy, jit_compile)
    progbar = Progress(None, verbose)
    results = []
    for batch in image_batches(images, run.batch_size, input_shape, dtype):
        results.append(run(batch)[0])
        progbar.add(len(batch))
    progbar.finish()
    if not results:
        return np.zeros((0, fitter.total_channels), "float32")
    return np.concatenate(results)


