"""A module partition as a runnable unit: (embeddings) + consecutive layers (+ final norm and head).

A Stage references the submodules of a model; it owns no weights of its own, so a teacher Stage
over the full-precision model and a student Stage over its quantized copy describe the same
partition of two models. It needs only the model's config to build the layer context, so the
distributed engine can run a Stage on a rank that holds nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from mrem_dist.data import Batch
from mrem_dist.models.families import ModelFamily

from .partition import ModuleSpec


@dataclass
class StageOutput:
    hidden: list[Tensor]  # output of every layer of the stage, in order; hidden[-1] is the stage output
    logits: Optional[Tensor] = None  # last stage of a task model only


class Stage(nn.Module):
    def __init__(self, model: nn.Module, family: ModelFamily, spec: ModuleSpec) -> None:
        super().__init__()
        self.spec, self.family = spec, family
        self.config = family.config(model)
        all_layers = family.layers(model)
        self.layers = nn.ModuleList(all_layers[i] for i in spec.layers)
        self.embeddings = family.embeddings(model) if spec.first else None
        self.final_norm = family.final_norm(model) if spec.last else None
        # The head runs through the family on the whole model (its layout differs per family);
        # kept in a list so that it is not registered twice as a submodule of this Stage.
        self._head_model = [model] if (spec.last and family.is_task_model(model)) else []

    @property
    def has_head(self) -> bool:
        return bool(self._head_model)

    def forward(self, inputs: Optional[Tensor], batch: Batch, logits: bool = True) -> StageOutput:
        """`inputs`: the hidden state entering the stage, or None for the first stage (which
        embeds batch.input_ids itself). logits=False skips the head (an LM head over a 49K
        vocabulary costs as much as several layers, and reconstruction without KD never reads it)."""
        if self.spec.first:
            hidden = self.family.embed(self.embeddings, batch)
        else:
            if inputs is None:
                raise ValueError(f"{self.spec.describe()} needs the hidden state of module {self.spec.index - 1} as input")
            hidden = inputs
        context = self.family.layer_context(self.config, hidden, batch)
        outs = []
        for layer in self.layers:
            hidden = self.family.run_layer(layer, hidden, context)
            outs.append(hidden)
        out = None
        if self.has_head and logits:
            out = self.family.head(self._head_model[0], hidden if self.final_norm is None else self.final_norm(hidden))
        return StageOutput(outs, out)

    def extra_repr(self) -> str:
        return self.spec.describe()
