"""Writing a SavedModel: the one place that builds an `ExportArchive`."""

import keras
import tensorflow as tf


def write_saved_model(filepath, tracked, endpoints, constants, verbose=True):
    """Writes `tracked` objects with function and constant endpoints.

    Args:
        filepath: str. The SavedModel directory.
        tracked: list of Keras layers or models whose variables it holds.
        endpoints: `{name: (function, input_signature or None)}`; None for a
            `tf.function` already traced.
        constants: `{name: value}`: endpoints without arguments returning a
            constant (class names, live classes).
        verbose: bool, whether Keras prints what it writes.
    """
    archive = keras.export.ExportArchive()
    for obj in tracked:
        archive.track(obj)
    for name, (function, signature) in endpoints.items():
        if signature is None:
            archive.add_endpoint(name, function)
        else:
            archive.add_endpoint(name, function, input_signature=signature)
    for name, value in constants.items():
        archive.add_endpoint(name, _constant(tf.constant(value)),
                             input_signature=[])
    archive.write_out(filepath, verbose=verbose)
    return filepath


def _constant(tensor):
    return lambda: tensor
