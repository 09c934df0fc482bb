"""Plain-PTQ fidelity grid: bit widths x weight clipping on one model and data set.

Each cell is a real `mrem_dist.pipeline.run` (load, quantize, calibrate, evaluate), composed
through Hydra exactly as `python -m mrem_dist quant=<q> clip=<c> ...` would be. Prints a table and
writes it (markdown + json) to --out.

    python benchmarks/ptq_fidelity.py                       # MiniLM-L6 on the built-in text
    python benchmarks/ptq_fidelity.py --quant w4a8 w2a8 --clip minmax aciq --extra data.eval_samples=128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mrem_dist.config import RunConfig, register_configs, validate  # noqa: E402
from mrem_dist.pipeline import run  # noqa: E402


def compose_config(overrides: list[str], run_dir: str) -> RunConfig:
    dcfg = compose(config_name="config", overrides=[*overrides, f"run_dir={run_dir}"])
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    validate(cfg)
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", nargs="+", default=["w8a8", "w4a8", "w3a8", "w2a8"])
    p.add_argument("--clip", nargs="+", default=["minmax", "aciq", "mse", "ocs"])
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every cell")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ptq_fidelity"))
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    register_configs()
    rows = []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None), tempfile.TemporaryDirectory() as tmp:
        for quant in args.quant:
            for clip in args.clip:
                overrides = [f"quant={quant}", f"clip={clip}", *args.extra]
                cfg = compose_config(overrides, str(Path(tmp) / f"{quant}_{clip}"))
                start = time.perf_counter()
                report = run(cfg)
                seconds = time.perf_counter() - start
                q = report["metrics"]["quantized"]
                row = {"quant": quant, "clip": clip, "seconds": round(seconds, 1), **q}
                rows.append(row)
                print(json.dumps(row), flush=True)

    metrics = [k for k in rows[0] if k not in ("quant", "clip", "seconds")]
    header = "| quant | clip | " + " | ".join(metrics) + " | seconds |"
    lines = [header, "|" + "---|" * (len(metrics) + 3)]
    for r in rows:
        lines.append(f"| {r['quant']} | {r['clip']} | " + " | ".join(f"{r[m]:.4f}" for m in metrics) + f" | {r['seconds']} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/ptq_fidelity.py " + " ".join(sys.argv[1:])
    out.with_suffix(".md").write_text(f"`{command.strip()}`\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1))
    print(f"wrote {out}.md / .json")


if __name__ == "__main__":
    main()
