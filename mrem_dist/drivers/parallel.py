"""MREM-P (method=mrem_p): every rank trains its module partition, rank 0 coordinates.

On every rank: build the model's skeleton and load the data (the same batches from the same seed
everywhere), cut the partition and build the parallel layout, read only this rank's modules' tensors
from the checkpoint (model.sharded_load; else load the whole model and let go of the rest),
quantize what is left, calibrate the static activation ranges through the stream, score the initial
quantized model against full precision through the stream (the last stage keeps the metric state),
train (engine.parallel), then the stage leader sends its modules' state, records and metric state
to rank 0. Rank 0, the coordinator, reloads the full-precision model, assembles the whole quantized
model from what every stage sent (a missing tensor is an error), scores and validates it end to end,
and writes the report and the artifact. Only rank 0 writes.

A single process (no launcher) runs the same code with world size 1: its one rank trains every
module in lockstep.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch

from mrem_dist.config import RunConfig
from mrem_dist.context import RunContext
from mrem_dist.distributed import gather_to_main, init_distributed, teardown_distributed
from mrem_dist.engine import ModuleSpec, epoch_order
from mrem_dist.engine.checkpoint import Preempted, StopSignal
from mrem_dist.engine.gptq import copy_gptq, gptq_model, gptq_options
from mrem_dist.engine.parallel import RankPipeline
from mrem_dist.engine.records import ModuleRecord, RankPayload
from mrem_dist.engine.shard import holders, owned_state, release_unowned, tensor_owner
from mrem_dist.layout import ParallelLayout, stage_modules
from mrem_dist.log import get_logger
from mrem_dist.models import ModelFamily, load_model
from mrem_dist.models.loading import can_load_sharded
from mrem_dist.models.sharded import materialize, materialized_bytes
from mrem_dist.quantize import needs_calibration, quantize_model
from mrem_dist.scheme import QuantScheme
from mrem_dist.scoring import layer_errors, score

log = get_logger(__name__)

# Relative difference allowed between the per-layer error the ranks measured through the stream
# and the one the coordinator measures on the assembled model (same arithmetic, other order).
ASSEMBLY_TOLERANCE = 1e-3


def run_parallel(cfg: RunConfig) -> Optional[tuple[dict, torch.nn.Module]]:
    """Join the process group the launcher described (none for a single process) and run this
    rank's share. Returns (report, assembled quantized model) on rank 0, None elsewhere."""
    dist = init_distributed(cfg.device, cfg.timeout_s)
    try:
        with StopSignal() as stop:
            return _run_rank(RunContext.begin(cfg, dist), stop)
    except Preempted:
        raise
    except BaseException as e:
        if dist.world_size > 1:
            log.error("rank %d of %d failed: %s: %s", dist.rank, dist.world_size, type(e).__name__, e)
        raise
    finally:
        teardown_distributed()


