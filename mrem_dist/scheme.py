"""The quantization scheme: what `quantize_model` builds, what the `quant` config group holds and
what an artifact records. A plain dataclass with neither torch nor Hydra behind it, so the config,
the quantizer library and the artifact schema can all import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class QuantScheme:
    """A quantization scheme. Bit widths in the W-E-A notation: transformer weights, word
    embeddings, activations. The `quant` group of the run config (conf/quant/*.yaml presets) is
    this dataclass; an artifact records it through its own versioned schema (artifact/schema.py)."""

    name: str = "w4a8"
    w_bits: int = 4
    # Word-embedding bits; null keeps the word embeddings in full precision.
    e_bits: Optional[int] = 8
    # Activation bits (input of every quantized Linear); null keeps activations in full precision.
    a_bits: Optional[int] = 8
    w_symmetric: bool = True
    # Symmetric weight and word-embedding grids: false = restricted codes [-(2^(b-1)-1), 2^(b-1)-1]
    # (2 bits: {-1, 0, 1}); true = all 2^b codes [-2^(b-1), 2^(b-1)-1] with step max|w| / 2^(b-1),
    # DeepSpeed ZeroQuant's grid (2 bits: {-2, -1, 0, 1}). benchmarks/report.py measures both.
    w_full_range: bool = False
    w_granularity: str = "row"
    # Number of groups of consecutive output rows, for w_granularity=group (ZeroQuant).
    w_groups: int = 0
    # Consecutive input columns per group within each output row, for w_granularity=input_group
    # (the "group size" of GPTQ / AWQ / AutoRound: w4a16_g128 is 4 bits, groups of 128 columns).
    w_group_size: int = 0
    w_clip: str = "minmax"
    aciq_prior: str = "laplace"
    # Ternary weights {-alpha, 0, alpha} with TWN initialisation; needs w_bits=2.
    ternary: bool = False
    # Outlier channel splitting: fraction of input channels split per Linear (0 disables).
    ocs_ratio: float = 0.0
    ocs_quant_aware: bool = True
    a_mode: str = "static"
    a_symmetric: bool = True
    # Symmetric activation grid: false = restricted codes [-(2^(b-1)-1), 2^(b-1)-1] with step
    # max|x| / (2^(b-1)-1) (ZeroQuant, vLLM's int8 kernels); true = all 2^b codes [-2^(b-1), 2^(b-1)-1]
    # with step max|x| / ((2^b-1)/2), the grid of compressed-tensors, which transformers runs on a
    # compressed-tensors folder (export.format=compressed-tensors needs it). Not w_full_range's step.
    a_full_range: bool = False
    a_clip: str = "minmax"
    e_granularity: str = "row"
