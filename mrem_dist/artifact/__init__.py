"""The quantized model as a real, smaller artifact (packed integer codes in safetensors)."""

from .export import QuantizedArtifact, export_quantized, load_quantized
from .pack import code_range, field_bits, pack_codes, packed_bytes, unpack_codes
from .schema import ArtifactError, ArtifactMeta, ModuleEntry, read_meta

__all__ = [
    "ArtifactError", "ArtifactMeta", "ModuleEntry", "QuantizedArtifact", "export_quantized", "load_quantized", "read_meta",
    "code_range", "field_bits", "pack_codes", "packed_bytes", "unpack_codes",
]
