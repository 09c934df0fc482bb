"""Which module partition owns each tensor of a model, and keeping only a rank's own.

Ownership follows MREM's convention: the embeddings belong to the first module, a layer to the
module that holds it, everything else (pooler, classifier, final norms) to the last module. So
every tensor has exactly one owner, and the coordinator can assemble the whole model from what
each rank sends, checking that nothing is missing or duplicated.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mrem_dist.models.adapters import ModelAdapter

from .partition import ModuleSpec

Owner = Callable[[str], int]


def tensor_owner(model: nn.Module, adapter: ModelAdapter, specs: list[ModuleSpec]) -> Owner:
    """A function from a qualified parameter/buffer name of `model` to the index of its module."""
    emb = adapter.embeddings(model)
    emb_prefix = next(n for n, m in model.named_modules() if m is emb) + "."
    layer_prefix = adapter.layer_prefix(model) + "."
    layer_module = {i: s.index for s in specs for i in s.layers}
    last = specs[-1].index

    def owner(name: str) -> int:
        if name.startswith(emb_prefix):
            return specs[0].index
        if name.startswith(layer_prefix):
            return layer_module[int(name[len(layer_prefix):].split(".", 1)[0])]
        return last

    return owner


def release_unowned(model: nn.Module, owner: Owner, held: set[int]) -> int:
    """Free, in place, every parameter and buffer of `model` whose module is not in `held` (its
    storage becomes an empty tensor; the module tree stays, so names and Stages still work).
    Returns the number of elements freed."""
    freed = 0
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                full = f"{prefix}.{name}" if prefix else name
                if t is None or t.numel() == 0 or owner(full) in held:
                    continue
                freed += t.numel()
                with torch.no_grad():
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return freed


def owned_state(model: nn.Module, owner: Owner, held: set[int]) -> dict[str, Tensor]:
    """The state_dict entries of the modules in `held`, detached and on the CPU (to be sent)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if owner(k) in held}
