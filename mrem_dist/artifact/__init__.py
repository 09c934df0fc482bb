"""The quantized model as a real, smaller artifact (packed integer codes in safetensors)."""

from .export import ArtifactError, QuantizedArtifact, export_quantized, load_quantized
from .pack import code_range, field_bits, pack_codes, packed_bytes, unpack_codes

__all__ = [
    "ArtifactError", "QuantizedArtifact", "export_quantized", "load_quantized",
    "code_range", "field_bits", "pack_codes", "packed_bytes", "unpack_codes",
]
