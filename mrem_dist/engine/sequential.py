"""One process, one module after another: REM, LKD and MREM-S.

Module n trains on cached boundary activations: f_{n-1} (full precision, for the teacher's
targets and for teacher forcing) and fq_{n-1} (the output of the already-reconstructed quantized
modules 0..n-1). It is measured on held-out calibration batches before and after training and,
with never_worse, goes back to its initial state when training made it worse there. Then its
outputs become the next module's inputs. Only the stores of one boundary (plus the next one being
built) are alive at any time.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from mrem_dist.data import Batch
from mrem_dist.log import get_logger
from mrem_dist.models.families import ModelFamily

from .cache import ActivationStore, choose_cache
from .checkpoint import Checkpointer, Preempted, StopSignal
from .partition import ModuleSpec
from .reconstruct import (Feed, ModuleTrainer, ReconSettings, check_lam, log_kept, mix_inputs, module_error,
                          load_snapshot, reconstruct_module, snapshot)
from .records import ModuleRecord, keep_trained
from .stage import Stage

log = get_logger(__name__)


@dataclass
class EngineResult:
    cache: str  # 'memory' or 'disk': where the calibration activations lived
    modules: list[ModuleRecord] = field(default_factory=list)


@dataclass
class EngineOptions:
    """How the sequential engine runs (not what it computes, except `seed`: the batch order)."""

    cache: str = "auto"  # where boundary activations live: memory, disk, or auto (disk above the budget)
    cache_memory_gb: float = 4.0
    cache_dir: Optional[Path] = None
    seed: int = 0
    device: torch.device | str = "cpu"
    checkpoint: Optional[Checkpointer] = None
    stop: Optional[StopSignal] = None


def _needs_quantized_inputs(settings: ReconSettings) -> bool:
    # LKD (lam = 1 throughout) never looks at the quantized stream: skip computing it.
    return settings.lam != "one"


def epoch_order(num_batches: int, steps: int, seed: int) -> Iterator[int]:
    """Batch indices for `steps` steps: a fresh seeded permutation every epoch."""
    rng = random.Random(seed)
    t = 0
    while t < steps:
        order = list(range(num_batches))
        rng.shuffle(order)
        for i in order[: steps - t]:
            yield i
        t += min(num_batches, steps - t)


def activation_bytes(batches: list[Batch], hidden_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one boundary's activations over the calibration set."""
    return sum(b.input_ids.numel() for b in batches) * hidden_size * dtype_bytes


class _Boundary:
    """The inputs of the module being trained: the batches (calibration, then held-out) and the
    cached boundary activations entering it (full precision, and quantized upstream unless LKD)."""

    def __init__(self, batches: list[Batch], device, use_q: bool) -> None:
        self.batches, self.device, self.use_q = batches, device, use_q
        self.fp: Optional[ActivationStore] = None
        self.q: Optional[ActivationStore] = None

    def feed(self, order) -> Feed:
        for i in order:
            yield (self.batches[i],
                   None if self.fp is None else self.fp.get(i, self.device),
                   None if self.q is None else self.q.get(i, self.device))

    @torch.no_grad()
    def advance(self, teacher: Stage, student: Stage, kind: str, cache_dir: Optional[Path], index: int) -> None:
        """Replace the stores by the outputs of the module just trained (the next one's inputs)."""
        next_fp = ActivationStore(kind, cache_dir, f"fp{index}")
        next_q = ActivationStore(kind, cache_dir, f"q{index}") if self.use_q else None
        for i, (batch, fp_in, q_in) in enumerate(self.feed(range(len(self.batches)))):
            next_fp.put(i, teacher(fp_in, batch, logits=False).hidden[-1])
            if next_q is not None:
                # The student stream: quantized module n on the quantized upstream.
                next_q.put(i, student(mix_inputs(0.0, fp_in, q_in), batch, logits=False).hidden[-1])
        self.close()
        self.fp, self.q = next_fp, next_q

    def close(self) -> None:
        for store in (self.fp, self.q):
            if store is not None:
                store.close()
        self.fp = self.q = None


