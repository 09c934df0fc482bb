"""MREM-P (method=mrem_p): every rank trains its module partition, rank 0 coordinates.

On every rank: build the model's skeleton and load the data (the same batches from the same seed
everywhere), cut the partition and build the parallel layout, read only this rank's modules' tensors
from the checkpoint (model.sharded_load; else load the whole model and let go of the rest),
quantize what is left (method.init=gptq: GPTQ down the pipeline, each rank its own layers),
calibrate the static activation ranges through the stream, score the initial quantized model
against full precision through the stream (the last stage keeps the metric state), train
(engine.parallel), score the final model against full precision through the stream again (both
passes also probe the layer errors). Then each stage leader validates its own modules
(validation.check_model) and makes its shard of every export format (artifact/shard.py: packed
codes, scales, the rest of its state, as the files store them), all stages at once, and sends rank
0 its records, metric states, findings and the shards' manifests (names, dtypes, shapes, SHA-256;
no tensor). Rank 0, the coordinator, builds the model's structure on the meta device from its
config (no rank ever reloads the full-precision model), checks that every tensor of the model is
held by a stage, validates, and writes the report; then it lays each file out from the merged
manifests and asks the leaders for their tensors one rank at a time, writing each as it arrives,
checked against its sender's hash on arrival and once more in the finished file: no process holds
the whole quantized model. Only rank 0 writes.

A single process (no launcher) runs the same code with world size 1: its one rank trains every
module in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mrem_dist.artifact.formats import make_shard, write_format
from mrem_dist.artifact.shard import ExportInfo, Manifest, Shard, state_digest, tensor_sha256
from mrem_dist.config import RunConfig, export_formats
from mrem_dist.context import RunContext
from mrem_dist.distributed import (DistContext, gather_to_main, init_distributed, recv_bytes, recv_object, send_bytes,
                                   send_object, teardown_distributed)
from mrem_dist.engine import ModuleSpec, epoch_order
from mrem_dist.engine.checkpoint import Preempted, StopSignal
from mrem_dist.engine.gptq import gptq_options
from mrem_dist.engine.parallel import RankPipeline
from mrem_dist.engine.records import ModuleRecord, RankPayload
from mrem_dist.engine.shard import Owner, holders, holds, owned_state, release_unowned, tensor_owner
from mrem_dist.layout import ParallelLayout
from mrem_dist.log import get_logger
from mrem_dist.models.loading import can_load_sharded, load_skeleton
from mrem_dist.models.sharded import materialize, materialized_bytes
from mrem_dist.quantize import copy_to_quantize, needs_calibration, quantize_model
from mrem_dist.validation import Structure

log = get_logger(__name__)

# The evaluation batches the layer errors are probed on, before and after training.
PROBE_BATCHES = 4


def run_parallel(cfg: RunConfig) -> Optional[tuple[dict, Optional[torch.nn.Module]]]:
    """Join the process group the launcher described (none for a single process) and run this
    rank's share. Returns on rank 0 (report, the quantized model) in a single process, (report,
    None) on several ranks (no process holds the whole model: it is the artifact, and the report's
    reconstruction.state_sha256 digests its state); None on the other ranks."""
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


def _run_rank(ctx: RunContext, stop: StopSignal) -> Optional[tuple[dict, Optional[torch.nn.Module]]]:
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
        qmodel = quantize_model(copy_to_quantize(model, family, ctx.scheme), family, ctx.scheme, learnable=True,
                                layers=layers, embeddings=specs[0].index in held)
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
        probed_before = pipe.evaluate(evalset.batches, scored, init_metric, probe=PROBE_BATCHES)
    # Taken before a checkpoint is loaded: a resumed run returns to the same initial state.
    initial = pipe.initial_states()
    order = list(epoch_order(len(calib), settings.steps, cfg.seed))
    log.info("rank %d: %d steps a module, lam=%s, queue %d", layout.rank, settings.steps, settings.lam, cfg.method.queue)
    with timer("reconstruct"):  # the training steps and the never-worse check
        results, decisions, stats = pipe.train(calib, order, settings, ctx.data.holdout, initial, checkpoint, stop)
        del initial
    final_metric = task.metric(evalset)
    with timer("evaluate"):  # the final model against full precision, stage by stage, and its probes
        probed_after = pipe.evaluate(evalset.batches, scored, final_metric, probe=PROBE_BATCHES)

    modules = [
        ModuleRecord(res.index, [spec.start, spec.stop], settings.steps, before, after, round(res.seconds, 3),
                     round(res.wait_seconds, 3), res.losses, res.lams, stats.resumed_from, layout.rank, kept)
        for res, spec, (before, after, kept) in zip(results, pipe.held, decisions)
    ]
    held_fp = {"load": "sharded" if sharded else "whole", "full_precision_bytes": fp_bytes}
    last, leader = layout.is_last_stage, layout.is_leader
    # A replica's modules are its leader's, value for value: only the leader sends them.
    shards, structure, digests, covers = {}, Structure(), {}, []
    with timer("pack"):  # this stage's share of the validation and of the export, at the same time as the others'
        if leader:
            info, mine = ctx.export_info(), holds(qmodel, owner, held)
            shards = {fmt: make_shard(info, fmt, qmodel, mine) for fmt in export_formats(cfg.export)}
            structure = Structure.of(qmodel)
            digests = {name: tensor_sha256(t) for name, t in owned_state(qmodel, owner, held).items()}
            covers = list(filter(holds(model, owner, held), model.state_dict()))
    payload = RankPayload(
        layout.rank, {fmt: shard.manifest(layout.rank) for fmt, shard in shards.items()}, structure, digests, covers,
        modules if leader else [], {**stats.as_dict(), **held_fp, "stage": layout.stage, "replica": layout.replica},
        probed_before, probed_after, init_metric if last else None, final_metric if last else None,
        dict(timer.seconds), list(timer.spans))
    whole = qmodel if dist.world_size == 1 else None  # one process: the model is whole here, the caller gets it
    # Nothing else of the model is needed any more: the shards hold what the files will.
    del pipe, qmodel, model
    loaded.model = None
    with timer("gather"):
        parts = gather_to_main(payload, dist, layout)
    if parts is None:
        if leader:
            serve_shards(shards, dist)
        log.info("rank %d: sent modules %s to the coordinator", layout.rank, sorted(held))
        return None
    report = _coordinate(ctx, layout, specs, parts, shards)
    if checkpoint is not None:  # the artifact and report are written: nothing left to resume
        checkpoint.remove()
    return report, whole


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


def _coordinate(ctx: RunContext, layout: ParallelLayout, specs: list[ModuleSpec], parts: list[RankPayload],
                shards: dict[str, Shard]) -> dict:
    cfg, timer, loaded = ctx.cfg, ctx.timer, ctx.loaded
    with timer("assemble"):
        # The model's structure from its config, on the meta device (no weights): its names, its
        # class and config for the files.
        skeleton = load_skeleton(cfg.model.path, cfg.model.kind, ctx.dtype).model
        final = StreamedModel(parts, shards, skeleton, ctx.export_info(), ctx.dist)
        failures = final.coverage(tensor_owner(skeleton, loaded.family, specs))
        digests = {name: d for p in parts for name, d in p.digests.items()}
    # The last stage's replicas scored disjoint batches: their sums and metric states add up.
    lasts = [p for p in parts if p.final_metric is not None]
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
            "state_sha256": state_digest(digests),
        },
        "layer_error": {"before": before, "after": after},
        "rank_spans": {p.rank: p.spans for p in parts if p.rank != layout.rank},
    }
    return ctx.finish(final, metrics, extra, failures)


def serve_shards(shards: dict[str, Shard], dist: DistContext) -> None:
    """A stage leader's side of the streamed export: send the coordinator the tensors it asks for,
    format by format (StreamedModel._stream), until it says it is done."""
    while (request := recv_object(0, dist, "waiting for the coordinator's export requests from")) is not None:
        fmt, names = request
        for name in names:
            send_bytes(shards[fmt].tensors[name], 0, dist)


@dataclass
class StreamedModel:
    """The final model of an MREM-P run on the coordinator (RunContext.finish's FinalModel): the
    stage leaders' shards of every export format, known by their manifests; rank 0's own in
    memory, every other leader's requested tensor by tensor while the files are written, so that
    no process holds the whole quantized model. Names two ranks hold (a tied tensor) come from the
    lower rank only."""

    parts: list[RankPayload]
    own: dict[str, Shard]  # this process's shards, by format
    skeleton: torch.nn.Module  # the model on the meta device: its config, class and names
    info: ExportInfo
    dist: DistContext
    _busy: Optional[int] = None  # a rank whose stream was broken off: it cannot take a request any more

    def coverage(self, owner: Owner) -> list[str]:
        """The assembly's failures: a tensor of the model no stage holds."""
        covered = {name for p in self.parts for name in p.covers}
        missing = [name for name in self.skeleton.state_dict() if name not in covered]
        if not missing:
            return []
        return [f"no rank sent {len(missing)} of the model's tensors (e.g. {missing[0]}, owned by module "
                f"{owner(missing[0])}): every rank must run the same model, quantization and partition settings"]

    def structure(self) -> Structure:
        return sum((p.structure for p in self.parts), Structure())

    def write(self, fmt: str, path) -> int:
        merged = Manifest.merge({p.rank: p.manifests[fmt] for p in self._leaders()})
        return write_format(self.info, fmt, path, merged, self._stream(fmt, merged), self.skeleton)

    def _leaders(self) -> list[RankPayload]:
        return [p for p in self.parts if p.stats["replica"] == 0]

    def _stream(self, fmt: str, merged: Manifest):
        me = self.dist.rank
        own = self.own[fmt].tensors
        yield from ((name, own[name]) for name in own if merged.ranks[name] == me)
        for p in self._leaders():
            if p.rank == me:
                continue
            names = [name for name in p.manifests[fmt].specs if merged.ranks[name] == p.rank]
            self._busy = p.rank
            send_object((fmt, names), p.rank, self.dist, "asking for the artifact's tensors")
            for name in names:
                spec = merged.specs[name]
                yield name, recv_bytes(spec.dtype, spec.shape, p.rank, self.dist)
            self._busy = None

    def done(self) -> None:
        for p in self._leaders():
            if p.rank not in (self.dist.rank, self._busy):
                send_object(None, p.rank, self.dist, "closing the export with")


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
