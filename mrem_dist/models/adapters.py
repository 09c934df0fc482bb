"""One adapter per architecture family: where the embeddings, the layer list and the head live, and
how to run the model piece by piece (embed -> layer -> ... -> head).

The reconstruction engine and the partitioner only talk to this interface, so a new family (GPT-2,
Llama: causal mask, final norm, LM head) is a new adapter, not a change to the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


@dataclass
class ModelAdapter:
    """Accessors for one family. `model` is either the bare encoder (AutoModel) or a task model
    (AutoModelFor...) whose encoder sits under `base_prefix`."""

    family: str
    base_prefix: str  # attribute holding the encoder inside a task model ("bert", "roberta", ...)
    embeddings_attr: str
    word_embeddings_attr: str  # relative to the embeddings module
    layers_path: str  # relative to the encoder

    # -- locating the parts ------------------------------------------------------------------
    def encoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base_prefix, model)

    def is_task_model(self, model: nn.Module) -> bool:
        return hasattr(model, self.base_prefix)

    def embeddings(self, model: nn.Module) -> nn.Module:
        return getattr(self.encoder(model), self.embeddings_attr)

    def word_embeddings(self, model: nn.Module) -> nn.Embedding:
        return getattr(self.embeddings(model), self.word_embeddings_attr)

    def set_word_embeddings(self, model: nn.Module, module: nn.Module) -> None:
        setattr(self.embeddings(model), self.word_embeddings_attr, module)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = self.encoder(model)
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def layer_prefix(self, model: nn.Module) -> str:
        """Qualified name of the layer list inside `model`, e.g. 'bert.encoder.layer'."""
        prefix = self.base_prefix + "." if self.is_task_model(model) else ""
        return prefix + self.layers_path

    # -- running it piece by piece -------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        return self.embed_with(self.embeddings(model), input_ids, token_type_ids)

    def embed_with(self, embeddings: nn.Module, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Run the embeddings module itself (a partition may hold it without the whole model)."""
        if self.family == "distilbert" or token_type_ids is None:
            return embeddings(input_ids=input_ids)
        return embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def layer_mask(self, config, hidden: torch.Tensor, attention_mask: torch.Tensor):
        """The mask object the layers expect (built once per batch, shared by all layers). Takes the
        model config, not the model, so that a partition holding a few layers can build it."""
        return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
        out = layer(hidden, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    def head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Task model: logits from the last hidden state. Bare encoder: the hidden state itself
        (the caller pools it)."""
        if not self.is_task_model(model):
            return hidden
        return _HEADS[self.family](model, hidden)

    def forward(self, model: nn.Module, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The whole model through the pieces; equals the HF forward (tested)."""
        hidden = self.embed(model, input_ids, token_type_ids)
        mask = self.layer_mask(self.encoder(model).config, hidden, attention_mask)
        for layer in self.layers(model):
            hidden = self.run_layer(layer, hidden, mask)
        return self.head(model, hidden)


def _bert_like_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # BertForSequenceClassification: pooler (tanh dense on [CLS]) -> dropout -> classifier.
    pooled = model.bert.pooler(hidden) if model.bert.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))


def _roberta_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # RobertaClassificationHead takes the whole sequence and reads <s> itself.
    return model.classifier(hidden)


def _distilbert_head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
    return model.classifier(model.dropout(pooled))


_HEADS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "bert": _bert_like_head,
    "roberta": _roberta_head,
    "distilbert": _distilbert_head,
}

ADAPTERS: dict[str, ModelAdapter] = {
    "bert": ModelAdapter("bert", "bert", "embeddings", "word_embeddings", "encoder.layer"),
    "roberta": ModelAdapter("roberta", "roberta", "embeddings", "word_embeddings", "encoder.layer"),
    "distilbert": ModelAdapter("distilbert", "distilbert", "embeddings", "word_embeddings", "transformer.layer"),
}
# model_type values (config.json) that share an adapter; MiniLM checkpoints are model_type "bert".
MODEL_TYPE_TO_FAMILY = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "distilbert": "distilbert"}


def adapter_for(model_type: str) -> ModelAdapter:
    family = MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        raise ValueError(
            f"model_type {model_type!r} has no adapter: supported are {', '.join(sorted(MODEL_TYPE_TO_FAMILY))}. "
            "Add a ModelAdapter in mrem_dist/models/adapters.py for this family."
        )
    return ADAPTERS[family]
