"""Drop-in quantized replacements for nn.Linear / nn.Embedding, and model-wide helpers.

The modules own a clone of the original weight (the latent FP weight that reconstruction
trains), so training them never modifies the FP model they were built from. The clone is float32
whatever the model dtype (bfloat16 cannot hold the small updates reconstruction makes); the
forward casts the quantized weight to the input's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .ocs import ocs_split, ocs_split_quant_aware
from .quantizers import ActQuantizer, WeightQuantizer, expand_to_rows

__all__ = ["QuantLinear", "QuantEmbedding", "iter_quantizers", "calibrating"]


_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


_KEEP_MATMULS = partial(create_selective_checkpoint_contexts, _keep_matmuls)


class QuantLinear(nn.Module):
    """y = F.linear(aq(x)[..., in_index], wq(weight), bias).

    With ocs_ratio > 0 the weight is OCS-split to [out, in + n] and `in_index` duplicates the
    split input features. Without quantizers (and OCS) it equals the original Linear exactly.
    With outliers (PreQuant, `set_outliers`) the input columns `outlier_index` of the weight are
    replaced by the full-precision `outlier_weight`: y = F.linear(aq(x), wq(weight) with those
    columns swapped in, bias).
    """

    in_index: Tensor | None
    outlier_index: Tensor | None

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: WeightQuantizer | None,
        act_quantizer: ActQuantizer | None,
        ocs_ratio: float = 0.0,
        ocs_quant_aware: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"QuantLinear wraps an nn.Linear, got {type(linear).__name__}: pass the Linear module")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.ocs_ratio = float(ocs_ratio)
        w = linear.weight.detach().float().clone()
        # A None buffer stays out of the state_dict: `in_index` is saved only with OCS.
        self.register_buffer("in_index", None)
        if ocs_ratio != 0:  # ocs_split rejects ratios outside [0, 1]
            w, index = ocs_split(w, ocs_ratio)
            if weight_quantizer is not None and ocs_quant_aware:
                # OCS's quantization-aware split needs the grid step of the split weight, so:
                # quantizer on the plain split -> per-row step -> redo the split with it.
                weight_quantizer.init_from(w)
                step = expand_to_rows(weight_quantizer.dequant_params()[0], w.shape[0]).to(w.dtype)
                w, index = ocs_split_quant_aware(linear.weight.detach(), ocs_ratio, step)
            self.in_index = index
        self.weight = nn.Parameter(w, requires_grad=linear.weight.requires_grad)
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=linear.bias.requires_grad)
        if weight_quantizer is not None:
            weight_quantizer.init_from(self.weight)
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        # None entries stay out of the state_dict: saved only for a PreQuant model.
        self.register_buffer("outlier_index", None)
        self.register_parameter("outlier_weight", None)

    def set_outliers(self, index: Tensor, weight: Tensor | None = None) -> None:
        """Keep the input columns `index` in full precision as the parameter `outlier_weight`
        [out, len(index)], initialised from those columns of the latent (pre-quantization) weight
        unless `weight` is given (a saved model's values)."""
        if self.in_index is not None:
            raise ValueError("outlier columns and OCS splitting do not combine: set quant.ocs_ratio=0 for PreQuant")
        index = torch.as_tensor(index, dtype=torch.long, device=self.weight.device).reshape(-1)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= self.in_features or index.unique().numel() != index.numel():
            raise ValueError(f"outlier columns must be distinct indices in [0, {self.in_features}), got {index.tolist()[:8]}")
        if weight is None:
            weight = self.weight.detach()[:, index]
        if tuple(weight.shape) != (self.out_features, index.numel()):
            raise ValueError(f"outlier_weight must be [{self.out_features}, {index.numel()}], got {tuple(weight.shape)}")
        self.outlier_index = index
        self.outlier_weight = nn.Parameter(weight.detach().clone().to(self.weight.dtype))

    def effective_weight(self) -> Tensor:
        """The weight the layer multiplies with: quantized, outlier columns in full precision."""
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        if self.outlier_index is not None:
            w = w.index_copy(1, self.outlier_index, self.outlier_weight.to(w.dtype))
        return w

    @property
    def ocs_extra(self) -> int:
        """Number of input columns added by OCS."""
        return self.weight.shape[1] - self.in_features

    def inputs(self, x: Tensor) -> Tensor:
        """What the weight multiplies: x fake-quantized, with OCS's split columns duplicated."""
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.inputs(x)
        if torch.is_grad_enabled() and self.weight_quantizer is not None:
            # Training: autograd would keep three weight-sized tensors per projection for the
            # backward pass (the codes before and after the clamp, the fake-quantized weight), 3x
            # the module's weights for every step; recomputing them from (weight, scale) in the
            # backward pass costs one fake quantization. The matmuls' outputs are kept (no matmul
            # is run twice); the gradients are the same, bit for bit (tests/test_quant_modules.py).
            return checkpoint(self._linear, x, use_reentrant=False, context_fn=_KEEP_MATMULS)
        return self._linear(x)

    def _linear(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.effective_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        ocs = f", ocs_ratio={self.ocs_ratio}, ocs_extra={self.ocs_extra}" if self.in_index is not None else ""
        outliers = f", outlier_columns={self.outlier_index.numel()}" if self.outlier_index is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{ocs}{outliers}"


class QuantEmbedding(nn.Module):
    """F.embedding(ids, wq(weight), padding_idx). Per-row (per-token) weight quantization is the
    natural choice here: WeightQuantizer's default granularity='row'."""

    def __init__(self, embedding: nn.Embedding, weight_quantizer: WeightQuantizer | None) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"QuantEmbedding wraps an nn.Embedding, got {type(embedding).__name__}: pass the Embedding module"
            )
        if embedding.max_norm is not None:
            # max_norm renormalises the weight in place during lookup, which would bypass the quantizer.
            raise ValueError("nn.Embedding with max_norm is not supported: rebuild it with max_norm=None")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.scale_grad_by_freq, self.sparse = embedding.scale_grad_by_freq, embedding.sparse
        self.weight = nn.Parameter(embedding.weight.detach().float().clone(), requires_grad=embedding.weight.requires_grad)
        self.out_dtype = embedding.weight.dtype  # what the layers after it run in
        if weight_quantizer is not None:
            weight_quantizer.init_from(self.weight)
        self.weight_quantizer = weight_quantizer

    def forward(self, ids: Tensor) -> Tensor:
        wq = self.weight_quantizer
        if wq is not None and wq.rowwise() and not self.scale_grad_by_freq and not self.sparse:
            # Quantize only the looked-up rows: equal to quantizing the table, ~100x cheaper. The
            # padding row's gradient is masked like F.embedding's padding_idx does.
            out = wq.forward_rows(self.weight, ids)
            if self.padding_idx is not None and self.weight.requires_grad:
                keep = (ids != self.padding_idx).unsqueeze(-1).to(out.dtype)
                out = out * keep + (out * (1 - keep)).detach()
            return out.to(self.out_dtype)
        w = self.weight if wq is None else wq(self.weight)
        return F.embedding(ids, w, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse).to(self.out_dtype)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, WeightQuantizer | ActQuantizer]]:
    """(qualified name, module) for every WeightQuantizer / ActQuantizer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            yield name, module


@contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Calibrate every static ActQuantizer of `model` on the batches run inside the block:

        with torch.no_grad(), calibrating(model):
            for batch in calib_loader:
                model(**batch)

    Scales are computed on a normal exit. On an exception observation is cancelled (scales
    untouched) and the exception propagates. Unnamed quantizers get their module path as name
    so that error messages say which one failed.
    """
    quants = [(n, q) for n, q in iter_quantizers(model) if isinstance(q, ActQuantizer) and q.mode == "static"]
    for name, q in quants:
        if not q.name:
            q.name = name or type(model).__name__
        q.start_observing()
    try:
        yield model
    except BaseException:
        for _, q in quants:
            q.cancel_observing()
        raise
    unseen = []
    for _, q in quants:
        if q.observed_numel == 0:
            unseen.append(q.name)
            q.cancel_observing()
        else:
            q.stop_observing()
    if unseen:
        shown = ", ".join(unseen[:8]) + ("..." if len(unseen) > 8 else "")
        raise RuntimeError(
            f"{len(unseen)} static ActQuantizer(s) saw no activations during calibration ({shown}): "
            "run the calibration batches through these modules, or build them without act quantizers"
        )
