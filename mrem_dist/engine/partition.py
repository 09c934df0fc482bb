"""Cut a model's layer list into N modules of consecutive layers.

The embeddings join the first module and the head the last (MREM's convention), so a module is
just a contiguous range of layer indices plus two flags. The cut minimises the cost of the most
expensive module, since in MREM-P the slowest rank sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mrem_dist.models.families import ModelFamily
from mrem_dist.quant import QuantLinear

# How the layers are cut: cost (estimated compute per token) or params (memory).
BALANCES = ("cost", "params")


@dataclass(frozen=True)
class ModuleSpec:
    """Module `index` of `count`: layers [start, stop) of the layer list."""

    index: int
    count: int
    start: int
    stop: int

    @property
    def first(self) -> bool:  # owns the embeddings
        return self.index == 0

    @property
    def last(self) -> bool:  # owns the pooler / head
        return self.index == self.count - 1

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)

    def describe(self) -> str:
        parts = (["embeddings"] if self.first else []) + [f"layers {self.start}-{self.stop - 1}"] + (["head"] if self.last else [])
        return f"module {self.index}: " + " + ".join(parts)


def split_contiguous(costs: list[float], n: int) -> list[tuple[int, int]]:
    """Split costs[0..L) into n non-empty contiguous ranges minimising the largest range sum.

    Exact dynamic programme, O(n L^2): L is a layer count (tens), so this is instant. Among optimal
    splits it prefers the one whose earlier modules are smaller (ties broken by the cut position),
    which keeps it deterministic.
    """
    L = len(costs)
    if n < 1:
        raise ValueError(f"the number of modules must be at least 1, got {n}")
    if n > L:
        raise ValueError(
            f"cannot cut {L} layers into {n} modules: every module needs at least one layer. "
            f"Use at most {L} modules (method.modules<={L}), or method.modules=0 for one layer per module"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: minimal max-cost splitting the first i layers into k modules; cut[k][i]: last start.
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for i in range(k, L - (n - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i] - 1e-12 * max(1.0, abs(value)):
                    best[k][i], cut[k][i] = value, j
    ranges, i = [], L
    for k in range(n, 0, -1):
        j = cut[k][i]
        ranges.append((j, i))
        i = j
    return ranges[::-1]


def layer_costs(model: nn.Module, family: ModelFamily, balance: str, seq_len: int = 128, head: bool = True) -> list[float]:
    """Cost of each layer, with the embeddings charged to layer 0 and the head to the last layer
    (per token: the family says what its head costs a token). head=False: the head does not run
    in a training step (no KD term), so its compute is not charged (an LM head over a 49K
    vocabulary costs as much as several layers, and would otherwise shrink the last module).

    params: parameters held (memory balance). cost: estimated compute per token of a training
    step: 2 FLOPs per Linear weight plus the attention matmuls (4 * seq_len * hidden); an
    embedding lookup is nearly free, so the (large) embedding table weighs only what its
    trained rows cost. Estimated rather than timed so that the cut is reproducible run to run.
    """
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r} is not one of {', '.join(BALANCES)}: pick one of them")
    layers = list(family.layers(model))
    embeddings = family.embeddings(model)
    if balance == "params":
        head_params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in family.backbone(model).parameters())
        costs = [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
        costs[0] += sum(p.numel() for p in embeddings.parameters())
        costs[-1] += head_params
        return costs
    hidden = family.config(model).hidden_size
    costs = []
    for layer in layers:
        # Counted on the module's layer shape, so a quantized copy gives the same cut.
        linear = sum(m.in_features * m.out_features for m in layer.modules() if isinstance(m, (nn.Linear, QuantLinear)))
        costs.append(2.0 * linear + 4.0 * seq_len * hidden)
    # Rows of the embedding table touched per token: one lookup of `hidden` values.
    costs[0] += 2.0 * family.word_embeddings(model).embedding_dim
    if head:
        costs[-1] += family.head_cost_per_token(model, seq_len)
    return costs


def partition(model: nn.Module, family: ModelFamily, modules: int, balance: str = "cost", seq_len: int = 128,
              head: bool = True) -> list[ModuleSpec]:
    """N modules of consecutive layers; modules=0 means one layer per module. `head`: whether the
    head's compute is charged to the last module (layer_costs)."""
    num_layers = len(family.layers(model))
    n = num_layers if modules == 0 else modules
    if n < 0:
        raise ValueError(f"method.modules={modules} must be >= 0 (0 = one layer per module)")
    ranges = split_contiguous(layer_costs(model, family, balance, seq_len, head), n)
    return [ModuleSpec(i, n, start, stop) for i, (start, stop) in enumerate(ranges)]
