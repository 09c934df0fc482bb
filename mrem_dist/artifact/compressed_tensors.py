"""The quantized model as a compressed-tensors folder: what vLLM serves and what `transformers`
loads with `from_pretrained` (with the `compressed-tensors` package installed), no mrem-dist code.

The integer codes written are the ones mrem-dist trained and evaluated, packed here from the
codes themselves (not re-quantized from dequantized weights); learned step sizes are the scales.
Layout of compressed-tensors (its `pack-quantized` and `int-quantized` formats), per quantized Linear
`<name>`:

    <name>.weight_packed     int32 [out, ceil(in*b/32)]: codes shifted to unsigned (c + 2^(b-1)),
                             each run of 32 codes of a row filling b words densely, code i at bit i*b
                             (3-bit codes straddle words); `int-quantized` (8-bit weights with
                             activations) stores int8 codes as <name>.weight instead
    <name>.weight_scale      [1] tensor, [out, 1] channel, [out, in/group_size] group
    <name>.weight_zero_point asymmetric only: the zero point in the signed grid (zp - 2^(b-1)), int32
                             packed the same way along the output dimension (int8 [1] per tensor)
    <name>.weight_shape      int64 [2] (pack-quantized)
    <name>.input_scale / .input_zero_point   static activations (dynamic ones are computed per token)

and config.json's `quantization_config` (quant_method compressed-tensors, format, one config group
targeting `Linear`, an `ignore` list of every Linear kept in full precision). A signed grid is
[-2^(b-1), 2^(b-1)-1] there, mrem-dist's asymmetric grid [0, 2^b-1]: the shift by 2^(b-1) maps one
onto the other exactly, so the folder dequantizes to the same weights bit for bit.

What the format cannot express is refused by name (`unsupported`), never approximated: OCS's split
columns, PreQuant's full-precision outlier columns, quantized word embeddings, ZeroQuant's groups of
output rows, GPT-2's Conv1D projections (the format targets nn.Linear), and activations on mrem-dist's
restricted symmetric grid (the format's is all 2^b codes: quant.a_full_range=true).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from mrem_dist.io import atomic_dir
from mrem_dist.quant import QuantEmbedding, QuantLinear
from mrem_dist.scheme import QuantScheme

from .schema import ArtifactError, sha256_file
from .shard import ExportInfo, Manifest, Shard, write_tensors

FORMAT = "compressed-tensors"
TENSORS = "model.safetensors"
# Provenance beside the folder (transformers ignores it): what `mrem_dist.evaluate` compares against.
PROVENANCE = "mrem_dist.json"
# The compressed-tensors release the folder was written for and tested with (pyproject's pin).
CT_VERSION = "0.20.1"
# mrem-dist granularity -> the format's strategy.
STRATEGIES = {"tensor": "tensor", "row": "channel", "input_group": "group"}


def unsupported(scheme: QuantScheme, family: str = "", outliers: bool = False) -> list[str]:
    """Why `scheme` on this family cannot be written as compressed-tensors (empty: it can). Checked
    before any work (preflight) and again on the model itself at export."""
    why = []
    if scheme.ocs_ratio:
        why.append(f"OCS split columns (quant.ocs_ratio={scheme.ocs_ratio}) add input columns the format has no "
                   "field for: set quant.ocs_ratio=0")
    if scheme.e_bits is not None:
        why.append(f"quantized word embeddings (quant.e_bits={scheme.e_bits}): the format quantizes Linear layers "
                   "here; set quant.e_bits=null")
    if scheme.w_granularity not in STRATEGIES:
        why.append(f"ZeroQuant's groups of output rows (quant.w_granularity={scheme.w_granularity}) have no "
                   "compressed-tensors strategy: use row, tensor or input_group (quant.w_group_size)")
    if scheme.a_bits is not None and scheme.a_symmetric and not scheme.a_full_range:
        why.append("activations on the restricted symmetric grid (quant.a_full_range=false, codes from "
                   f"-{2 ** (scheme.a_bits - 1) - 1}): compressed-tensors quantizes activations on all 2^b codes; "
                   "set quant.a_full_range=true")
    if family == "gpt2":
        why.append("GPT-2's Conv1D projections: transformers builds GPT-2 with Conv1D, which compressed-tensors "
                   "does not quantize (it targets nn.Linear); export the mrem format for GPT-2")
    if outliers:
        why.append("PreQuant's full-precision outlier columns have no compressed-tensors field: export the mrem format")
    return why


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Pack signed `bits`-bit codes [rows, cols] along the columns into int32 [rows, ceil(cols*bits/32)]:
    each code shifted by 2^(bits-1) to unsigned, code i of every run of 32 at bit i*bits of the run's
    `bits` words (the last run zero-padded), the compressed-tensors layout."""
    rows, cols = codes.shape
    unsigned = (codes.to(torch.int64) + (1 << (bits - 1))).contiguous()
    if unsigned.numel() and (int(unsigned.min()) < 0 or int(unsigned.max()) >= 1 << bits):
        raise ValueError(f"codes span [{int(codes.min())}, {int(codes.max())}], outside the signed {bits}-bit grid")
    runs = math.ceil(cols / 32)
    padded = torch.zeros(rows, runs * 32, dtype=torch.int64)
    padded[:, :cols] = unsigned
    # Each run of 32 codes is one (32*bits)-bit integer, built up as `bits` 32-bit words: code i
    # contributes bits [i*bits, (i+1)*bits), split across two words when it straddles a boundary.
    words = torch.zeros(rows, runs, bits, dtype=torch.int64)
    values = padded.view(rows, runs, 32)
    for i in range(32):
        start = i * bits
        word, offset = divmod(start, 32)
        words[:, :, word] |= (values[:, :, i] << offset) & 0xFFFFFFFF
        if offset + bits > 32:
            words[:, :, word + 1] |= values[:, :, i] >> (32 - offset)
    # Reinterpret the low 32 bits as signed int32 (the stored dtype).
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return signed.reshape(rows, runs * bits)[:, :math.ceil(cols * bits / 32)].to(torch.int32).contiguous()


