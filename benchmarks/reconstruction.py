"""Reconstruction against plain PTQ on one model, side by side in one run.

For each bit width: plain PTQ with each clipping (min-max, ACIQ, OCS, MSE), then REM, LKD and
MREM-S with the same number of steps per module (all initialised from the MSE clip, the best
PTQ init measured by benchmarks/ptq_fidelity.py). Every cell is a real `mrem_dist.runner.run`, composed
like `python -m mrem_dist ...`. Writes benchmarks/results/reconstruction.{md,json}.

    python benchmarks/reconstruction.py --steps 100
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
    ("ptq", ["clip=minmax"]), ("ptq", ["clip=aciq"]), ("ptq", ["clip=ocs"]), ("ptq", ["clip=mse"]),
    ("rem", ["clip=mse"]), ("lkd", ["clip=mse"]), ("mrem_s", ["clip=mse"]),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", default=["w2a8", "w4a8"])
    p.add_argument("--steps", type=int, default=100, help="training steps per module")
    p.add_argument("--methods", nargs="+", default=None, help="subset of ptq rem lkd mrem_s")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every cell")
    p.add_argument("--out", default=str(RESULTS / "reconstruction"))
    args = p.parse_args()

    rows = []
    with hydra_configs(), tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            for method, overrides in CELLS:
                if args.methods and method not in args.methods:
                    continue
                ov = [f"quant={quant}", f"method={method}", f"method.steps={args.steps}", *overrides, *args.extra]
                cfg = compose_config(ov, Path(tmp) / str(len(rows)))
                start = time.perf_counter()
                report = run(cfg)
                row = {"quant": quant, "method": method,
                       "clip": cfg.quant.w_clip + (" +ocs" if cfg.quant.ocs_ratio else ""),
                       "modules": len(report.get("reconstruction", {}).get("modules", [])),
                       "seconds": round(time.perf_counter() - start, 1), **report["metrics"]["quantized"]}
                rows.append(row)
                print(json.dumps(row), flush=True)

    metrics = [k for k in rows[0] if k not in ("quant", "method", "clip", "modules", "seconds")]
    table = ["| quant | method | init clip | modules | " + " | ".join(metrics) + " | seconds |",
             "|" + "---|" * (len(metrics) + 5)]
    table += [f"| {r['quant']} | {r['method']} | {r['clip']} | {r['modules'] or '-'} | "
              + " | ".join(f"{r[m]:.4f}" for m in metrics) + f" | {r['seconds']} |" for r in rows]
    header = f"{args.steps} steps per module (REM/LKD: one module per layer; MREM-S: 4 modules)."
    write_results(args.out, "reconstruction.py", header, rows, table)


if __name__ == "__main__":
    main()
