"""GPTQ over a whole model (method=gptq, and init=gptq for the reconstruction methods).

As the reference implementation does: the layers are calibrated one after another, each on the
outputs of the layers before it *already quantized by GPTQ*; within a layer, one forward pass over
the calibration batches collects the Hessian 2/n X^T X of every Linear's input (the reference's
default; its `--true-sequential` option, re-running the layer after each group of Linears, is not
implemented), then every Linear is quantized column by column (quant/gptq.py) and the layer's
outputs are recomputed with the quantized weights for the next layer.

The result is written into the model's own QuantLinears: the latent weight becomes GPTQ's
quantized weight and the weight quantizer's scales / zero points GPTQ's, so the fake-quantized
forward reproduces GPTQ's weights exactly, and a reconstruction method trains on from there.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor, nn

from mrem_dist.data import Batch
from mrem_dist.log import get_logger
from mrem_dist.models.families import ModelFamily
from mrem_dist.quant import QuantLinear
from mrem_dist.quant.gptq import GptqOptions, HessianAccumulator, gptq_quantize

log = get_logger(__name__)


def gptq_options(method) -> GptqOptions:
    """The GPTQ settings of a run's MethodConfig (method.gptq_*)."""
    return GptqOptions(method.gptq_block_size, method.gptq_damp, method.gptq_act_order)


def _targets(layer: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]


@torch.no_grad()
def apply_result(module: QuantLinear, result) -> None:
    """Put GPTQ's weight and grid into a QuantLinear (in place; LSQ step sizes stay Parameters)."""
    wq = module.weight_quantizer
    module.weight.copy_(result.weight.to(module.weight.dtype))
    wq.scale.copy_(result.scale.reshape(-1, 1))
    if wq.zero_point is not None:
        wq.zero_point.copy_(result.zero_point.reshape(-1, 1))


def gptq_bits(module: QuantLinear) -> tuple[int, bool, int]:
    """(bits, symmetric, group size: 0 per row) of a QuantLinear's weight quantizer; GPTQ takes
    per-row scales or groups of input columns on the restricted (or asymmetric) grid only."""
    wq = module.weight_quantizer
    if wq.granularity not in ("row", "input_group") or wq.ternary or wq.full_range or module.in_index is not None:
        raise ValueError("GPTQ quantizes with one scale per row or per group of input columns on the plain integer "
                         "grid: use quant.w_granularity=row or input_group, no ternary / full-range grid, no OCS")
    return wq.bits, wq.symmetric, wq.group_size


@torch.no_grad()
def gptq_model(qmodel: nn.Module, family: ModelFamily, batches: list[Batch], options: GptqOptions) -> dict[str, float]:
    """Run GPTQ on every quantized Linear of `qmodel`'s layers, in place; returns each Linear's
    Hessian-weighted error (the calibration output error it minimises), by qualified name."""
    return gptq_layers(qmodel, family, batches, options)[0]


@torch.no_grad()
def gptq_layers(qmodel: nn.Module, family: ModelFamily, batches: list[Batch], options: GptqOptions,
                layers: Optional[list[int]] = None,
                hidden: Optional[list[Tensor]] = None) -> tuple[dict[str, float], list[Tensor]]:
    """GPTQ of the consecutive `layers` (indices; default all) of `qmodel`, in place, fed with
    `hidden`: the first one's input on every batch (default: the embeddings' output). An MREM-P
    rank runs its own layers on what the previous stage's GPTQ-quantized layers computed
    (RankPipeline.gptq). Returns each Linear's error and the last layer's output on every batch."""
    config = family.config(qmodel)
    prefix = family.layer_prefix(qmodel)
    if hidden is None:
        hidden = [family.embed(family.embeddings(qmodel), b) for b in batches]
    contexts = [family.layer_context(config, h, b) for h, b in zip(hidden, batches)]
    errors: dict[str, float] = {}
    all_layers = family.layers(qmodel)
    indices = list(range(len(all_layers))) if layers is None else list(layers)
    start = time.perf_counter()
    for done, index in enumerate(indices, 1):
        layer = all_layers[index]
        targets = _targets(layer)
        hessians = {n: HessianAccumulator(f"{prefix}.{index}.{n}", m.in_features) for n, m in targets}
        hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: hessians[n].add(args[0])) for n, m in targets]
        try:
            for h, c in zip(hidden, contexts):
                family.run_layer(layer, h, c)
        finally:
            for hook in hooks:
                hook.remove()
        for name, module in targets:
            bits, symmetric, group_size = gptq_bits(module)
            result = gptq_quantize(module.weight, hessians[name].hessian, bits, symmetric, group_size, options,
                                   name=f"{prefix}.{index}.{name}")
            apply_result(module, result)
            errors[f"{prefix}.{index}.{name}"] = result.error
        hidden = [family.run_layer(layer, h, c) for h, c in zip(hidden, contexts)]
        log.info("gptq: layer %d (%d/%d, %d Linears) done, %.1f s", index + 1, done, len(indices), len(targets),
                 time.perf_counter() - start)
    return errors, hidden
