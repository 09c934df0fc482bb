"""Sharded loading: a rank of a parallel run reads only the tensors of its own modules.

The model is built from its config with every parameter on the meta device (no storage; buffers
such as rotary frequencies are computed as usual) and tied as from_pretrained ties it. Each tensor
the rank keeps is then read on its own from the checkpoint's safetensors files (`safe_open` reads
just that tensor's bytes) and cast to the model's dtype, as from_pretrained does; every other
tensor becomes an empty one. That is the state `engine.shard.release_unowned` leaves after a whole
load, so everything downstream runs unchanged, and no moment of the load holds the whole model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def tensor_names(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every parameter and buffer, grouped by the tensor object (the names
    of a tied tensor share one entry)."""
    names: dict[int, list[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None:
                    names.setdefault(id(t), []).append(f"{prefix}.{name}" if prefix else name)
    return names


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: those its index names, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


class CheckpointTensors:
    """Read access to the tensors of a folder's safetensors files, one tensor at a time."""

    def __init__(self, folder: Path, base_prefix: str = ""):
        from safetensors import safe_open

        files = safetensors_files(folder)
        if not files:
            raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
        self.folder, self.base_prefix = folder, base_prefix
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            for key in handle.keys():
                self._where[key] = handle

    def __enter__(self) -> "CheckpointTensors":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def key(self, name: str) -> Optional[str]:
        """The file key of model tensor `name`: the name itself, or the name with the base model's
        prefix ("model.", "bert.") removed or added, as checkpoints saved from the bare base model
        or from a task model name them."""
        p = self.base_prefix + "." if self.base_prefix else ""
        for key in (name, name[len(p):] if p and name.startswith(p) else None, p + name if p else None):
            if key is not None and key in self._where:
                return key
        return None

    def read(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)


def replace_tensors(model: nn.Module, value: Callable[[list[str], Tensor, bool], Optional[Tensor]]) -> int:
    """Give every parameter and buffer of `model` the tensor value(its names, it, is_param), once
    per tensor object, so a tied tensor stays one tensor under all its names (None: leave it as it
    is). Returns the bytes of the new tensors."""
    names = tensor_names(model)
    # The original tensors stay referenced to the end, so no new tensor can take the id of one.
    originals = [t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())]
    replaced: dict[int, Tensor] = {}
    loaded = 0
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store, is_param in ((module._parameters, True), (module._buffers, False)):
            for name, t in list(store.items()):
                if t is None or id(t) not in names:  # None, or already replaced (a shared module)
                    continue
                if id(t) not in replaced:
                    new = value(names[id(t)], t, is_param)
                    if new is None:
                        continue
                    loaded += new.numel() * new.element_size()
                    replaced[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                store[name] = replaced[id(t)]
    del originals
    return loaded


def materialize(model: nn.Module, folder: str, keep: Callable[[str], bool], device: torch.device) -> int:
    """Give `model` (a skeleton from loading.load_skeleton) the checkpoint's values of every tensor
    that `keep` holds under one of its names, on `device`; every other tensor becomes empty. A kept
    parameter the files do not hold is an error (a persistent buffer keeps its computed value when
    the files lack it, as from_pretrained leaves it). Returns the bytes materialized."""
    missing = []
    with CheckpointTensors(Path(folder).expanduser(), getattr(model, "base_model_prefix", "")) as files:

        def value(names: list[str], t: Tensor, is_param: bool) -> Optional[Tensor]:
            if not any(keep(n) for n in names):
                return torch.empty(0, dtype=t.dtype, device=device)
            key = next((k for k in map(files.key, names) if k is not None), None)
            if key is not None:
                return files.read(key).to(device=device, dtype=t.dtype)
            if is_param:
                missing.append(names[0])
                return None
            return t.to(device)  # a buffer the files do not hold: its computed value

        loaded = replace_tensors(model, value)
    if missing:
        raise KeyError(
            f"{len(missing)} tensors of the model are not in the safetensors files of {folder} (e.g. {missing[0]}): "
            "its tensor names need a conversion that only a whole load applies. Load the whole model on every rank "
            "(model.sharded_load=false), or save the folder again with save_pretrained")
    return loaded


def materialized_bytes(model: nn.Module) -> int:
    """The bytes of storage the model's parameters and buffers hold (a tied tensor counted once)."""
    seen: dict[int, Tensor] = {}
    for module in model.modules():
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and t.device.type != "meta":
                seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())
