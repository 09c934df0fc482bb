"""One class per architecture family: where the embeddings, the layers, the final norm and the head
live; how to run the model piece by piece (embed -> layer -> ... -> head); what every layer of a
stage is called with (the layer context); and what must be normalized before quantization.

The engine, the partitioner and the scoring code talk only to this interface: a new family (GPT-2,
Llama: causal mask, rotary embeddings, final norm, LM head) is a new subclass, not a change to them.

- **Layer context.** `layer_context(config, hidden, batch)` is built once per batch and passed to
  every layer as keyword arguments (`layer(hidden, **context)`): for the encoders here the
  attention mask in the layer's own format; for a decoder also position ids and rotary embeddings.
  It takes the model config, not the model, so a rank holding a few layers can build it.
- **Projections.** Quantization replaces `nn.Linear`s. `normalize_projections` turns projections of
  other types (GPT-2's `Conv1D`) into equivalent `nn.Linear`s first, and refuses a layer that would
  end with none: a layer left in full precision without a word would be a silent wrong result.
- **Tied weights.** A Parameter reachable under several names (a word embedding tied to an LM head)
  is one tensor: every module partition that holds one of its names holds it (engine/shard.py).
- **Head cost.** `head_cost_per_token` is what the partitioner charges the last module per token: a
  sequence-classification head runs once per sequence, an LM head once per token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mrem_dist.data import Batch


class ModelFamily:
    """The Hugging Face module layout of one family. `model` is either the bare backbone
    (AutoModel) or a task model (AutoModelFor...) whose backbone sits under `base_prefix`."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    base_prefix: str = ""  # attribute holding the backbone inside a task model ("bert", ...)
    embeddings_attr: str = "embeddings"
    word_embeddings_attr: str = "word_embeddings"  # relative to the embeddings module
    layers_path: str = "encoder.layer"  # relative to the backbone

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- where the parts live ----------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base_prefix, model)

    def is_task_model(self, model: nn.Module) -> bool:
        return hasattr(model, self.base_prefix)

    def config(self, model: nn.Module):
        return self.backbone(model).config

    def embeddings(self, model: nn.Module) -> nn.Module:
        return getattr(self.backbone(model), self.embeddings_attr)

    def word_embeddings(self, model: nn.Module) -> nn.Embedding:
        return getattr(self.embeddings(model), self.word_embeddings_attr)

    def set_word_embeddings(self, model: nn.Module, module: nn.Module) -> None:
        setattr(self.embeddings(model), self.word_embeddings_attr, module)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = self.backbone(model)
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def _prefix(self, model: nn.Module) -> str:
        return self.base_prefix + "." if self.is_task_model(model) else ""

    def layer_prefix(self, model: nn.Module) -> str:
        """Qualified name of the layer list inside `model`, e.g. 'bert.encoder.layer'."""
        return self._prefix(model) + self.layers_path

    def embeddings_prefix(self, model: nn.Module) -> str:
        return self._prefix(model) + self.embeddings_attr

    def final_norm(self, model: nn.Module) -> Optional[nn.Module]:
        """The norm after the last layer (decoders); None for post-norm encoders."""
        return None

    def head_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The task head: every parameter outside the embeddings and the layers (BERT: pooler +
        classifier; RoBERTa: classifier; DistilBERT: pre_classifier + classifier)."""
        if not self.is_task_model(model):
            raise ValueError("the model has no task head: load it as a classifier (model.kind=classifier)")
        body = (self.embeddings_prefix(model) + ".", self.layer_prefix(model) + ".")
        return [(n, p) for n, p in model.named_parameters() if not n.startswith(body)]

    # -- running it piece by piece -------------------------------------------------------------
    def embed(self, embeddings: nn.Module, batch: Batch) -> Tensor:
        """Run the embeddings module itself (a partition may hold it without the whole model)."""
        if batch.token_type_ids is None:
            return embeddings(input_ids=batch.input_ids)
        return embeddings(input_ids=batch.input_ids, token_type_ids=batch.token_type_ids)

    def layer_context(self, config, hidden: Tensor, batch: Batch) -> dict:
        """Keyword arguments of every layer for this batch (built once, shared by the layers)."""
        from transformers.masking_utils import create_bidirectional_mask

        return {"attention_mask": create_bidirectional_mask(config=config, inputs_embeds=hidden,
                                                            attention_mask=batch.attention_mask)}

    def run_layer(self, layer: nn.Module, hidden: Tensor, context: dict) -> Tensor:
        out = layer(hidden, **context)
        return out[0] if isinstance(out, tuple) else out

    def head(self, model: nn.Module, hidden: Tensor) -> Optional[Tensor]:
        """Logits of a task model from the last hidden state; None for a bare backbone."""
        if not self.is_task_model(model):
            return None
        return self._head(model, hidden)

    def _head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        raise NotImplementedError(f"{self.name} has no task head")

    def forward(self, model: nn.Module, batch: Batch) -> Tensor:
        """The whole model through the pieces: the logits of a task model, the last hidden state
        of a backbone; equals the Hugging Face forward (tested)."""
        hidden = self.embed(self.embeddings(model), batch)
        context = self.layer_context(self.config(model), hidden, batch)
        for layer in self.layers(model):
            hidden = self.run_layer(layer, hidden, context)
        norm = self.final_norm(model)
        if norm is not None:
            hidden = norm(hidden)
        logits = self.head(model, hidden)
        return hidden if logits is None else logits

    # -- preparing it for quantization ---------------------------------------------------------
    @torch.no_grad()
    def normalize_projections(self, model: nn.Module) -> int:
        """Turn every projection of the layers that is not an nn.Linear (transformers' Conv1D,
        weight [in, out]) into an equivalent nn.Linear, in place; returns how many were converted.
        A layer left with no nn.Linear at all is an error naming its type."""
        from transformers.pytorch_utils import Conv1D

        converted = 0
        for index, layer in enumerate(self.layers(model)):
            for name, child in list(layer.named_modules()):
                if isinstance(child, Conv1D):
                    in_features, out_features = child.weight.shape
                    linear = nn.Linear(in_features, out_features, bias=child.bias is not None,
                                       device=child.weight.device, dtype=child.weight.dtype)
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                    parent_name, _, attr = name.rpartition(".")
                    setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, linear)
                    converted += 1
            if not any(isinstance(m, nn.Linear) for m in layer.modules()):
                raise ValueError(
                    f"layer {index} ({type(layer).__name__}) of this {self.name} model has no nn.Linear projection "
                    "to quantize: its projections are of a type mrem-dist does not know; add their conversion to "
                    f"{type(self).__name__}.normalize_projections"
                )
        return converted

    def head_cost_per_token(self, model: nn.Module, seq_len: int) -> float:
        """FLOPs per token of the head: a classification head runs once per sequence."""
        head = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in self.backbone(model).parameters())
        return 2.0 * head / max(seq_len, 1)


class BertFamily(ModelFamily):
    name, model_types, base_prefix = "bert", ("bert",), "bert"

    def _head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        # BertForSequenceClassification: pooler (tanh dense on [CLS]) -> dropout -> classifier.
        pooled = model.bert.pooler(hidden) if model.bert.pooler is not None else hidden[:, 0]
        return model.classifier(model.dropout(pooled))


class RobertaFamily(ModelFamily):
    name, model_types, base_prefix = "roberta", ("roberta", "xlm-roberta"), "roberta"

    def _head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        # RobertaClassificationHead takes the whole sequence and reads <s> itself.
        return model.classifier(hidden)


class DistilBertFamily(ModelFamily):
    name, model_types, base_prefix = "distilbert", ("distilbert",), "distilbert"
    layers_path = "transformer.layer"

    def embed(self, embeddings: nn.Module, batch: Batch) -> Tensor:
        return embeddings(input_ids=batch.input_ids)  # no token types

    def _head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (BertFamily(), RobertaFamily(), DistilBertFamily())}
# config.json model_type -> family; MiniLM checkpoints are model_type "bert".
MODEL_TYPE_TO_FAMILY = {t: f.name for f in FAMILIES.values() for t in f.model_types}


def family_for(model_type: str) -> ModelFamily:
    name = MODEL_TYPE_TO_FAMILY.get(model_type)
    if name is None:
        raise ValueError(
            f"model_type {model_type!r} has no model family: supported are {', '.join(sorted(MODEL_TYPE_TO_FAMILY))}. "
            "Add a ModelFamily subclass in mrem_dist/models/families.py for it."
        )
    return FAMILIES[name]
