"""Every method on a decoder LLM, end to end through `execute` (a tiny seeded Llama, real English text
from .txt files, the LLM data protocol): ptq (RTN and MSE clip), gptq, rem, lkd, mrem_s and mrem_p
(one process, and 2 real gloo ranks bit-identical to it), init=gptq, the artifact and its INT8 path;
bad decoder inputs fail before long work with the fix named."""

import json
from pathlib import Path

import pytest
import torch

from dist_helpers import gathered_state, run_ranks
from test_pipeline import _cfg
from mrem_dist.preflight import InputError
from mrem_dist.runner import execute

pytestmark = pytest.mark.slow

W3 = ["quant=w3a16_g64", "quant.w_group_size=16"]


def _data(calib: str, evaluation: str) -> list[str]:
    return ["data=local", f"data.train_file={calib}", f"data.validation_file={evaluation}", "data.seq_len=32",
            "data.calib_samples=8", "data.eval_samples=6", "data.batch_size=4", "threads=1"]


def _run(tmp_path, model_dir, text, *overrides):
    return execute(_cfg(tmp_path / "run", f"model.path={model_dir}", *_data(*text), *overrides))


def _recon(method: str, *extra: str) -> list[str]:
    modules = ["method.modules=2"] if method in ("mrem_s", "mrem_p") else []  # rem / lkd: one layer per module
    return [f"method={method}", "method.steps=6", *modules, "method.lr_weight=1e-4", *extra]


def test_ptq_rtn_and_mse_clip_on_a_decoder_report_perplexity(tmp_path, tiny_llama_dir, wiki_like_txt):
    report, qmodel = _run(tmp_path, tiny_llama_dir, wiki_like_txt, "quant=w4a16_g64",
                          "quant.w_group_size=16")
    fp, q = report["metrics"]["full_precision"], report["metrics"]["quantized"]
    assert report["model"]["kind"] == "causal_lm" and report["model"]["family"] == "llama"
    assert set(q) == {"perplexity", "perplexity_ratio", "top1_agreement", "kl"} and set(fp) == {"perplexity"}
    assert q["perplexity_ratio"] == pytest.approx(q["perplexity"] / fp["perplexity"])
    assert report["data"]["seq_len"] == 32 and report["data"]["evaluation_tokens"] == 6 * 32
    assert report["validation"]["passed"] and report["validation"]["headline_metric"] == "perplexity"
    mse, _ = execute(_cfg(tmp_path / "mse", f"model.path={tiny_llama_dir}", *_data(*wiki_like_txt), "quant=w4a16_g64",
                          "quant.w_group_size=16", "quant.w_clip=mse"))
    assert mse["quant"]["w_clip"] == "mse" and mse["metrics"]["quantized"]["kl"] != q["kl"]


def test_gptq_beats_round_to_nearest_at_three_bits(tmp_path, tiny_llama_dir, wiki_like_txt):
    rtn, _ = _run(tmp_path / "rtn", tiny_llama_dir, wiki_like_txt, *W3, "method=ptq")
    gptq, qmodel = _run(tmp_path / "gptq", tiny_llama_dir, wiki_like_txt, *W3, "method=gptq")
    assert gptq["gptq"]["linears"] == 7 * 4 and gptq["timings_s"]["gptq"] > 0
    assert gptq["metrics"]["quantized"]["kl"] < rtn["metrics"]["quantized"]["kl"]
    assert gptq["validation"]["passed"]  # the codes the artifact stores are the weights GPTQ chose


@pytest.mark.parametrize("method", ["rem", "lkd", "mrem_s", "mrem_p"])
def test_every_reconstruction_method_runs_on_a_decoder(tmp_path, tiny_llama_dir, wiki_like_txt, method):
    report, _ = _run(tmp_path, tiny_llama_dir, wiki_like_txt, *W3, *_recon(method))
    modules = report["reconstruction"]["modules"]
    assert len(modules) == (4 if method in ("rem", "lkd") else 2)
    assert sum(m["error_after"] for m in modules) < sum(m["error_before"] for m in modules)
    assert report["metrics_before_reconstruction"]["perplexity"] > 0 and report["validation"]["passed"]


