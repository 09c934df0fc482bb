"""A run, end to end: `run(cfg)` is what `python -m mrem_dist` calls after Hydra has composed and
validated the config. It picks the driver of the method (mrem_dist/drivers/); every driver starts
from a RunContext and ends through its one report -> validate -> export path.

Everything that can fail on bad input (model, data columns, bit widths, group counts) is checked
before the long work starts, and nothing is written to the run directory until the end.
"""

from __future__ import annotations

from typing import Optional

import torch

from mrem_dist.config import PARALLEL_METHODS, RunConfig
from mrem_dist.context import RunContext
from mrem_dist.distributed import env_world_size
from mrem_dist.preflight import preflight


def run(cfg: RunConfig) -> Optional[dict]:
    """Run the configured method; returns the report (also written to cfg.run_dir) on the main
    rank, None on the other ranks of a parallel run."""
    result = execute(cfg)
    return None if result is None else result[0]


def execute(cfg: RunConfig) -> Optional[tuple[dict, torch.nn.Module]]:
    """`run`, also returning the final quantized model (None on the non-main ranks). Every input is
    checked first (preflight: InputError, exit code 2), before any weight is loaded."""
    preflight(cfg)
    if cfg.method.name in PARALLEL_METHODS:
        from mrem_dist.drivers.parallel import run_parallel

        return run_parallel(cfg)
    world = env_world_size()
    if world > 1:
        raise RuntimeError(
            f"method={cfg.method.name} runs in one process but this was launched as {world} ranks: launch it "
            "without torchrun/srun, or use method=mrem_p to train module partitions on every rank"
        )
    if cfg.method.name == "prequant":
        from mrem_dist.drivers.prequant import run_prequant

        return run_prequant(RunContext.begin(cfg))
    from mrem_dist.drivers.single import run_single

    return run_single(RunContext.begin(cfg))