def _args(bits: int, symmetric: bool, strategy: str, group_size: int | None, dynamic: bool) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic, "actorder": None, "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


def _linear_tensors(name: str, module: QuantLinear, dense_8bit: bool, dtype: torch.dtype) -> tuple[dict, dict]:
    """The folder's tensors of one QuantLinear and its (weights, input_activations) arguments."""
    wq = module.weight_quantizer
    if module.in_index is not None or module.outlier_index is not None:
        raise ArtifactError(f"{name} has OCS split or PreQuant outlier columns: compressed-tensors cannot express "
                            "them; export the mrem format")
    out_f, in_f = module.weight.shape
    strategy = STRATEGIES.get(wq.granularity)
    if strategy is None:
        raise ArtifactError(f"{name}: granularity {wq.granularity!r} has no compressed-tensors strategy")
    offset = 1 << (wq.bits - 1)
    codes = wq.codes(module.weight)  # [out, in], the trained grid's codes
    signed = codes if wq.symmetric else codes - offset
    scale, zp = wq.dequant_params()
    per_row = {"tensor": 1, "channel": 1, "group": in_f // max(wq.group_size, 1)}[strategy]
    shape = (1,) if strategy == "tensor" else (out_f, per_row)
    t = {f"{name}.weight_scale": scale.float().reshape(shape).clone()}
    if dense_8bit:  # int-quantized: the int8 codes as the weight, no shape to record
        t[f"{name}.weight"] = signed.to(torch.int8)
    else:
        t[f"{name}.weight_packed"] = pack_int32(signed, wq.bits)
        t[f"{name}.weight_shape"] = torch.tensor([out_f, in_f], dtype=torch.int64)
    if not wq.symmetric:
        zsigned = (zp.reshape(shape) - offset).round().to(torch.int64)
        t[f"{name}.weight_zero_point"] = (zsigned.to(torch.int8) if strategy == "tensor" or dense_8bit
                                          else pack_int32(zsigned.t(), wq.bits).t().contiguous())
    if module.bias is not None:
        t[f"{name}.bias"] = module.bias.detach().to(dtype).clone()
    weights = _args(wq.bits, wq.symmetric, strategy, wq.group_size if strategy == "group" else None, False)
    aq, acts = module.act_quantizer, None
    if aq is not None:
        if aq.symmetric and not aq.full_range:
            raise ArtifactError(f"{name}: activations on the restricted symmetric grid cannot be expressed in "
                                "compressed-tensors: quantize with quant.a_full_range=true")
        dynamic = aq.mode == "dynamic"
        acts = _args(aq.bits, aq.symmetric, "token" if dynamic else "tensor", None, dynamic)
        if not dynamic:
            t[f"{name}.input_scale"] = aq.scale.detach().float().reshape(1).clone()
            if not aq.symmetric:
                t[f"{name}.input_zero_point"] = (aq.zero_point.reshape(1) - (1 << (aq.bits - 1))).round().to(torch.int8)
    return t, {"weights": weights, "input_activations": acts}


def _ignored_linears(model: nn.Module, config: Any, quantized: dict) -> list[str]:
    """Every Linear a loader builds from `config` that is not quantized (the LM head, a classifier, a
    pooler the exported encoder left out): without an ignore entry the `Linear` target would quantize it."""
    with torch.device("meta"):
        skeleton = type(model)._from_config(config)
    return [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and n not in quantized]


def quantization_config(group: dict, ignore: list[str], fmt: str) -> dict:
    """config.json's `quantization_config`: the one config group (every quantized Linear of an
    mrem-dist model shares its scheme), targeting `Linear`."""
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], **group, "output_activations": None, "format": fmt}},
        "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "version": CT_VERSION,
    }


