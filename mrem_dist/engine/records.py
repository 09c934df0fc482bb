"""The typed result of reconstructing one module: what the report's `reconstruction.modules` lists,
what a rank sends the coordinator, and what a finished module's checkpoint carries."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional


# What a module keeps after training: its trained state, or its initial one when the trained state is
# worse on the held-out batches (method.never_worse).
KEPT = ("trained", "initial")


def keep_trained(before: float, after: float, never_worse: bool) -> bool:
    """The never-worse rule: keep the trained state unless it measured worse than the initial one
    (a tie keeps the trained state; a non-finite error is worse than any finite one)."""
    if not never_worse:
        return True
    return math.isfinite(after) and not (math.isfinite(before) and after > before)


@dataclass
class ModuleRecord:
    index: int
    layers: list[int]  # [start, stop) of the layer list
    steps: int
    # Mean reconstruction loss on the held-out calibration batches of the initial / the trained state,
    # both fed by the final upstream modules (the inputs the module sees in the final model).
    error_before: float
    error_after: float
    seconds: float
    wait_seconds: float  # waiting for inputs (activation I/O, or the previous rank's stream)
    losses: list[float] = field(default_factory=list)  # training loss at every step
    lams: list[float] = field(default_factory=list)  # teacher-forcing weight at every step
    resumed_from: int = 0  # the step training started at (> 0: resumed from a checkpoint)
    rank: int = 0  # the rank that trained it
    kept: str = "trained"  # KEPT: the state the final model holds (initial: training made it worse)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleRecord":
        return cls(**d)


@dataclass
class RankPayload:
    """What a stage leader of MREM-P sends the coordinator: the trained modules' state and records,
    the per-layer sums its probes measured, and the streaming metric states of the initial and of
    the final quantized model (the last stage's; None elsewhere). Metric states, sums and module
    states, never model outputs."""

    rank: int
    state: dict  # qualified name -> tensor (CPU) of every tensor this rank's modules hold
    modules: list[ModuleRecord]
    stats: dict  # RankStats.as_dict()
    layers_before: dict[int, tuple]  # layer -> sums of (||h_q - h||^2, ||h||^2, ||h_q||^2): engine.parallel.Probes
    layers_after: dict[int, tuple]
    init_metric: object = None  # the task's metric state (models/tasks.py) on the last stage
    final_metric: object = None  # the same, of the final model
    check: dict = field(default_factory=dict)  # the assembly check's batches: layer -> ||h_q||^2 of the final model
    output_sq: Optional[float] = None  # the same batches, the last stage: sum of squares of the scored output
    timings_s: dict = field(default_factory=dict)
    spans: list = field(default_factory=list)  # Timer.spans: the rank's phases up to the gather