def test_init_gptq_starts_reconstruction_from_gptq(tmp_path, tiny_llama_dir, wiki_like_txt):
    rtn, _ = _run(tmp_path / "rtn", tiny_llama_dir, wiki_like_txt, *W3, *_recon("mrem_s", "method.init=rtn"))
    gptq, _ = _run(tmp_path / "gptq", tiny_llama_dir, wiki_like_txt, *W3, *_recon("mrem_s", "method.init=gptq"))
    assert gptq["gptq"]["linears"] == 28
    assert gptq["metrics_before_reconstruction"]["kl"] < rtn["metrics_before_reconstruction"]["kl"]


def _partition_bytes(model_dir: str, modules: int, ranks: int) -> list[int]:
    """The bytes of the full-precision tensors each rank's modules hold (a tied tensor counts on
    every rank that holds one of its names), from a whole load."""
    from mrem_dist.engine import partition
    from mrem_dist.engine.shard import holders, tensor_owner
    from mrem_dist.layout import stage_modules
    from mrem_dist.models import load_model
    from mrem_dist.models.sharded import tensor_names

    loaded = load_model(model_dir)
    model, family = loaded.model, loaded.family
    by_name = holders(model, tensor_owner(model, family, partition(model, family, modules, head=False)))
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = []
    for held in stage_modules(modules, ranks):
        ids = [i for i, names in tensor_names(model).items() if by_name[names[0]] & set(held)]
        out.append(sum(tensors[i].numel() * tensors[i].element_size() for i in ids))
    return out


def _job(rank, model_dir, text, run_dir, out_dir, overrides):
    from dist_helpers import capture_states
    from mrem_dist.runner import execute

    capture_states(out_dir, rank)
    result = execute(_cfg(run_dir, f"model.path={model_dir}", *_data(*text), *overrides))
    if result is not None:
        (Path(out_dir) / "report.json").write_text(json.dumps(result[0]))


@pytest.mark.dist
@pytest.mark.parametrize("ranks,init", [(2, "gptq"), (3, "gptq"), (2, "rtn")])
def test_mrem_p_on_a_decoder_over_ranks_is_bit_identical_to_one_process(tmp_path, tiny_llama_dir, wiki_like_txt, ranks,
                                                                         init):
    """Each rank reads only its own modules' tensors (sharded loading), with init=gptq too (GPTQ runs
    down the pipeline, each rank its own layers on the previous stage's GPTQ outputs): the
    full-precision bytes a rank holds are those of its modules, the tied embedding on both end ranks."""
    overrides = [*W3, *_recon("mrem_p", "method.modules=3", f"method.init={init}", "method.queue=2")]
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(_job, ranks, tiny_llama_dir, wiki_like_txt, str(tmp_path / "ranks"), str(out), overrides)
    report = json.loads((out / "report.json").read_text())
    assert report["reconstruction"]["world_size"] == ranks and report["validation"]["passed"]
    ranks_report = report["reconstruction"]["ranks"]
    assert [r["load"] for r in ranks_report] == ["sharded"] * ranks
    assert [r["full_precision_bytes"] for r in ranks_report] == _partition_bytes(tiny_llama_dir, 3, ranks)
    single, qmodel = execute(_cfg(tmp_path / "single", f"model.path={tiny_llama_dir}", *_data(*wiki_like_txt), *overrides))
    parallel_state, state = gathered_state(out), qmodel.state_dict()
    assert parallel_state.keys() == state.keys()
    for k in state:
        assert torch.equal(parallel_state[k], state[k]), k
    assert single["metrics"] == report["metrics"]


