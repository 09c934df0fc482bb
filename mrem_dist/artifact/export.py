"""Save a quantized model as a directory that really is smaller, and load it back runnable.

Layout (format `mrem-dist-quantized`, version 1):

    model.safetensors   every tensor of the quantized model's state, except that the latent weight
                        of each quantized Linear / Embedding is replaced by its packed integer codes
                        (`<module>.qweight`, uint8: pack.py); step sizes, zero points, activation
                        scales, biases, LayerNorms, position embeddings and the head are kept as is,
                        and so are a PreQuant model's full-precision outlier columns
                        (`<module>.outlier_index`, `<module>.outlier_weight`)
    quantization.json   format and version, the quantization scheme, per quantized module its bits,
                        grid and weight shape, the model kind, and the SHA-256 of model.safetensors
                        (artifact/schema.py: the schema, versioned on its own)
    manifest.json       every other file with its size and SHA-256, checked before anything is read
    config.json, tokenizer files   as Hugging Face writes them

The directory is written under a temporary name and renamed into place at the end, so a crash
never leaves a half-written artifact under the final name. Loading checks the manifest, the format
and the version before anything else and names the file and the problem when one is off.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from mrem_dist.io import atomic_dir
from mrem_dist.models.families import ModelFamily
from mrem_dist.models.tasks import Task
from mrem_dist.quant import QuantEmbedding, QuantLinear
from mrem_dist.quant.functional import dequantize
from mrem_dist.quant.int8 import KERNELS, to_int8
from mrem_dist.quant.quantizers import group_view
from mrem_dist.scheme import QuantScheme

from .pack import pack_codes, unpack_codes
from .schema import (FORMAT, VERSION, ArtifactError, ArtifactMeta, ModuleEntry, read_meta, sha256_file, write_manifest,
                     write_meta)
from .shard import ExportInfo, Manifest, Shard, write_tensors

TENSORS = "model.safetensors"


def _quantized_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)) and module.weight_quantizer is not None:
            yield name, module


def untied_state(model: nn.Module, held: Optional[Callable[[str], bool]] = None) -> tuple[dict, dict[str, str]]:
    """The state to store, each tensor once: a tensor under several names (tied weights) is kept
    under its first name; the others are returned as {alias: kept name}, re-tied on load. `held`:
    keep only the names it accepts (a rank's own modules; a tied tensor's names are held together)."""
    state, first, tied = {}, {}, {}
    quantized = {f"{name}.weight" for name, _ in _quantized_modules(model)}
    for name, t in model.state_dict(keep_vars=True).items():
        if held is not None and not held(name):
            continue
        if id(t) in first:
            if name in quantized or first[id(t)] in quantized:
                raise ArtifactError(f"{name} is tied to {first[id(t)]} and one of them is quantized: tied quantized "
                                    "weights cannot be exported yet; keep them in full precision (quant.e_bits=null)")
            tied[name] = first[id(t)]
            continue
        first[id(t)] = name
        state[name] = t.detach().cpu().contiguous()
    return state, tied


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    for alias, kept in tied.items():
        parent, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, model.get_parameter(kept))


@torch.no_grad()
def mrem_shard(model: nn.Module, held: Optional[Callable[[str], bool]] = None) -> Shard:
    """The mrem format's part of `model` (the whole of it, or the state names `held` keeps: a
    rank's own modules): the state to store with each quantized weight as its packed codes, and
    each quantized module's ModuleEntry."""
    state, tied = untied_state(model, held)
    modules = {}
    for name, module in _quantized_modules(model):
        if f"{name}.weight" not in state:
            continue
        wq = module.weight_quantizer
        codes = wq.codes(module.weight)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = pack_codes(codes.cpu(), wq.bits, signed=wq.symmetric)
        outliers = getattr(module, "outlier_index", None)
        modules[name] = ModuleEntry(
            "linear" if isinstance(module, QuantLinear) else "embedding", wq.bits, wq.symmetric, wq.ternary,
            wq.granularity, int(wq.scale.shape[0]), list(module.weight.shape),
            str(module.weight.dtype).removeprefix("torch."), 0 if outliers is None else int(outliers.numel()))
    return Shard(state, modules, tied)


def write_mrem(path: str | os.PathLike, manifest: Manifest, stream: Iterable[tuple[str, torch.Tensor]], model: nn.Module,
               info: ExportInfo) -> dict:
    """Write the mrem artifact of `manifest` (one shard's, or the ranks' merged) to the directory
    `path`, its tensors from `stream`. `model`: any model of the architecture (its config is
    written, its module order orders quantization.json). Returns the metadata written to
    quantization.json (with the file sizes)."""
    path = Path(path)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules = dict(sorted(manifest.modules.items(), key=lambda kv: order.get(kv[0], len(order))))
    with atomic_dir(path, "directory for the artifact") as tmp:
        digest = write_tensors(tmp / TENSORS, manifest, stream, metadata={"format": FORMAT, "version": str(VERSION)})
        model.config.save_pretrained(tmp)
        info.tokenizer.save_pretrained(tmp)
        meta = ArtifactMeta(info.kind, model.config.model_type, info.scheme, modules, info.source, {TENSORS: digest},
                            tied=dict(manifest.tied))
        write_meta(tmp, meta)
        write_manifest(tmp)
    return {**meta.to_json(), "bytes": {TENSORS: (path / TENSORS).stat().st_size}}


