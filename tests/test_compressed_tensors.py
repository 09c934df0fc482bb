"""export.format=compressed-tensors: the folder transformers (and vLLM) load without mrem-dist.

The packing is checked against compressed-tensors' own packer; the round trips load every folder
with plain transformers in a separate process that never imports mrem_dist, and compare its logits
with the fake-quantized model mrem-dist evaluated. What the format cannot express is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny, minilm_dir
from test_decoders import VOCAB, build_decoder
from mrem_dist.artifact import ArtifactError
from mrem_dist.artifact.compressed_tensors import (PROVENANCE, export_compressed_tensors, load_kwargs, pack_int32,
                                                   unsupported)
from mrem_dist.models.families import family_for
from mrem_dist.quantize import calibrate_activations, quantize_model
from mrem_dist.scheme import QuantScheme

WEIGHT_ONLY = dict(e_bits=None, a_bits=None)
SCHEMES = {
    # W4 in groups of input columns, asymmetric (the w4a16_g* presets) and symmetric.
    "w4_g16_asym": QuantScheme(name="w4g", w_bits=4, w_symmetric=False, w_granularity="input_group", w_group_size=16,
                               **WEIGHT_ONLY),
    "w4_g16_sym": QuantScheme(name="w4gs", w_bits=4, w_granularity="input_group", w_group_size=16, **WEIGHT_ONLY),
    # W3: codes straddle the int32 words.
    "w3_g16_asym": QuantScheme(name="w3g", w_bits=3, w_symmetric=False, w_granularity="input_group", w_group_size=16,
                               **WEIGHT_ONLY),
    "w8_channel": QuantScheme(name="w8", w_bits=8, **WEIGHT_ONLY),
    "w8a8_dynamic": QuantScheme(name="w8a8", w_bits=8, e_bits=None, a_bits=8, a_mode="dynamic", a_full_range=True),
    "w4a8_static_asym_acts": QuantScheme(name="w4a8", w_bits=4, e_bits=None, a_bits=8, a_symmetric=False),
}

# The user's side: transformers alone (compressed-tensors installed), never mrem_dist.
LOADER = """
import json, sys, torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, CompressedTensorsConfig
assert "mrem_dist" not in sys.modules
out = {}
for folder, kind in json.loads(sys.argv[1]).items():
    groups = json.load(open(folder + "/config.json"))["quantization_config"]["config_groups"].values()
    asym = any(not g["weights"]["symmetric"] and g["weights"]["strategy"] in ("group", "channel") for g in groups)
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if asym else {}
    cls = {"causal_lm": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification, "encoder": AutoModel}[kind]
    model = cls.from_pretrained(folder, **kwargs).eval()
    ids = torch.load(folder + "/../ids.pt")
    with torch.no_grad():
        y = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out[folder] = (y.last_hidden_state if kind == "encoder" else y.logits)
    assert "mrem_dist" not in sys.modules
