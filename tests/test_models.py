import pytest
import torch

from conftest import build_tiny
from mrem_dist.data import Batch
from mrem_dist.models import FAMILIES, family_for, load_model, resolve_model_path


def _inputs(batch=3, seq=12, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0  # a padded row, so the mask matters
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if not f.causal))  # decoders: test_decoders.py
@pytest.mark.parametrize("head", [False, True])
def test_family_forward_matches_hf_forward(name, head):
    model = build_tiny(name, head)
    family = FAMILIES[name]
    ids, mask = _inputs()
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=mask)
        ref = hf.logits if head else hf.last_hidden_state
        ours = family.forward(model, Batch(ids, mask))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert len(family.layers(model)) == (model.config.num_hidden_layers if name != "distilbert" else 3)
    assert family.is_task_model(model) == head
    assert isinstance(family.word_embeddings(model), torch.nn.Embedding)


def test_layer_prefix_names_real_modules():
    for head in (False, True):
        model = build_tiny("bert", head)
        prefix = FAMILIES["bert"].layer_prefix(model)
        assert model.get_submodule(prefix + ".0") is FAMILIES["bert"].layers(model)[0]


def test_unknown_family_error_names_fix():
    with pytest.raises(ValueError, match="has no model family.*ModelFamily subclass in mrem_dist/models/families.py"):
        family_for("t5")


@pytest.mark.slow
def test_load_builtin_minilm_is_encoder():
    loaded = load_model("builtin:all-MiniLM-L6-v2")
    assert loaded.task.kind == "encoder" and loaded.family.name == "bert"
    assert len(loaded.family.layers(loaded.model)) == 6
    assert loaded.model.config.hidden_size == 384


def test_load_local_classifier(tiny_classifier_dir):
    loaded = load_model(tiny_classifier_dir)
    assert loaded.task.kind == "classifier" and loaded.task.num_labels == 2


def test_classifier_kind_without_head_is_refused(tiny_encoder_dir):
    with pytest.raises(ValueError, match="no fine-tuned sequence-classification head.*model.kind=encoder"):
        load_model(tiny_encoder_dir, kind="classifier")


def test_missing_local_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_unknown_hub_id_offline_is_clear():
    # conftest sets HF_HUB_OFFLINE=1, the same failure a machine without network gives.
    with pytest.raises(OSError, match="could not load model 'bert-base-uncased'.*model.path=<local folder"):
        load_model("bert-base-uncased")


def test_missing_tokenizer_is_clear(tmp_path):
    model = build_tiny("bert", head=True)
    model.save_pretrained(tmp_path)
    with pytest.raises(OSError, match="has no tokenizer files"):
        load_model(str(tmp_path))
