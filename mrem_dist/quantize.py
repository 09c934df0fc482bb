"""Turn a model into its fake-quantized copy under a quantization scheme (the W-E-A settings).

What is quantized, and why:
- every nn.Linear inside the transformer layers: weights at `w_bits`, their input activations at
  `a_bits` (static per-tensor from calibration, or token-wise dynamic);
- the word embeddings at `e_bits` (the E of W-E-A), per row (one scale per token);
- kept in full precision: position/type embeddings (tiny), LayerNorms, biases, softmax and the
  attention score matmuls, the pooler and the classification head. These are the conventions of
  the MREM/TernaryBERT line of work; they cost well under 1% of the weights of a BERT-base.
"""

from __future__ import annotations

import copy
from typing import Collection, Iterable, Iterator, Optional

import torch
from torch import nn

from mrem_dist.log import get_logger
from mrem_dist.models.families import ModelFamily
from mrem_dist.quant import ActQuantizer, QuantEmbedding, QuantLinear, WeightQuantizer, calibrating
from mrem_dist.scheme import QuantScheme

log = get_logger(__name__)


def weight_grid(scheme: QuantScheme) -> str:
    return "ternary" if scheme.ternary else "full" if scheme.w_full_range else "restricted"


def weight_quantizer(scheme: QuantScheme, learnable: bool = True) -> WeightQuantizer:
    return WeightQuantizer(
        bits=scheme.w_bits,
        symmetric=scheme.w_symmetric,
        granularity=scheme.w_granularity,
        groups=scheme.w_group_size if scheme.w_granularity == "input_group" else scheme.w_groups,
        clip=scheme.w_clip,
        prior=scheme.aciq_prior,
        grid=weight_grid(scheme),
        learnable=learnable,
    )


def act_quantizer(scheme: QuantScheme, name: str, learnable: bool = True) -> ActQuantizer | None:
    if scheme.a_bits is None:
        return None
    return ActQuantizer(
        bits=scheme.a_bits,
        mode=scheme.a_mode,
        symmetric=scheme.a_symmetric,
        clip=scheme.a_clip,
        learnable=learnable,
        name=name,
        full_range=scheme.a_full_range,
    )


def quantize_layers(layers: Iterable[tuple[str, nn.Module]], scheme: QuantScheme, learnable: bool = True) -> int:
    """Replace every nn.Linear inside the given (name, layer) pairs by a QuantLinear, in place.
    Returns the number of Linears replaced."""
    count = 0
    for layer_name, layer in layers:
        for name, child in list(_linears(layer)):
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            full = f"{layer_name}.{name}"
            if not torch.isfinite(child.weight).all():
                raise ValueError(f"{full} has NaN/inf weights: the checkpoint is corrupt or was saved after a diverged run")
            try:
                qlinear = QuantLinear(
                    child,
                    weight_quantizer(scheme, learnable),
                    act_quantizer(scheme, full, learnable),
                    ocs_ratio=scheme.ocs_ratio,
                    ocs_quant_aware=scheme.ocs_quant_aware,
                )
            except ValueError as e:  # e.g. a group count that does not divide this weight's rows
                raise ValueError(f"cannot quantize {full} (weight {tuple(child.weight.shape)}): {e}") from e
            setattr(parent, attr, qlinear)
            count += 1
    return count


def _linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and not isinstance(child, QuantLinear):
            yield name, child


def quantize_model(
    model: nn.Module,
    family: ModelFamily,
    scheme: QuantScheme,
    learnable: bool = True,
    layers: Optional[Collection[int]] = None,
    embeddings: bool = True,
) -> nn.Module:
    """Quantize `model` in place (callers keeping the FP model quantize `copy_to_quantize(model, ...)`).

    Projections that are not nn.Linear are first normalized into nn.Linear by the family (a layer
    with none left is an error). `layers` (indices) and `embeddings` restrict it to a partition:
    a rank of MREM-P quantizes only the modules it holds."""
    family.normalize_projections(model)
    prefix = family.layer_prefix(model)
    chosen = [
        (f"{prefix}.{i}", layer) for i, layer in enumerate(family.layers(model)) if layers is None or i in layers
    ]
    n = quantize_layers(chosen, scheme, learnable)
    if scheme.e_bits is not None and embeddings:
        emb = family.word_embeddings(model)
        wq = WeightQuantizer(
            bits=scheme.e_bits,
            symmetric=True,
            granularity=scheme.e_granularity,
            clip=scheme.w_clip,
            prior=scheme.aciq_prior,
            grid="full" if scheme.w_full_range else "restricted",
            learnable=learnable,
        )
        family.set_word_embeddings(model, QuantEmbedding(emb, wq))
    log.info(
        "quantized %d Linear layers to W%d%s, word embeddings %s, activations %s",
        n,
        scheme.w_bits,
        " (ternary)" if scheme.ternary else "",
        ("not held here" if not embeddings else f"E{scheme.e_bits}" if scheme.e_bits else "full precision"),
        f"A{scheme.a_bits} {scheme.a_mode}" if scheme.a_bits else "full precision",
    )
    return model


def copy_to_quantize(model: nn.Module, family: ModelFamily, scheme: QuantScheme) -> nn.Module:
    """A deep copy of `model` for `quantize_model`, sharing with `model` the large tensors the
    quantized model keeps in full precision and never trains: the word embeddings when the scheme
    leaves them unquantized (e_bits=None, the W-A16 schemes) and the output head (an LM head, tied
    to them or not). A decoder's 49K x 576 embedding is a fifth of SmolLM2: one copy less on the
    ranks that hold it. Nothing writes into them (training, GPTQ and the export read them), so the
    full-precision model stays what was loaded."""
    shared = []
    if scheme.e_bits is None:
        shared.append(family.word_embeddings(model).weight)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and isinstance(getattr(head, "weight", None), torch.Tensor):
        shared.append(head.weight)
    return copy.deepcopy(model, memo={id(t): t for t in shared})


@torch.no_grad()
def calibrate_activations(model: nn.Module, run_batch, batches: list) -> None:
    """Run calibration batches through `model` with every static activation quantizer observing;
    `run_batch(model, batch)` is the forward. Non-finite activations raise FloatingPointError."""
    with calibrating(model):
        for batch in batches:
            run_batch(model, batch)


def needs_calibration(model: nn.Module) -> bool:
    return any(isinstance(m, ActQuantizer) and m.mode == "static" for m in model.modules())
