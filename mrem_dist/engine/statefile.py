"""Nested training state (module weights, optimizer moments, loss history, a report record) in a
file that cannot carry code: every tensor in safetensors, everything else as JSON in the file's
header. Reading never unpickles anything, and the header (with the fingerprint of the run that
wrote it) is read and checked before a single tensor is.

    state = {"student": {...tensors...}, "optimizer": {"state": {0: {...}}, "param_groups": [...]},
             "losses": [...]}
    save_state(path, state, header={"fingerprint": {...}, "step": 12})
    header = read_header(path)        # JSON only
    state = load_state(path)          # the same nesting back, tensors included

Supported values: dicts (str or int keys), lists and tuples (read back as lists), tensors, str,
int, float, bool and None. Anything else is refused when writing: a checkpoint is data, never an
object graph.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_TENSOR = "__tensor__"  # {"__tensor__": key}: a tensor stored under `key` in the safetensors body
_INT_KEYS = "__int_keys__"  # {"__int_keys__": [[k, v], ...]}: a dict whose keys are ints (optimizer state)
_HEADER = "mrem_dist.header"
_SKELETON = "mrem_dist.state"


class StateFileError(ValueError):
    """A state file is unreadable, or holds something other than plain data."""


def _flatten(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        key = f"t{len(tensors)}"
        # safetensors refuses views sharing storage: store a compact copy of each.
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INT_KEYS: [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
        if not all(isinstance(k, str) for k in obj):
            raise StateFileError(f"{path}: dict keys must be all str or all int, got {sorted(map(repr, obj))[:3]}")
        if _TENSOR in obj or _INT_KEYS in obj:
            raise StateFileError(f"{path}: the keys {_TENSOR!r} / {_INT_KEYS!r} are reserved")
        return {k: _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise StateFileError(f"{path}: a {type(obj).__name__} cannot be stored in a checkpoint (plain data only)")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_INT_KEYS}:
            return {int(k): _unflatten(v, tensors) for k, v in obj[_INT_KEYS]}
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | os.PathLike, state: Any, header: dict) -> None:
    """Write `state` (nested plain data and tensors) and `header` (JSON) to `path`, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    skeleton = _flatten(state, tensors, "state")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_HEADER: json.dumps(header), _SKELETON: json.dumps(skeleton)})
    os.replace(tmp, path)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise StateFileError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if _HEADER not in meta or _SKELETON not in meta:
        raise StateFileError(f"{path} is not an mrem-dist checkpoint (no header)")
    return meta


def read_header(path: str | os.PathLike) -> dict:
    """The header alone: JSON from the file's metadata, no tensor read."""
    path = Path(path)
    try:
        return json.loads(_metadata(path)[_HEADER])
    except json.JSONDecodeError as e:
        raise StateFileError(f"{path}: the checkpoint header is corrupt ({e})") from e


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """The state `save_state` wrote (tuples come back as lists)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = _metadata(path)
    try:
        skeleton = json.loads(meta[_SKELETON])
        tensors = load_file(str(path), device=str(device))
    except Exception as e:
        raise StateFileError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    return _unflatten(skeleton, tensors)
