"""Trains the CIFAR-10 models of `cifar_models.py` where TensorFlow is absent.

For a GPU machine that has JAX (or PyTorch) but no TensorFlow and no
internet: `--export` (run where tfds works) writes the CIFAR-10 training set
as JPEG (quality 90, to fit a 64 MB upload) into one .npz; on the GPU
machine, training reads it with Pillow and runs the same recipe as
`cifar_models.trained()` (SGD, cosine, flips and 4-pixel crops), then saves
`{arch}_w{width}_e{epochs}_s{seed}.keras` (weights only, no optimizer),
which `cifar_models.trained()` then finds in its cache.

    python examples/train_on_accelerator.py --export=cifar10_jpeg.npz
    KERAS_BACKEND=jax python examples/train_on_accelerator.py \\
        --data=cifar10_jpeg.npz --models=vgg16:0.5,resnet18:0.5 --epochs=30
"""

import io
import os
import time

import numpy as np
from absl import flags

_EXPORT = flags.DEFINE_string("export", None, "Write the JPEG .npz here.")
_DATA = flags.DEFINE_string("data", None, "The JPEG .npz to train on.")
_MODELS = flags.DEFINE_list("models", ["vgg16:0.5"], "arch:width pairs.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Training epochs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_OUTPUT = flags.DEFINE_string("output_dir", ".", "Where the models go.")


def export(path):
    import tensorflow_datasets as tfds
    from PIL import Image

    blobs, labels = [], []
    ds = tfds.load("cifar10", split="train", as_supervised=True)
    for image, label in ds.as_numpy_iterator():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
        labels.append(label)
    np.savez(path, data=np.frombuffer(b"".join(blobs), np.uint8),
             offsets=np.cumsum([0] + [len(b) for b in blobs]),
             labels=np.asarray(labels, np.int64))


def load(path):
    from PIL import Image

    with np.load(path) as f:
        data, offsets, labels = f["data"], f["offsets"], f["labels"]
    images = np.stack([
        np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())))
        for a, b in zip(offsets[:-1], offsets[1:])
    ])
    return images, labels


def main(_):
    if _EXPORT.value:
        export(_EXPORT.value)
        return
    import keras

    import cifar_models

    images, labels = load(_DATA.value)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))

    class Batches(keras.utils.PyDataset):
        def __init__(self, seed, batch_size=128):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.batch_size = batch_size
            self.on_epoch_end()

        def __len__(self):
            return -(-len(labels) // self.batch_size)

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(labels))

        def __getitem__(self, index):
            idx = self.order[index * self.batch_size:
                             (index + 1) * self.batch_size]
            n = len(idx)
            dy, dx = self.rng.integers(0, 9, (2, n))
            rows = (dy[:, None] + np.arange(32))[:, :, None]
            cols = (dx[:, None] + np.arange(32))[:, None, :]
            x = padded[idx[:, None, None], rows, cols]
            flip = self.rng.random(n) < 0.5
            x[flip] = x[flip, :, ::-1]
            return x.astype("float32") / 255.0, labels[idx]

    for entry in _MODELS.value:
        arch, width = entry.split(":")
        width = float(width)
        keras.utils.set_random_seed(_SEED.value)
        model = cifar_models.ARCHITECTURES[arch](width)
        cifar_models.compile_for_training(model, 391 * _EPOCHS.value)
        start = time.time()
        model.fit(Batches(_SEED.value), epochs=_EPOCHS.value, verbose=2)
        print(f"{arch} width {width:g}: {time.time() - start:.0f} s",
              flush=True)
        # Weights only: a fresh, uncompiled copy carries no optimizer state.
        fresh = cifar_models.ARCHITECTURES[arch](width)
        fresh.set_weights(model.get_weights())
        fresh.save(os.path.join(
            _OUTPUT.value,
            f"{arch}_w{width:g}_e{_EPOCHS.value}_s{_SEED.value}.keras"))


if __name__ == "__main__":
    import cifar_models

    cifar_models.run_app(main)
