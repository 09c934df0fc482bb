"""The typed result of reconstructing one module: what the report's `reconstruction.modules` lists,
what a rank sends the coordinator, and what a finished module's checkpoint carries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModuleRecord:
    index: int
    layers: list[int]  # [start, stop) of the layer list
    steps: int
    error_before: float  # mean reconstruction loss on probe batches, before / after training
    error_after: float
    seconds: float
    wait_seconds: float  # waiting for inputs (activation I/O, or the previous rank's stream)
    losses: list[float] = field(default_factory=list)  # training loss at every step
    lams: list[float] = field(default_factory=list)  # teacher-forcing weight at every step
    resumed_from: int = 0  # the step training started at (> 0: resumed from a checkpoint)
    rank: int = 0  # the rank that trained it

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleRecord":
        return cls(**d)


@dataclass
class RankPayload:
    """What a stage leader of MREM-P sends the coordinator: the trained modules' state and records,
    the per-layer error sums its probes measured, and the streaming metric state of the initial
    quantized model (the last stage's; None elsewhere). Metric states and module states, never
    model outputs."""

    rank: int
    state: dict  # qualified name -> tensor (CPU) of every tensor this rank's modules hold
    modules: list[ModuleRecord]
    stats: dict  # RankStats.as_dict()
    layers_before: dict[int, tuple[float, float]]  # layer -> (sum ||h_q - h||^2, sum ||h||^2)
    layers_after: dict[int, tuple[float, float]]
    init_metric: object = None  # the task's metric state (models/tasks.py) on the last stage
    timings_s: dict = field(default_factory=dict)
