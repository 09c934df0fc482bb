"""The reconstruction engine: partition a model into modules, train each quantized module to
reproduce its full-precision twin. REM, LKD and MREM-S (sequential driver) and MREM-P (parallel
driver, one module partition per rank) are settings of the same training loop."""

from .cache import CACHE_MODES, ActivationStore, choose_cache
from .parallel import RankPipeline, RankStats
from .partition import BALANCES, ModuleSpec, layer_costs, partition, split_contiguous
from .reconstruct import (
    LAM_SCHEDULES,
    LOSSES,
    ModuleResult,
    ModuleTrainer,
    ReconSettings,
    check_lam,
    lam_at,
    masked_mse,
    mix_inputs,
    module_error,
    reconstruct_module,
    reconstruction_loss,
    step,
    trainable_groups,
)
from .records import ModuleRecord, RankPayload
from .sequential import EngineOptions, EngineResult, epoch_order, reconstruct_sequential
from .shard import owned_state, release_unowned, tensor_owner
from .stage import Stage, StageOutput
from .stream import StreamReceiver, StreamSender

__all__ = [
    "CACHE_MODES", "ActivationStore", "choose_cache",
    "RankPipeline", "RankStats",
    "BALANCES", "ModuleSpec", "layer_costs", "partition", "split_contiguous",
    "LAM_SCHEDULES", "LOSSES", "ModuleResult", "ModuleTrainer", "ReconSettings", "check_lam", "lam_at", "masked_mse", "mix_inputs",
    "module_error", "reconstruct_module", "reconstruction_loss", "step", "trainable_groups",
    "ModuleRecord", "RankPayload",
    "EngineOptions", "EngineResult", "epoch_order", "reconstruct_sequential",
    "owned_state", "release_unowned", "tensor_owner",
    "Stage", "StageOutput",
    "StreamReceiver", "StreamSender",
]
