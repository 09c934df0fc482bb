"""Real integer inference: Linear layers that run an INT8 x INT8 -> INT32 GEMM.

`Int8Linear` quantizes its input to integer codes exactly as the fake-quant `ActQuantizer` does
(static per-tensor, or token-wise dynamic), multiplies them with the int8 weight codes in an integer
kernel, and rescales the int32 sums: y = acc * s_x * s_w + b. W4 / W2 codes are held as int8 (the
kernels have no narrower type). `Int8Embedding` keeps the table as int8 codes and dequantizes only
the looked-up rows. `to_int8(model)` swaps every quantized module of a fake-quant model in place.

Kernels (`BACKENDS`), chosen explicitly or by device; there is no float fallback inside:
- onednn (CPU): `torch.ops.onednn.qlinear_pointwise`, u8 activations x s8 weights, float32 output.
  On x86 CPUs without VNNI the u8*s8 products are summed in pairs in int16 (vpmaddubsw), which
  saturates once |weight code| > 64, i.e. for 8-bit weights. `cpu_int8_code_limit()` measures this
  on the running CPU once, and 8-bit weights are then refused instead of computed wrong.
- int_mm (CUDA; also runs on CPU, slowly, which is how the tests check it): `torch._int_mm`, s8 x s8
  with int32 output. cuBLASLt wants more than 16 rows and K, N multiples of 8: padded here.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import qrange, tokenwise_scale
from .modules import QuantEmbedding, QuantLinear
from .quantizers import expand_to_rows

__all__ = ["KERNELS", "BACKENDS", "Int8Linear", "Int8Embedding", "backend_for", "cpu_int8_code_limit", "to_int8"]

# How a loaded artifact computes: "float" dequantizes (the fake-quant reference), "int8" runs integer GEMMs.
KERNELS = ("float", "int8")
# The integer GEMM: oneDNN's u8 x s8 on CPU, torch._int_mm on CUDA.
BACKENDS = ("onednn", "int_mm")


def backend_for(device: torch.device | str) -> str:
    """The integer kernel for a device: onednn on CPU, torch._int_mm on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return "int_mm"
    if device.type == "cpu":
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")):
            raise RuntimeError(
                "this torch build has no oneDNN INT8 linear kernel (torch.ops.onednn.qlinear_pointwise): "
                "install an x86 torch wheel with oneDNN, pass backend='int_mm' (slow on CPU), or load with kernel='float'"
            )
        return "onednn"
    raise ValueError(f"no INT8 kernel for device {device}: use a CPU or CUDA device, or kernel='float'")


