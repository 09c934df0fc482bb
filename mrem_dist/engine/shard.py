"""Which module partition owns each tensor of a model, and keeping only a rank's own.

Ownership follows MREM's convention: the embeddings belong to the first module, a layer to the
module that holds it, everything else (pooler, classifier, final norm, LM head) to the last module.
A tensor reachable under several names (a word embedding tied to the LM head: one Parameter) is
owned by every module that holds one of its names, so both end ranks keep it; the streamed export
takes each name from the lowest rank that holds it, and a name two ranks hold with different values
is an error (artifact/shard.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mrem_dist.models.families import ModelFamily
from mrem_dist.models.sharded import tensor_names

from .partition import ModuleSpec

Owner = Callable[[str], int]


def tensor_owner(model: nn.Module, family: ModelFamily, specs: list[ModuleSpec]) -> Owner:
    """A function from a qualified parameter/buffer name of `model` to the index of its module."""
    emb_prefixes = tuple(p + "." for p in family.embedding_prefixes(model))
    layer_prefix = family.layer_prefix(model) + "."
    layer_module = {i: s.index for s in specs for i in s.layers}
    last = specs[-1].index

    def owner(name: str) -> int:
        if name.startswith(emb_prefixes):
            return specs[0].index
        if name.startswith(layer_prefix):
            return layer_module[int(name[len(layer_prefix):].split(".", 1)[0])]
        return last

    return owner


def holders(model: nn.Module, owner: Owner) -> dict[str, set[int]]:
    """For every name, the modules that hold its tensor (more than one for a tied tensor)."""
    out: dict[str, set[int]] = {}
    for names in tensor_names(model).values():
        held_by = {owner(n) for n in names}
        for n in names:
            out[n] = held_by
    return out


def release_unowned(model: nn.Module, owner: Owner, held: set[int]) -> int:
    """Free, in place, every parameter and buffer of `model` that no module in `held` holds (its
    storage becomes an empty tensor; the module tree stays, so names and Stages still work).
    Returns the number of elements freed."""
    freed = 0
    by_name = holders(model, owner)
    seen: set[int] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                full = f"{prefix}.{name}" if prefix else name
                if t is None or id(t) in seen or t.numel() == 0 or by_name[full] & held:
                    continue
                seen.add(id(t))
                freed += t.numel()
                with torch.no_grad():
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    return freed


def holds(model: nn.Module, owner: Owner, held: set[int]) -> Callable[[str], bool]:
    """Whether a state_dict name of `model` is held by the modules in `held` (a tied tensor's names:
    by all of their modules)."""
    by_name = holders(model, owner)
    return lambda name: bool(by_name.get(name, {owner(name)}) & held)


def owned_state(model: nn.Module, owner: Owner, held: set[int]) -> dict[str, Tensor]:
    """The state_dict entries held by the modules in `held`, detached and on the CPU."""
    mine = holds(model, owner, held)
    return {k: v.detach().cpu() for k, v in model.state_dict(keep_vars=True).items() if mine(k)}
