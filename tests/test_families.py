"""The model-family protocol: projections normalized to nn.Linear (or a clear error), tied tensors
held by every module partition that uses them, the head's per-token cost, and the streaming metric
states of the tasks (update batch by batch, merge partial states, compute at the end)."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import build_tiny
from mrem_dist.data import Batch, fidelity_metrics
from mrem_dist.artifact import ArtifactError
from mrem_dist.artifact.export import mrem_shard
from mrem_dist.artifact.shard import Manifest
from mrem_dist.engine import partition
from mrem_dist.engine.shard import holds, release_unowned, tensor_owner
from mrem_dist.models import FAMILIES, EvalSet, SequenceClassification
from mrem_dist.models.tasks import ClassificationState, FidelityState
from mrem_dist.quantize import quantize_model
from mrem_dist.scheme import QuantScheme

BERT = FAMILIES["bert"]


def test_conv1d_projections_become_equal_linears():
    model = build_tiny("bert", head=False)
    layer = BERT.layers(model)[0]
    torch.manual_seed(0)
    conv = Conv1D(32, 32)  # GPT-2's projection: weight [in, out]
    nn.init.normal_(conv.weight, std=0.1)
    layer.attention.output.dense = conv
    x = torch.randn(2, 5, 32)
    before = conv(x)
    assert BERT.normalize_projections(model) == 1
    linear = layer.attention.output.dense
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), before, rtol=0, atol=1e-6)
    assert BERT.normalize_projections(model) == 0  # idempotent


def test_a_layer_left_without_any_linear_is_an_error_naming_its_type():
    model = build_tiny("bert", head=False)

    class Opaque(nn.Module):
        def forward(self, hidden, **_):
            return hidden

    BERT.layers(model)[2] = Opaque()
    with pytest.raises(ValueError, match=r"layer 2 \(Opaque\) of this bert model has no nn.Linear projection"):
        BERT.normalize_projections(model)


def _tied_classifier():
    # A tensor shared by the first module (position embeddings) and the last (the head): the same
    # Parameter under two names, as a word embedding tied to an LM head is.
    model = build_tiny("bert", head=True, num_labels=64)
    model.classifier.weight = model.bert.embeddings.position_embeddings.weight
    return model


def test_a_tied_tensor_is_held_by_both_end_modules_and_both_must_agree():
    model = _tied_classifier()
    specs = partition(model, BERT, 2)
    owner = tensor_owner(model, BERT, specs)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    release_unowned(first, owner, {0})
    release_unowned(last, owner, {1})
    for shard in (first, last):  # kept by both, still one tensor in each
        assert shard.bert.embeddings.position_embeddings.weight.numel() == 64 * 32
        assert shard.classifier.weight is shard.bert.embeddings.position_embeddings.weight
    assert first.bert.encoder.layer[3].output.dense.weight.numel() == 0
    assert last.bert.encoder.layer[0].output.dense.weight.numel() == 0
    scheme = QuantScheme(e_bits=None, a_bits=None)
    shards = []
    for rank, shard in ((0, first), (1, last)):  # what each rank quantizes and exports
        q = quantize_model(copy.deepcopy(shard), BERT, scheme, layers=set(specs[rank].layers), embeddings=rank == 0)
        shards.append(mrem_shard(q, holds(q, owner, {rank})))
    stored = "bert.embeddings.position_embeddings.weight"  # the first name: the classifier is its alias
    assert all(stored in s.tensors and s.tied == {"classifier.weight": stored} for s in shards)
    merged = Manifest.merge({rank: s.manifest(rank) for rank, s in enumerate(shards)})
    assert merged.ranks[stored] == 0 and merged.tied == {"classifier.weight": stored}
    # The same tensor sent twice with different values is refused, naming both ranks.
    shards[1].tensors[stored] = shards[1].tensors[stored] + 1.0
    with pytest.raises(ArtifactError, match=f"{stored} was sent by both rank 0 and rank 1, with different values"):
        Manifest.merge({rank: s.manifest(rank) for rank, s in enumerate(shards)})


def test_the_classification_head_is_charged_per_sequence():
    model = build_tiny("bert", head=True)
    head = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.bert.parameters())
    assert BERT.head_cost_per_token(model, 16) == pytest.approx(2.0 * head / 16)


def _batches(n, with_labels):
    g = torch.Generator().manual_seed(0)
    return [Batch(torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long),
                  labels=torch.randint(0, 2, (4,), generator=g) if with_labels else None) for _ in range(n)]


def test_fidelity_state_merges_and_equals_the_whole_set_computed_at_once():
    g = torch.Generator().manual_seed(1)
    fp = [torch.randn(4, 8, generator=g) for _ in range(4)]
    q = [f + 0.1 * torch.randn(4, 8, generator=g) for f in fp]
    batches = _batches(4, False)
    whole, head, tail = FidelityState(), FidelityState(), FidelityState()
    for i, b in enumerate(batches):
        whole.update(fp[i], q[i], b)
        (head if i < 2 else tail).update(fp[i], q[i], b)
    merged = head.merge(tail).compute()
    assert merged == whole.compute()
    assert merged[1] == fidelity_metrics(torch.cat(fp), torch.cat(q)) and merged[0]["cosine"] == pytest.approx(1.0)


def test_classification_state_scores_the_labels_carried_by_the_batches():
    batches = _batches(3, True)
    task = SequenceClassification(2)
    state = task.metric(EvalSet(batches, ("accuracy",)))
    assert isinstance(state, ClassificationState)
    for b in batches:
        right = nn.functional.one_hot(b.labels, 2).float()
        state.update(right, 1.0 - right, b)  # full precision always right, quantized always wrong
    fp, q = state.compute()
    assert fp == {"accuracy": 1.0} and q["accuracy"] == 0.0 and q["fidelity_cosine"] == pytest.approx(0.0)
    # Without the full-precision model (PreQuant with no reference): the quantized model's task metric only.
    alone = task.metric(EvalSet(batches, ("accuracy",)))
    for b in batches:
        alone.update(None, nn.functional.one_hot(b.labels, 2).float(), b)
    assert alone.compute() == (None, {"accuracy": 1.0})


def test_nan_outputs_are_blamed_on_the_right_model():
    state = FidelityState()
    b = _batches(1, False)[0]
    with pytest.raises(FloatingPointError, match="the full-precision model itself produced NaN"):
        state.update(torch.full((4, 8), float("nan")), torch.zeros(4, 8), b)
    with pytest.raises(FloatingPointError, match="the quantized model produced NaN"):
        state.update(torch.zeros(4, 8), torch.full((4, 8), float("nan")), b)


def test_a_tied_tensor_is_stored_once_in_the_artifact_and_tied_again_on_load(tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from conftest import minilm_dir
    from mrem_dist.artifact import export_quantized, load_quantized

    model = _tied_classifier()
    scheme = QuantScheme(a_bits=None)
    q = quantize_model(copy.deepcopy(model), BERT, scheme, learnable=False)
    export_quantized(q, AutoTokenizer.from_pretrained(minilm_dir()), scheme, "classifier", tmp_path / "art")
    with safe_open(str(tmp_path / "art" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "bert.embeddings.position_embeddings.weight" in names and "classifier.weight" not in names
    art = load_quantized(tmp_path / "art")
    assert art.meta.tied == {"classifier.weight": "bert.embeddings.position_embeddings.weight"}
    assert art.model.classifier.weight is art.model.bert.embeddings.position_embeddings.weight
    torch.testing.assert_close(art.model.classifier.weight, q.classifier.weight)
