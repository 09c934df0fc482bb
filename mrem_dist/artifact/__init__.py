"""The quantized model as a real, smaller artifact (packed integer codes in safetensors)."""

from .pack import code_range, field_bits, pack_codes, packed_bytes, unpack_codes

__all__ = ["code_range", "field_bits", "pack_codes", "packed_bytes", "unpack_codes"]
