"""Scaling with the ranks on the real decoder (SmolLM2-135M): memory per rank, whole-job speed-up,
blocked time, and a timeline of who does what, when. Side by side in one run, every cell the real
entry point in a subprocess (MREM-P under torchrun, as a user starts it), one CPU thread per rank.

Cells, all with the same modules, steps, data and initialization (RTN: every rank then reads only
its own modules' tensors, sharded loading; GPTQ would load the whole model on every rank):
- MREM-S in one process (the baseline of the speed-up);
- MREM-P in one process (every module in lockstep: the baseline of the memory per rank);
- MREM-P on 2 and on 3 ranks (on a 2-core machine the 3-rank cell's times are not a speed-up
  measurement, its memory is);
- MREM-P on 2 ranks as 1 stage x 2 data-parallel replicas (method.replicas=2): every module on both
  ranks, each training on half of every batch (its throughput against the one-process MREM-P run).

Reported per cell: whole-job wall time and training time (MREM-S: the sum over its modules; MREM-P:
the slowest rank), their speed-ups against MREM-S, the seconds each rank spent per phase (load,
quantize, calibrate, evaluate (with the layer probes), reconstruct, pack, gather, assemble, validate, write) and blocked, the
full-precision bytes each rank held, and each rank's peak RSS as a fraction of the one-process
MREM-P run's, whole and above the RSS at the end of its loading (the runtime every process carries
before it reads a weight). The 2-rank cell's timeline is drawn (results/scaling_timeline.png).

    python benchmarks/scaling.py                 # SmolLM2, 6 modules, 20 steps (about 30 minutes on 2 cores)
    python benchmarks/scaling.py --quick         # a smoke run on a tiny random decoder (seconds)
    python benchmarks/scaling.py --cells p2,s1 --out benchmarks/results/scaling_repeat   # a repeat of two cells
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from common import RESULTS, launch, write_results

# id -> (name, method, ranks, extra overrides)
CELLS = {
    "s1": ("MREM-S, 1 process", "mrem_s", 1, []),
    "p1": ("MREM-P, 1 process", "mrem_p", 1, []),
    "p2": ("MREM-P, 2 ranks", "mrem_p", 2, []),
    "p3": ("MREM-P, 3 ranks", "mrem_p", 3, []),
    "r2": ("MREM-P, 2 replicas of 1 stage", "mrem_p", 2, ["method.replicas=2"]),
}
PHASES = ("load", "quantize", "calibrate", "evaluate", "reconstruct", "pack", "gather", "assemble", "validate", "write")


def cell(name: str, method: str, ranks: int, args, data: list[str], run_dir: Path, extra: list[str]) -> dict:
    overrides = [*data, f"quant={args.quant}", f"method={method}", "method.init=rtn", f"method.modules={args.modules}",
                 f"method.steps={args.steps}", "checkpoint.dir=null", "device=cpu", *extra]
    report, wall = launch(overrides, run_dir, ranks, threads=1)
    rec = report["reconstruction"]
    ranks_info = rec.get("ranks") or [{"rank": 0, "peak_rss_gb": report["peak_memory_gb"]["rss"],
                                       "blocked_fraction": 0.0, "train_seconds": sum(m["seconds"] for m in rec["modules"])}]
    phases: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    peaks: dict[int, dict[str, float]] = defaultdict(dict)  # the process's peak RSS at the phase's first end
    blocked: dict[int, float] = defaultdict(float)
    for s in report["timeline"]["spans"]:
        phases[s["rank"]][s["phase"]] += s["end_s"] - s["start_s"]
        peaks[s["rank"]].setdefault(s["phase"], s["peak_rss_gb"])
        blocked[s["rank"]] += s["blocked_s"]
    return {
        "cell": name, "method": method, "ranks": ranks, "replicas": rec.get("replicas", 1), "wall_s": round(wall, 1),
        "train_s": round(max(r["train_seconds"] for r in ranks_info), 1),
        "peak_rss_gb": [r["peak_rss_gb"] for r in ranks_info],
        # Rank 0's whole-process peak, the coordinator's streamed export included.
        "coordinator_peak_rss_gb": report["peak_memory_gb"]["rss"],
        "load": [r.get("load", "whole") for r in ranks_info],
        "full_precision_bytes": [r.get("full_precision_bytes") for r in ranks_info],
        "blocked_fraction": [r["blocked_fraction"] for r in ranks_info],
        "phase_s": {str(r): {p: round(v, 2) for p, v in ps.items()} for r, ps in sorted(phases.items())},
        "blocked_s": {str(r): round(v, 2) for r, v in sorted(blocked.items())},
        "peak_rss_at_phase_end_gb": {str(r): ps for r, ps in sorted(peaks.items())},
        "perplexity": report["metrics"]["quantized"]["perplexity"],
        # The never-worse check's reverts: a module kept initial makes the check serial from it on.
        "kept_initial": [m["index"] for m in rec["modules"] if m.get("kept") == "initial"],
        "timeline": report["timeline"]["spans"],
    }


def model_part(row: dict, rank: str) -> float:
    """A rank's peak RSS above its RSS at the end of loading (nan where the cell was not run)."""
    peaks = row.get("peak_rss_at_phase_end_gb", {}).get(rank, {})
    if "load" not in peaks:
        return float("nan")
    return row["peak_rss_gb"][int(rank)] - peaks["load"]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or "unknown CPU"."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def draw_timeline(row: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(PHASES, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 2.2 + 0.6 * row["ranks"]))
    for s in row["timeline"]:
        y = row["ranks"] - 1 - s["rank"]
        ax.broken_barh([(s["start_s"], s["end_s"] - s["start_s"])], (y + 0.1, 0.8), color=colors.get(s["phase"], "grey"))
        if s["blocked_s"] > 0:  # the seconds of the span spent waiting on a peer, hatched at its end
            ax.broken_barh([(s["end_s"] - s["blocked_s"], s["blocked_s"])], (y + 0.1, 0.8), facecolor="none",
                           hatch="///", edgecolor="black", linewidth=0)
    ax.set_yticks([row["ranks"] - 1 - r + 0.5 for r in range(row["ranks"])], [f"rank {r}" for r in range(row["ranks"])])
    ax.set_xlabel("seconds from the job's start (hatched: blocked on a peer, drawn at the end of its phase)")
    seen = {s["phase"] for s in row["timeline"]}
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in PHASES if p in seen],
               labels=[p for p in PHASES if p in seen], ncol=len(seen), fontsize=8, loc="lower center")
    ax.set_title(f"{row['cell']}: what each rank does, when")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random decoder, 2 steps: checks the script")
    p.add_argument("--modules", type=int, default=6, help="module partitions (divisible by 1, 2 and 3)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quant", default="w3a16_g64")
    p.add_argument("--out", default=None)
    p.add_argument("--cells", default=",".join(CELLS), help=f"which cells, in this order (of {', '.join(CELLS)}); "
                   "the speed-ups need s1, the memory ratios p1, the timeline p2")
    args = p.parse_args()
    chosen = args.cells.split(",")
    if not chosen or any(c not in CELLS for c in chosen):
        p.error(f"--cells takes a comma-separated list of {', '.join(CELLS)}, got {args.cells!r}")
    out = Path(args.out or RESULTS / ("quick/scaling" if args.quick else "scaling"))
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from gpu_check_inputs import build

            build(Path(tmp) / "in")
            args.steps, args.quant, args.modules = 2, "w4a16_g64", 3  # its decoder has 4 layers
            data = [f"model.path={Path(tmp) / 'in' / 'decoder'}", "data=local", f"data.train_file={Path(tmp) / 'in/calib.txt'}",
                    f"data.validation_file={Path(tmp) / 'in/eval.txt'}", "data.seq_len=64", "data.calib_samples=8",
                    "data.holdout_samples=4", "data.eval_samples=4", "data.batch_size=4"]
        else:
            data = ["model=smollm2", "data=wiki", "data.calib_samples=32", "data.seq_len=256", "data.eval_samples=16",
                    "data.batch_size=2"]
        rows = []
        for key in chosen:
            name, method, ranks, extra = CELLS[key]
            rows.append({"id": key, **cell(name, method, ranks, args, data, Path(tmp) / f"run{len(rows)}", extra)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "timeline"}), flush=True)
    by_id = {r["id"]: r for r in rows}
    nothing = {"wall_s": float("nan"), "train_s": float("nan"), "peak_rss_gb": [float("nan")],
               "coordinator_peak_rss_gb": float("nan")}  # a baseline not run: its ratios print as nan
    base, one = by_id.get("s1", nothing), by_id.get("p1", nothing)
    table = ["| cell | wall s | training s | speed-up vs MREM-S (wall / training) | peak RSS GB per rank "
             "| vs one process | rank 0 with the export | FP MB held per rank | blocked per rank | perplexity "
             "| modules kept initial |",
             "|" + "---|" * 11]
    for r in rows:
        fp_mb = ", ".join("?" if b is None else f"{b / 1e6:.0f}" for b in r["full_precision_bytes"])
        vs_one = ", ".join(f"{g / one['peak_rss_gb'][0]:.2f}x" for g in r["peak_rss_gb"])
        table.append(
            f"| {r['cell']} | {r['wall_s']} | {r['train_s']} | {base['wall_s'] / r['wall_s']:.2f}x / "
            f"{base['train_s'] / r['train_s']:.2f}x | {', '.join(f'{g:.2f}' for g in r['peak_rss_gb'])} "
            f"| {vs_one} | {r['coordinator_peak_rss_gb'] / one['coordinator_peak_rss_gb']:.2f}x | {fp_mb} "
            f"| {', '.join(f'{100 * f:.1f}%' for f in r['blocked_fraction'])} | {r['perplexity']:.2f} "
            f"| {', '.join(map(str, r['kept_initial'])) or 'none'} |")
    for r in rows:
        if r["replicas"] > 1:  # the same modules and steps as the one-process MREM-P run, half a batch each
            table += ["", f"{r['cell']} against MREM-P in one process (the same work): training throughput "
                      f"{one['train_s'] / r['train_s']:.2f}x, whole job {one['wall_s'] / r['wall_s']:.2f}x."]
    # The runtime every process carries whatever it holds (torch, transformers, the tokenizer, the
    # text: ~0.65 GB on SmolLM2) is what keeps the ratios above 1/N; what is left is the model's part.
    table += ["", "Peak RSS above the end of loading (the process with torch, transformers, the tokenizer and the text; "
              "the weights mapped, not yet read), per rank, against one process's:", "",
              "| cell | RSS at the end of loading GB | peak above it GB | vs one process |", "|---|---|---|---|"]
    one_model = model_part(one, "0")
    for r in rows:
        floors = [r["peak_rss_at_phase_end_gb"].get(str(k), {}).get("load", float("nan")) for k in range(len(r["peak_rss_gb"]))]
        above = [model_part(r, str(k)) for k in range(len(r["peak_rss_gb"]))]
        table.append(f"| {r['cell']} | {', '.join(f'{f:.2f}' for f in floors)} | {', '.join(f'{a:.2f}' for a in above)} "
                     f"| {', '.join(f'{a / one_model:.2f}x' for a in above)} |")
    table += ["", "Seconds per phase, per rank (blocked: of those, the seconds spent waiting on a peer):", "",
              "| cell | rank | " + " | ".join(PHASES) + " | blocked |", "|" + "---|" * (len(PHASES) + 3)]
    for r in rows:
        for rank, ps in r["phase_s"].items():
            table.append(f"| {r['cell']} | {rank} | " + " | ".join(f"{ps[p]:.1f}" if p in ps else "" for p in PHASES)
                         + f" | {r['blocked_s'][rank]:.1f} |")
    table += ["", "Peak RSS in GB at the end of each phase (its first span: evaluate before training), per rank "
              "(the peak only grows: the phase where it rises is the one that needed the memory):", "",
              "| cell | rank | " + " | ".join(PHASES) + " |", "|" + "---|" * (len(PHASES) + 2)]
    for r in rows:
        for rank, ps in r["peak_rss_at_phase_end_gb"].items():
            table.append(f"| {r['cell']} | {rank} | " + " | ".join(f"{ps[p]:.2f}" if p in ps else "" for p in PHASES) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    if "p2" in by_id:
        picture = out.with_name(out.name + "_timeline.png")
        draw_timeline(by_id["p2"], picture)
        table += ["", f"![timeline]({picture.name})"]
    header = (f"{'tiny random decoder (--quick)' if args.quick else 'SmolLM2-135M-Instruct, wiki text, 32 x 256 calibration'}, "
              f"{args.quant}, {args.modules} modules, {args.steps} steps, RTN start, one thread per rank; "
              f"{os.cpu_count()} CPU cores ({cpu_model()}), {torch.backends.cpu.get_cpu_capability()} kernels (a cell "
              "with more ranks than cores measures memory, not speed; float results differ between CPU kinds).")
    write_results(out, "scaling.py", header, rows, table)


if __name__ == "__main__":
    main()
