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
    causal: bool = False  # a decoder: causal attention, loaded as AutoModelForCausalLM

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

    def embedding_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        """Qualified names of the embedding modules (the first module partition owns them)."""
        return (self._prefix(model) + self.embeddings_attr,)

    def final_norm(self, model: nn.Module) -> Optional[nn.Module]:
        """The norm after the last layer (decoders); None for post-norm encoders."""
        return None

    def head_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The task head: every parameter outside the embeddings and the layers (BERT: pooler +
        classifier; RoBERTa: classifier; DistilBERT: pre_classifier + classifier)."""
        if not self.is_task_model(model):
            raise ValueError("the model has no task head: load it as a classifier (model.kind=classifier)")
        body = tuple(p + "." for p in self.embedding_prefixes(model)) + (self.layer_prefix(model) + ".",)
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
                    linear = nn.Linear(child.nx, child.nf, bias=child.bias is not None,
                                       device=child.weight.device, dtype=child.weight.dtype)
                    # A partition this rank let go of (engine/shard.py) stays let go of: empty tensors.
                    for dst, src in ((linear.weight, child.weight.t()), (linear.bias, child.bias)):
                        if src is None:
                            continue
                        if src.numel():
                            dst.copy_(src)
                        else:
                            dst.data = torch.empty(0, dtype=dst.dtype, device=dst.device)
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


class DecoderFamily(ModelFamily):
    """A causal LM (AutoModelForCausalLM): pre-norm layers, a final norm, and an LM head that
    runs on every token. Hidden states at padded positions are never read (calibration and
    perplexity windows are full, unpadded sequences of data.seq_len tokens)."""

    final_norm_attr: str = "norm"
    lm_head_attr: str = "lm_head"
    causal = True

    def final_norm(self, model: nn.Module) -> Optional[nn.Module]:
        return getattr(self.backbone(model), self.final_norm_attr)

    def _head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return getattr(model, self.lm_head_attr)(hidden)  # `hidden` has been through the final norm

    def head_cost_per_token(self, model: nn.Module, seq_len: int) -> float:
        if not self.is_task_model(model):
            return 0.0
        head = getattr(model, self.lm_head_attr)
        return 2.0 * head.in_features * head.out_features

    @staticmethod
    def _positions(hidden: Tensor) -> Tensor:
        return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)

    @staticmethod
    def _causal_mask(config, hidden: Tensor, batch: Batch, positions: Tensor, sliding: bool = False):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make = create_sliding_window_causal_mask if sliding else create_causal_mask
        return make(config=config, inputs_embeds=hidden, attention_mask=batch.attention_mask, cache=None,
                    position_ids=positions)


class LlamaFamily(DecoderFamily):
    """Llama and the models with its module layout: Qwen2/Qwen2.5 (biases on q/k/v), Mistral
    (sliding-window attention). Rotary embeddings and the causal mask are built from the config
    (a rank holding a few layers has no `rotary_emb` of its own to call); grouped-query attention
    is the layers' own business."""

    name, model_types, base_prefix = "llama", ("llama", "qwen2", "mistral"), "model"
    embeddings_attr, word_embeddings_attr, layers_path = "embed_tokens", "", "layers"

    def word_embeddings(self, model: nn.Module) -> nn.Embedding:
        return self.embeddings(model)  # the embedding table is the whole embeddings module

    def set_word_embeddings(self, model: nn.Module, module: nn.Module) -> None:
        setattr(self.backbone(model), self.embeddings_attr, module)

    def embed(self, embeddings: nn.Module, batch: Batch) -> Tensor:
        return embeddings(batch.input_ids)

    @staticmethod
    def _rotary(config, device) -> nn.Module:
        """The model type's own rotary module (transformers.models.<type>.modeling_<type>),
        built once per config and device: its inv_freq follows the config's rope parameters."""
        cache = _ROTARY.get((id(config), str(device)))
        if cache is None or cache[0] is not config:
            import importlib

            modeling = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
            cls = next(getattr(modeling, n) for n in dir(modeling) if n.endswith("RotaryEmbedding") and n[0] != "_")
            cache = (config, cls(config=config).to(device))
            _ROTARY[(id(config), str(device))] = cache
        return cache[1]

    def _sliding(self, config) -> tuple[bool, bool]:
        """(a full-attention layer exists, a sliding-window layer exists)."""
        types = getattr(config, "layer_types", None)
        if config.model_type == "mistral":
            return config.sliding_window is None, config.sliding_window is not None
        if not types:
            return True, False
        return "full_attention" in types, "sliding_attention" in types

    def layer_context(self, config, hidden: Tensor, batch: Batch) -> dict:
        positions = self._positions(hidden)
        full, sliding = self._sliding(config)
        masks = {}
        if full:
            masks["full_attention"] = self._causal_mask(config, hidden, batch, positions)
        if sliding:
            masks["sliding_attention"] = self._causal_mask(config, hidden, batch, positions, sliding=True)
        return {"attention_mask": masks, "position_ids": positions,
                "position_embeddings": self._rotary(config, hidden.device)(hidden, position_ids=positions)}

    def run_layer(self, layer: nn.Module, hidden: Tensor, context: dict) -> Tensor:
        masks = context["attention_mask"]
        # Qwen2 names each layer's attention type; Mistral's layers all share the model's window.
        kind = getattr(getattr(layer, "self_attn", None), "layer_type", None) or next(iter(masks))
        return super().run_layer(layer, hidden, {**context, "attention_mask": masks[kind]})


class Gpt2Family(DecoderFamily):
    """GPT-2: learned position embeddings added to the token embeddings, Conv1D projections
    (normalized to nn.Linear before quantization), final norm `ln_f`, LM head tied to `wte`."""

    name, model_types, base_prefix = "gpt2", ("gpt2",), "transformer"
    embeddings_attr, word_embeddings_attr, layers_path, final_norm_attr = "", "wte", "h", "ln_f"

    def embeddings(self, model: nn.Module) -> nn.Module:
        return Gpt2Embeddings(self.backbone(model))

    def word_embeddings(self, model: nn.Module) -> nn.Embedding:
        return self.backbone(model).wte

    def set_word_embeddings(self, model: nn.Module, module: nn.Module) -> None:
        self.backbone(model).wte = module

    def embedding_prefixes(self, model: nn.Module) -> tuple[str, ...]:
        base = self._prefix(model)
        return (base + "wte", base + "wpe")

    def embed(self, embeddings: nn.Module, batch: Batch) -> Tensor:
        return embeddings(batch.input_ids)

    def layer_context(self, config, hidden: Tensor, batch: Batch) -> dict:
        positions = self._positions(hidden)
        return {"attention_mask": self._causal_mask(config, hidden, batch, positions), "position_ids": positions}


class Gpt2Embeddings(nn.Module):
    """GPT-2's wte + wpe (+ dropout) as one module over the backbone's own submodules (shared,
    not copied), so that a Stage can hold "the embeddings" of GPT-2 as it does BERT's."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = backbone.wte, backbone.wpe, backbone.drop

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(positions))


# (id(config), device) -> (config, rotary module): built once per model and device.
_ROTARY: dict = {}

FAMILIES: dict[str, ModelFamily] = {
    f.name: f for f in (BertFamily(), RobertaFamily(), DistilBertFamily(), LlamaFamily(), Gpt2Family())
}
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