def _format(scheme: QuantScheme) -> str:
    """int-quantized (int8 codes as the weight) for 8-bit weights with activations, else pack-quantized."""
    return "int-quantized" if scheme.w_bits == 8 and scheme.a_bits is not None else "pack-quantized"


@torch.no_grad()
def ct_shard(model: nn.Module, scheme: QuantScheme, family: str, dtype: str | None = None,
             held: Callable[[str], bool] | None = None) -> Shard:
    """The compressed-tensors part of `model` (the whole of it, or the state names `held` keeps: a
    rank's own modules): its tensors in the format's layout and, per quantized Linear, its
    (weights, input_activations) arguments. `dtype`: see export_compressed_tensors."""
    from .export import untied_state

    problems = unsupported(scheme, family)
    if any(isinstance(m, QuantEmbedding) and m.weight_quantizer is not None for m in model.modules()):
        problems.append("quantized word embeddings: set quant.e_bits=null")
    if problems:
        raise ArtifactError("cannot export compressed-tensors: " + "; ".join(problems))
    state, tied = untied_state(model, held)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None
                 and f"{n}.weight" in state}
    # The dtype the model runs in (its unquantized parameters'): QuantLinear keeps float32 latent biases.
    runs_in = next((p.dtype for n, p in model.named_parameters()
                    if not any(n.startswith(q + ".") for q in quantized)), torch.float32)
    dense_8bit = _format(scheme) == "int-quantized"
    tensors = {key: value for key, value in state.items() if not any(key.startswith(n + ".") for n in quantized)}
    modules = {}
    for name, module in quantized.items():
        t, modules[name] = _linear_tensors(name, module, dense_8bit, runs_in)
        tensors.update(t)
    if dtype:
        target = getattr(torch, dtype)
        tensors = {k: v.to(target) if v.is_floating_point() else v for k, v in tensors.items()}
    return Shard(tensors, modules, tied)