def test_the_decoder_artifact_loads_and_its_int8_path_matches(tmp_path, tiny_llama_dir, wiki_like_txt):
    import mrem_dist
    from mrem_dist.scoring import run_batch

    # W4A8: codes within the exact range of every CPU INT8 kernel (W8 needs AVX-VNNI, AMX or a GPU).
    report, qmodel = _run(tmp_path, tiny_llama_dir, wiki_like_txt, "quant=w4a8_dynamic", "method=ptq")
    assert report["validation"]["passed"]
    art = mrem_dist.load_quantized(tmp_path / "run" / "model")
    fast = mrem_dist.load_quantized(tmp_path / "run" / "model", kernel="int8")
    ids = torch.randint(0, 1000, (2, 16))
    from mrem_dist.data import Batch

    batch = Batch(ids, torch.ones_like(ids))
    with torch.no_grad():
        ref = run_batch(qmodel, art.family, batch)
        torch.testing.assert_close(run_batch(art.model, art.family, batch), ref, rtol=0, atol=0)
        torch.testing.assert_close(run_batch(fast.model, fast.family, batch), ref, rtol=1e-3, atol=1e-3)
    # python -m mrem_dist.evaluate on the artifact: the run's perplexities again, and the artifact alone.
    from mrem_dist.evaluate import evaluate_artifact
    from test_evaluate_artifact import _eval_cfg

    data = [o for o in _data(*wiki_like_txt) if o.startswith("data") and "calib" not in o and "train_file" not in o]
    again = evaluate_artifact(_eval_cfg(tmp_path / "eval", f"artifact={tmp_path / 'run' / 'model'}", *data))
    assert again["metrics"]["quantized"]["perplexity"] == pytest.approx(report["metrics"]["quantized"]["perplexity"])
    assert again["metrics"]["full_precision"] == pytest.approx(report["metrics"]["full_precision"])
    alone = evaluate_artifact(_eval_cfg(tmp_path / "alone", f"artifact={tmp_path / 'run' / 'model'}", "compare=false", *data))
    assert alone["metrics"]["full_precision"] is None and set(alone["metrics"]["quantized"]) == {"perplexity"}


@pytest.mark.parametrize("overrides,match", [
    (["data.seq_len=128"], r"data.seq_len=128 is longer than the model's context of 64 tokens"),
    (["quant=w4a16_g64", "quant.w_group_size=24"], r"w_group_size=24 does not divide the 32 input columns"),
    (["quant=w4a8"], r"quant.e_bits=8 on a decoder LLM"),
])
def test_bad_decoder_inputs_fail_before_any_weight_is_loaded(tmp_path, tiny_llama_dir, wiki_like_txt, overrides, match):
    with pytest.raises(InputError, match=match):
        _run(tmp_path, tiny_llama_dir, wiki_like_txt, *overrides)
    assert not (tmp_path / "run").exists()


def test_a_text_shorter_than_one_window_is_named(tmp_path, tiny_llama_dir):
    short = tmp_path / "short.txt"
    short.write_text("a few words only.")
    with pytest.raises(Exception, match=r"fewer than one window of data.seq_len=32"):
        _run(tmp_path, tiny_llama_dir, (str(short), str(short)), "quant=w4a16_g64", "quant.w_group_size=16")


def test_bfloat16_forward_passes_keep_float32_latent_weights(tmp_path, tiny_llama_dir, wiki_like_txt):
    from mrem_dist.quant import QuantLinear

    report, qmodel = _run(tmp_path, tiny_llama_dir, wiki_like_txt, *W3, *_recon("mrem_s"), "model.dtype=bfloat16")
    assert report["validation"]["passed"] and report["metrics"]["quantized"]["perplexity"] > 0
    linears = [m for m in qmodel.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.weight.dtype == torch.float32 and m.weight_quantizer.scale.dtype == torch.float32
                           for m in linears)
    assert qmodel.model.norm.weight.dtype == torch.bfloat16  # everything else runs in the model's dtype
