"""A module partition as a runnable unit: (embeddings) + consecutive layers (+ head).

A Stage references the submodules of a model; it owns no weights of its own, so a teacher Stage
over the full-precision model and a student Stage over its quantized copy describe the same
partition of two models. It only needs the model's config to build attention masks, so the
distributed engine can run a Stage on a rank that holds nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from mrem_dist.data import Batch
from mrem_dist.models.adapters import ModelAdapter

from .partition import ModuleSpec


@dataclass
class StageOutput:
    hidden: list[Tensor]  # output of every layer of the stage, in order; hidden[-1] is the stage output
    logits: Optional[Tensor] = None  # last stage of a task model only


class Stage(nn.Module):
    def __init__(self, model: nn.Module, adapter: ModelAdapter, spec: ModuleSpec) -> None:
        super().__init__()
        self.spec, self.adapter = spec, adapter
        self.config = adapter.encoder(model).config
        all_layers = adapter.layers(model)
        self.layers = nn.ModuleList(all_layers[i] for i in spec.layers)
        self.embeddings = adapter.embeddings(model) if spec.first else None
        # The head runs through the adapter on the whole model (its layout differs per family);
        # kept in a list so that it is not registered twice as a submodule of this Stage.
        self._head_model = [model] if (spec.last and adapter.is_task_model(model)) else []

    @property
    def has_head(self) -> bool:
        return bool(self._head_model)

    def forward(self, inputs: Optional[Tensor], batch: Batch) -> StageOutput:
        """`inputs`: the hidden state entering the stage, or None for the first stage (which
        embeds batch.input_ids itself)."""
        if self.spec.first:
            hidden = self.adapter.embed_with(self.embeddings, batch.input_ids, batch.token_type_ids)
        else:
            if inputs is None:
                raise ValueError(f"{self.spec.describe()} needs the hidden state of module {self.spec.index - 1} as input")
            hidden = inputs
        mask = self.adapter.layer_mask(self.config, hidden, batch.attention_mask)
        outs = []
        for layer in self.layers:
            hidden = self.adapter.run_layer(layer, hidden, mask)
            outs.append(hidden)
        logits = self.adapter.head(self._head_model[0], hidden) if self.has_head else None
        return StageOutput(outs, logits)

    def extra_repr(self) -> str:
        return self.spec.describe()
