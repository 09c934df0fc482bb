"""Plain-PTQ fidelity grid: bit widths x weight clipping on one model and data set.

Each cell is a real `mrem_dist.runner.run` (load, quantize, calibrate, evaluate), composed
through Hydra exactly as `python -m mrem_dist quant=<q> clip=<c> ...` would be. Prints a table and
writes it (markdown + json) to --out.

    python benchmarks/ptq_fidelity.py                       # MiniLM-L6 on the built-in text
    python benchmarks/ptq_fidelity.py --quant w4a8 w2a8 --clip minmax aciq --extra data.eval_samples=128
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import RESULTS, compose_config, hydra_configs, write_results

from mrem_dist.runner import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", default=["w8a8", "w4a8", "w3a8", "w2a8"])
    p.add_argument("--clip", nargs="+", default=["minmax", "aciq", "mse", "ocs"])
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every cell")
    p.add_argument("--out", default=str(RESULTS / "ptq_fidelity"))
    args = p.parse_args()

    rows = []
    with hydra_configs(), tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            for clip in args.clip:
                cfg = compose_config([f"quant={quant}", f"clip={clip}", *args.extra], Path(tmp) / f"{quant}_{clip}")
                start = time.perf_counter()
                report = run(cfg)
                row = {"quant": quant, "clip": clip, "seconds": round(time.perf_counter() - start, 1),
                       **report["metrics"]["quantized"]}
                rows.append(row)
                print(json.dumps(row), flush=True)

    metrics = [k for k in rows[0] if k not in ("quant", "clip", "seconds")]
    table = ["| quant | clip | " + " | ".join(metrics) + " | seconds |", "|" + "---|" * (len(metrics) + 3)]
    table += [f"| {r['quant']} | {r['clip']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + f" | {r['seconds']} |"
              for r in rows]
    write_results(args.out, "ptq_fidelity.py", "", rows, table)


if __name__ == "__main__":
    main()
