"""Hydra sweeps: `python -m mrem_dist -m ...` runs every job into its own directory and ends with
one summary table (markdown + CSV) and one plot; `python -m mrem_dist.sweep <dir>` rebuilds it."""

import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO
from mrem_dist.sweep import collect, main, write_summary
from test_pipeline import _small_data


@pytest.mark.slow
def test_a_two_by_two_sweep_ends_with_its_table(tmp_path, tiny_encoder_dir, sst_like_csv):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "mrem_dist", "-m", "quant=w8a8,w4a8", "method=mrem_s,mrem_p", "method.modules=2",
           "method.steps=4", f"model.path={tiny_encoder_dir}", "device=cpu", *_small_data(*sst_like_csv),
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_mrem_s_w8a8", "1_mrem_p_w8a8", "2_mrem_s_w4a8", "3_mrem_p_w4a8"], jobs
    table = (sweep / "sweep_summary.md").read_text()
    assert table.count("| cosine |") == 4 and "![sweep](sweep_summary.png)" in table
    with open(sweep / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["quant"]) for r in rows] == [("mrem_s", "w8a8"), ("mrem_p", "w8a8"),
                                                          ("mrem_s", "w4a8"), ("mrem_p", "w4a8")]
    assert all(0 < float(r["quantized"]) <= 1 and r["passed"] == "True" for r in rows)
    assert (sweep / "sweep_summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "sweep summary:" in done.stderr + done.stdout


def test_failed_jobs_are_listed_not_skipped(tmp_path, capsys):
    (tmp_path / "0_ptq_w4a8" / ".hydra").mkdir(parents=True)  # started, never wrote its report
    rows = collect(tmp_path)
    assert rows == [{"job": "0_ptq_w4a8", "passed": "no report (failed or still running)"}]
    write_summary(tmp_path)
    assert "no report" in (tmp_path / "sweep_summary.md").read_text()
    assert not (tmp_path / "sweep_summary.png").exists()  # nothing to plot
    assert main([str(tmp_path / "missing")]) == 1 and "not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no job directories"):
        write_summary(empty)
