"""The typed result of reconstructing one module: what the report's `reconstruction.modules` lists,
what a rank sends the coordinator, and what a finished module's checkpoint carries."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from mrem_dist.validation import Structure


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
    """What a stage leader of MREM-P sends the coordinator: the manifests of its modules' shards of
    the export (no tensor: those follow one at a time as the coordinator writes the files), what
    validation found in its modules, the digests of their trained state, their records, the
    per-layer sums its probes measured, and the streaming metric states of the initial and of the
    final quantized model (the last stage's; None elsewhere). Metric states, sums and manifests,
    never model outputs or weights."""

    rank: int
    manifests: dict  # export format -> artifact.shard.Manifest of this rank's modules
    structure: Structure  # validation.check_model on this rank's modules
    digests: dict[str, str]  # qualified name -> SHA-256 of every tensor of its modules' quantized state
    covers: list[str]  # the full-precision model's state names its modules hold
    modules: list[ModuleRecord]
    stats: dict  # RankStats.as_dict()
    layers_before: dict[int, tuple]  # layer -> sums of (||h_q - h||^2, ||h||^2, ||h_q||^2): engine.parallel.Probed
    layers_after: dict[int, tuple]
    init_metric: object = None  # the task's metric state (models/tasks.py) on the last stage
    final_metric: object = None  # the same, of the final model
    timings_s: dict = field(default_factory=dict)
    spans: list = field(default_factory=list)  # Timer.spans: the rank's phases up to the gather
