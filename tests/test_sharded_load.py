"""Sharded loading (models/sharded.py): a skeleton on the meta device filled tensor by tensor from
the safetensors files equals from_pretrained bit for bit, and a rank's share holds only the bytes of
its own modules' tensors (counted on the materialized tensors, not RSS)."""

from __future__ import annotations

import pytest
import torch

from conftest import minilm_dir, save_tiny, save_tiny_decoder
from mrem_dist.engine import partition
from mrem_dist.engine.shard import holders, release_unowned, tensor_owner
from mrem_dist.models.loading import can_load_sharded, load_model, load_skeleton
from mrem_dist.models.sharded import materialize, materialized_bytes, tensor_names

CPU = torch.device("cpu")


def _folders(tmp_path_factory):
    return {
        "llama": lambda: save_tiny_decoder(tmp_path_factory.mktemp("sl_llama"), "llama"),
        "qwen2": lambda: save_tiny_decoder(tmp_path_factory.mktemp("sl_qwen2"), "qwen2"),
        "gpt2": lambda: save_tiny_decoder(tmp_path_factory.mktemp("sl_gpt2"), "gpt2"),
        "bert-classifier": lambda: save_tiny(tmp_path_factory.mktemp("sl_bert"), "bert", head=True),
        "distilbert": lambda: save_tiny(tmp_path_factory.mktemp("sl_distil"), "distilbert", head=False),
        "minilm": minilm_dir,
    }


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "bert-classifier", "distilbert", "minilm"])
def folder(request, tmp_path_factory) -> str:
    return _folders(tmp_path_factory)[request.param]()


def _state(model) -> dict:
    """Every parameter and buffer by name, non-persistent buffers (rotary frequencies) included."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _tied(model) -> list[list[str]]:
    return sorted(sorted(names) for names in tensor_names(model).values() if len(names) > 1)


def test_a_materialized_skeleton_equals_from_pretrained(folder):
    whole = load_model(folder).model
    skeleton = load_skeleton(folder)
    assert all(p.device.type == "meta" for p in skeleton.model.parameters())
    n = materialize(skeleton.model, folder, lambda name: True, CPU)
    ref, got = _state(whole), _state(skeleton.model)
    assert sorted(ref) == sorted(got)
    for k in ref:
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
    # The same names share one tensor in both (tied embeddings: one Parameter under two names).
    assert _tied(whole) == _tied(skeleton.model)
    assert n == materialized_bytes(skeleton.model) == materialized_bytes(whole)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_rank_holds_only_its_partition(kind, tmp_path):
    """The sharded share of each of 2 ranks equals a whole load released to that share, tensor for
    tensor, and its materialized bytes are the owned ones only; with tied embeddings (llama) both end
    ranks hold the one tied tensor."""
    folder = save_tiny_decoder(tmp_path / kind, kind)
    for rank in (0, 1):
        whole = load_model(folder)
        specs = partition(whole.model, whole.family, 2)
        release_unowned(whole.model, tensor_owner(whole.model, whole.family, specs), {rank})
        skeleton = load_skeleton(folder)
        model = skeleton.model
        owner = tensor_owner(model, skeleton.family, partition(model, skeleton.family, 2))
        by_name = holders(model, owner)
        n = materialize(model, folder, lambda name: rank in by_name[name], CPU)
        ref, got = _state(whole.model), _state(model)
        assert sorted(ref) == sorted(got)
        for k in ref:
            assert torch.equal(ref[k], got[k]), (rank, k)
        owned = {id(t): t for k, t in got.items() if rank in by_name[k]}
        assert n == materialized_bytes(model) == sum(t.numel() * t.element_size() for t in owned.values())
        layers = [i for s in partition(model, skeleton.family, 2) if s.index != rank for i in s.layers]
        assert layers and all(p.numel() == 0 for i in layers for p in skeleton.family.layers(model)[i].parameters())
        if kind == "llama":
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert model.lm_head.weight.numel() > 0  # both end ranks hold the tied embedding


def test_a_folder_without_safetensors_cannot_be_loaded_sharded(tmp_path):
    folder = save_tiny_decoder(tmp_path / "bin", "llama")
    assert can_load_sharded(folder)
    model = load_model(folder).model
    for f in (tmp_path / "bin").glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert not can_load_sharded(folder)


def test_a_tensor_the_files_do_not_hold_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_decoder(tmp_path / "renamed", "llama")
    path = tmp_path / "renamed" / "model.safetensors"
    state = load_file(path)
    state["renamed.weight"] = state.pop("model.norm.weight")
    save_file(state, path, metadata={"format": "pt"})
    skeleton = load_skeleton(folder)
    with pytest.raises(KeyError, match=r"model\.norm\.weight.*model\.sharded_load=false"):
        materialize(skeleton.model, folder, lambda name: True, CPU)


def test_the_ranks_shares_have_the_fingerprint_of_the_whole_model(tiny_llama_dir):
    """Checkpoints are keyed by one fingerprint on every stage: merged over the ranks, the hashes
    of the shares are those of the whole model."""
    from mrem_dist.engine.checkpoint import fingerprint
    from test_engine import _batches

    batches = _batches(2)
    whole = load_model(tiny_llama_dir)
    specs = partition(whole.model, whole.family, 2)
    shares = []
    for rank in (0, 1):
        share = load_model(tiny_llama_dir).model
        release_unowned(share, tensor_owner(share, whole.family, specs), {rank})
        shares.append(share)
    own: list[dict] = []
    fingerprint(shares[1], batches, {}, gather=lambda mine: own.append(mine) or [mine])
    merged = fingerprint(shares[0], batches, {}, gather=lambda mine: [mine, own[0]])
    assert merged == fingerprint(whole.model, batches, {})
    assert fingerprint(shares[0], batches, {}) != merged  # one share alone is not the model
