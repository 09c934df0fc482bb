"""What the benchmark scripts share: composing a run config exactly as the entry point does, and
writing a result table (markdown + json, with the command that produced it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

from mrem_dist.config import RunConfig, register_configs, validate  # noqa: E402


@contextmanager
def hydra_configs() -> Iterator[None]:
    """Offline, quiet, and with conf/ loaded: compose_config() works inside."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        yield


def compose_config(overrides: list[str], run_dir: str | Path) -> RunConfig:
    """`python -m mrem_dist <overrides>`'s config, validated, writing into run_dir."""
    dcfg = compose(config_name="config", overrides=[*overrides, f"run_dir={run_dir}"])
    return validate(OmegaConf.to_object(dcfg))


def launch(overrides: list[str], run_dir: Path, ranks: int = 1, threads: int = 0,
           module: str = "mrem_dist", result: str = "report.json") -> tuple[dict, float]:
    """`python -m <module> <overrides>` (mrem_dist, mrem_dist.finetune or mrem_dist.evaluate) in a
    subprocess (under torchrun when ranks > 1), exactly as a user starts it; returns (the `result`
    file it wrote: report.json, or evaluation.json for evaluate; wall seconds of the whole job)."""
    launcher = [sys.executable, "-m", module]
    if ranks > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    "-m", module]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [*overrides, f"threads={threads}", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((Path(run_dir) / result).read_text()), wall


def write_results(out: str | Path, script: str, header: str, rows: list[dict], table: list[str]) -> None:
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    text = f"`{command.strip()}`\n\n" + (header + "\n\n" if header else "") + "\n".join(table) + "\n"
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"command": command.strip(), "rows": rows}, indent=1))
    print(f"wrote {out}.md / .json")
