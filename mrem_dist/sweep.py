"""One table (markdown + CSV) and one plot for a sweep directory.

    python -m mrem_dist -m quant=w2a8,w4a8 method=mrem_s,mrem_p    # writes it at the end by itself
    python -m mrem_dist.sweep runs/sweeps/<date>/<time>           # or again, for any sweep directory

Every job directory (one per job, shared by the job's ranks) holds the job's report.json; a job
directory without one (the job failed or is still running) is listed as such rather than skipped.
Hydra runs `SweepSummary.on_multirun_end` after the last job (conf/config.yaml registers it), with
every launcher: the basic one, joblib, or submitit on SLURM.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mrem_dist.io import atomic_write_bytes, atomic_write_text
from mrem_dist.log import get_logger

log = get_logger(__name__)

COLUMNS = ("job", "method", "quant", "bits", "metric", "full_precision", "quantized", "drop_pct", "passed",
           "reconstruct_s", "total_s", "ranks", "peak_rss_gb", "artifact_ratio")


def _job_row(job_dir: Path) -> dict:
    import json

    from mrem_dist.validation import headline_metric

    report_file = job_dir / "report.json"
    if not report_file.is_file():
        return {"job": job_dir.name, "passed": "no report (failed or still running)"}
    r = json.loads(report_file.read_text())
    q, fp, qm = r["quant"], r["metrics"]["full_precision"], r["metrics"]["quantized"]
    name = headline_metric(qm)
    drop = (fp[name] - qm[name]) / abs(fp[name]) * 100 if fp.get(name) else None
    return {
        "job": job_dir.name, "method": r["method"], "quant": q["name"],
        "bits": f"W{q['w_bits']}E{q['e_bits'] or 'fp'}A{q['a_bits'] or 'fp'}", "metric": name,
        "full_precision": fp.get(name), "quantized": qm[name], "drop_pct": None if drop is None else round(drop, 2),
        "passed": r.get("validation", {}).get("passed"),
        "reconstruct_s": r["timings_s"].get("reconstruct"), "total_s": r["timings_s"].get("total"),
        "ranks": r.get("reconstruction", {}).get("world_size", 1),
        "peak_rss_gb": r.get("peak_memory_gb", {}).get("rss"),
        # The first format the job exported (the mrem artifact unless export.format put another first).
        "artifact_ratio": next(iter(r.get("artifacts", {}).values()), {}).get("ratio_to_fp32"),
    }


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per job directory of the sweep (a directory Hydra wrote: it has .hydra/ or a report)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory: give the sweep directory (hydra.sweep.dir)")
    jobs = [d for d in sorted(sweep_dir.iterdir()) if d.is_dir() and ((d / "report.json").is_file() or (d / ".hydra").is_dir())]
    return [_job_row(d) for d in jobs]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_summary(sweep_dir: str | Path) -> Path:
    """Write sweep_summary.md / .csv / .png into `sweep_dir`; returns the markdown file."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} has no job directories (no */report.json or */.hydra): is it a sweep directory?")
    header = "| " + " | ".join(COLUMNS) + " |"
    lines = [f"# Sweep {sweep_dir}", "", f"{len(rows)} jobs.", "", header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    if any(r.get("quantized") is not None for r in rows):
        lines += ["", "![sweep](sweep_summary.png)"]
        from mrem_dist.plots import sweep_png

        atomic_write_bytes(sweep_dir / "sweep_summary.png", sweep_png(rows, str(sweep_dir)))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    atomic_write_text(sweep_dir / "sweep_summary.csv", buf.getvalue())
    out = sweep_dir / "sweep_summary.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


class SweepSummary(Callback):
    """Hydra callback: the sweep's summary once every job has ended (only the main rank writes)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from mrem_dist.distributed import is_main_process

        if not is_main_process():
            return
        try:
            out = write_summary(config.hydra.sweep.dir)
        except FileNotFoundError as e:  # every job failed before writing anything: say so, do not mask it
            log.error("no sweep summary: %s", e)
            return
        log.info("sweep summary: %s (and .csv, .png)", out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        out = write_summary(args[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
