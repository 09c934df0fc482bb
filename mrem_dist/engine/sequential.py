"""One process, one module after another: REM, LKD and MREM-S.

Module n trains on cached boundary activations: f_{n-1} (full precision, for the teacher's
targets and for teacher forcing) and fq_{n-1} (the output of the already-reconstructed quantized
modules 0..n-1). After it has trained, its outputs become the next module's inputs. Only the
stores of one boundary (plus the next one being built) are alive at any time.
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
from mrem_dist.models.adapters import ModelAdapter

from .cache import ActivationStore, choose_cache
from .checkpoint import Checkpointer, Preempted, StopSignal
from .partition import ModuleSpec
from .reconstruct import Feed, ModuleTrainer, ReconSettings, lam_at, mix_inputs, module_error, reconstruct_module
from .stage import Stage

log = get_logger(__name__)


@dataclass
class EngineResult:
    cache: str  # 'memory' or 'disk': where the calibration activations lived
    modules: list[dict] = field(default_factory=list)


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


def _feed(batches: list[Batch], order: Iterator[int], fp: Optional[ActivationStore], q: Optional[ActivationStore], device) -> Feed:
    for i in order:
        yield (
            batches[i],
            None if fp is None else fp.get(i, device),
            None if q is None else q.get(i, device),
        )


def activation_bytes(batches: list[Batch], hidden_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one boundary's activations over the calibration set."""
    return sum(b.input_ids.numel() for b in batches) * hidden_size * dtype_bytes


def _train_module(spec, student, teacher, batches, settings, fp_store, q_store, device, probe, lam_end, seed,
                  checkpoint, stop, tag, reached) -> dict:
    """Train one module (from step `reached` of a checkpoint, or 0) and return its report record."""
    log.info("%s (%d steps, lam=%s)", spec.describe(), settings.steps, settings.lam)
    # The error before is the initial module's: measured before a checkpoint is loaded into it.
    before = module_error(student, teacher, _feed(batches, iter(probe), fp_store, q_store, device), lam_end, settings.loss)
    trainer = ModuleTrainer(student, teacher, settings)
    if reached:
        checkpoint.load(reached, [trainer], tag)

    def after_step(done: int, tr: ModuleTrainer) -> None:
        stopping = stop is not None and stop.received is not None
        if checkpoint is not None and (stopping or checkpoint.due(done, settings.steps)):
            checkpoint.save(done, [tr], tag)
        if stopping:
            where = f"checkpoint in {checkpoint.root}" if checkpoint is not None else "no checkpoint (checkpoint.dir=null)"
            raise Preempted(f"stopped after step {done} of {settings.steps} of {spec.describe()} on a stop signal; "
                            f"{where}: run the same command again to resume")

    # One batch order for every module (as in MREM-P, where all modules step together).
    order = itertools.islice(epoch_order(len(batches), settings.steps, seed), reached, None)
    res = reconstruct_module(student, teacher, _feed(batches, order, fp_store, q_store, device), settings,
                             trainer, reached, after_step)
    after = module_error(student, teacher, _feed(batches, iter(probe), fp_store, q_store, device), lam_end, settings.loss)
    log.info("%s: reconstruction error %.4g -> %.4g in %.1fs", spec.describe(), before, after, res.seconds)
    record = {
        "index": spec.index,
        "layers": [spec.start, spec.stop],
        "steps": settings.steps,
        "error_before": before,
        "error_after": after,
        "seconds": round(res.seconds, 3),
        "wait_seconds": round(res.wait_seconds, 3),
        "losses": res.losses,
        "resumed_from": reached,
    }
    if checkpoint is not None:  # done: a rerun restores it instead of training it again
        checkpoint.save(settings.steps, [trainer], tag, extra=record)
    return record


def reconstruct_sequential(
    fp_model: nn.Module,
    q_model: nn.Module,
    adapter: ModelAdapter,
    specs: list[ModuleSpec],
    batches: list[Batch],
    settings: ReconSettings,
    *,
    cache: str = "auto",
    cache_memory_gb: float = 4.0,
    cache_dir: Optional[Path] = None,
    seed: int = 0,
    error_batches: int = 4,
    device: torch.device | str = "cpu",
    checkpoint: Optional[Checkpointer] = None,
    stop: Optional[StopSignal] = None,
) -> EngineResult:
    """Reconstruct every module of `q_model` in order, in place. `batches` live on `device`.

    With a checkpointer, each module is checkpointed every `checkpoint.every` steps and when it is
    done (with its report record); a rerun skips the modules that were done, continues the one
    that was training, and recomputes the boundary activations from the restored weights. A stop
    signal checkpoints the step in progress and raises Preempted."""
    fp_model.requires_grad_(False)
    q_model.requires_grad_(False)
    hidden = adapter.encoder(fp_model).config.hidden_size
    use_q = _needs_quantized_inputs(settings)
    # Live at once: this boundary's fp (and q) store plus the next one being written.
    needed = activation_bytes(batches, hidden) * (4 if use_q else 2)
    kind = choose_cache(cache, needed, cache_memory_gb)
    log.info(
        "calibration activations: %.2f GB at peak, kept in %s (method.cache=%s, budget %.1f GB)",
        needed / 2**30, kind, cache, cache_memory_gb,
    )
    result = EngineResult(cache=kind)
    lam_end = lam_at(settings.lam, settings.steps - 1, settings.steps, settings.t0) if settings.steps else 0.0
    fp_store: Optional[ActivationStore] = None
    q_store: Optional[ActivationStore] = None
    probe = list(range(min(error_batches, len(batches))))
    try:
        if checkpoint is not None:
            checkpoint.prepare()
        for spec in specs:
            teacher, student = Stage(fp_model, adapter, spec), Stage(q_model, adapter, spec)
            tag = f"module{spec.index}_"
            reached = checkpoint.latest(tag) if checkpoint is not None else 0
            # Finished before the restart: the checkpoint of its last step carries its report record.
            record = checkpoint.extra(settings.steps, tag) if reached == settings.steps else None
            if record is not None:
                trainer = ModuleTrainer(student, teacher, settings)
                checkpoint.load(reached, [trainer], tag)
                trainer.finish()
                log.info("%s: restored from its checkpoint (trained before the restart)", spec.describe())
            else:
                record = _train_module(spec, student, teacher, batches, settings, fp_store, q_store, device, probe,
                                       lam_end, seed, checkpoint, stop, tag, reached)
            result.modules.append(record)
            if spec.last:
                break
            next_fp = ActivationStore(kind, cache_dir, f"fp{spec.index}")
            next_q = ActivationStore(kind, cache_dir, f"q{spec.index}") if use_q else None
            with torch.no_grad():
                for i, batch in enumerate(batches):
                    fp_in = None if fp_store is None else fp_store.get(i, device)
                    next_fp.put(i, teacher(fp_in, batch).hidden[-1])
                    if next_q is not None:
                        q_in = None if q_store is None else q_store.get(i, device)
                        # The student stream: quantized module n on the quantized upstream.
                        next_q.put(i, student(mix_inputs(0.0, fp_in, q_in), batch).hidden[-1])
            for store in (fp_store, q_store):
                if store is not None:
                    store.close()
            fp_store, q_store = next_fp, next_q
    finally:
        for store in (fp_store, q_store):
            if store is not None:
                store.close()
    return result
