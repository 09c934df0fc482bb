"""A parallel run (method=mrem_p): every rank trains its module partition, rank 0 coordinates.

On every rank: load the model and data (the same batches from the same seed everywhere), cut the
partition, let go of every weight outside this rank's modules, quantize what is left, calibrate
the static activation ranges through the stream, train (engine.parallel), then send the trained
modules' state to rank 0. Rank 0, the coordinator, computes the full-precision reference outputs
before letting go of its share of the model, and at the end assembles the whole quantized model
from what every rank sent (each tensor has exactly one owner: a missing or duplicated one is an
error), validates it end to end, and writes the report. Only rank 0 writes.

A single process (no launcher) runs the same code with world size 1: its one rank trains every
module in lockstep.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Optional

import torch

from mrem_dist.config import RunConfig
from mrem_dist.data import mean_pool
from mrem_dist.distributed import DistContext, gather_to_main, init_distributed, rank_modules, teardown_distributed
from mrem_dist.engine import ReconSettings, epoch_order, lam_at, partition
from mrem_dist.engine.checkpoint import Preempted, StopSignal
from mrem_dist.engine.parallel import RankPipeline
from mrem_dist.engine.shard import owned_state, release_unowned, tensor_owner
from mrem_dist.evaluate import compare, layer_errors, model_outputs
from mrem_dist.log import get_logger
from mrem_dist.models import load_model
from mrem_dist.pipeline import Timer, build_report, finish, load_inputs, make_checkpointer, recon_settings
from mrem_dist.quantize import needs_calibration, quantize_model

log = get_logger(__name__)

# Relative difference allowed between the per-layer error the ranks measured through the stream
# and the one the coordinator measures on the assembled model (same arithmetic, other order).
ASSEMBLY_TOLERANCE = 1e-3


def run_parallel(cfg: RunConfig) -> Optional[tuple[dict, torch.nn.Module]]:
    """Join the process group the launcher described (none for a single process) and run this
    rank's share. Returns (report, assembled quantized model) on rank 0, None elsewhere."""
    ctx = init_distributed(cfg.device, cfg.timeout_s)
    try:
        with StopSignal() as stop:
            return _run_rank(cfg, ctx, stop)
    except Preempted:
        raise
    except BaseException as e:
        if ctx.world_size > 1:
            log.error("rank %d of %d failed: %s: %s", ctx.rank, ctx.world_size, type(e).__name__, e)
        raise
    finally:
        teardown_distributed()


