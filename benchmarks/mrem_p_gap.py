"""Why MREM-P trails MREM-S at short budgets: the same modules, steps, batches and init (W4A8, MSE
clip, 4 modules), MREM-S against MREM-P in one process (bit-identical to any rank count) with
different teacher-forcing schedules. Writes benchmarks/results/mrem_p_gap_s<steps>.{md,json}.

    python benchmarks/mrem_p_gap.py --steps 20
    python benchmarks/mrem_p_gap.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, compose_config, hydra_configs, write_results

from mrem_dist.runner import run

CELLS = [
    ("MREM-S (quantized upstream, finished)", ["method=mrem_s"]),
    ("MREM-P, anneal t0 = 1.5 x steps (default)", ["method=mrem_p"]),
    ("MREM-P, anneal t0 = steps/2 (the default before 2026-12-02)", ["method=mrem_p", "method.t0=HALF"]),
    ("MREM-P, anneal t0 = steps", ["method=mrem_p", "method.t0=STEPS"]),
    ("MREM-P, lam = 0 (no teacher)", ["method=mrem_p", "method.lam=zero"]),
    ("MREM-P, lam = 1 (teacher only)", ["method=mrem_p", "method.lam=one"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quant", default="w4a8")
    p.add_argument("--extra", nargs="*", default=["data.calib_samples=256", "data.eval_samples=256"])
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/mrem_p_gap_s<steps>)")
    args = p.parse_args()
    out = args.out or str(RESULTS / f"mrem_p_gap_s{args.steps}")
    rows = []
    with hydra_configs(), tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(CELLS):
            overrides = [o.replace("STEPS", str(args.steps)).replace("HALF", str(max(args.steps // 2, 1))) for o in overrides]
            cfg = compose_config([f"quant={args.quant}", "clip=mse", "method.modules=4", f"method.steps={args.steps}",
                                  "checkpoint.dir=null", "export.enabled=false", *overrides, *args.extra], Path(tmp) / str(i))
            start = time.perf_counter()
            report = run(cfg)
            mods = report["reconstruction"]["modules"]
            row = {"cell": name, "cosine": report["metrics"]["quantized"]["cosine"],
                   "before": report["metrics_before_reconstruction"]["cosine"],
                   "error_after": [round(m["error_after"], 5) for m in mods],
                   "last_layer_error": round(report["layer_error"]["after"][-1], 5),
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = ["| cell | cosine | module error after (held-out samples) | last layer's relative error | seconds |",
             "|---|---|---|---|---|"]
    table += [f"| {r['cell']} | {r['cosine']:.4f} | {', '.join(f'{e:.4g}' for e in r['error_after'])} | "
              f"{r['last_layer_error']:.4g} | {r['seconds']} |" for r in rows]
    header = (f"{args.quant}, MSE-clip init (cosine {rows[0]['before']:.4f} before training), 4 modules, "
              f"{args.steps} steps per module, {' '.join(args.extra)}; one process")
    write_results(out, "mrem_p_gap.py", header, rows, table)


if __name__ == "__main__":
    main()
