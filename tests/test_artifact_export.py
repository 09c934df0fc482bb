"""Export a quantized model to a packed directory and load it back: the loaded model reproduces the
fake-quantized one, the file is really smaller, and damaged artifacts are refused by name."""

import copy
import json

import pytest
import torch

from conftest import build_tiny, minilm_dir
from mrem_dist.artifact import ArtifactError, export_quantized, load_quantized
from mrem_dist.scheme import QuantScheme
from mrem_dist.models import FAMILIES
from mrem_dist.quantize import calibrate_activations, quantize_model
from mrem_dist.scoring import run_batch
from test_engine import _batches


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _quantized(family, head, scheme):
    model = build_tiny(family, head)
    family = FAMILIES[family]
    q = quantize_model(copy.deepcopy(model), family, scheme, learnable=True)
    batches = _batches(2)
    calibrate_activations(q, lambda m, b: run_batch(m, family, b), batches)
    with torch.no_grad():  # move weights and step sizes off their init, as training would
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p) * p.abs().mean())
    return q.eval(), family


SCHEMES = {
    "w4a8": QuantScheme(),
    "w2e2a8-ternary": QuantScheme(w_bits=2, e_bits=2, ternary=True),
    "w3-asym": QuantScheme(w_bits=3, w_symmetric=False),
    "w8-group-ocs": QuantScheme(w_bits=8, w_granularity="group", w_groups=4, ocs_ratio=0.05),
    "w4-dynamic-fp-emb": QuantScheme(e_bits=None, a_mode="dynamic"),
    "w2e4a8-full-range": QuantScheme(w_bits=2, e_bits=4, w_full_range=True),
}


@pytest.mark.parametrize("family,head", [("bert", True), ("bert", False), ("roberta", False), ("distilbert", True)])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_loaded_model_reproduces_the_fake_quantized_one(tmp_path, tokenizer, family, head, scheme):
    q, family = _quantized(family, head, SCHEMES[scheme])
    kind = "classifier" if head else "encoder"
    meta = export_quantized(q, tokenizer, SCHEMES[scheme], kind, tmp_path / "art")
    loaded = load_quantized(tmp_path / "art")
    assert loaded.task.kind == kind and loaded.meta.modules.keys() == meta["modules"].keys()
    b = _batches(1, seed=3)[0]
    with torch.no_grad():
        want = run_batch(q, family, b)
        got = run_batch(loaded.model, loaded.family, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".*tmp"))


def test_packed_file_is_smaller(tmp_path, tokenizer):
    from safetensors.torch import save_file

    q, _ = _quantized("bert", False, QuantScheme(w_bits=4, e_bits=8))
    meta = export_quantized(q, tokenizer, QuantScheme(w_bits=4, e_bits=8), "encoder", tmp_path / "art")
    fp = build_tiny("bert", False)
    save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(tmp_path / "fp.safetensors"))
    ratio = meta["bytes"]["model.safetensors"] / (tmp_path / "fp.safetensors").stat().st_size
    assert ratio < 0.3, ratio  # word embeddings dominate this tiny model: 8 bits of 32


@pytest.fixture()
def artifact(tmp_path, tokenizer):
    q, _ = _quantized("bert", True, QuantScheme())
    export_quantized(q, tokenizer, QuantScheme(), "classifier", tmp_path / "art")
    return tmp_path / "art"


def test_existing_target_is_refused(artifact, tokenizer):
    q, _ = _quantized("bert", True, QuantScheme())
    with pytest.raises(FileExistsError, match="already exists"):
        export_quantized(q, tokenizer, QuantScheme(), "classifier", artifact)


def test_truncated_tensors_are_refused(artifact):
    f = artifact / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="model.safetensors: checksum mismatch"):
        load_quantized(artifact)


def _reseal(artifact):
    # The checks behind the manifest: a folder made consistent again (as a newer release would write it).
    from mrem_dist.artifact.schema import write_manifest

    write_manifest(artifact)


def test_unknown_version_is_refused(artifact):
    meta = json.loads((artifact / "quantization.json").read_text())
    meta["version"] = 99
    (artifact / "quantization.json").write_text(json.dumps(meta))
    _reseal(artifact)
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        load_quantized(artifact)


def test_a_version_3_artifact_loads_with_the_restricted_activation_grid(artifact):
    # Version 3 predates quant.a_full_range: its activations were on the restricted grid.
    meta = json.loads((artifact / "quantization.json").read_text())
    assert meta["version"] == 4 and meta["quant"].pop("a_full_range") is False
    meta["version"] = 3
    (artifact / "quantization.json").write_text(json.dumps(meta))
    _reseal(artifact)
    art = load_quantized(artifact)
    assert art.meta.version == 3 and art.meta.scheme.a_full_range is False


def test_corrupt_metadata_and_missing_tokenizer_are_named(artifact):
    for f in [*artifact.glob("tokenizer*"), *artifact.glob("vocab*"), *artifact.glob("special_tokens*")]:
        f.unlink()
    with pytest.raises(ArtifactError, match=r"tokenizer.* is missing \(listed in manifest.json\)"):
        load_quantized(artifact)
    _reseal(artifact)
    with pytest.raises(ArtifactError, match="tokenizer files in .* are missing"):
        load_quantized(artifact)
    (artifact / "quantization.json").write_text("{not json")
    _reseal(artifact)
    with pytest.raises(ArtifactError, match="quantization.json is not valid JSON"):
        load_quantized(artifact)
    with pytest.raises(ArtifactError, match="is not a directory"):
        load_quantized(artifact / "nothing")


@pytest.mark.parametrize("family,head", [("bert", True), ("roberta", False), ("distilbert", True)])
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("backend", ["onednn", "int_mm"])
def test_int8_kernel_reproduces_the_float_kernel(tmp_path, tokenizer, family, head, scheme, backend):
    """kernel=int8 runs integer GEMMs on the stored codes. Every layer matches its float twin to
    float rounding (test_int8.py); end to end, a rounding difference can move an activation across a
    grid boundary (one code step), so the whole model is compared with a relative L2 tolerance."""
    from mrem_dist.quant.int8 import Int8Linear, cpu_int8_code_limit

    q, family = _quantized(family, head, SCHEMES[scheme])
    export_quantized(q, tokenizer, SCHEMES[scheme], "classifier" if head else "encoder", tmp_path / "art")
    if backend == "onednn" and SCHEMES[scheme].w_bits == 8 and cpu_int8_code_limit() < 127:
        with pytest.raises(ValueError, match="exact only up to"):
            load_quantized(tmp_path / "art", kernel="int8", backend=backend)
        return
    art = load_quantized(tmp_path / "art", kernel="int8", backend=backend)
    assert any(isinstance(m, Int8Linear) for m in art.model.modules())
    reference = load_quantized(tmp_path / "art")
    b = _batches(1, seed=3)[0]
    with torch.no_grad():
        want = run_batch(reference.model, family, b)
        got = run_batch(art.model, family, b)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-3, rel


def test_unknown_kernel_is_refused(artifact):
    with pytest.raises(ValueError, match="kernel='fast'"):
        load_quantized(artifact, kernel="fast")