class _SequentialRun:
    """One module after another; the state shared by the modules of one run."""

    def __init__(self, batches: list[Batch], holdout: list[Batch], settings: ReconSettings, options: EngineOptions) -> None:
        if not holdout:
            raise ValueError("no held-out calibration batches to measure the modules on: set data.holdout_samples >= 1")
        self.batches, self.settings, self.options = batches, settings, options
        self.checkpoint, self.stop = options.checkpoint, options.stop
        # The held-out batches ride along after the calibration ones; training never draws them.
        self.probe = list(range(len(batches), len(batches) + len(holdout)))
        self.boundary = _Boundary(batches + holdout, options.device, _needs_quantized_inputs(settings))

    def _error(self, student: Stage, teacher: Stage) -> float:
        return module_error(student, teacher, self.boundary.feed(iter(self.probe)), check_lam(self.settings), self.settings.loss)

    def _after_step(self, spec: ModuleSpec, tag: str):
        settings, checkpoint, stop = self.settings, self.checkpoint, self.stop

        def after_step(done: int, tr: ModuleTrainer) -> None:
            stopping = stop is not None and stop.received is not None
            if checkpoint is not None and (stopping or checkpoint.due(done, settings.steps)):
                checkpoint.save(done, [tr], tag)
            if stopping:
                where = f"checkpoint in {checkpoint.root}" if checkpoint is not None else "no checkpoint (checkpoint.dir=null)"
                raise Preempted(f"stopped after step {done} of {settings.steps} of {spec.describe()} on a stop signal; "
                                f"{where}: run the same command again to resume")

        return after_step

    def restore(self, student: Stage, teacher: Stage, tag: str) -> Optional[ModuleRecord]:
        """A module finished before a restart: its weights and record from its last checkpoint."""
        if self.checkpoint is None or self.checkpoint.latest(tag) != self.settings.steps:
            return None
        record = self.checkpoint.extra(self.settings.steps, tag)
        if record is None:
            return None
        trainer = ModuleTrainer(student, teacher, self.settings)
        self.checkpoint.load(self.settings.steps, [trainer], tag)
        trainer.finish()
        log.info("%s: restored from its checkpoint (trained before the restart)", student.spec.describe())
        return ModuleRecord.from_dict(record)

    def train(self, student: Stage, teacher: Stage, tag: str) -> ModuleRecord:
        """Train one module (from the step of its latest checkpoint, or 0) and return its record."""
        spec, settings, checkpoint = student.spec, self.settings, self.checkpoint
        reached = checkpoint.latest(tag) if checkpoint is not None else 0
        log.info("%s (%d steps, lam=%s)", spec.describe(), settings.steps, settings.lam)
        # The error before and the initial state are the initial module's: taken before a checkpoint
        # is loaded into it.
        before = self._error(student, teacher)
        initial = snapshot(student, teacher)
        trainer = ModuleTrainer(student, teacher, settings)
        if reached:
            checkpoint.load(reached, [trainer], tag)
        # One batch order for every module (as in MREM-P, where all modules step together).
        order = itertools.islice(epoch_order(len(self.batches), settings.steps, self.options.seed), reached, None)
        res = reconstruct_module(student, teacher, self.boundary.feed(order), settings, trainer, reached,
                                 self._after_step(spec, tag))
        after = self._error(student, teacher)
        kept = "trained" if keep_trained(before, after, settings.never_worse) else "initial"
        if kept == "initial":
            load_snapshot(student, initial)
        log.info("%s: trained in %.1fs", spec.describe(), res.seconds)
        log_kept(spec, before, after, kept)
        record = ModuleRecord(spec.index, [spec.start, spec.stop], settings.steps, before, after, round(res.seconds, 3),
                              round(res.wait_seconds, 3), res.losses, res.lams, reached, kept=kept)
        if checkpoint is not None:  # done: a rerun restores it instead of training it again
            checkpoint.save(settings.steps, [trainer], tag, extra=record.as_dict())
        return record


def reconstruct_sequential(
    fp_model: nn.Module,
    q_model: nn.Module,
    family: ModelFamily,
    specs: list[ModuleSpec],
    batches: list[Batch],
    holdout: list[Batch],
    settings: ReconSettings,
    options: Optional[EngineOptions] = None,
) -> EngineResult:
    """Reconstruct every module of `q_model` in order, in place, training on `batches` and measuring
    each module on `holdout` (the never-worse check). Both live on `options.device`.

    With a checkpointer, each module is checkpointed every `checkpoint.every` steps and when it is
    done (with its record); a rerun skips the modules that were done, continues the one that was
    training, and recomputes the boundary activations from the restored weights. A stop signal
    checkpoints the step in progress and raises Preempted."""
    options = options or EngineOptions()
    fp_model.requires_grad_(False)
    q_model.requires_grad_(False)
    hidden = family.config(fp_model).hidden_size
    # Live at once: this boundary's fp (and q) store plus the next one being written.
    needed = activation_bytes(batches + holdout, hidden) * (4 if _needs_quantized_inputs(settings) else 2)
    kind = choose_cache(options.cache, needed, options.cache_memory_gb)
    log.info("calibration activations: %.2f GB at peak, kept in %s (method.cache=%s, budget %.1f GB)",
             needed / 2**30, kind, options.cache, options.cache_memory_gb)
    result = EngineResult(cache=kind)
    run = _SequentialRun(batches, holdout, settings, options)
    try:
        if run.checkpoint is not None:
            run.checkpoint.prepare()
        for spec in specs:
            teacher, student = Stage(fp_model, family, spec), Stage(q_model, family, spec)
            tag = f"module{spec.index}_"
            record = run.restore(student, teacher, tag) or run.train(student, teacher, tag)
            result.modules.append(record)
            if spec.last:
                break
            run.boundary.advance(teacher, student, kind, options.cache_dir, spec.index)
    finally:
        run.boundary.close()
    return result
