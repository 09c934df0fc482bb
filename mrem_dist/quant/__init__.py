"""Quantizer library: integer-grid primitives, clipping, OCS, quantizers and quantized modules."""

from .clipping import ACIQ_ALPHA, ACIQ_PRIORS, CLIP_METHODS, SCALE_EPS, check_clip, clip_range, scale_zero_point
from .functional import check_bits, dequantize, fake_quant, qrange, quantize_codes, round_ste, tokenwise_scale
from .modules import QuantEmbedding, QuantLinear, calibrating, iter_quantizers
from .ocs import ocs_num_split, ocs_split, ocs_split_quant_aware
from .quantizers import (
    ACT_MODES,
    GRANULARITIES,
    GRIDS,
    SAMPLE_SIZE,
    ActQuantizer,
    WeightQuantizer,
    expand_to_rows,
    group_view,
)

__all__ = [
    "ACIQ_ALPHA", "ACIQ_PRIORS", "CLIP_METHODS", "SCALE_EPS", "check_clip", "clip_range", "scale_zero_point",
    "check_bits", "dequantize", "fake_quant", "qrange", "quantize_codes", "round_ste", "tokenwise_scale",
    "QuantEmbedding", "QuantLinear", "calibrating", "iter_quantizers",
    "ocs_num_split", "ocs_split", "ocs_split_quant_aware",
    "ACT_MODES", "GRANULARITIES", "GRIDS", "SAMPLE_SIZE", "ActQuantizer", "WeightQuantizer", "expand_to_rows", "group_view",
]
