"""The run's outputs a person reads: `report.json` (machine-readable) and `summary.md`."""

from __future__ import annotations

import math
from pathlib import Path

from mrem_dist.io import atomic_write_bytes, atomic_write_json, atomic_write_text


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(report: dict) -> str:
    q = report["quant"]
    fp, qm = report["metrics"]["full_precision"], report["metrics"]["quantized"]
    bits = f"W{q['w_bits']}-E{q['e_bits'] or 'fp'}-A{q['a_bits'] or 'fp'}"
    lines = [
        f"# mrem-dist: {report['method']} {q['name']} ({bits})",
        "",
        f"- model: `{report['model']['path']}` ({report['model']['family']}, {report['model']['kind']}, "
        f"{report['model']['parameters'] / 1e6:.1f}M parameters)",
        f"- data: `{report['data']['name']}`, {report['data']['calibration_samples']} calibration / "
        + (f"{report['data']['evaluation_samples']} evaluation windows of {report['data']['seq_len']} tokens"
           if "seq_len" in report["data"] else
           f"{report['data']['evaluation_samples']} evaluation samples, max length {report['data']['max_length']}"),
        f"- weights: {q['w_granularity']}"
        + (f" ({q['w_groups']} groups)" if q["w_granularity"] == "group" else "")
        + (f" (groups of {q['w_group_size']} input columns)" if q["w_granularity"] == "input_group" else "")
        + f", {'symmetric' if q['w_symmetric'] else 'asymmetric'}, clip {q['w_clip']}"
        + (f", OCS ratio {q['ocs_ratio']}" if q["ocs_ratio"] else "")
        + (", ternary" if q["ternary"] else ""),
        f"- activations: {q['a_mode'] if q['a_bits'] else 'full precision'}",
        *([f"- note: {report['model']['note']}"] if report["model"].get("note") else []),
        "",
        "| metric | full precision | quantized |",
        "|---|---|---|",
    ]
    for name in qm:
        lines.append(f"| {name} | {_fmt(fp.get(name, '-'))} | {_fmt(qm[name])} |")
    if "reconstruction" in report:
        before = report["metrics_before_reconstruction"]
        lines += ["", "Before reconstruction (the PTQ initialisation): " + ", ".join(f"{k} {_fmt(v)}" for k, v in before.items()), ""]
        rec = report["reconstruction"]
        lines += [f"Reconstruction ({rec['cache']} activation cache): module error on the held-out calibration samples, "
                  "initial -> trained state, and the state kept (never worse than the initial one)", "",
                  "| module | layers | error initial | error trained | kept | seconds |", "|---|---|---|---|---|---|"]
        for m in rec["modules"]:
            lines.append(f"| {m['index']} | {m['layers'][0]}-{m['layers'][1] - 1} | {m['error_before']:.4g} | "
                         f"{m['error_after']:.4g} | {m['kept']} | {m['seconds']:.1f} |")
        initial = [m["index"] for m in rec["modules"] if m["kept"] == "initial"]
        if initial:
            lines += ["", f"Kept at their initialization (training made them worse on the held-out samples): modules "
                      f"{', '.join(map(str, initial))}. A lower method.lr_weight_rel / method.lr_scale may train them."]
        err = report["layer_error"]
        lines += ["", "| layer | relative error before | after |", "|---|---|---|"]
        lines += [f"| {i} | {b:.4g} | {a:.4g} |" for i, (b, a) in enumerate(zip(err["before"], err["after"]))]
        lines += ["", "![reconstruction](reconstruction.png)"]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    return "\n".join(lines) + "\n"


def json_safe(obj):
    """The report with every NaN/inf replaced by None: JSON has no such numbers, and a report
    must never be lost to one (validation lists the metric that was not finite)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_report(run_dir: Path, report: dict, plot: bool = True) -> None:
    """report.json and summary.md; with `plot`, the reconstruction plot too (its figures do not
    change when the report is written again with the artifact's section)."""
    if plot and "reconstruction" in report:
        from mrem_dist.plots import reconstruction_png

        title = f"{report['method']} {report['quant']['name']} on {report['model']['path']}"
        atomic_write_bytes(run_dir / "reconstruction.png",
                           reconstruction_png(report["reconstruction"]["modules"], report["layer_error"], title))
    atomic_write_json(run_dir / "report.json", json_safe(report))
    atomic_write_text(run_dir / "summary.md", summary_markdown(report))