def _onednn_linear(qx: Tensor, x_scale: float, x_zp: int, packed: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    zeros = torch.zeros(w_scale.shape[0], dtype=torch.int32)
    return torch.ops.onednn.qlinear_pointwise(
        qx, x_scale, x_zp, packed, w_scale, zeros, bias, 1.0, 0, torch.float32, "none", [], ""
    )


@functools.lru_cache(maxsize=1)
def cpu_int8_code_limit() -> int:
    """Largest |weight code| the oneDNN CPU kernel multiplies exactly with full-range u8
    activations on this machine: 127 with VNNI/AMX, 64 without (int16 pair sums saturate above).
    Measured with a worst-case product rather than read from CPU flags, so it cannot be wrong."""
    k, n = 64, 8
    x = torch.full((4, k), 255, dtype=torch.uint8)  # code 127 with zero point 128
    ones = torch.ones(n)
    for limit in (127, 64):
        w = torch.full((n, k), limit, dtype=torch.int8)
        out = _onednn_linear(x, 1.0, 128, torch.ops.onednn.qlinear_prepack(w, [4, k]), ones, None)
        if torch.equal(out, torch.full_like(out, 127.0 * limit * k)):
            return limit
    raise RuntimeError("the oneDNN INT8 kernel gives wrong results on this CPU even for small weight codes: use kernel='float'")


class Int8Linear(nn.Module):
    """y = (codes(x) @ w_codes^T) * s_x * s_w + bias, with an integer GEMM.

    codes: int8 [out, in'] (in' = in + OCS extra columns), w_scale: float32 [out] (one step per
    output row; tensor/group granularity expand to rows), act: the calibrated (or dynamic)
    ActQuantizer of the fake-quant layer, whose grid the input codes reproduce exactly.
    outlier_index / outlier_weight (PreQuant): those input columns are left out of the integer
    GEMM (their codes zeroed) and multiplied in float, on the same quantized activations."""

    def __init__(self, source: QuantLinear, codes: Tensor, w_scale: Tensor, backend: str, name: str = "") -> None:
        """`source`: the fake-quant layer (its bias, calibrated activation quantizer, OCS input
        index and PreQuant outlier columns are taken over); `codes`, `w_scale`: its int8 weight."""
        super().__init__()
        act, bias, in_index, in_features = source.act_quantizer, source.bias, source.in_index, source.in_features
        outlier_index, outlier_weight = source.outlier_index, source.outlier_weight
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"{name}: weight codes must be a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
        if act.mode == "static" and not bool(act.calibrated):
            raise ValueError(f"{name}: its activation quantizer is not calibrated: calibrate the model before to_int8")
        limit = int(codes.abs().max()) if codes.numel() else 0
        if backend == "onednn" and limit > cpu_int8_code_limit():
            raise ValueError(
                f"{name}: weight codes reach {limit}, but this CPU's INT8 kernel (oneDNN without VNNI) sums u8*s8 "
                f"products in int16 and is exact only up to |code| {cpu_int8_code_limit()}. Use symmetric weights of 7 bits "
                "or fewer (asymmetric: 6), a CPU with AVX-VNNI/AMX, a GPU, or kernel='float'"
            )
        self.in_features, self.out_features = in_features, codes.shape[0]
        self.backend, self.name = backend, name
        self.act_mode, self.act_bits, self.act_full_range = act.mode, act.bits, act.full_range
        self.qmin, self.qmax = act.qmin, act.qmax
        self.act_scale = float(act.scale) if act.mode == "static" else None
        self.act_zero_point = int(act.zero_point) if act.mode == "static" and act.zero_point is not None else 0
        if outlier_index is not None:
            codes = codes.index_fill(1, outlier_index, 0)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("outlier_index", outlier_index)
        self.register_buffer("outlier_weight", None if outlier_weight is None else outlier_weight.detach().float().clone())
        self.register_buffer("w_scale", w_scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("in_index", in_index)
        self._packed: Optional[Tensor] = None
        if backend == "int_mm":
            self._prepare_int_mm()

    def _prepare_int_mm(self) -> None:
        # Zero rows/columns change no sum: pad N and K to multiples of 8 once. The weight's row sums
        # turn an asymmetric activation grid into a symmetric one (see _forward_int_mm).
        n, k = self.codes.shape
        w = F.pad(self.codes, (0, -k % 8, 0, -n % 8))
        self.register_buffer("codes_t", w.t(), persistent=False)  # [K, N] column-major view, what cuBLASLt takes
        self.register_buffer("row_sums", self.codes.sum(1, dtype=torch.int32), persistent=False)

    def _input_codes(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        """Integer codes of x [M, K] (a new float tensor holding integers on the activation grid)
        and the input step: a float for static, a [M, 1] tensor for token-wise dynamic."""
        x = x.float()
        if self.act_mode == "dynamic":
            scale = tokenwise_scale(x, self.act_bits, self.act_full_range)
            return x.div(scale).round_().clamp_(self.qmin, self.qmax), scale
        q = x.div(self.act_scale).round_()
        if self.act_zero_point:
            q.add_(self.act_zero_point)
        return q.clamp_(self.qmin, self.qmax), self.act_scale

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        q, x_scale = self._input_codes(x.reshape(-1, shape[-1]))
        if self.in_index is not None:
            q = q.index_select(-1, self.in_index)
        outliers = None
        if self.outlier_index is not None:  # before the GEMM: onednn shifts q in place
            xo = q.index_select(-1, self.outlier_index)
            xo = (xo - self.act_zero_point).mul_(x_scale) if self.act_zero_point else xo.mul_(x_scale)
            outliers = xo @ self.outlier_weight.t()
        if self.backend == "onednn":
            y = self._forward_onednn(q, x_scale)
        else:
            y = self._forward_int_mm(q, x_scale)
        if outliers is not None:
            y = y.add_(outliers)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _forward_onednn(self, q: Tensor, x_scale: Tensor | float) -> Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.codes, None)
        # The kernel takes u8 activations with a zero point: shift a symmetric grid by 128.
        shift = 128 if self.qmin < 0 else 0
        qx = q.add_(shift).to(torch.uint8)
        zp = self.act_zero_point + shift
        if isinstance(x_scale, float):  # static: one step for the tensor, bias added by the kernel
            return _onednn_linear(qx, x_scale, zp, self._packed, self.w_scale, self.bias)
        acc = _onednn_linear(qx, 1.0, zp, self._packed, self.w_scale, None)
        return acc.mul_(x_scale) if self.bias is None else torch.addcmul(self.bias, acc, x_scale)

    def _forward_int_mm(self, q: Tensor, x_scale: Tensor | float) -> Tensor:
        m, k = q.shape
        # Asymmetric codes (0..255) do not fit int8: (q - zp) = (q - 128) + (128 - zp), and the
        # constant term contributes (128 - zp) * row_sum(w) to every output.
        offset = 128 if self.qmin >= 0 else 0
        qx = (q - offset).to(torch.int8) if offset else q.to(torch.int8)
        qx = F.pad(qx, (0, -k % 8, 0, max(17 - m, 0)))
        acc = torch._int_mm(qx, self.codes_t)[:m, : self.out_features]
        if offset or self.act_zero_point:
            acc = acc + (offset - self.act_zero_point) * self.row_sums
        y = acc.float().mul_(x_scale).mul_(self.w_scale)
        return y if self.bias is None else y.add_(self.bias)

    def _apply(self, fn, recurse: bool = True):
        self._packed = None  # oneDNN's packed weight lives on the old device: repack lazily
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        act = f"A{self.act_bits} {self.act_mode}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {act}, backend={self.backend}"


class Int8Embedding(nn.Module):
    """An embedding table held as int8 codes with a step per row; a lookup dequantizes only the
    rows it returns (bit-identical to the fake-quant table, a quarter of the memory)."""

    def __init__(self, codes: Tensor, scale: Tensor, dtype: torch.dtype, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.padding_idx, self.dtype = padding_idx, dtype
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.detach().float().reshape(-1, 1).contiguous())

    def forward(self, ids: Tensor) -> Tensor:
        return (self.codes[ids].float() * self.scale[ids]).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _int8_codes(module: QuantLinear | QuantEmbedding, name: str, codes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(int8 codes with the zero point removed, float32 step per row) of a quantized module."""
    wq = module.weight_quantizer
    if codes is None:
        codes = wq.codes(module.weight)
    scale, zp = wq.dequant_params()
    rows = codes.shape[0]
    codes = codes.to(torch.int32)
    if zp is not None:
        # (codes - zp) is what the dequantized weight multiplies: it fits int8 for up to 7 bits.
        codes = codes - expand_to_rows(zp, rows).to(torch.int32)
    lo, hi = qrange(8, True, full_range=True)  # what int8 holds
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(
            f"{name}: asymmetric {wq.bits}-bit weight codes minus their zero points leave the int8 range: "
            "an INT8 kernel needs symmetric weights, or asymmetric ones of 7 bits or fewer; use kernel='float'"
        )
    return codes.to(torch.int8), expand_to_rows(scale.float(), rows).reshape(-1)


@torch.no_grad()
def to_int8(model: nn.Module, backend: Optional[str] = None, codes: Optional[dict[str, Tensor]] = None) -> nn.Module:
    """Replace, in place, every QuantLinear by an Int8Linear and every quantized QuantEmbedding by
    an Int8Embedding. `backend` defaults to the kernel of the model's device; `codes` (module name
    -> integer codes, as an artifact stores them) avoids recomputing codes from the weights.

    A QuantLinear without an activation quantizer (float activations) has no integer GEMM: it is
    an error, not a silent float layer."""
    codes = codes or {}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if backend is None:
        backend = backend_for(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)} (or None: chosen by device)")
    if backend == "onednn" and backend_for(device) != "onednn":
        raise ValueError(f"backend='onednn' is a CPU kernel but the model is on {device}: use backend='int_mm'")
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if module.weight_quantizer is None or module.act_quantizer is None:
                raise ValueError(
                    f"{name} has full-precision {'weights' if module.weight_quantizer is None else 'activations'}: "
                    "the INT8 kernel needs quantized weights and activations (set quant.a_bits), or use kernel='float'"
                )
            w, s = _int8_codes(module, name, codes.get(name))
            swaps.append((name, Int8Linear(module, w, s, backend, name)))
        elif isinstance(module, QuantEmbedding) and module.weight_quantizer is not None:
            w, s = _int8_codes(module, name, codes.get(name))
            swaps.append((name, Int8Embedding(w, s, module.weight.dtype, module.padding_idx)))
    if not swaps:
        raise ValueError("the model has no quantized modules: quantize it (mrem_dist.quantize.quantize_model) before to_int8")
    for name, new in swaps:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
    return model
