"""CI smoke of benchmarks/scaling.py: `--quick` runs every cell (MREM-S, MREM-P on 1, 2 and 3
ranks under torchrun, 2 replicas of one stage) on a tiny random decoder and writes a table whose
figures come from the cells' own reports."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
@pytest.mark.dist
def test_quick_scaling_runs_every_cell(tmp_path):
    out = tmp_path / "scaling"
    done = subprocess.run([sys.executable, "benchmarks/scaling.py", "--quick", "--out", str(out)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {r["cell"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert [(r["method"], r["ranks"], r["replicas"]) for r in rows.values()] == [
        ("mrem_s", 1, 1), ("mrem_p", 1, 1), ("mrem_p", 2, 1), ("mrem_p", 3, 1), ("mrem_p", 2, 2)]
    one, two, three = rows["MREM-P, 1 process"], rows["MREM-P, 2 ranks"], rows["MREM-P, 3 ranks"]
    # Sharded loading: each rank of 2 or 3 holds less full precision than one process, together
    # at least all of it (the tied embedding counts on both end ranks).
    for cell in (two, three):
        assert cell["load"] == ["sharded"] * cell["ranks"]
        assert max(cell["full_precision_bytes"]) < one["full_precision_bytes"][0] <= sum(cell["full_precision_bytes"])
        assert len(cell["peak_rss_gb"]) == len(cell["blocked_fraction"]) == cell["ranks"]
        assert {s["rank"] for s in cell["timeline"]} == set(range(cell["ranks"]))
    # The same modules, steps and batches: MREM-P's result does not depend on its rank count.
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert three["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    # Replicas: every module on both ranks, the full batch's gradient: the same model to float tolerance.
    replicas = rows["MREM-P, 2 replicas of 1 stage"]
    assert replicas["full_precision_bytes"] == one["full_precision_bytes"] * 2
    assert replicas["perplexity"] == pytest.approx(one["perplexity"], rel=1e-3)
    text = out.with_suffix(".md").read_text()
    assert "against MREM-P in one process (the same work): training throughput" in text
    assert (out.parent / "scaling_timeline.png").stat().st_size > 0
