"""Why MREM-P trails MREM-S at short budgets, and what closing the gap costs: the same modules,
steps, batches and init (MSE clip, 4 modules), MREM-S in one process against MREM-P on 2 torchrun
ranks (2 modules each; bit-identical to one process, tested) with different teacher-forcing
schedules and finish phases (method.finish_steps: a module's last steps on the finished upstream).
One thread per process, so the training seconds compare the pipeline with one process doing the
same work. Writes benchmarks/results/mrem_p_gap_<quant>_s<steps>.{md,json}.

    python benchmarks/mrem_p_gap.py --steps 20                     # W4A8, every cell
    python benchmarks/mrem_p_gap.py --steps 20 --quant w2a8 --cells mrem_s p finish_half
    python benchmarks/mrem_p_gap.py --steps 20 --modules 2 --cells mrem_s p finish_half   # one module a rank
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, launch, write_results

# id -> (name, ranks, overrides); STEPS, HALF, QUARTER, THREEQ are replaced by the step counts.
CELLS = {
    "mrem_s": ("MREM-S (quantized upstream, finished)", 1, ["method=mrem_s"]),
    "p": ("MREM-P, anneal t0 = 1.5 x steps (default)", 2, ["method=mrem_p"]),
    "t0_half": ("MREM-P, anneal t0 = steps/2 (the default before 2026-12-02)", 2, ["method=mrem_p", "method.t0=HALF"]),
    "t0_steps": ("MREM-P, anneal t0 = steps", 2, ["method=mrem_p", "method.t0=STEPS"]),
    "lam0": ("MREM-P, lam = 0 (no teacher)", 2, ["method=mrem_p", "method.lam=zero"]),
    "lam1": ("MREM-P, lam = 1 (teacher only)", 2, ["method=mrem_p", "method.lam=one"]),
    "finish_quarter": ("MREM-P, finish_steps = steps/4", 2, ["method=mrem_p", "method.finish_steps=QUARTER"]),
    "finish_half": ("MREM-P, finish_steps = steps/2", 2, ["method=mrem_p", "method.finish_steps=HALF"]),
    "finish_3q": ("MREM-P, finish_steps = 3/4 x steps", 2, ["method=mrem_p", "method.finish_steps=THREEQ"]),
    "finish_all": ("MREM-P, finish_steps = steps, lam = 0 (MREM-S in the pipeline)", 2,
                   ["method=mrem_p", "method.lam=zero", "method.finish_steps=STEPS"]),
}


def _fill(overrides: list[str], steps: int) -> list[str]:
    sizes = {"STEPS": steps, "HALF": max(steps // 2, 1), "QUARTER": max(steps // 4, 1), "THREEQ": max(3 * steps // 4, 1)}
    out = []
    for o in overrides:
        for key, value in sizes.items():
            o = o.replace(key, str(value))
        out.append(o)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quant", default="w4a8")
    p.add_argument("--modules", type=int, default=4, help="method.modules (4: the benchmark report's quality cells)")
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS), help="default: every cell")
    p.add_argument("--extra", nargs="*", default=["data.calib_samples=256", "data.eval_samples=256"])
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/mrem_p_gap_<quant>_s<steps>)")
    args = p.parse_args()
    suffix = "" if args.modules == 4 else f"_m{args.modules}"
    out = args.out or str(RESULTS / f"mrem_p_gap_{args.quant}_s{args.steps}{suffix}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells:
            name, ranks, overrides = CELLS[cell]
            cfg = [f"quant={args.quant}", "clip=mse", f"method.modules={args.modules}", f"method.steps={args.steps}",
                   "checkpoint.dir=null", "export.enabled=false", *_fill(overrides, args.steps), *args.extra]
            report, wall = launch(cfg, Path(tmp) / cell, ranks=ranks, threads=1)
            rec = report["reconstruction"]
            ranks_stats = rec.get("ranks") or []
            train = (max(r["train_seconds"] for r in ranks_stats) if ranks_stats
                     else sum(m["seconds"] for m in rec["modules"]))
            row = {"cell": cell, "name": name, "ranks": ranks, "overrides": _fill(overrides, args.steps),
                   "partition": rec["partition"],
                   "cosine": report["metrics"]["quantized"]["cosine"],
                   "before": report["metrics_before_reconstruction"]["cosine"],
                   "error_after": [round(m["error_after"], 5) for m in rec["modules"]],
                   "kept": [m["kept"] for m in rec["modules"]],
                   "train_seconds": round(train, 1),
                   "blocked_fraction": max((r["blocked_fraction"] for r in ranks_stats), default=0.0),
                   "wall_seconds": round(wall, 1)}
            rows.append(row)
            print(row, flush=True)
    ref = next((r for r in rows if r["cell"] == "mrem_s"), None)
    table = ["| cell | ranks x threads | cosine | gap to MREM-S | module error after (held-out) | train s | "
             "most blocked rank | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = f"{100 * (ref['cosine'] - r['cosine']) / ref['cosine']:.2f}%" if ref else "n/a"
        table.append(f"| {r['name']} | {r['ranks']} x 1 | {r['cosine']:.4f} | {gap} | "
                     f"{', '.join(f'{e:.4g}' for e in r['error_after'])} | {r['train_seconds']} | "
                     f"{100 * r['blocked_fraction']:.1f}% | {r['wall_seconds']} |")
    header = (f"{args.quant}, MSE-clip init (cosine {rows[0]['before']:.4f} before training), {args.steps} steps per "
              f"module, {' '.join(args.extra)}; {args.modules} modules ({'; '.join(rows[0]['partition'])}), on 2 ranks "
              "in consecutive groups. Train s: the slowest rank's steps, finish phase and never-worse check (MREM-S: "
              "the sum over its modules); most blocked rank: its seconds waiting for a neighbour over its train s; "
              "wall: the whole job, load to report.")
    write_results(out, "mrem_p_gap.py", header, rows, table)


if __name__ == "__main__":
    main()