def _run_rank(ctx: RunContext, stop: StopSignal) -> Optional[tuple[dict, torch.nn.Module]]:
    cfg, timer, dist = ctx.cfg, ctx.timer, ctx.dist
    if cfg.method.modules:  # fail before loading anything (modules=0 needs the layer count)
        stage_modules(cfg.method.modules, dist.world_size)
    settings = ctx.recon_settings()
    sharded = _sharded_load(cfg, dist.world_size)
    with timer("load"):
        loaded = ctx.load(skeleton=sharded)
        model, family, task = loaded.model, loaded.family, loaded.task
        specs = ctx.partition(model)  # from the layer shapes: the same on a skeleton
        layout = ParallelLayout.build(dist.rank, dist.world_size, len(specs))
        held = set(layout.modules)
        owner = tensor_owner(model, family, specs)
        if sharded:
            by_name = holders(model, owner)
            read = materialize(model, loaded.path, lambda name: bool(by_name[name] & held), ctx.device)
            log.info("rank %d read %.1f MB of its modules' tensors from %s", layout.rank, read / 1e6, loaded.path)
    model.requires_grad_(False)
    calib, evalset = ctx.data.calib, ctx.data.evalset
    gptq = None
    if cfg.method.init == "gptq":
        # GPTQ calibrates each layer on the GPTQ-quantized layers before it: every rank runs the
        # same deterministic pass over the whole model it loaded, then keeps its own partition.
        with timer("gptq"):
            gptq = quantize_model(copy.deepcopy(model), family, ctx.scheme, learnable=False)
            gptq_model(gptq, family, calib, gptq_options(cfg.method))
    with timer("quantize"):
        release_unowned(model, owner, held)  # after a sharded load there is nothing left to free
        fp_bytes = materialized_bytes(model)  # the full-precision tensors this rank holds from now on
    # The fingerprint covers the full-precision tensors this stage holds: its inputs.
    checkpoint = ctx.checkpointer(layout, model)
    with timer("quantize"):
        layers = {i for s in specs if s.index in held for i in s.layers}
        qmodel = quantize_model(copy.deepcopy(model), family, ctx.scheme, learnable=True, layers=layers,
                                embeddings=specs[0].index in held)
        if gptq is not None:
            copy_gptq(gptq, qmodel)
            del gptq
    kept = sum(p.numel() for p in model.parameters())
    log.info("%s holds %s: %.1fM of %.1fM full-precision parameters", layout.describe(),
             "; ".join(s.describe() for s in specs if s.index in held), kept / 1e6, loaded.num_parameters / 1e6)

    pipe = RankPipeline(model, qmodel, family, specs, layout, ctx.device, cfg.method.queue)
    timer.blocked = pipe.blocked_clock()
    with timer("calibrate"):
        if needs_calibration(qmodel):
            pipe.calibrate(calib)
    probe_eval = evalset.batches[:4]
    init_metric = task.metric(evalset)
    with timer("evaluate"):
        pipe.evaluate(evalset.batches, lambda b, out: task.reduce(b, out.hidden[-1], out.logits), init_metric)
    with timer("probe"):
        _, layers_before = pipe.probe(probe_eval, 0.0, settings.loss)
    # Taken before a checkpoint is loaded: a resumed run returns to the same initial state.
    initial = pipe.initial_states()
    order = list(epoch_order(len(calib), settings.steps, cfg.seed))
    log.info("rank %d: %d steps a module, lam=%s, queue %d", layout.rank, settings.steps, settings.lam, cfg.method.queue)
    with timer("reconstruct"):  # the training steps and the never-worse check
        results, decisions, stats = pipe.train(calib, order, settings, ctx.data.holdout, initial, checkpoint, stop)
        del initial
    with timer("probe"):
        _, layers_after = pipe.probe(probe_eval, 0.0, settings.loss)

    modules = [
        ModuleRecord(res.index, [spec.start, spec.stop], settings.steps, before, after, round(res.seconds, 3),
                     round(res.wait_seconds, 3), res.losses, res.lams, stats.resumed_from, layout.rank, kept)
        for res, spec, (before, after, kept) in zip(results, pipe.held, decisions)
    ]
    held_fp = {"load": "sharded" if sharded else "whole", "full_precision_bytes": fp_bytes}
    payload = RankPayload(layout.rank, owned_state(qmodel, owner, held), modules, {**stats.as_dict(), **held_fp},
                          layers_before, layers_after, init_metric if layout.is_last_stage else None,
                          dict(timer.seconds), list(timer.spans))
    # A lone rank freed nothing: its full-precision model serves the coordinator as it is. Otherwise
    # nothing of the shard is needed any more (the coordinator rebuilds the whole model): free it.
    whole_fp = model if layout.world_size == 1 else None
    del pipe, qmodel, model
    loaded.model = None
    with timer("gather"):
        parts = gather_to_main(payload, dist, layout)
    if parts is None:
        log.info("rank %d: sent modules %s to the coordinator", layout.rank, sorted(held))
        return None
    result = _coordinate(ctx, layout, specs, parts, whole_fp)
    if checkpoint is not None:  # the artifact and report are written: nothing left to resume
        checkpoint.remove()
    return result


def _sharded_load(cfg: RunConfig, world_size: int) -> bool:
    """Whether each rank reads only its own modules' tensors (model.sharded_load, on several ranks).
    The cases where every rank still loads the whole model say why in the log."""
    if world_size == 1 or not cfg.model.sharded_load:
        return False
    if cfg.method.init == "gptq":
        log.info("method.init=gptq: every rank loads the whole model (GPTQ quantizes each layer on the outputs of "
                 "the GPTQ-quantized layers before it, and every rank runs that pass), then frees the other modules")
        return False
    if not can_load_sharded(cfg.model.path):
        log.warning("model.path=%s is not a local folder of safetensors weights: every rank loads the whole model and "
                    "frees the other modules (save it with save_pretrained to load only each rank's share)",
                    cfg.model.path)
        return False
    return True


