"""benchmarks/llm_peers.py's bookkeeping (the quick run of its cells is in test_benchmark_report.py):
the targets read from rows, the scheme check of a peer's folder, the report's merge of its json, and
peer_quantize.py's refusals of bad input."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import llm_peers  # noqa: E402
import report  # noqa: E402


def row(bits, cell, ppl, wall, tool=None):
    return {"bits": bits, "cell": cell, "tool": tool or ("mrem-dist" if cell.startswith("mrem-dist") else "autoround"),
            "perplexity": ppl, "ratio_to_fp": ppl / 30, "wall_s": wall, "peak_rss_gb": 1.0, "processes": "1 x 2 threads",
            "trained": "x", "command": "c"}


def test_targets_say_met_not_met_and_not_measured():
    rows = [row(3, "mrem-dist MREM-P (2 ranks)", 70.0, 600), row(3, "AutoRound (defaults)", 75.0, 5000),
            row(3, "AutoRound (matched budget)", 69.0, 610), row(3, "llm-compressor GPTQ", 80.0, 200, "llmcompressor")]
    lines = llm_peers.targets(rows)
    assert "- W3 perplexity: MREM-P 70.00 vs AutoRound (defaults) 75.00: met (target: MREM-P lower)" in lines
    assert "- W3 perplexity: MREM-P 70.00 vs AutoRound (matched budget) 69.00: NOT met (target: MREM-P lower)" in lines
    assert any(line.startswith("- W3 wall time: MREM-P 600 s vs AutoRound at its defaults 5000 s: met") for line in lines)
    assert "- W2: not measured (no MREM-P cell)" in lines
    rows = rows[:1]
    assert "- W3 wall time vs AutoRound at its defaults: not measured" in llm_peers.targets(rows)


def test_a_folder_of_another_scheme_is_refused():
    weights = {"num_bits": 3, "group_size": 64, "symmetric": False, "type": "int", "strategy": "group"}
    llm_peers.check_scheme({"config_groups": {"group_0": {"weights": weights}}}, 3, "f")
    for wrong in ({"num_bits": 4}, {"group_size": 128}, {"symmetric": True}, {"strategy": "channel"}):
        with pytest.raises(RuntimeError, match="expected weights"):
            llm_peers.check_scheme({"config_groups": {"group_0": {"weights": {**weights, **wrong}}}}, 3, "f")
    with pytest.raises(RuntimeError, match="expected weights"):
        llm_peers.check_scheme(None, 3, "f")  # not a compressed-tensors folder at all


def test_report_merges_an_llm_peers_json_as_its_section(tmp_path):
    peers = {"setup": {**llm_peers.setup(llm_peers.parse_args(["--quick"])), "fp_perplexity": 30.0},
             "runs": [{"command": "python benchmarks/llm_peers.py --bits 3", "started": "2026-12-01 19:00",
                       "machine": "m", "minutes": 90.0}],
             "rows": [row(3, "mrem-dist MREM-P (2 ranks)", 70.0, 600), row(3, "AutoRound (defaults)", 75.0, 5000)]}
    other = {"runs": [{"command": "python benchmarks/report.py --sections prequant", "started": "s", "minutes": 1.0,
                       "machine": "m", "sections": ["prequant"]}], "prequant": []}
    merged = report.merge([other, peers])
    assert merged["llm_peers"] == peers["rows"] and merged["llm_peers_setup"]["fp_perplexity"] == 30.0
    assert [r["sections"] for r in merged["runs"]] == [["prequant"], ["llm_peers"]]
    out = tmp_path / "r"
    report.write(out, merged)
    text = out.with_suffix(".md").read_text()
    assert "## Decoder LLM: AutoRound and llm-compressor side by side" in text and "### W3A16 g64" in text
    assert "SmolLM2 W3A16 g64 perplexity (FP 30.00): mrem-dist MREM-P (2 ranks) 70.00 in 600 s; AutoRound (defaults) " \
           "75.00 in 5000 s" in text
    assert (tmp_path / "r_llm_peers.png").stat().st_size > 0


@pytest.mark.slow
def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "p"
    saved = {"setup": llm_peers.setup(llm_peers.parse_args(["--quick"])), "runs": [], "rows": []}
    out.with_suffix(".json").write_text(json.dumps(saved))
    done = subprocess.run([sys.executable, "benchmarks/llm_peers.py", "--quick", "--steps", "3", "--resume", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--resume" in done.stderr and "use the same settings" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--iters", "2"], "--iters is AutoRound's setting"),
    ([], "expected an int64 [samples, seq_len] tensor"),
])
def test_peer_quantize_refuses_bad_input(tmp_path, extra, message):
    import torch

    calib = tmp_path / "calib.pt"
    torch.save(torch.zeros(4, dtype=torch.int32), calib)
    done = subprocess.run([sys.executable, "benchmarks/peer_quantize.py", "llmcompressor", "--model", str(tmp_path),
                           "--calib", str(calib), "--bits", "3", "--group-size", "64", "--out", str(tmp_path / "o"),
                           "--result", str(tmp_path / "r.json"), *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and message in done.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.json").exists()
