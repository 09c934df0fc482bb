"""MREM-P on 2 ranks against MREM-S in one process, side by side in one run, on the real MiniLM.

Both cut the model into the same 2 modules and train each for the same number of steps from the
same initialisation (MSE clip); every cell is the real entry point in a subprocess, MREM-P started
by torchrun exactly as a user would. Each rank and the MREM-S baseline get one CPU thread (one
"device" each, as in the paper's comparison of MREM-S on one GPU with MREM-P on N); with
--baseline-threads 2 the baseline also runs with both cores, the same total hardware.

Reported per cell: wall time of the whole job and its training time (MREM-S: the sum over its
modules, trained one after another; MREM-P: the slowest rank), speed-up against
MREM-S on one thread, the fraction of training time each rank was blocked on communication, peak
resident memory per rank, and fidelity (cosine of sentence embeddings to full precision).

    python benchmarks/parallel.py --steps 100
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import RESULTS, launch, write_results


def job(method: str, quant: str, steps: int, threads: int, ranks: int, run_dir: Path, extra: list[str]) -> dict:
    """One cell: MREM-S or MREM-P on 2 modules, launched as a user would; its timing and memory figures."""
    args = [f"quant={quant}", "clip=mse", f"method={method}", "method.modules=2", f"method.steps={steps}",
            "device=cpu", *extra]
    report, wall = launch(args, run_dir, ranks, threads)
    rec = report["reconstruction"]
    ranks_info = rec.get("ranks") or [{"rank": 0, "blocked_fraction": 0.0, "peak_rss_gb": report["peak_memory_gb"]["rss"]}]
    return {
        "quant": quant, "method": method, "ranks": ranks, "threads_per_rank": threads,
        # Training time: MREM-S trains its modules one after another, MREM-P's ranks at once.
        "wall_s": round(wall, 1),
        "train_s": round(max(r["train_seconds"] for r in rec["ranks"]) if "ranks" in rec
                         else sum(m["seconds"] for m in rec["modules"]), 1),
        "blocked_fraction": [r["blocked_fraction"] for r in ranks_info],
        "peak_rss_gb": [r["peak_rss_gb"] for r in ranks_info],
        # Rank 0's whole-process peak, including the coordinator's assembly (the report's top level).
        "coordinator_peak_rss_gb": report["peak_memory_gb"]["rss"] if ranks > 1 else None,
        "cosine": report["metrics"]["quantized"]["cosine"],
        "module_error_after": [m["error_after"] for m in rec["modules"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", default=["w4a8", "w2a8"])
    p.add_argument("--steps", type=int, default=100, help="training steps per module")
    p.add_argument("--baseline-threads", type=int, nargs="+", default=[1], help="threads of the MREM-S baseline runs")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every cell")
    p.add_argument("--out", default=str(RESULTS / "parallel"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            cells = [("mrem_s", t, 1) for t in args.baseline_threads] + [("mrem_p", 1, 2)]
            for method, threads, ranks in cells:
                row = job(method, quant, args.steps, threads, ranks, Path(tmp) / str(len(rows)), args.extra)
                rows.append(row)
                print(json.dumps(row), flush=True)

    def base(quant):
        return next(r for r in rows if r["quant"] == quant and r["method"] == "mrem_s" and r["threads_per_rank"] == 1)

    table = ["| quant | method | ranks x threads | wall s | training s | speed-up (wall / training) "
             "| blocked per rank | peak RSS GB per rank | cosine | vs MREM-S |", "|" + "---|" * 10]
    for r in rows:
        b = base(r["quant"])
        table.append(
            f"| {r['quant']} | {r['method']} | {r['ranks']} x {r['threads_per_rank']} | {r['wall_s']} | {r['train_s']} "
            f"| {b['wall_s'] / r['wall_s']:.2f}x / {b['train_s'] / r['train_s']:.2f}x "
            f"| {', '.join(f'{100 * f:.1f}%' for f in r['blocked_fraction'])} "
            f"| {', '.join(f'{g:.2f}' for g in r['peak_rss_gb'])} | {r['cosine']:.4f} "
            f"| {100 * (r['cosine'] - b['cosine']) / b['cosine']:+.2f}% |"
        )
    header = (f"MiniLM-L6 (real weights), built-in text, 2 modules, {args.steps} steps per module, MSE-clip init; "
              f"speed-up and quality relative to MREM-S on 1 thread. Machine: {os.cpu_count()} CPU cores.")
    write_results(args.out, "parallel.py", header, rows, table)


if __name__ == "__main__":
    main()