def _coordinate(ctx: RunContext, layout: ParallelLayout, specs: list[ModuleSpec], parts: list[RankPayload],
                whole_fp: Optional[torch.nn.Module]) -> tuple[dict, torch.nn.Module]:
    cfg, timer, loaded, evalset = ctx.cfg, ctx.timer, ctx.loaded, ctx.data.evalset
    family = loaded.family
    with timer("assemble"):
        fp_model = whole_fp
        if fp_model is None:
            # The ranks let go of the full-precision weights outside their partitions: load them again.
            fp_model = load_model(cfg.model.path, cfg.model.kind, ctx.dtype).model.to(ctx.device)
            fp_model.requires_grad_(False)
        qmodel = assemble(fp_model, family, ctx.scheme, specs, parts)
    with timer("evaluate"):
        metrics = score(fp_model, qmodel, family, loaded.task, evalset).compute()
        _, init_metrics = next(p.init_metric for p in parts if p.init_metric is not None).compute()
        after = layer_errors(fp_model, qmodel, family, evalset.batches[:4])
    before, after_ranks = _merge_layers(parts, "layers_before"), _merge_layers(parts, "layers_after")
    failures = []
    mismatch = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(after, after_ranks)), default=0.0)
    if len(after) != len(after_ranks) or mismatch > ASSEMBLY_TOLERANCE:
        failures.append(
            f"the assembled model does not reproduce the per-layer error the ranks measured (relative difference "
            f"{mismatch:.2e} > {ASSEMBLY_TOLERANCE}): a module's state was lost or mixed up in transfer"
        )
    extra = {
        "metrics_before_reconstruction": init_metrics,
        "reconstruction": {
            "partition": [s.describe() for s in specs],
            "cache": "stream",
            "world_size": layout.world_size,
            "backend": ctx.dist.backend,
            "queue": cfg.method.queue,
            "modules": sorted((m.as_dict() for p in parts for m in p.modules), key=lambda m: m["index"]),
            "ranks": [dict(p.stats, timings_s=p.timings_s) for p in parts],
            "assembly_relative_difference": mismatch,
        },
        "layer_error": {"before": before, "after": after},
        "rank_spans": {p.rank: p.spans for p in parts if p.rank != layout.rank},
    }
    return ctx.finish(qmodel, metrics, extra, failures), qmodel


def assemble(fp_model: torch.nn.Module, family: ModelFamily, scheme: QuantScheme, specs: list[ModuleSpec],
             parts: list[RankPayload]) -> torch.nn.Module:
    """The whole quantized model: the quantized structure of `fp_model`, loaded with the state
    every stage leader sent. Every tensor must come from a rank that holds it; a tensor held by two
    (tied weights) must arrive with the same value from both."""
    merged: dict[str, torch.Tensor] = {}
    source: dict[str, int] = {}
    for part in parts:
        for key, value in part.state.items():
            if key in merged and not torch.equal(merged[key], value):
                raise RuntimeError(f"assembly: {key} was sent by both rank {source[key]} and rank {part.rank}, "
                                   "with different values")
            merged[key], source[key] = value, part.rank
    # Only the structure matters here (every scale is overwritten by the ranks' state), so the
    # initial clip is min-max: the MSE search would be minutes of wasted work on a large model.
    structure = dataclasses.replace(scheme, w_clip="minmax")
    qmodel = quantize_model(copy.deepcopy(fp_model), family, structure, learnable=True)
    expected = set(qmodel.state_dict())
    missing, unexpected = sorted(expected - set(merged)), sorted(set(merged) - expected)
    if missing or unexpected:
        owner = tensor_owner(fp_model, family, specs)
        detail = (f"missing {len(missing)} (e.g. {missing[0]}, owned by module {owner(missing[0])})" if missing else "") + (
            f" unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "")
        raise RuntimeError(f"assembly of the quantized model failed: {detail.strip()}; every rank must run the same "
                           "model, quantization and partition settings")
    qmodel.load_state_dict(merged, strict=True)
    qmodel.requires_grad_(False)
    log.info("assembled the quantized model from %d ranks (%d tensors)", len(parts), len(merged))
    return qmodel


def _merge_layers(parts: list[RankPayload], key: str) -> list[float]:
    sums: dict[int, tuple[float, float]] = {}
    for p in parts:
        sums.update(getattr(p, key))
    return [sums[i][0] / max(sums[i][1], 1e-30) for i in sorted(sums)]
