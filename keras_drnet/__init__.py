"""keras_drnet: DRNet (dissect and reconstruct ConvNets) for Keras 3."""

from keras_drnet import model_surgery
from keras_drnet.allocation import allocate_budget
from keras_drnet.budget_search import smallest_subtask
from keras_drnet.calibration import calibrate_batchnorm
from keras_drnet.calibration import fill_closed_channels
from keras_drnet.channel_gate import ChannelGate
from keras_drnet.civ import CIVs
from keras_drnet.compaction import compact
from keras_drnet.dissection import dissect
from keras_drnet.export import export
from keras_drnet.export import read_class_names
from keras_drnet.finetuning import finetune
from keras_drnet.gate_fitting import CDRP
from keras_drnet.gate_fitting import GateFitter
from keras_drnet.gate_fitting import cdrp
from keras_drnet.graph import LayerKind
from keras_drnet.graph import register_layer_kind
from keras_drnet.model_surgery import inject_gates
from keras_drnet.model_surgery import list_gates
from keras_drnet.reconstruction import CCIV
from keras_drnet.reconstruction import combine
from keras_drnet.repair import repair
from keras_drnet.reporting import SubtaskReport
from keras_drnet.reporting import evaluate_subtask
from keras_drnet.selection import Selection
from keras_drnet.serving import export_dynamic
from keras_drnet.subtask import SubtaskModel
from keras_drnet.subtask import subtask

__version__ = "0.1.0"

__all__ = [
    "CCIV", "CDRP", "CIVs", "ChannelGate", "GateFitter", "LayerKind", "Selection",
    "SubtaskModel",
    "SubtaskReport", "allocate_budget", "calibrate_batchnorm", "cdrp",
    "combine", "compact", "dissect", "evaluate_subtask", "export",
    "export_dynamic", "fill_closed_channels", "finetune", "inject_gates",
    "list_gates", "model_surgery", "read_class_names", "register_layer_kind",
    "repair", "smallest_subtask", "subtask",
]
