"""A safetensors file written tensor by tensor, from a list of what it will hold.

`safetensors.torch.save_file` needs every tensor in one process's memory at once. The parallel
coordinator's artifact is made of tensors that arrive from the ranks one at a time, so the layout
is computed first from each tensor's name, dtype and shape (`TensorSpec`), the header written, and
each tensor's bytes written at its offset when it arrives: the process never holds more than one.

The layout is safetensors' own (as of safetensors 0.8, checked byte for byte by the tests): an
8-byte little-endian header length, a JSON header (`__metadata__` first, then the tensors in file
order, every offset relative to the end of the header) padded with spaces to a multiple of 8, then
the tensors' bytes, ordered by dtype (safetensors' order, widest first) and then by name. One
difference, on purpose: the metadata's keys are written sorted, where safetensors writes them in
its hash map's order, which changes from process to process; so the same tensors always give the
same file and the same checksum.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

# torch dtype -> safetensors dtype, in safetensors' order of dtypes (its enum order: the file
# holds the later ones first).
DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {name: i for i, name in enumerate(DTYPES.values())}


@dataclass(frozen=True)
class TensorSpec:
    """What the file will hold under one name (no data)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(t.dtype, tuple(t.shape))

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def layout(specs: Mapping[str, TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file's first bytes (header length and header) and every tensor's (begin, end) byte
    offsets after them."""
    unknown = sorted({str(s.dtype) for s in specs.values() if s.dtype not in DTYPES})
    if unknown:
        raise ValueError(f"safetensors cannot store dtype {', '.join(unknown)}")
    order = sorted(specs, key=lambda n: (-_RANK[DTYPES[specs[n].dtype]], n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offsets, at = {}, 0
    for name in order:
        spec = specs[name]
        offsets[name] = (at, at + spec.nbytes)
        header[name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape), "data_offsets": [at, at + spec.nbytes]}
        at += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class TensorFileWriter:
    """Writes `specs` to `path` as one safetensors file, a tensor at a time (`write`, in any order);
    `close` checks that every tensor was written. The file is only complete after close: write it
    inside a temporary directory (io.atomic_dir) so that a failure leaves nothing under its name."""

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, TensorSpec],
                 metadata: Optional[Mapping[str, str]] = None) -> None:
        self.path, self.specs = Path(path), dict(specs)
        head, self.offsets = layout(self.specs, metadata)
        self.base = len(head)
        self.missing = set(self.specs)
        self.file = open(self.path, "wb")
        self.file.write(head)
        self.file.truncate(self.base + max((end for _, end in self.offsets.values()), default=0))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"{self.path.name}: {name} is not among the tensors the file was laid out for")
        if name not in self.missing:
            raise ValueError(f"{self.path.name}: {name} was written twice")
        if TensorSpec.of(tensor) != spec:
            raise ValueError(f"{self.path.name}: {name} arrived as {tensor.dtype} {tuple(tensor.shape)}, but the file "
                             f"was laid out for {spec.dtype} {spec.shape}")
        begin, _ = self.offsets[name]
        self.file.seek(self.base + begin)
        # safetensors stores little-endian bytes, the layout of every machine torch runs on.
        self.file.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self.missing.discard(name)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.missing:
            raise RuntimeError(f"{self.path.name}: {len(self.missing)} tensors were never written "
                               f"(e.g. {sorted(self.missing)[0]})")

    def __enter__(self) -> "TensorFileWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()