def _run_rank(cfg: RunConfig, ctx: DistContext, stop: StopSignal) -> Optional[tuple[dict, torch.nn.Module]]:
    if cfg.method.modules:  # fail before loading anything (modules=0 needs the layer count)
        rank_modules(cfg.method.modules, ctx.world_size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device, timer, t0 = ctx.device, Timer(), time.perf_counter()
    settings: ReconSettings = recon_settings(cfg.method)

    with timer("load"):
        loaded, prepared = load_inputs(cfg)
    model, adapter = loaded.model.to(device), loaded.adapter
    model.requires_grad_(False)
    calib = [b.to(device) for b in prepared.calib]
    eval_batches = [b.to(device) for b in prepared.evalset.batches]
    checkpoint = make_checkpointer(cfg, ctx.rank, ctx.world_size, model, calib)
    with timer("quantize"):
        specs = partition(model, adapter, cfg.method.modules, cfg.method.balance, cfg.data.max_length)
        held = set(rank_modules(len(specs), ctx.world_size)[ctx.rank])
    fp_out = None
    if ctx.is_main:
        with timer("evaluate"):  # the reference, while this rank still has the whole model
            fp_out = model_outputs(model, adapter, eval_batches)

    owner = tensor_owner(model, adapter, specs)
    with timer("quantize"):
        release_unowned(model, owner, held)
        layers = {i for s in specs if s.index in held for i in s.layers}
        qmodel = quantize_model(copy.deepcopy(model), adapter, cfg.quant, learnable=True, layers=layers,
                                embeddings=specs[0].index in held)
    kept = sum(p.numel() for p in model.parameters())
    log.info("rank %d of %d holds %s: %.1fM of %.1fM full-precision parameters", ctx.rank, ctx.world_size,
             "; ".join(s.describe() for s in specs if s.index in held), kept / 1e6, loaded.num_parameters / 1e6)

    pipe = RankPipeline(model, qmodel, adapter, specs, ctx.rank, ctx.world_size, device, cfg.method.queue)
    with timer("calibrate"):
        if needs_calibration(qmodel):
            pipe.calibrate(calib)
    lam_end = lam_at(settings.lam, settings.steps - 1, settings.steps, settings.t0)
    probe_calib, probe_eval = calib[:4], eval_batches[:4]

    def reduce(batch, out):
        return out.logits if out.logits is not None else mean_pool(out.hidden[-1], batch.attention_mask)

    with timer("evaluate"):
        init_outputs = pipe.final_outputs(eval_batches, reduce)
        err_before, _ = pipe.probe(probe_calib, lam_end, settings.loss)
        _, layers_before = pipe.probe(probe_eval, 0.0, settings.loss)
    order = list(epoch_order(len(calib), settings.steps, cfg.seed))
    log.info("rank %d: %d steps a module, lam=%s, queue %d", ctx.rank, settings.steps, settings.lam, cfg.method.queue)
    with timer("reconstruct"):
        results, stats = pipe.train(calib, order, settings, checkpoint, stop)
    with timer("evaluate"):
        err_after, _ = pipe.probe(probe_calib, lam_end, settings.loss)
        _, layers_after = pipe.probe(probe_eval, 0.0, settings.loss)

    modules = [
        {
            "index": res.index, "rank": ctx.rank, "layers": [spec.start, spec.stop], "steps": settings.steps,
            "error_before": err_before[res.index], "error_after": err_after[res.index],
            "seconds": round(res.seconds, 3), "wait_seconds": round(res.wait_seconds, 3), "losses": res.losses,
            "lams": res.lams, "resumed_from": stats.resumed_from,
        }
        for res, spec in zip(results, pipe.held)
    ]
    payload = {
        "rank": ctx.rank, "state": owned_state(qmodel, owner, held), "modules": modules, "stats": stats.as_dict(),
        "layers_before": layers_before, "layers_after": layers_after, "init_outputs": init_outputs,
        "timings_s": dict(timer.seconds),
    }
    # A lone rank freed nothing: its full-precision model serves the coordinator as it is. Otherwise
    # nothing of the shard is needed any more (the coordinator rebuilds the whole model): free it.
    whole_fp = model if ctx.world_size == 1 else None
    del pipe, qmodel, model
    loaded.model = None
    with timer("gather"):
        parts = gather_to_main(payload, ctx)
    if parts is None:
        log.info("rank %d: sent modules %s to the coordinator", ctx.rank, sorted(held))
        return None
    result = _coordinate(cfg, ctx, loaded, prepared, specs, parts, fp_out, eval_batches, timer, t0, whole_fp)
    if checkpoint is not None:  # the artifact and report are written: nothing left to resume
        checkpoint.remove()
    return result


def _coordinate(cfg, ctx, loaded, prepared, specs, parts, fp_out, eval_batches, timer, t0,
                whole_fp) -> tuple[dict, torch.nn.Module]:
    adapter, device = loaded.adapter, ctx.device
    with timer("assemble"):
        fp_model = whole_fp
        if fp_model is None:
            # The ranks let go of the full-precision weights outside their partitions: load them again.
            fp_model = load_model(cfg.model.path, cfg.model.kind, cfg.model.dtype).model.to(device)
            fp_model.requires_grad_(False)
        qmodel = assemble(fp_model, adapter, cfg, specs, parts)
    with timer("evaluate"):
        q_out = model_outputs(qmodel, adapter, eval_batches)
        fp_metrics, q_metrics = compare(fp_out, q_out, prepared.evalset)
        init_out = torch.cat([o for p in parts for o in p["init_outputs"]])
        _, init_metrics = compare(fp_out, init_out, prepared.evalset)
        after = layer_errors(fp_model, qmodel, adapter, eval_batches[:4])
    before, after_ranks = _merge_layers(parts, "layers_before"), _merge_layers(parts, "layers_after")
    failures = []
    mismatch = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(after, after_ranks)), default=0.0)
    if len(after) != len(after_ranks) or mismatch > ASSEMBLY_TOLERANCE:
        failures.append(
            f"the assembled model does not reproduce the per-layer error the ranks measured (relative difference "
            f"{mismatch:.2e} > {ASSEMBLY_TOLERANCE}): a module's state was lost or mixed up in transfer"
        )
    timer.seconds["total"] = round(time.perf_counter() - t0, 3)
    extra = {
        "metrics_before_reconstruction": init_metrics,
        "reconstruction": {
            "partition": [s.describe() for s in specs],
            "cache": "stream",
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "queue": cfg.method.queue,
            "modules": sorted((m for p in parts for m in p["modules"]), key=lambda m: m["index"]),
            "ranks": [dict(p["stats"], timings_s=p["timings_s"]) for p in parts],
            "assembly_relative_difference": mismatch,
        },
        "layer_error": {"before": before, "after": after},
    }
    report = build_report(cfg, loaded, prepared, fp_metrics, q_metrics, extra, timer, device)
    return finish(cfg, report, qmodel, loaded, failures), qmodel


def assemble(fp_model: torch.nn.Module, adapter, cfg: RunConfig, specs, parts: list[dict]) -> torch.nn.Module:
    """The whole quantized model: the quantized structure of `fp_model`, loaded with the state
    every rank sent. Every tensor must come from exactly one rank."""
    merged: dict[str, torch.Tensor] = {}
    source: dict[str, int] = {}
    for part in parts:
        for key, value in part["state"].items():
            if key in merged:
                raise RuntimeError(f"assembly: {key} was sent by both rank {source[key]} and rank {part['rank']}")
            merged[key], source[key] = value, part["rank"]
    # Only the structure matters here (every scale is overwritten by the ranks' state), so the
    # initial clip is min-max: the MSE search would be minutes of wasted work on a large model.
    structure = dataclasses.replace(cfg.quant, w_clip="minmax")
    qmodel = quantize_model(copy.deepcopy(fp_model), adapter, structure, learnable=True)
    expected = set(qmodel.state_dict())
    missing, unexpected = sorted(expected - set(merged)), sorted(set(merged) - expected)
    if missing or unexpected:
        owner = tensor_owner(fp_model, adapter, specs)
        detail = (f"missing {len(missing)} (e.g. {missing[0]}, owned by module {owner(missing[0])})" if missing else "") + (
            f" unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "")
        raise RuntimeError(f"assembly of the quantized model failed: {detail.strip()}; every rank must run the same "
                           "model, quantization and partition settings")
    qmodel.load_state_dict(merged, strict=True)
    qmodel.requires_grad_(False)
    log.info("assembled the quantized model from %d ranks (%d tensors)", len(parts), len(merged))
    return qmodel


def _merge_layers(parts: list[dict], key: str) -> list[float]:
    sums: dict[int, tuple[float, float]] = {}
    for p in parts:
        sums.update(p[key])
    return [sums[i][0] / max(sums[i][1], 1e-30) for i in sorted(sums)]
