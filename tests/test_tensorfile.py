"""The safetensors file written tensor by tensor (artifact/tensorfile.py) is safetensors' own."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from mrem_dist.artifact.shard import Shard, write_tensors
from mrem_dist.artifact.tensorfile import DTYPES, TensorFileWriter, TensorSpec


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        if dtype in (torch.uint16, torch.uint32, torch.uint64):
            continue  # torch can make them, not compare them: safetensors' torch API leaves them out too
        base = torch.randn(3, 5, generator=g) * 40
        out[f"t{(7 * i) % 13}.{str(dtype)[6:]}"] = base.to(dtype) if dtype.is_floating_point else (base > 0 if dtype == torch.bool else base.to(dtype))
    out["scalar"], out["empty"] = torch.tensor(2.5), torch.zeros(0, 4)
    out["a.weight"], out["z.qweight"] = torch.randn(4, 6, generator=g), torch.randint(0, 255, (4, 3), dtype=torch.uint8)
    return out


def test_a_file_written_tensor_by_tensor_is_save_files_byte_for_byte(tmp_path):
    tensors = _mixed()
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    # One metadata key: safetensors' own order is then fixed too, and the files must be identical.
    with TensorFileWriter(ours, {n: TensorSpec.of(t) for n, t in tensors.items()}, {"format": "pt"}) as out:
        for name in reversed(list(tensors)):  # the arrival order does not matter
            out.write(name, tensors[name])
    save_file(tensors, str(theirs), metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()
    loaded = load_file(str(ours))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], tensors[n]) for n in tensors)


def test_the_metadata_keys_are_written_in_a_stable_order(tmp_path):
    tensors = {"w": torch.ones(2, 2)}
    meta = {"version": "1", "format": "mrem-dist-quantized"}
    shard = Shard(tensors)  # the exporters' path: a shard's manifest and its tensors
    write_tensors(tmp_path / "a.safetensors", shard.manifest(), shard.tensors.items(), meta)
    data = (tmp_path / "a.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8:8 + n].startswith(b'{"__metadata__":{"format":"mrem-dist-quantized","version":"1"},')
    # The same file as safetensors', but for the metadata's order (its hash map's, per process).
    theirs = save(tensors, metadata=meta)
    assert json.loads(data[8:8 + n]) == json.loads(theirs[8:8 + n]) and data[8 + n:] == theirs[8 + n:]


def test_a_tensor_that_does_not_fit_the_layout_is_refused_and_a_missing_one_fails_close(tmp_path):
    specs = {"a": TensorSpec(torch.float32, (2,)), "b": TensorSpec(torch.uint8, (3,))}
    out = TensorFileWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="a arrived as torch.float16 \\(2,\\), but the file was laid out for torch.float32"):
        out.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(KeyError, match="c is not among"):
        out.write("c", torch.zeros(1))
    out.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="a was written twice"):
        out.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="1 tensors were never written \\(e.g. b\\)"):
        out.close()
