"""keras_drnet: DRNet (dissect and reconstruct ConvNets) for Keras 3.

The public names load on first use (PEP 562): `import keras_drnet` costs
nothing, so the command line answers `--help` before TensorFlow starts;
`keras_drnet.dissect` (or any other name) imports what it needs then.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.2.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "allocate_budget": "allocation",
    "smallest_subtask": "budget_search",
    "calibrate_batchnorm": "calibration",
    "fill_closed_channels": "calibration",
    "ChannelGate": "channel_gate",
    "CIVs": "civ",
    "compact": "compaction",
    "PathDetector": "detection",
    "dissect": "dissection",
    "export": "export",
    "read_class_names": "export",
    "finetune": "finetuning",
    "CDRP": "gate_fitting",
    "GateFitter": "gate_fitting",
    "cdrp": "gate_fitting",
    "LayerKind": "graph",
    "register_layer_kind": "graph",
    "inject_gates": "model_surgery",
    "list_gates": "model_surgery",
    "CCIV": "reconstruction",
    "combine": "reconstruction",
    "repair": "repair",
    "SubtaskReport": "reporting",
    "evaluate_subtask": "reporting",
    "Selection": "selection",
    "export_dynamic": "serving",
    "SubtaskModel": "subtask",
    "subtask": "subtask",
}
_MODULES = {"model_surgery"}

__all__ = sorted(_EXPORTS) + sorted(_MODULES)


def __getattr__(name):
    if name in _MODULES:
        value = importlib.import_module(f"keras_drnet.{name}")
    elif name in _EXPORTS:
        module = importlib.import_module(f"keras_drnet.{_EXPORTS[name]}")
        value = getattr(module, name)
    else:
        raise AttributeError(f"module 'keras_drnet' has no attribute {name!r}")
    _register_with_keras()
    globals()[name] = value  # later look-ups skip this function
    return value


def _register_with_keras():
    """Imports the modules that register the package's Keras classes, so
    that `keras.models.load_model` finds `SubtaskModel`, `ChannelGate` and
    `GateFitter` in files that hold them."""
    importlib.import_module("keras_drnet.subtask")
    importlib.import_module("keras_drnet.gate_fitting")


class _AfterKeras(importlib.abc.MetaPathFinder):
    """Registers the package's classes once Keras is imported, whoever
    imports it: `import keras_drnet` stays free, and a file loaded with
    `keras.models.load_model` right after it still finds them."""

    def find_spec(self, name, path=None, target=None):
        if name != "keras":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            # Inside one of our own imports (`kd.dissect` importing its
            # module) the half-imported module cannot be used yet;
            # `__getattr__` registers once that import is done.
            if not any(
                getattr(getattr(m, "__spec__", None), "_initializing", False)
                for n, m in list(sys.modules.items())
                if n.startswith("keras_drnet.")
            ):
                _register_with_keras()

        spec.loader.exec_module = exec_then_register
        return spec


class _Namespace(types.ModuleType):
    """The package: importing its module `subtask` (or `repair`, `export`)
    must not replace the function of that name, as Python's import system
    would by setting the module as an attribute of the package."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Namespace

if "keras" in sys.modules:
    _register_with_keras()
else:
    sys.meta_path.insert(0, _AfterKeras())


def __dir__():
    return sorted(set(globals()) | set(__all__))
