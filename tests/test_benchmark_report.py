"""CI smoke of the benchmark report: `python benchmarks/report.py --quick` on the real MiniLM runs
every section (quality grid, MREM-P scaling with torchrun, INT8 latency, DeepSpeed's ZeroQuant,
PreQuant on the movie-review task, AutoRound and llm-compressor on SmolLM2) and writes a report whose every figure comes from the run's own
rows; `--render` merges reports of runs that measured different sections."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quick_report_runs_every_section(tmp_path):
    pytest.importorskip("deepspeed", reason="the peer section needs the dev extra (deepspeed==0.19.6)")
    pytest.importorskip("auto_round", reason="the llm_peers section needs the dev extra (auto-round==0.16.1)")
    out = tmp_path / "report"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "benchmarks/report.py", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.with_suffix(".json").read_text())

    methods = ["PTQ min-max", "PTQ ACIQ", "PTQ OCS", "PTQ MSE", "PTQ fine-grained", "REM", "LKD", "MREM-S", "MREM-P"]
    assert [r["method"] for r in report["quality"]] == methods
    for r in report["quality"]:
        assert -1 <= r["cosine"] <= 1 and math.isfinite(r["rel_error"]), r
        assert 0.1 < r["artifact_ratio"] < 0.3  # W4 + E8: a real, smaller artifact
    mrem_p = report["quality"][-1]
    assert mrem_p["ranks"] == 2 and mrem_p["steps"] == 2

    scaling = {(r["method"], r["ranks"]): r for r in report["scaling"]}
    assert scaling.keys() == {("mrem_s", 1), ("mrem_p", 1), ("mrem_p", 2)}
    two = scaling[("mrem_p", 2)]
    assert len(two["blocked_fraction"]) == 2 and len(two["peak_rss_gb"]) == 2 and all(g > 0 for g in two["peak_rss_gb"])
    assert two["efficiency"] == pytest.approx(two["speedup_train"] / 2, abs=1e-3)
    # The same modules, steps and batches: MREM-P's result does not depend on its rank count.
    assert two["cosine"] == pytest.approx(scaling[("mrem_p", 1)]["cosine"], abs=1e-4)

    latency = {r["config"] for r in report["latency"] if r["table"] == "latency"}
    assert {"fp32", "w4a8-static float", "w4a8-static int8"} <= latency

    peer = {r["cell"]: r for r in report["peer"]}
    assert peer.keys() == {"ds_ptq", "ds_lkd", "ptq", "ptq_full_range", "lkd_full_range"}
    # On DeepSpeed's own grid, mrem-dist's PTQ computes DeepSpeed's quantized model.
    assert peer["ptq_full_range"]["cosine"] == pytest.approx(peer["ds_ptq"]["cosine"], abs=2e-3)

    pq = {(r["bits"], r["cell"]): r for r in report["prequant"]}
    assert pq.keys() == {(None, "fp"), (4, "prequant"), (4, "ft_ptq"), (4, "ft_mrem_s")}
    assert all(0 <= r["accuracy"] <= 1 for r in pq.values())
    fp = pq[(None, "fp")]["accuracy"]
    assert pq[(4, "prequant")]["drop_pts"] == pytest.approx(100 * (fp - pq[(4, "prequant")]["accuracy"]), abs=0.01)
    assert 0 < pq[(4, "prequant")]["outlier_fraction"] < pq[(4, "prequant")]["trainable_fraction"] < 0.02

    # The decoder peers: every cell of the quick mode ran, its folder scored by mrem-dist's perplexity
    # (for mrem-dist's own cells equal to what its run reported: llm_peers.py checks it).
    sys.path.insert(0, str(REPO / "benchmarks"))
    import llm_peers

    lp = {r["cell"]: r for r in report["llm_peers"]}
    assert list(lp) == llm_peers.QUICK_CELLS and {r["bits"] for r in lp.values()} == {3}
    fp = report["llm_peers_setup"]["fp_perplexity"]
    for r in lp.values():
        assert fp < r["perplexity"] < 1e4 and r["ratio_to_fp"] == pytest.approx(r["perplexity"] / fp, abs=1e-3), r
        assert r["wall_s"] > 0 and r["peak_rss_gb"] > 0.3, r
    assert lp["mrem-dist MREM-P (2 ranks)"]["processes"] == "2 x 1 threads"
    assert lp["mrem-dist RTN"]["run_perplexity"] == pytest.approx(lp["mrem-dist RTN"]["perplexity"], rel=1e-4)
    assert lp["AutoRound (matched budget)"]["settings"]["iters"] == 2 and lp["AutoRound RTN (iters=0)"]["settings"]["iters"] == 0
    # Same min-max grid, same windows: the two RTNs agree (AutoRound's rounding ties aside).
    assert lp["AutoRound RTN (iters=0)"]["perplexity"] == pytest.approx(lp["mrem-dist RTN"]["perplexity"], rel=0.02)
    # llm-compressor ran in its own environment, on the versions it pins.
    assert lp["llm-compressor GPTQ"]["peer_versions"]["transformers"] == "5.17.0"
    assert lp["llm-compressor GPTQ"]["version"] == "llmcompressor 0.14.0.1"
    assert (tmp_path / "report_llm_peers.png").stat().st_size > 0

    text = out.with_suffix(".md").read_text()
    assert text.startswith("`python benchmarks/report.py --quick") and "## Headlines" in text
    assert "## PreQuant" in text and "## Decoder LLM: AutoRound and llm-compressor side by side" in text
    for h in report["headlines"]:
        assert h in text
    for png in ("_quality.png", "_scaling.png"):
        assert (tmp_path / f"report{png}").read_bytes()[:4] == b"\x89PNG"

    # Two runs, one report: sections from the run that measured them, both commands listed.
    # The quality section merges setting by setting: a W8A8 row of the other run joins the W4A8 ones.
    other = dict(report, runs=[dict(report["runs"][0], command="python benchmarks/report.py --sections prequant",
                                    sections=["prequant"])], scaling=[], latency=[], peer=[],
                 quality=[dict(r, setting="w8a8", cosine=0.5) for r in report["quality"]] + [dict(report["quality"][0], cosine=0.1)],
                 prequant=[dict(r, accuracy=0.5) for r in report["prequant"]])
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "benchmarks/report.py", "--render", str(out.with_suffix(".json")),
                           str(tmp_path / "other.json"), "--out", str(merged)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    both = json.loads(merged.with_suffix(".json").read_text())
    assert [r["command"] for r in both["runs"]][1] == "python benchmarks/report.py --sections prequant"
    assert both["prequant"] == report["prequant"]  # the first report that has a section wins
    assert both["quality"] == report["quality"] + [dict(r, setting="w8a8", cosine=0.5) for r in report["quality"]]
    assert merged.with_suffix(".md").read_text().count("Machine:") == 2
