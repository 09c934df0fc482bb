"""The LLM peers, side by side: Intel's AutoRound (SignRound) and llm-compressor's GPTQ (vLLM's own
tool) against mrem-dist on the same decoder, the same calibration windows, the same evaluation
windows and the same scheme, scored by one evaluator.

SmolLM2-135M-Instruct (model=smollm2) on Wikipedia text (data=wiki); W<b>A16, asymmetric weights in
groups of 64 input columns (quant=w<b>a16_g64: SmolLM2's hidden size 576 is not a multiple of 128),
embeddings and LM head in full precision, for everyone. Cells per bit width (CELLS):
- mrem-dist: RTN, GPTQ (one process; with its default static act-order, and without: the ablation
  that separates act-order from the rest), MREM-S (one process) and MREM-P (2 torchrun ranks x 1
  thread), both reconstructions from GPTQ (method.init=gptq), and MREM-P from RTN: AutoRound's start;
- peers, each in its own process (benchmarks/peer_quantize.py) through its public API: AutoRound at
  its default tuning (200 iterations per block, batch 8, lr 1/iters: nothing passed but the scheme and
  the data), at a budget near MREM-P's wall time (--matched-iters), and at iters=0 (its RTN);
  llm-compressor's GPTQModifier through `oneshot` at its defaults. AutoRound runs in this
  environment (the `peers` extra); llm-compressor in its own virtual environment (its pins,
  transformers<=5.17 and compressed-tensors==0.19, cannot share one with mrem-dist), created on first
  use beside the data cache ($MREM_DIST_DATA, else ~/.cache/mrem_dist: peers/llmcompressor-<version>).
Every cell writes a compressed-tensors folder (mrem-dist with export.format=compressed-tensors, the
peers in their own llm-compressor format); this script loads each folder back with transformers
(mrem_dist.artifact.load_compressed_tensors), checks that it holds the scheme asked for, and scores
it with mrem-dist's perplexity on the evaluation windows of the run (for mrem-dist's cells that
figure must equal the one its run reported: it is checked). Wall time is the process's, start to
exit, less mrem-dist's in-run evaluation of both models (the peers evaluate nothing); one-process
cells get both cores. Peak RSS is the process's (the larger rank's for MREM-P).

    python benchmarks/llm_peers.py                     # W4, W3, W2: hours on 2 cores (AutoRound's defaults)
    python benchmarks/llm_peers.py --bits 3 --cells "AutoRound (defaults)" --resume   # add cells to a run
    python benchmarks/llm_peers.py --quick             # smoke: W3, 2 steps, tiny data (CI: report.py --quick)
    python benchmarks/llm_peers.py --render            # rebuild the .md / .png from the .json

Targets (reported whether met or not): at W3 and W2, MREM-P on 2 ranks below both peers' perplexity
(each AutoRound cell and llm-compressor's GPTQ), and less wall time than AutoRound at its defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import REPO, RESULTS, compose_config, hydra_configs, launch

from mrem_dist.io import cache_root

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
GROUP = 64


@dataclass(frozen=True)
class Cell:
    name: str
    tool: str                 # "mrem-dist", "autoround" or "llmcompressor"
    overrides: tuple = ()     # mrem-dist: the run's Hydra overrides
    ranks: int = 1
    iters: str | None = None  # AutoRound: "default", "matched" or "0"
    trained: str = ""         # what the cell optimizes, for the table


CELLS = [
    Cell("mrem-dist RTN", "mrem-dist", ("method=ptq",), trained="nothing (min-max)"),
    Cell("mrem-dist GPTQ", "mrem-dist", ("method=gptq",), trained="nothing (Hessian rounding, static act-order)"),
    Cell("mrem-dist GPTQ without act-order", "mrem-dist", ("method=gptq", "method.gptq_act_order=false"),
         trained="nothing (Hessian rounding, columns in order)"),
    Cell("mrem-dist MREM-S", "mrem-dist", ("method=mrem_s", "method.init=gptq"),
         trained="weights + step sizes, 2 modules of 15 layers, from GPTQ"),
    Cell("mrem-dist MREM-P (2 ranks)", "mrem-dist", ("method=mrem_p", "method.init=gptq"), ranks=2,
         trained="weights + step sizes, 2 modules of 15 layers at once, from GPTQ"),
    Cell("mrem-dist MREM-P from RTN (2 ranks)", "mrem-dist", ("method=mrem_p", "method.init=rtn"), ranks=2,
         trained="weights + step sizes, 2 modules at once, from RTN"),
    Cell("AutoRound RTN (iters=0)", "autoround", iters="0", trained="nothing (min-max)"),
    Cell("llm-compressor GPTQ", "llmcompressor", trained="nothing (Hessian rounding, static act-order)"),
    Cell("AutoRound (matched budget)", "autoround", iters="matched",
         trained="rounding offsets + clip ranges per block (signed gradient)"),
    Cell("AutoRound (defaults)", "autoround", iters="default",
         trained="rounding offsets + clip ranges per block (signed gradient)"),
]
NAMES = [c.name for c in CELLS]
# --quick: every code path (each peer, AutoRound tuned and at iters=0, mrem-dist in one process and
# on 2 ranks) at the smallest cost; AutoRound's defaults are the one cell left out (200 iterations).
QUICK_CELLS = ["mrem-dist RTN", "mrem-dist MREM-P (2 ranks)", "AutoRound RTN (iters=0)", "llm-compressor GPTQ",
               "AutoRound (matched budget)"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's settings, --quick's defaults filled in (benchmarks/report.py calls this too)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: W3, QUICK_CELLS, 2 steps / iterations, 8 x 64 "
                   "calibration, 4 evaluation windows; writes results/quick/llm_peers.*")
    p.add_argument("--bits", type=int, nargs="+", default=None, help="default 4 3 2 (--quick: 3)")
    p.add_argument("--cells", nargs="+", default=None, choices=NAMES, metavar="CELL", help=f"default all: {NAMES}")
    p.add_argument("--steps", type=int, default=None, help="MREM steps per module (default 40; --quick: 2)")
    p.add_argument("--modules", type=int, default=2)
    p.add_argument("--calib", type=int, default=None, help="calibration windows (default 32; --quick: 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256; --quick: 64)")
    p.add_argument("--eval", type=int, default=None, help="evaluation windows (default 32; --quick: 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="method.lr_weight of the MREM cells")
    # 12: chosen from AutoRound's rate here (about 0.8 s per iteration and block at batch 8 x 256
    # tokens, plus loading, torch.compile and caching) against MREM-P's ~430 s at W3; measured: 301 s.
    p.add_argument("--matched-iters", type=int, default=None,
                   help="AutoRound iterations per block of the matched cell (default 12: near MREM-P's wall time "
                        "here, measured; --quick: 2)")
    p.add_argument("--llmcompressor-python", default=None,
                   help="python of an environment with llm-compressor (default: the one this script creates)")
    p.add_argument("--resume", action="store_true", help="keep the rows of --out's json, run only the missing cells")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/llm_peers; --quick: "
                   "benchmarks/results/quick/llm_peers)")
    p.add_argument("--render", action="store_true", help="rewrite the .md and .png from --out's json, run nothing")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"bits": [3] if q else [4, 3, 2], "steps": 2 if q else 40, "calib": 8 if q else 32,
                "seq_len": 64 if q else 256, "eval": 4 if q else 32, "matched_iters": 2 if q else 12,
                "cells": QUICK_CELLS if q else NAMES,
                "out": RESULTS / ("quick/llm_peers" if q else "llm_peers")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out)
    return args


def main() -> None:
    args = parse_args()
    saved = json.loads(args.out.with_suffix(".json").read_text()) if (args.render or args.resume) else None
    if args.render:
        write(args.out, saved)
        return
    if saved and saved["setup"]["budget"] != budget(args):
        raise SystemExit(f"--resume: {args.out}.json was measured with {saved['setup']['budget']}, this run would use "
                         f"{budget(args)}: use the same settings or another --out")
    with hydra_configs(), tempfile.TemporaryDirectory() as tmp:
        report = measure(args, Path(tmp), saved, on_row=lambda rep: write(args.out, rep))
    write(args.out, report)


def measure(args: argparse.Namespace, tmp: Path, saved: dict | None = None, on_row=None, command: str | None = None
            ) -> dict:
    """Run the cells of `args` (those not already in `saved`, a report of the same settings) inside
    hydra_configs(); returns the report {setup, runs, rows}. `on_row(report)` after every cell;
    `command`: the one that started this run (default: this script's command line)."""
    report = saved or {"setup": setup(args), "runs": [], "rows": []}
    command = command or "python benchmarks/llm_peers.py " + shlex.join(sys.argv[1:])
    report["runs"].append({"command": command.strip(),
                           "started": time.strftime("%Y-%m-%d %H:%M"), "machine": machine()})
    done = {(r["bits"], r["cell"]) for r in report["rows"]}
    todo = [(b, c) for b in args.bits for c in CELLS if c.name in args.cells and (b, c.name) not in done]
    needs_llmc = any(c.tool == "llmcompressor" for _, c in todo)
    python = {"autoround": sys.executable,
              "llmcompressor": args.llmcompressor_python or (llmcompressor_env() if needs_llmc else None)}
    start = time.perf_counter()
    bench = Bench(args, tmp, python)
    report["setup"]["fp_perplexity"] = bench.fp_perplexity
    for bits, cell in todo:
        report["rows"].append(bench.run(cell, bits))
        report["runs"][-1]["minutes"] = round((time.perf_counter() - start) / 60, 1)
        print(json.dumps(report["rows"][-1]), flush=True)
        if on_row:
            on_row(report)  # a stopped run keeps what it measured
    return report


def budget(args) -> str:
    return (f"{args.calib} x {args.seq_len} calibration tokens, {args.eval} evaluation windows of {args.seq_len}, "
            f"MREM {args.steps} steps x {args.modules} modules at lr {args.lr}")


def setup(args) -> dict:
    return {"budget": budget(args), "group_size": GROUP, "steps": args.steps, "modules": args.modules,
            "calib": args.calib, "seq_len": args.seq_len, "eval": args.eval, "lr": args.lr}


def machine() -> str:
    from importlib.metadata import version

    from artifact import cpu_description

    return (f"{os.cpu_count()} CPU cores ({cpu_description()}), {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}")


def llmcompressor_env(root: Path | None = None) -> str:
    """The python of a virtual environment with LLMCOMPRESSOR, created once under `root` (default:
    beside the data cache). It sees this environment's packages after its own (a .pth file naming
    this one's site-packages: unlike --system-site-packages that also works when this environment is
    itself a venv), so torch is not downloaded again (pinned to this one's version so pip keeps it)
    and only what llm-compressor pins is installed over them."""
    import sysconfig

    env = (root or cache_root() / "peers") / LLMCOMPRESSOR.replace("==", "-")
    python = env / "bin" / "python"
    if (env / "ready").exists():
        return str(python)
    print(f"creating {env} for {LLMCOMPRESSOR} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(own) / "_mrem_dist_parent.pth").write_text("".join(f"{p}\n" for p in ours))
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", LLMCOMPRESSOR, torch_pin],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {LLMCOMPRESSOR} {torch_pin} into {env} failed:\n{done.stderr[-3000:]}")
    (env / "ready").write_text(LLMCOMPRESSOR + "\n")
    return str(python)


class Bench:
    """The shared inputs (model, calibration ids, evaluation windows) and one method per kind of cell."""

    def __init__(self, args, tmp: Path, python: dict):
        from mrem_dist.context import RunContext
        from mrem_dist.scoring import score

        self.args, self.tmp, self.python = args, tmp, python
        self.data = ["model=smollm2", "data=wiki", f"data.calib_samples={args.calib}", f"data.seq_len={args.seq_len}",
                     f"data.eval_samples={args.eval}", "data.batch_size=2", "checkpoint.dir=null"]
        # The windows every cell sees: those `python -m mrem_dist` draws with these overrides.
        ctx = RunContext.begin(compose_config([*self.data, "quant=w4a16_g64"], tmp / "inputs"))
        loaded = ctx.load()
        self.model_dir, self.family, self.task, self.evalset = loaded.path, loaded.family, loaded.task, ctx.data.evalset
        ids = torch.cat([b.input_ids for b in ctx.data.calib])
        if ids.shape != (args.calib, args.seq_len) or not all(bool(b.attention_mask.all()) for b in ctx.data.calib):
            raise RuntimeError(f"calibration windows: expected {args.calib} full windows of {args.seq_len}, got "
                               f"{tuple(ids.shape)}")
        self.calib = tmp / "calib.pt"
        torch.save(ids.cpu().to(torch.int64), self.calib)
        self.fp_perplexity = score(None, loaded.model, self.family, self.task, self.evalset).compute()[1]["perplexity"]
        del loaded, ctx

    def run(self, cell: Cell, bits: int) -> dict:
        run_dir = self.tmp / f"{bits}_{NAMES.index(cell.name)}"
        if cell.tool == "mrem-dist":
            row, folder = self.mrem(cell, bits, run_dir)
        else:
            row, folder = self.peer(cell, bits, run_dir)
        ppl = self.score_folder(folder, bits)
        if "run_perplexity" in row and not math.isclose(ppl, row["run_perplexity"], rel_tol=1e-4):
            raise RuntimeError(f"{cell.name} W{bits}: the folder scores {ppl}, its run reported {row['run_perplexity']}")
        return {"bits": bits, "cell": cell.name, "tool": cell.tool, "perplexity": round(ppl, 3),
                "ratio_to_fp": round(ppl / self.fp_perplexity, 4), **row, "trained": cell.trained,
                "cpu": torch.backends.cpu.get_cpu_capability()}

    def mrem(self, cell: Cell, bits: int, run_dir: Path) -> tuple[dict, Path]:
        trains = cell.overrides[0].startswith("method=mrem")
        recon = [f"method.steps={self.args.steps}", f"method.modules={self.args.modules}",
                 f"method.lr_weight={self.args.lr}"] if trains else []
        cfg = [*self.data, f"quant=w{bits}a16_g{GROUP}", *cell.overrides, *recon, "export.format=compressed-tensors"]
        report, wall = launch(cfg, run_dir, ranks=cell.ranks, threads=2 // cell.ranks)
        ranks = report.get("reconstruction", {}).get("ranks") or []
        rss = max([report["peak_memory_gb"]["rss"], *(r["peak_rss_gb"] for r in ranks)])
        command = f"python -m mrem_dist {' '.join(cfg)}"
        if cell.ranks > 1:
            command = f"torchrun --nproc_per_node={cell.ranks} -m mrem_dist {' '.join(cfg)} threads=1"
        # The in-run evaluation of both models (and MREM-P's per-layer probes) is mrem-dist's own
        # scoring, which the peers do not do: left out of the wall time.
        scoring = report["timings_s"]["evaluate"] + report["timings_s"].get("probe", 0.0)
        return ({"wall_s": round(wall - scoring, 1), "peak_rss_gb": round(rss, 3),
                 "processes": f"{cell.ranks} x {2 // cell.ranks} threads", "command": command,
                 "run_perplexity": report["metrics"]["quantized"]["perplexity"],
                 **({"before_perplexity": round(report["metrics_before_reconstruction"]["perplexity"], 3),
                     # modules the never-worse check returned to their start (training made them worse)
                     "kept_initial": [m["index"] for m in report["reconstruction"]["modules"] if m["kept"] == "initial"]}
                    if trains else {})},
                Path(report["artifacts"]["compressed-tensors"]["path"]))

    def peer(self, cell: Cell, bits: int, run_dir: Path) -> tuple[dict, Path]:
        iters = {"default": None, "matched": self.args.matched_iters, "0": 0}.get(cell.iters)
        result = run_dir / "peer.json"
        args = [cell.tool, "--model", self.model_dir, "--calib", str(self.calib), "--bits", str(bits),
                "--group-size", str(GROUP), "--asym", "--out", str(run_dir / "model"), "--result", str(result),
                *(["--iters", str(iters)] if iters is not None else [])]
        command = [self.python[cell.tool], str(REPO / "benchmarks" / "peer_quantize.py"), *args]
        run_dir.mkdir(parents=True)
        start = time.perf_counter()
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"},
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{cell.name} W{bits} failed ({done.returncode}): {shlex.join(command)}\n"
                               f"{done.stderr[-4000:]}")
        peer = json.loads(result.read_text())
        # The command as a user re-runs it: the temporary paths named by what they hold.
        where = {self.model_dir: "<smollm2 folder>", str(self.calib): "<calib.pt>", str(run_dir / "model"): "<out>",
                 str(result): "<out>/peer.json"}
        python = "python" if cell.tool == "autoround" else "<llm-compressor env>/bin/python"
        shown = [python, "benchmarks/peer_quantize.py", *(where.get(a, a) for a in args)]
        return ({"wall_s": round(wall, 1), "peak_rss_gb": peer["peak_rss_gb"], "processes": f"1 x {peer['threads']} threads",
                 "command": " ".join(shown), "version": f"{peer['package']} {peer['version']}",
                 "settings": peer["settings"], "peer_versions": peer["versions"]}, Path(peer["folder"]))

    def score_folder(self, folder: Path, bits: int) -> float:
        """Perplexity of a compressed-tensors folder on the evaluation windows, after checking it
        holds W<bits> asymmetric groups of GROUP on every quantized Linear."""
        from mrem_dist.artifact.compressed_tensors import load_compressed_tensors, read_quantization_config
        from mrem_dist.scoring import score

        check_scheme(read_quantization_config(folder), bits, folder)
        art = load_compressed_tensors(folder, "cpu")
        return score(None, art.model, self.family, self.task, self.evalset).compute()[1]["perplexity"]


def check_scheme(config: dict | None, bits: int, folder: Path | str) -> None:
    """A folder's quantization_config must hold W<bits> asymmetric integer groups of GROUP in every
    config group: a peer that wrote another scheme than the one asked for is an error, not a row."""
    schemes = [g.get("weights") or {} for g in (config or {}).get("config_groups", {}).values()]
    want = {"num_bits": bits, "group_size": GROUP, "symmetric": False, "type": "int", "strategy": "group"}
    if not schemes or any({k: s.get(k) for k in want} != want for s in schemes):
        raise RuntimeError(f"{folder}: expected weights {want}, its quantization_config has {schemes or config}")


def write(out: Path, report: dict) -> None:
    """<out>.md / .json / .png: a table per bit width, the targets, a perplexity-time plot."""
    lines = [f"`{r['command']}` ({r['started']}; {r['machine']})" for r in report["runs"]]
    text = "\n".join(lines + ["", *tables(report["rows"], report["setup"])]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    plot(out.with_suffix(".png"), report["rows"], report["setup"].get("fp_perplexity"))
    print(text)


def tables(rows: list[dict], s: dict) -> list[str]:
    """The markdown of the rows: the setup, a table per bit width, the targets, versions and commands."""
    lines = [f"SmolLM2-135M-Instruct, data=wiki, W<b>A16 asymmetric in groups of {s['group_size']} for every "
              f"cell; {s['budget']}; full-precision perplexity {s.get('fp_perplexity', math.nan):.3f}. Every cell's "
              "compressed-tensors folder is loaded back with transformers and scored by mrem-dist's perplexity on the "
              "same windows. Wall: the process, start to exit (load, calibrate, save), less mrem-dist's in-run "
              "evaluation; peak RSS of one process."]
    for bits in sorted({r["bits"] for r in rows}, reverse=True):
        here = {r["cell"]: r for r in rows if r["bits"] == bits}
        # Rows measured on machines of different CPU kernels (sessions land on different machines)
        # say which: their wall times compare only roughly.
        mixed = len({r.get("cpu") for r in here.values()}) > 1
        lines += ["", f"### W{bits}A16 g{s['group_size']}", "",
                  "| cell | perplexity | x FP | wall s | peak RSS GB | processes | trained |" + (" CPU |" if mixed else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if mixed else "")]
        for name in NAMES:  # in CELLS' order; a cell this report did not run says so
            r = here.get(name)
            if r is None:
                lines.append(f"| {name} | not run in this report | | | | | |" + (" |" if mixed else ""))
                continue
            start = f" (start: {r['before_perplexity']:.2f})" if "before_perplexity" in r else ""
            if r.get("kept_initial"):
                start = start[:-1] + f"; kept at their start: module {', '.join(map(str, r['kept_initial']))})"
            lines.append(f"| {name} | {r['perplexity']:.2f} | {r['ratio_to_fp']:.3f} | {r['wall_s']} | {r['peak_rss_gb']} | "
                         f"{r['processes']} | {r['trained']}{start} |" + (f" {r.get('cpu', '?')} |" if mixed else ""))
    lines += ["", "### Targets", "", *targets(rows)]
    versions = sorted({r["version"] for r in rows if "version" in r})
    lines += ["", "### Versions and commands", "", f"Peers: {', '.join(versions) or 'none run'}; llm-compressor's "
              "environment: " + next((json.dumps(r["peer_versions"]) for r in rows if r["tool"] == "llmcompressor"), "-"),
              "", *[f"- W{r['bits']} {r['cell']}: `{r['command']}`" + (f" (settings {json.dumps(r['settings'])})"
                                                                       if "settings" in r else "") for r in rows]]
    return lines


def targets(rows: list[dict]) -> list[str]:
    cell = {(r["bits"], r["cell"]): r for r in rows}
    out = []
    for bits in (3, 2):
        ours = cell.get((bits, "mrem-dist MREM-P (2 ranks)"))
        if not ours:
            out.append(f"- W{bits}: not measured (no MREM-P cell)")
            continue
        for peer in ("AutoRound (defaults)", "AutoRound (matched budget)", "llm-compressor GPTQ"):
            theirs = cell.get((bits, peer))
            if theirs is None:
                out.append(f"- W{bits} perplexity vs {peer}: not measured")
                continue
            met = ours["perplexity"] < theirs["perplexity"]
            out.append(f"- W{bits} perplexity: MREM-P {ours['perplexity']:.2f} vs {peer} {theirs['perplexity']:.2f}: "
                       f"{'met' if met else 'NOT met'} (target: MREM-P lower)")
        theirs = cell.get((bits, "AutoRound (defaults)"))
        if theirs:
            met = ours["wall_s"] < theirs["wall_s"]
            where = ("" if ours.get("cpu") == theirs.get("cpu") else
                     f", measured on different machines (CPU {ours.get('cpu', '?')} and {theirs.get('cpu', '?')})")
            out.append(f"- W{bits} wall time: MREM-P {ours['wall_s']} s vs AutoRound at its defaults {theirs['wall_s']} s: "
                       f"{'met' if met else 'NOT met'} (target: MREM-P faster){where}")
        else:
            out.append(f"- W{bits} wall time vs AutoRound at its defaults: not measured")
    return out


def plot(path: Path, rows: list[dict], fp_ppl: float | None) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["bits"] for r in rows}, reverse=True)
    if not widths:
        return
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4.5), squeeze=False)
    for ax, bits in zip(axes[0], widths):
        for r in (r for r in rows if r["bits"] == bits):
            ax.scatter(r["wall_s"], r["perplexity"], marker="o" if r["tool"] == "mrem-dist" else "s",
                       color="C0" if r["tool"] == "mrem-dist" else "C1" if r["tool"] == "autoround" else "C2")
            ax.annotate(r["cell"].replace("mrem-dist ", ""), (r["wall_s"], r["perplexity"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        if fp_ppl:
            ax.axhline(fp_ppl, color="gray", ls="--", lw=0.8, label=f"FP32 {fp_ppl:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="wall s (log)", ylabel="perplexity (log)",
               title=f"W{bits}A16 g{GROUP}: mrem-dist (circles) vs peers (squares)")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