def write_compressed_tensors(path: str | os.PathLike, manifest: Manifest, stream: Iterable[tuple[str, Tensor]],
                             model: nn.Module, info: ExportInfo) -> dict:
    """Write the compressed-tensors folder of `manifest` (one shard's, or the ranks' merged) at
    `path` (under a temporary name, renamed at the end), its tensors from `stream`. `model`: any
    model of the architecture (its class and config). Returns what the report records."""
    if not manifest.modules:
        raise ArtifactError("the model has no quantized Linear layers: nothing to export as compressed-tensors")
    groups = iter(manifest.modules.items())
    _, group = next(groups)
    for name, args in groups:
        if args != group:
            raise ArtifactError(f"{name} is quantized with another scheme than the Linears before it: one scheme per "
                                "model is exported as compressed-tensors")
    fmt = _format(info.scheme)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if info.dtype:
        config.dtype = info.dtype
    config.quantization_config = quantization_config(group, _ignored_linears(model, config, manifest.modules), fmt)
    path = Path(path)
    with atomic_dir(path, "directory for the compressed-tensors export") as tmp:
        digest = write_tensors(tmp / TENSORS, manifest, stream, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        info.tokenizer.save_pretrained(tmp)
        provenance = {"format": FORMAT, "kind": info.kind, "source": info.source, "quant": dataclasses.asdict(info.scheme),
                      "tied": dict(manifest.tied), "sha256": {TENSORS: digest}}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
    return {"path": str(path), "format": fmt, "bytes": (path / TENSORS).stat().st_size}


def export_compressed_tensors(model: nn.Module, tokenizer: Any, scheme: QuantScheme, kind: str, family: str,
                              path: str | os.PathLike, source: str | None = None, dtype: str | None = None) -> dict:
    """Write `model` (fake-quantized, mrem-dist modules inside) as a compressed-tensors folder at
    `path`. `dtype` (float16 / bfloat16): cast the unquantized tensors and the scales to it
    (config.json's dtype too); None keeps the model's own dtype, so that the folder computes exactly
    what mrem-dist evaluated. Returns what the report records."""
    shard = ct_shard(model, scheme, family, dtype)
    return write_compressed_tensors(path, shard.manifest(), shard.tensors.items(), model,
                                    ExportInfo(tokenizer, scheme, kind, family, source, dtype))


@dataclass
class CompressedTensorsFolder:
    """A compressed-tensors folder loaded by transformers (no mrem-dist module inside), with what
    `mrem_dist.evaluate` needs beside it; the fields `mrem_dist.evaluate` reads match QuantizedArtifact's."""

    model: nn.Module
    tokenizer: Any
    family: Any
    task: Any
    source: str | None
    quant: dict


def read_quantization_config(path: str | os.PathLike) -> dict | None:
    """config.json's compressed-tensors `quantization_config` of the folder `path`, or None when the
    folder is not a compressed-tensors export."""
    config_file = Path(path) / "config.json"
    try:
        q = json.loads(config_file.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None
    return q if isinstance(q, dict) and q.get("quant_method") == FORMAT else None


def folder_kind(path: str | os.PathLike) -> str:
    """The task of a compressed-tensors folder: as recorded beside it, else from its architecture."""
    from mrem_dist.models.loading import auto_kind, load_config

    recorded = Path(path) / PROVENANCE
    if recorded.is_file():
        return json.loads(recorded.read_text())["kind"]
    return auto_kind(load_config(str(path)), "auto")


def load_kwargs(qconfig: dict) -> dict:
    """from_pretrained's arguments that give back exactly the exported model. transformers 5.24 with
    compressed-tensors 0.20.1 builds the packed zero points of asymmetric group/channel weights at
    their unpacked shape and refuses the folder (the llm-compressor#1618 family of bugs; vLLM reads
    the packed layout): such weights are dequantized while loading, which is exact for weight-only
    schemes; activation quantization needs the quantized modules, so that combination is refused."""
    from transformers import CompressedTensorsConfig

    groups = list(qconfig.get("config_groups", {}).values())
    asymmetric = any(g.get("weights") and not g["weights"].get("symmetric", True)
                     and g["weights"].get("strategy") in ("group", "channel") for g in groups)
    if not asymmetric:
        return {}
    if any(g.get("input_activations") for g in groups):
        raise ArtifactError("transformers cannot load compressed-tensors asymmetric per-channel/group weights with "
                            "quantized activations (its loader mis-shapes the packed zero points); vLLM can. Score the "
                            "mrem artifact of the run instead (export.format=[mrem,compressed-tensors])")
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def load_compressed_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> CompressedTensorsFolder:
    """Load a compressed-tensors folder with transformers alone (the way a user of the folder
    does), as the task recorded beside it (or read from its architecture)."""
    from transformers import AutoConfig, AutoTokenizer

    from mrem_dist.models.families import family_for
    from mrem_dist.models.tasks import task_for

    path = Path(path)
    qconfig = read_quantization_config(path)
    if qconfig is None:
        raise ArtifactError(f"{path} is not a compressed-tensors folder (config.json has no compressed-tensors "
                            "quantization_config)")
    if importlib.util.find_spec("compressed_tensors") is None:  # transformers needs it to read the folder
        raise ArtifactError(f"{path} is a compressed-tensors folder: install compressed-tensors=={CT_VERSION} "
                            "(pip install 'mrem-dist[export]') to load it")
    provenance = {}
    if (path / PROVENANCE).is_file():
        provenance = json.loads((path / PROVENANCE).read_text())
        expected = provenance.get("sha256", {}).get(TENSORS)
        if expected and sha256_file(path / TENSORS) != expected:
            raise ArtifactError(f"{path / TENSORS}: checksum mismatch with {PROVENANCE} (the file is truncated or was "
                                "modified after export): re-export the model")
    config = AutoConfig.from_pretrained(str(path))
    family = family_for(config.model_type)
    task = task_for(folder_kind(path), int(config.num_labels))
    model = task.auto_class().from_pretrained(str(path), **load_kwargs(qconfig)).eval().requires_grad_(False).to(device)
    # compressed-tensors decompresses the weights in a forward pre-hook of the whole model, on its
    # first call; mrem-dist's scoring runs the model piece by piece (ModelFamily.forward), which would
    # bypass the hook: one token through the whole model first, as a user's first call does.
    with torch.no_grad():
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        model(input_ids=one, attention_mask=torch.ones_like(one))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return CompressedTensorsFolder(model, tokenizer, family, task, provenance.get("source"),
                                   {"format": qconfig.get("format"), "config_groups": qconfig.get("config_groups"),
                                    **({"mrem_dist": provenance["quant"]} if "quant" in provenance else {})})
