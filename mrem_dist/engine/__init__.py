"""The reconstruction engine: partition a model into modules, train each quantized module to
reproduce its full-precision twin. REM, LKD and MREM-S are settings of the same code."""

from .cache import CACHE_MODES, ActivationStore, choose_cache
from .partition import BALANCES, ModuleSpec, layer_costs, partition, split_contiguous
from .reconstruct import (
    LAM_SCHEDULES,
    LOSSES,
    ModuleResult,
    ModuleTrainer,
    ReconSettings,
    lam_at,
    masked_mse,
    mix_inputs,
    module_error,
    reconstruct_module,
    reconstruction_loss,
    step,
    trainable_groups,
)
from .sequential import EngineResult, epoch_order, reconstruct_sequential
from .stage import Stage, StageOutput
from .stream import StreamReceiver, StreamSender

__all__ = [
    "CACHE_MODES", "ActivationStore", "choose_cache",
    "BALANCES", "ModuleSpec", "layer_costs", "partition", "split_contiguous",
    "LAM_SCHEDULES", "LOSSES", "ModuleResult", "ModuleTrainer", "ReconSettings", "lam_at", "masked_mse", "mix_inputs",
    "module_error", "reconstruct_module", "reconstruction_loss", "step", "trainable_groups",
    "EngineResult", "epoch_order", "reconstruct_sequential",
    "Stage", "StageOutput",
    "StreamReceiver", "StreamSender",
]
