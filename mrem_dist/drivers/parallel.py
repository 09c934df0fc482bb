"""MREM-P (method=mrem_p): every rank trains its module partition, rank 0 coordinates.

On every rank: build the model's skeleton and load the data (the same batches from the same seed
everywhere), cut the partition and build the parallel layout, read only this rank's modules' tensors
from the checkpoint (model.sharded_load; else load the whole model and let go of the rest),
quantize what is left (method.init=gptq: GPTQ down the pipeline, each rank its own layers),
calibrate the static activation ranges through the stream, score the initial quantized model
against full precision through the stream (the last stage keeps the metric state), train
(engine.parallel), score the final model against full precision through the stream again (both
passes also probe the layer errors, the last one takes the assembly check's sums), then the stage
leader sends its modules' state, records and metric states to rank 0. Rank 0, the coordinator,
builds the model's structure from its config (no weights: no rank ever reloads the full-precision
model), assembles the whole quantized model from what every stage sent (a missing tensor is an
error), checks that it computes what the ranks measured (every layer's output and the scored output
on the check batch), validates it and writes the report and the artifact. Only rank 0 writes.

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
from mrem_dist.engine.gptq import gptq_options
from mrem_dist.engine.parallel import RankPipeline
from mrem_dist.engine.records import ModuleRecord, RankPayload
from mrem_dist.engine.shard import holders, owned_state, release_unowned, tensor_owner
from mrem_dist.layout import ParallelLayout
from mrem_dist.log import get_logger
from mrem_dist.models import ModelFamily
from mrem_dist.models.loading import can_load_sharded, load_skeleton
from mrem_dist.models.sharded import materialize, materialized_bytes, replace_tensors
from mrem_dist.quantize import needs_calibration, quantize_model
from mrem_dist.scheme import QuantScheme
from mrem_dist.scoring import output_norms

log = get_logger(__name__)

# Relative difference allowed between the output sums the ranks measured through the stream and
# the ones the coordinator measures on the assembled model (same arithmetic, other order).
ASSEMBLY_TOLERANCE = 1e-3
# The evaluation batches the layer errors are probed on (before and after training), and the ones
# the assembly check reruns on the coordinator, the whole model in one process: one batch finds a
# lost or mixed-up module as surely as more, and it is serial time on rank 0.
PROBE_BATCHES, CHECK_BATCHES = 4, 1


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
        ParallelLayout.build(dist.rank, dist.world_size, cfg.method.modules, cfg.method.replicas)
    settings = ctx.recon_settings()
    sharded = _sharded_load(cfg, dist.world_size)
    with timer("load"):
        loaded = ctx.load(skeleton=sharded)
        model, family, task = loaded.model, loaded.family, loaded.task
        specs = ctx.partition(model)  # from the layer shapes: the same on a skeleton
        layout = ParallelLayout.build(dist.rank, dist.world_size, len(specs), cfg.method.replicas)
        held = set(layout.modules)
        owner = tensor_owner(model, family, specs)
        if sharded:
            by_name = holders(model, owner)
            read = materialize(model, loaded.path, lambda name: bool(by_name[name] & held), ctx.device)
            log.info("rank %d read %.1f MB of its modules' tensors from %s", layout.rank, read / 1e6, loaded.path)
    model.requires_grad_(False)
    calib, evalset = ctx.data.calib, ctx.data.evalset
    fewest = min(b.input_ids.shape[0] for b in calib)
    if fewest < layout.replicas:
        raise ValueError(f"{layout.replicas} replicas per stage split every calibration batch's rows, but a batch has "
                         f"{fewest}: set data.batch_size to at least {layout.replicas} (and data.calib_samples to a "
                         "multiple of it), or use fewer replicas (method.replicas)")
    with timer("quantize"):
        release_unowned(model, owner, held)  # after a sharded load there is nothing left to free
        fp_bytes = materialized_bytes(model)  # the full-precision tensors this rank holds from now on
    # The fingerprint covers the full-precision tensors this stage holds: its inputs.
    checkpoint = ctx.checkpointer(layout, model)
    with timer("quantize"):
        layers = {i for s in specs if s.index in held for i in s.layers}
        qmodel = quantize_model(copy.deepcopy(model), family, ctx.scheme, learnable=True, layers=layers,
                                embeddings=specs[0].index in held)
    kept = sum(p.numel() for p in model.parameters())
    log.info("%s holds %s: %.1fM of %.1fM full-precision parameters", layout.describe(),
             "; ".join(s.describe() for s in specs if s.index in held), kept / 1e6, loaded.num_parameters / 1e6)

    pipe = RankPipeline(model, qmodel, family, specs, layout, ctx.device, cfg.method.queue)
    timer.blocked = pipe.blocked_clock()
    if cfg.method.init == "gptq":
        with timer("gptq"):  # down the pipeline, each rank its own layers
            pipe.gptq(qmodel, family, calib, gptq_options(cfg.method))
    with timer("calibrate"):
        if needs_calibration(qmodel):
            pipe.calibrate(calib)

    def scored(batch, out):
        return task.reduce(batch, out.hidden[-1], out.logits)

    init_metric = task.metric(evalset)
    with timer("evaluate"):  # and the layer errors' probe before training, in the same pass
        before = pipe.evaluate(evalset.batches, scored, init_metric, probe=PROBE_BATCHES)
    # Taken before a checkpoint is loaded: a resumed run returns to the same initial state.
    initial = pipe.initial_states()
    order = list(epoch_order(len(calib), settings.steps, cfg.seed))
    log.info("rank %d: %d steps a module, lam=%s, queue %d", layout.rank, settings.steps, settings.lam, cfg.method.queue)
    with timer("reconstruct"):  # the training steps and the never-worse check
        results, decisions, stats = pipe.train(calib, order, settings, ctx.data.holdout, initial, checkpoint, stop)
        del initial
    final_metric = task.metric(evalset)
    with timer("evaluate"):  # the final model against full precision, stage by stage; probes and the check's sums
        after = pipe.evaluate(evalset.batches, scored, final_metric, probe=PROBE_BATCHES, check=CHECK_BATCHES)

    modules = [
        ModuleRecord(res.index, [spec.start, spec.stop], settings.steps, before, after, round(res.seconds, 3),
                     round(res.wait_seconds, 3), res.losses, res.lams, stats.resumed_from, layout.rank, kept)
        for res, spec, (before, after, kept) in zip(results, pipe.held, decisions)
    ]
    held_fp = {"load": "sharded" if sharded else "whole", "full_precision_bytes": fp_bytes}
    last, leader = layout.is_last_stage, layout.is_leader
    # A replica's modules are its leader's, value for value: only the leader sends them.
    payload = RankPayload(layout.rank, owned_state(qmodel, owner, held) if leader else {}, modules if leader else [],
                          {**stats.as_dict(), **held_fp, "stage": layout.stage, "replica": layout.replica},
                          before.layers, after.layers, init_metric if last else None, final_metric if last else None,
                          after.check, after.output_sq, dict(timer.seconds), list(timer.spans))
    # Nothing of the shard is needed any more (the coordinator builds the model from the payloads).
    del pipe, qmodel, model
    loaded.model = None
    with timer("gather"):
        parts = gather_to_main(payload, dist, layout)
    if parts is None:
        log.info("rank %d: sent modules %s to the coordinator", layout.rank, sorted(held))
        return None
    result = _coordinate(ctx, layout, specs, parts)
    if checkpoint is not None:  # the artifact and report are written: nothing left to resume
        checkpoint.remove()
    return result


def _sharded_load(cfg: RunConfig, world_size: int) -> bool:
    """Whether each rank reads only its own modules' tensors (model.sharded_load, on several ranks).
    The cases where every rank still loads the whole model say why in the log."""
    if world_size == 1 or not cfg.model.sharded_load:
        return False
    if not can_load_sharded(cfg.model.path):
        log.warning("model.path=%s is not a local folder of safetensors weights: every rank loads the whole model and "
                    "frees the other modules (save it with save_pretrained to load only each rank's share)",
                    cfg.model.path)
        return False
    return True


def _coordinate(ctx: RunContext, layout: ParallelLayout, specs: list[ModuleSpec],
                parts: list[RankPayload]) -> tuple[dict, torch.nn.Module]:
    cfg, timer, loaded, evalset = ctx.cfg, ctx.timer, ctx.loaded, ctx.data.evalset
    family = loaded.family
    with timer("assemble"):
        structure = load_skeleton(cfg.model.path, cfg.model.kind, ctx.dtype).model
        qmodel = assemble(structure, family, ctx.scheme, specs, parts).to(ctx.device)
        for p in parts:
            p.state = {}  # the assembled model holds these tensors now
    with timer("evaluate"):  # the assembly check, on the batches the ranks measured it on
        norms, out_sq = output_norms(qmodel, family, loaded.task, evalset.batches[:CHECK_BATCHES])
    # The last stage's replicas scored disjoint batches: their sums and metric states add up.
    lasts = [p for p in parts if p.final_metric is not None]
    measured = [*_merge_check(parts), sum(p.output_sq for p in lasts)]
    failures = []
    mismatch = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip([*norms, out_sq], measured)), default=0.0)
    if len(norms) + 1 != len(measured) or mismatch > ASSEMBLY_TOLERANCE:
        failures.append(
            f"the assembled model does not compute the layer outputs the ranks measured (relative difference "
            f"{mismatch:.2e} > {ASSEMBLY_TOLERANCE}): a module's state was lost or mixed up in transfer"
        )
    metrics = _merge_metrics([p.final_metric for p in lasts]).compute()
    _, init_metrics = _merge_metrics([p.init_metric for p in lasts]).compute()
    before, after = _merge_layers(parts, "layers_before"), _merge_layers(parts, "layers_after")
    extra = {
        "metrics_before_reconstruction": init_metrics,
        "reconstruction": {
            "partition": [s.describe() for s in specs],
            "cache": "stream",
            "world_size": layout.world_size,
            "stages": layout.stages,
            "replicas": layout.replicas,
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


def assemble(structure: torch.nn.Module, family: ModelFamily, scheme: QuantScheme, specs: list[ModuleSpec],
             parts: list[RankPayload]) -> torch.nn.Module:
    """The whole quantized model, built in place in `structure` (consumed: a skeleton from
    load_skeleton, or any model of the architecture; its values do not matter) from the state every
    stage leader sent. Every tensor must come from a rank that holds it; a tensor held by two (tied
    weights) must arrive with the same value from both."""
    merged: dict[str, torch.Tensor] = {}
    source: dict[str, int] = {}
    for part in parts:
        for key, value in part.state.items():
            if key in merged and not torch.equal(merged[key], value):
                raise RuntimeError(f"assembly: {key} was sent by both rank {source[key]} and rank {part.rank}, "
                                   "with different values")
            merged[key], source[key] = value, part.rank
    # The structure's tensors take the values sent (shared, not copied; ties kept), so that the
    # quantizers below start from real weights; one the ranks did not send (a weight whose shape
    # outlier splitting changed, or a missing one, reported below) gets zeros of its shape.
    family.normalize_projections(structure)

    def value(names: list[str], t: torch.Tensor, is_param: bool) -> Optional[torch.Tensor]:
        sent = next((merged[n] for n in names if n in merged), None)
        if sent is not None and sent.shape == t.shape:
            return sent
        return torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else None

    replace_tensors(structure, value)
    # Only the structure matters here (every scale is overwritten by the ranks' state), so the
    # initial clip is min-max: the MSE search would be minutes of wasted work on a large model.
    qmodel = quantize_model(structure, family, dataclasses.replace(scheme, w_clip="minmax"), learnable=True)
    expected = set(qmodel.state_dict())
    missing, unexpected = sorted(expected - set(merged)), sorted(set(merged) - expected)
    if missing or unexpected:
        owner = tensor_owner(qmodel, family, specs)
        detail = (f"missing {len(missing)} (e.g. {missing[0]}, owned by module {owner(missing[0])})" if missing else "") + (
            f" unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "")
        raise RuntimeError(f"assembly of the quantized model failed: {detail.strip()}; every rank must run the same "
                           "model, quantization and partition settings")
    qmodel.load_state_dict(merged, strict=True)
    qmodel.requires_grad_(False)
    log.info("assembled the quantized model from %d ranks (%d tensors)", len(parts), len(merged))
    return qmodel


def _merge_metrics(states: list):
    """The replicas' metric states as one (models/tasks.py: merge adds the later ones into the first)."""
    for other in states[1:]:
        states[0].merge(other)
    return states[0]


def _summed(parts: list[RankPayload], key: str) -> dict[int, tuple[float, ...]]:
    """The ranks' per-layer sums `key` (layer -> a float or a tuple of floats), added up: the
    replicas of a stage measured disjoint batches."""
    sums: dict[int, tuple[float, ...]] = {}
    for p in parts:
        for layer, values in getattr(p, key).items():
            values = values if isinstance(values, tuple) else (values,)
            sums[layer] = tuple(a + b for a, b in zip(sums[layer], values)) if layer in sums else values
    return dict(sorted(sums.items()))


def _merge_layers(parts: list[RankPayload], key: str) -> list[float]:
    """Every layer's relative error ||h_q - h||^2 / ||h||^2 from the ranks' probe sums `key`."""
    return [num / max(den, 1e-30) for num, den, _ in _summed(parts, key).values()]


def _merge_check(parts: list[RankPayload]) -> list[float]:
    """Every layer's ||h_q||^2 on the check batches, from the ranks that ran them."""
    return [qq for (qq,) in _summed(parts, "check").values()]