torch.save(out, sys.argv[2])
"""


def _load_with_transformers(folders: dict[str, str], tmp: Path) -> dict:
    out = tmp / "loaded.pt"
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(folders), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def _quantized(kind: str, scheme: QuantScheme):
    model = build_decoder(kind) if kind in ("llama", "qwen2") else build_tiny("bert", head=kind == "bert_classifier")
    ids = torch.randint(5, VOCAB if kind in ("llama", "qwen2") else 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    quantize_model(model, family_for(model.config.model_type), scheme)
    if scheme.a_bits is not None and scheme.a_mode == "static":
        calibrate_activations(model, lambda m, b: m(input_ids=b, attention_mask=torch.ones_like(b)), [ids])
    return model, ids


TASK = {"llama": "causal_lm", "qwen2": "causal_lm", "bert_classifier": "classifier", "bert": "encoder"}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Every (model, scheme) exported, then all loaded back by one transformers-only process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tmp = tmp_path_factory.mktemp("ct")
    expected, folders = {}, {}
    for kind in TASK:
        for name, scheme in SCHEMES.items():
            if kind.startswith("bert") and name.startswith("w4a8"):
                continue
            model, ids = _quantized(kind, scheme)
            case = tmp / f"{kind}_{name}"
            case.mkdir()
            torch.save(ids, case / "ids.pt")
            with torch.no_grad():
                y = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            folder = str(case / "model-compressed-tensors")
            export_compressed_tensors(model, tokenizer, scheme, TASK[kind], family_for(model.config.model_type).name,
                                      folder, source="tiny")
            folders[folder] = TASK[kind]
            expected[folder] = (kind, name, y.last_hidden_state if kind == "bert" else y.logits)
    return expected, _load_with_transformers(folders, tmp)


def test_transformers_alone_loads_every_folder_and_gives_mrem_dists_outputs(round_trips):
    expected, loaded = round_trips
    assert len(loaded) == len(expected) == 22
    for folder, (kind, name, ref) in expected.items():
        # Weights dequantize bit for bit; activations quantize on the same grid: float rounding only.
        torch.testing.assert_close(loaded[folder], ref, rtol=1e-5, atol=1e-5, msg=f"{kind} {name}")


def test_the_folder_holds_packed_codes_and_the_config_the_format_defines(round_trips):
    from safetensors.torch import load_file

    expected, _ = round_trips
    folder = next(f for f, (kind, name, _) in expected.items() if (kind, name) == ("llama", "w3_g16_asym"))
    config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["quantization_status"] == "compressed" and "lm_head" in config["ignore"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"], weights["group_size"]) == (3, False, "group", 16)
    assert config["config_groups"]["group_0"]["targets"] == ["Linear"]
    state = load_file(str(Path(folder) / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert state[f"{q}.weight_packed"].dtype == torch.int32 and state[f"{q}.weight_packed"].shape == (32, 3)  # 32*3/32
    assert state[f"{q}.weight_scale"].shape == (32, 2) and state[f"{q}.weight_zero_point"].shape == (3, 2)
    assert state[f"{q}.weight_shape"].tolist() == [32, 32] and f"{q}.weight" not in state
    assert json.loads((Path(folder) / PROVENANCE).read_text())["source"] == "tiny"
    # The compressed-tensors package reads the config as its own.
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(config)
    assert parsed.config_groups["group_0"].weights.group_size == 16
    w8a8 = next(f for f, (kind, name, _) in expected.items() if (kind, name) == ("llama", "w8a8_dynamic"))
    config = json.loads((Path(w8a8) / "config.json").read_text())["quantization_config"]
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert config["format"] == "int-quantized" and (acts["strategy"], acts["dynamic"]) == ("token", True)
    assert load_file(str(Path(w8a8) / "model.safetensors"))[f"{q}.weight"].dtype == torch.int8


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_equals_compressed_tensors_own_packer(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    for cols in (5, 32, 33, 100):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, cols), generator=g).to(torch.int8)
        assert torch.equal(pack_int32(codes, bits), pack_to_int32(codes, bits))
        assert torch.equal(pack_int32(codes.t(), bits).t(), pack_to_int32(codes, bits, packed_dim=0))


@pytest.mark.parametrize("change,feature", [
    (dict(ocs_ratio=0.02), "OCS"),
    (dict(e_bits=4), "word embeddings"),
    (dict(w_granularity="group", w_groups=4), "groups of output rows"),
    (dict(a_bits=8), "restricted symmetric grid"),
])
def test_what_the_format_cannot_express_is_refused_by_name(change, feature, tmp_path):
    base = dict(name="x", w_bits=4, e_bits=None, a_bits=None)
    scheme = QuantScheme(**{**base, **change})
    assert any(feature in why for why in unsupported(scheme))
    model, _ = _quantized("llama", scheme)
    with pytest.raises(ArtifactError, match=feature):
        export_compressed_tensors(model, None, scheme, "causal_lm", "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_conv1d_and_prequant_outliers_are_refused():
    scheme = QuantScheme(name="x", w_bits=4, e_bits=None, a_bits=None)
    assert any("Conv1D" in why for why in unsupported(scheme, "gpt2"))
    assert any("outlier" in why for why in unsupported(scheme, "bert", outliers=True))
    assert unsupported(scheme, "llama") == []


def test_transformers_load_arguments_name_the_asymmetric_zero_point_workaround():
    def config(symmetric, acts=None):
        return {"config_groups": {"group_0": {"weights": {"symmetric": symmetric, "strategy": "group"},
                                              "input_activations": acts}}}

    assert load_kwargs(config(True)) == {}
    assert load_kwargs(config(False))["quantization_config"].dequantize
    with pytest.raises(ArtifactError, match="zero points"):
        load_kwargs(config(False, {"num_bits": 8}))


def _run_cfg(tmp_path, model_dir, text, *overrides):
    from test_decoder_methods import _data
    from test_pipeline import _cfg

    return _cfg(tmp_path / "run", f"model.path={model_dir}", *_data(*text), *overrides)


@pytest.mark.parametrize("quant", [["quant=w4a16_g64", "quant.w_group_size=16"], ["quant=w8a8_dynamic"]])
def test_a_run_exports_both_formats_and_evaluate_scores_the_folder_as_reported(tmp_path, tiny_llama_dir, wiki_like_txt,
                                                                                 quant):
    from test_decoder_methods import _data
    from test_evaluate_artifact import _eval_cfg
    from mrem_dist.evaluate import evaluate_artifact
    from mrem_dist.runner import execute

    report, _ = execute(_run_cfg(tmp_path, tiny_llama_dir, wiki_like_txt, *quant,
                                 "export.format=[mrem,compressed-tensors]"))
    mrem, ct = report["artifacts"]["mrem"], report["artifacts"]["compressed-tensors"]
    assert Path(mrem["path"]).name == "model" and Path(ct["path"]).name == "model-compressed-tensors"
    # Exact export: the unquantized tensors (here the tiny model's large fp32 embedding) keep the run's dtype.
    assert 0 < ct["ratio_to_fp32"] < 1 and ct["bytes"] == (Path(ct["path"]) / "model.safetensors").stat().st_size
    data = [o for o in _data(*wiki_like_txt) if not o.startswith("threads")]
    result = evaluate_artifact(_eval_cfg(tmp_path / "ev", f"artifact={ct['path']}", *data))
    assert result["format"] == "compressed-tensors" and result["kind"] == "causal_lm"
    for side in ("full_precision", "quantized"):
        for k, v in report["metrics"][side].items():
            assert result["metrics"][side][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (side, k)


def test_export_dtype_writes_a_bfloat16_folder_transformers_runs_in_bfloat16(tmp_path, tiny_llama_dir, wiki_like_txt):
    from safetensors.torch import load_file

    from test_decoder_methods import _data
    from test_evaluate_artifact import _eval_cfg
    from mrem_dist.evaluate import evaluate_artifact
    from mrem_dist.runner import execute

    report, _ = execute(_run_cfg(tmp_path, tiny_llama_dir, wiki_like_txt, "quant=w4a16_g64", "quant.w_group_size=16",
                                 "export.format=compressed-tensors", "export.dtype=bfloat16"))
    ct = report["artifacts"]["compressed-tensors"]
    assert list(report["artifacts"]) == ["compressed-tensors"] and ct["ratio_to_fp16"] < 1
    state = load_file(str(Path(ct["path"]) / "model.safetensors"))
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert state["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert json.loads((Path(ct["path"]) / "config.json").read_text())["dtype"] == "bfloat16"
    data = [o for o in _data(*wiki_like_txt) if not o.startswith("threads")]
    result = evaluate_artifact(_eval_cfg(tmp_path / "ev", f"artifact={ct['path']}", *data))
    # Not bit-exact (bfloat16 scales and activations), but the same model.
    assert result["metrics"]["quantized"]["perplexity"] == pytest.approx(report["metrics"]["quantized"]["perplexity"],
                                                                         rel=0.05)


def test_a_compressed_tensors_export_of_what_it_cannot_express_fails_before_any_work(tmp_path, tiny_llama_dir,
                                                                                      wiki_like_txt):
    from test_pipeline import _cfg
    from mrem_dist.config import ConfigError
    from mrem_dist.preflight import InputError, preflight
    from conftest import save_tiny_decoder

    with pytest.raises(ConfigError, match="word embeddings.*a_full_range=true"):
        _run_cfg(tmp_path, tiny_llama_dir, wiki_like_txt, "quant=w4a8", "export.format=compressed-tensors")
    with pytest.raises(ConfigError, match="export.format='onnx' is not one of mrem, compressed-tensors"):
        _run_cfg(tmp_path, tiny_llama_dir, wiki_like_txt, "export.format=[mrem,onnx]")
    with pytest.raises(ConfigError, match="export.format is empty"):
        _run_cfg(tmp_path, tiny_llama_dir, wiki_like_txt, "export.format=[]")
    gpt2 = save_tiny_decoder(tmp_path / "gpt2", "gpt2")
    cfg = _run_cfg(tmp_path, gpt2, wiki_like_txt, "quant=w4a16_g64", "quant.w_group_size=16",
                   "export.format=compressed-tensors")
    with pytest.raises(InputError, match="Conv1D"):
        preflight(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="add compressed-tensors to export.format"):
        _run_cfg(tmp_path, tiny_llama_dir, wiki_like_txt, "export.dtype=bfloat16")
    assert _cfg(tmp_path / "off", "export.enabled=false").export.enabled is False


def test_kernel_int8_on_a_compressed_tensors_folder_is_refused(tmp_path, round_trips):
    from test_evaluate_artifact import _eval_cfg
    from mrem_dist.config import ConfigError
    from mrem_dist.evaluate import evaluate_artifact

    folder = next(iter(round_trips[0]))
    with pytest.raises(ConfigError, match="kernel=float"):
        evaluate_artifact(_eval_cfg(tmp_path / "ev", f"artifact={folder}", "kernel=int8"))


def test_the_documented_transformers_snippet_runs_on_an_exported_folder(tmp_path, tiny_llama_dir):
    import re

    from conftest import REPO
    from mrem_dist.models import load_model

    page = (REPO / "docs" / "artifact.md").read_text()
    snippet = next(s for s in re.findall(r"^```python\n(.*?)^```", page, flags=re.M | re.S) if "model-compressed-tensors" in s)
    loaded, scheme = load_model(tiny_llama_dir), SCHEMES["w4_g16_asym"]
    quantize_model(loaded.model, loaded.family, scheme)
    folder = str(tmp_path / "model-compressed-tensors")
    export_compressed_tensors(loaded.model, loaded.tokenizer, scheme, "causal_lm", "llama", folder)
    code = re.sub(r'^folder = ".*"$', f"folder = {folder!r}", snippet, flags=re.M)
    assert code != snippet
    done = subprocess.run([sys.executable, "-c", code + "\nimport sys; assert 'mrem_dist' not in sys.modules\n"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