def export_quantized(
    model: nn.Module, tokenizer: Any, scheme: QuantScheme, kind: str, path: str | os.PathLike, source: str | None = None
) -> dict:
    """Write `model` (fake-quantized, mrem-dist modules inside) to the directory `path`. `kind`:
    its task's kind (Task.kind). Returns the metadata written to quantization.json (with the file
    sizes). `source`: the full-precision model it was quantized from (recorded so that
    `mrem_dist.evaluate` can compare against it)."""
    shard = mrem_shard(model)
    info = ExportInfo(tokenizer, scheme, kind, model.config.model_type, source)
    return write_mrem(path, shard.manifest(), shard.tensors.items(), model, info)


@dataclass
class QuantizedArtifact:
    model: nn.Module  # a Hugging Face model with mrem-dist quantized modules: model(input_ids, attention_mask)
    tokenizer: Any
    family: ModelFamily
    task: Task
    meta: ArtifactMeta

    @property
    def source(self) -> str | None:
        """The full-precision model it was quantized from (what mrem_dist.evaluate compares against)."""
        return self.meta.source

    @property
    def quant(self) -> dict:
        return self.meta.to_json()["quant"]


@torch.no_grad()
def load_quantized(
    path: str | os.PathLike, kernel: str = "float", backend: str | None = None, device: str | torch.device = "cpu"
) -> QuantizedArtifact:
    """Rebuild the quantized model from an artifact directory, on `device`.

    kernel="float": weights dequantized from their codes, activations fake-quantized; outputs equal
    those of the fake-quantized model it was exported from (the reference, and the training view).
    kernel="int8": every quantized Linear runs an integer GEMM on int8 codes (`mrem_dist.quant.int8`,
    `backend` onednn / int_mm, default by device) and embeddings stay int8 codes; outputs match
    the float kernel to float rounding. A layer the INT8 kernel cannot run exactly is an error."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {', '.join(KERNELS)}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    from mrem_dist.models.families import family_for
    from mrem_dist.models.loading import TOKENIZER_FILES, model_kwargs
    from mrem_dist.models.tasks import task_for
    from mrem_dist.quantize import quantize_model

    path = Path(path)
    meta = read_meta(path)
    tensors_file = path / TENSORS
    if not tensors_file.is_file():
        raise ArtifactError(f"{tensors_file} is missing")
    expected = meta.sha256[TENSORS]
    if sha256_file(tensors_file) != expected:
        raise ArtifactError(f"{tensors_file}: checksum mismatch (the file is truncated or was modified after export)")
    try:
        state = load_file(str(tensors_file))
    except SafetensorError as e:
        raise ArtifactError(f"{tensors_file} cannot be read: {e}") from e
    # transformers silently builds an empty tokenizer from a folder without its files: check first.
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ArtifactError(f"the tokenizer files in {path} are missing (looked for {', '.join(TOKENIZER_FILES)}): re-export the model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"the tokenizer files in {path} are missing or unreadable ({e}): re-export the model") from e
    config = AutoConfig.from_pretrained(str(path))
    family = family_for(config.model_type)
    task = task_for(meta.kind, int(config.num_labels))
    kwargs = model_kwargs(task, family)
    if "add_pooling_layer" in kwargs:  # whatever the exported model had
        kwargs["add_pooling_layer"] = any(k.startswith("pooler.") for k in state)
    model = task.auto_class().from_config(config, **kwargs).eval()
    # The structure only: every value is overwritten below, so skip the clipping search.
    quantize_model(model, family, dataclasses.replace(meta.scheme, w_clip="minmax"), learnable=False)
    codes_by_module = {}
    for name, info in meta.modules.items():
        packed = state.pop(f"{name}.qweight", None)
        if packed is None:
            raise ArtifactError(f"{tensors_file} has no packed weight for {name}: the file does not match its metadata")
        codes = codes_by_module[name] = unpack_codes(packed, info.bits, info.symmetric, tuple(info.shape))
        scale = state[f"{name}.weight_quantizer.scale"]
        zp = state.get(f"{name}.weight_quantizer.zero_point")
        weight = dequantize(group_view(codes, scale.shape[0]), scale, zp).reshape(info.shape)
        state[f"{name}.weight"] = weight.to(getattr(torch, info.dtype))
        if info.outlier_columns:
            index, values = state.get(f"{name}.outlier_index"), state.get(f"{name}.outlier_weight")
            if index is None or values is None or index.numel() != info.outlier_columns:
                raise ArtifactError(f"{tensors_file} lacks the {info.outlier_columns} outlier columns of {name} its metadata lists")
            model.get_submodule(name).set_outliers(index, values)
    _retie(model, meta.tied)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # position_ids: a non-persistent buffer in some versions; tied aliases are loaded through their kept name.
    missing = [k for k in missing if not k.endswith("position_ids") and k not in meta.tied]
    if missing or unexpected:
        raise ArtifactError(
            f"{tensors_file} does not match its model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    model.requires_grad_(False).to(device)
    if kernel == "int8":
        to_int8(model, backend, {k: v.to(device) for k, v in codes_by_module.items()})
    return QuantizedArtifact(model, tokenizer, family, task, meta)
