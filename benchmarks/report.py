"""The benchmark report: where mrem-dist stands against its baselines and its peer, in one command.

On the real all-MiniLM-L6-v2 and the built-in text (no network), every figure measured in this run:

1. quality: cosine of the sentence embeddings to FP32 (and rank agreement, relative error) at
   W8A8, W4A8, W3A8, W2A8, W4-E4-A8 and W2-E2-A8 for plain PTQ (min-max, ACIQ, OCS, MSE clipping,
   ZeroQuant-style fine-grained: 48 row groups + token-wise activations), REM, LKD, MREM-S and
   MREM-P (2 ranks, torchrun) with the same steps per module, all initialised from the MSE clip.
   Steps per module are equal, and so is the training compute: REM/LKD train 6 one-layer modules,
   MREM-S/P 4 modules of 1-2 layers (6 layers either way);
2. scaling: MREM-S in one process against MREM-P on 1 and 2 ranks (one thread each, 2 modules),
   training and wall time, parallel efficiency, time blocked on communication, peak RSS per rank;
3. artifact: model.safetensors of every quality cell against the FP32 model's, and the INT8 latency
   of the exported model (benchmarks/artifact.py's measurement);
4. peer: DeepSpeed's own ZeroQuant (PTQ and LKD, `deepspeed.compression`) side by side with
   mrem-dist's PTQ on both of its weight grids and LKD on DeepSpeed's grid, the same scheme on
   both sides (benchmarks/zeroquant_peer.py's cells; run that script for LKD on both grids);
5. prequant: PreQuant against FP fine-tuning and fine-tune -> PTQ / MREM-S on the movie-review
   task, accuracy at W4 and W3 (benchmarks/prequant.py's cells);
6. llm_peers: the decoder LLM side by side, SmolLM2 on Wikipedia text at W4/W3/W2A16 g64: AutoRound
   and llm-compressor's GPTQ against mrem-dist's RTN, GPTQ, MREM-S and MREM-P, every folder scored
   by mrem-dist's perplexity (benchmarks/llm_peers.py's cells; hours on 2 cores at full size, most
   of them AutoRound's defaults: run that script alone and `--render` its json in).

Writes <out>.md, <out>.json, <out>_quality.png and <out>_scaling.png. `--sections` runs some of
them; `--render A.json B.json` rebuilds one report from runs that measured different sections
(each section from the first file that has it, the quality section setting by setting, so it can
be measured a few `--settings` at a time; every run's command and machine are listed), a
benchmarks/llm_peers.py json among them as the llm_peers section.

    python benchmarks/report.py             # the full report: benchmarks/results/report.*
    python benchmarks/report.py --quick     # smoke run (30 min here beside two other jobs): results/quick/
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, compose_config, hydra_configs, launch

from mrem_dist.runner import run

SECTIONS = ("scaling", "latency", "quality", "peer", "prequant", "llm_peers")
SETTINGS = ["w8a8", "w4a8", "w3a8", "w2a8", "w4e4a8", "w2e2a8"]  # conf/quant presets
FINE_GRAINED = ["quant.w_granularity=group", "quant.w_groups=48", "quant.a_mode=dynamic"]
# (label, method, overrides, ranks): every reconstruction starts from the MSE clip, the best PTQ
# init measured (benchmarks/results/ptq_fidelity.md).
CELLS = [
    ("PTQ min-max", "ptq", ["clip=minmax"], 1),
    ("PTQ ACIQ", "ptq", ["clip=aciq"], 1),
    ("PTQ OCS", "ptq", ["clip=ocs"], 1),
    ("PTQ MSE", "ptq", ["clip=mse"], 1),
    ("PTQ fine-grained", "ptq", ["clip=minmax", *FINE_GRAINED], 1),
    ("REM", "rem", ["clip=mse"], 1),
    ("LKD", "lkd", ["clip=mse"], 1),
    ("MREM-S", "mrem_s", ["clip=mse"], 1),
    ("MREM-P", "mrem_p", ["clip=mse"], 2),
]
RECON = {"rem", "lkd", "mrem_s", "mrem_p"}
METRICS = ["cosine", "cosine_min", "rank_agreement", "rel_error"]


def quality(settings: list[str], steps: int, data: list[str], tmp: Path) -> list[dict]:
    rows = []
    for setting in settings:
        for label, method, overrides, ranks in CELLS:
            ov = [f"quant={setting}", f"method={method}", *overrides, *data, "checkpoint.dir=null", "device=cpu"]
            ov += [f"method.steps={steps}"] if method in RECON else []
            run_dir = tmp / f"q{len(rows)}"
            start = time.perf_counter()
            if ranks > 1:  # a user's torchrun launch; one thread per rank on this machine's cores
                report, wall = launch(ov, run_dir, ranks=ranks, threads=max(1, (os.cpu_count() or 2) // ranks))
            else:
                report = run(compose_config(ov, run_dir))
                wall = time.perf_counter() - start
            rec = report.get("reconstruction", {})
            train = (max(r["train_seconds"] for r in rec["ranks"]) if "ranks" in rec
                     else report["timings_s"].get("reconstruct", 0.0))
            rows.append({"setting": setting, "method": label, "ranks": ranks, "steps": steps if method in RECON else 0,
                         **{m: report["metrics"]["quantized"][m] for m in METRICS},
                         "wall_s": round(wall, 1), "train_s": round(train, 1),
                         "artifact_bytes": report["artifacts"]["mrem"]["bytes"], "artifact_ratio": report["artifacts"]["mrem"]["ratio_to_fp32"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def scaling(steps: int, data: list[str], tmp: Path) -> list[dict]:
    from parallel import job

    extra = [*data, "checkpoint.dir=null"]
    rows = []
    for method, ranks in (("mrem_s", 1), ("mrem_p", 1), ("mrem_p", 2)):
        rows.append(job(method, "w4a8", steps, 1, ranks, tmp / f"s{len(rows)}", extra))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_train"] = round(base["train_s"] / r["train_s"], 3)
        r["speedup_wall"] = round(base["wall_s"] / r["wall_s"], 3)
        r["efficiency"] = round(r["speedup_train"] / r["ranks"], 3)
    return rows


def latency(rounds: int, tmp: Path) -> tuple[list[dict], str]:
    from artifact import builtin_inputs, cpu_description, gemm
    from artifact import latency as model_latency

    from mrem_dist.config import BUILTIN_MODEL
    from mrem_dist.models import load_model

    loaded = load_model(BUILTIN_MODEL)
    batch, calib = builtin_inputs(loaded)
    rows = model_latency(loaded, calib, batch, tmp, torch.device("cpu"), rounds)
    rows += gemm(torch.device("cpu"), 3 * rounds)
    return rows, cpu_description()


def peer(bits: list[int], steps: int, data: list[str], tmp: Path) -> tuple[list[dict], dict]:
    from zeroquant_peer import peer_rows

    return peer_rows(bits, steps, 48, tmp, data)


def prequant(bits: list[int], steps: int, recon_steps: int, eval_samples: int, tmp: Path) -> tuple[list[dict], dict]:
    from prequant import prequant_rows

    return prequant_rows(bits, steps, recon_steps, tmp, eval_samples=eval_samples)


def llm_peers(quick: bool, tmp: Path, command: str) -> tuple[list[dict], dict]:
    import llm_peers as lp

    report = lp.measure(lp.parse_args(["--quick"] if quick else []), tmp, command=command)
    return report["rows"], report["setup"]


# ------------------------------------------------------------------------------------------ output


def _f(x: float, nd: int = 4) -> str:
    return f"{x:.{nd}f}"


def headlines(q: list[dict], sc: list[dict], lat: list[dict], pr: list[dict], pq: list[dict] = ()) -> list[str]:
    """The figures the README quotes, computed from the rows (nothing typed in)."""
    out = []
    by = {(r["setting"], r["method"]): r for r in q}
    for setting in dict.fromkeys(r["setting"] for r in q):
        cells = [r for r in q if r["setting"] == setting]
        best = max(cells, key=lambda r: r["cosine"])
        ptq = max((r for r in cells if r["method"].startswith("PTQ")), key=lambda r: r["cosine"])
        mp = by.get((setting, "MREM-P"))
        out.append(f"{setting.upper()}: best {best['method']} {_f(best['cosine'])} (best PTQ: {ptq['method']} "
                   f"{_f(ptq['cosine'])}; MREM-P {_f(mp['cosine']) if mp else 'n/a'}), artifact "
                   f"{_f(cells[0]['artifact_ratio'], 3)}x of FP32")
    p2 = next((r for r in sc if r["method"] == "mrem_p" and r["ranks"] == 2), None)
    if p2:
        out.append(f"MREM-P on 2 ranks trains {p2['speedup_train']:.2f}x faster than MREM-S (parallel efficiency "
                   f"{100 * p2['efficiency']:.0f}%, whole job {p2['speedup_wall']:.2f}x), blocked on communication "
                   + ", ".join(f"{100 * f:.1f}%" for f in p2["blocked_fraction"]) + " per rank")
    int8 = [r for r in lat if r.get("table") == "latency" and r.get("config", "").endswith(" int8") and "median_ms" in r]
    if int8:
        best = max(int8, key=lambda r: r["speedup_vs_fp32"])
        out.append(f"INT8 kernel on this CPU: {best['config']} {best['speedup_vs_fp32']:.2f}x of FP32's speed "
                   f"({best['median_ms']} ms per 32 x 128 batch)")
    cells = {(r["bits"], r["cell"]): r for r in pr}
    for bits in dict.fromkeys(r["bits"] for r in pr):
        ours = [f"mrem-dist{name} {method} {_f(cells[(bits, cell)]['cosine'])}"
                for cell, method, name in (("ptq", "PTQ", ""), ("ptq_full_range", "PTQ", " full-range"),
                                           ("lkd", "LKD", ""), ("lkd_full_range", "LKD", " full-range"))
                if (bits, cell) in cells]
        theirs = [f"DeepSpeed {method} {_f(cells[(bits, cell)]['cosine'])}"
                  for cell, method in (("ds_ptq", "PTQ"), ("ds_lkd", "LKD")) if (bits, cell) in cells]
        out.append(f"W{bits} (ZeroQuant's scheme) vs the peer: " + ", ".join(theirs) + "; " + ", ".join(ours))
    fp = next((r for r in pq if r["cell"] == "fp"), None)
    for bits in dict.fromkeys(r["bits"] for r in pq if r["bits"]):
        cells = {r["cell"]: r for r in pq if r["bits"] == bits}
        pqr = cells.get("prequant")
        others = ", ".join(f"{cells[c]['method']} {_f(cells[c]['accuracy'])}" for c in ("ft_mrem_s", "ft_ptq") if c in cells)
        if pqr and fp:
            out.append(f"PreQuant W{bits}A8 on movie reviews: accuracy {_f(pqr['accuracy'])} training "
                       f"{100 * pqr['trainable_fraction']:.2f}% of the parameters (FP fine-tuning {_f(fp['accuracy'])}, "
                       f"drop {pqr['drop_pts']:.2f} points); {others}")
    return out


def markdown(meta: dict, q: list[dict], sc: list[dict], lat: list[dict], pr: list[dict], heads: list[str],
             pq: list[dict] = (), lp: list[dict] = ()) -> str:
    lines = []
    for job in meta["runs"]:
        lines += [f"`{job['command']}` ({', '.join(job['sections'])})", "", f"Machine: {job['machine']}. Started "
                  f"{job['started']}, took {job['minutes']:.0f} min.", ""]
    if "setup" in meta:
        lines += [meta["setup"], ""]
    lines += ["## Headlines", ""]
    lines += [f"- {h}" for h in heads]
    if q:
        lines += _quality_md(meta, q)
    if sc:
        lines += _scaling_md(meta, sc)
    if lat:
        lines += _latency_md(meta, lat)
    if pr:
        lines += _peer_md(meta, pr)
    if pq:
        lines += _prequant_md(meta, pq)
    if lp:
        from llm_peers import tables

        lines += ["", "## Decoder LLM: AutoRound and llm-compressor side by side", "",
                  *tables(lp, meta["llm_peers_setup"])]
    lines += ["", "Not run here: GPUs and NCCL (this machine has none; the same commands run there with "
              "`device=cuda`), DeepSpeed's fused `quantizer_kernel` (CUDA only), multi-node MREM-P.", ""]
    return "\n".join(lines)


def llm_peers_headlines(rows: list[dict], setup: dict) -> list[str]:
    """Per bit width: MREM-P's perplexity and wall time against the best cell of each peer."""
    out = []
    for bits in sorted({r["bits"] for r in rows}, reverse=True):
        cells = [r for r in rows if r["bits"] == bits]
        ours = next((r for r in cells if r["cell"] == "mrem-dist MREM-P (2 ranks)"), None)
        best = {tool: min((r for r in cells if r["tool"] == tool), key=lambda r: r["perplexity"], default=None)
                for tool in ("autoround", "llmcompressor")}
        shown = [f"{r['cell']} {r['perplexity']:.2f} in {r['wall_s']:.0f} s" for r in [ours, *best.values()] if r]
        out.append(f"SmolLM2 W{bits}A16 g64 perplexity (FP {setup['fp_perplexity']:.2f}): "
                   + "; ".join(shown))
    return out


def _quality_md(meta: dict, q: list[dict]) -> list[str]:
    settings = list(dict.fromkeys(r["setting"] for r in q))
    lines = ["", f"## Quality: cosine to FP32 ({meta['steps']} steps per module for the "
              "reconstruction methods)", "", "| method | " + " | ".join(s.upper() for s in settings) + " |",
              "|---|" + "---|" * len(settings)]
    for label, *_ in CELLS:
        cells = {r["setting"]: r for r in q if r["method"] == label}
        if cells:
            lines.append(f"| {label} | " + " | ".join(_f(cells[s]["cosine"]) if s in cells else "" for s in settings) + " |")
    lines += ["", "Every cell in full (rank agreement: Spearman correlation of all pairwise sentence similarities, "
              "quantized vs FP32; relative error: mean ||q - fp|| / ||fp|| of the embeddings; training s: the "
              "reconstruction, MREM-P's slowest rank; job s: the whole run, loading and evaluation included):", "",
              "| setting | method | ranks | cosine | cosine min | rank agreement | rel. error | training s | job s | artifact |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in q:
        lines.append(f"| {r['setting']} | {r['method']} | {r['ranks']} | {_f(r['cosine'])} | {_f(r['cosine_min'])} | "
                     f"{_f(r['rank_agreement'])} | {_f(r['rel_error'])} | {r['train_s']} | {r['wall_s']} | "
                     f"{r['artifact_bytes'] / 1e6:.1f} MB ({r['artifact_ratio']:.3f}x) |")
    return lines


def _scaling_md(meta: dict, sc: list[dict]) -> list[str]:
    lines = ["", "## Scaling: MREM-P against MREM-S", "", meta["scaling_setup"], "",
              "| method | ranks x threads | training s | job s | training speed-up | parallel efficiency | "
              "blocked per rank | peak RSS GB per rank | cosine |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sc:
        lines.append(f"| {r['method']} | {r['ranks']} x {r['threads_per_rank']} | {r['train_s']} | {r['wall_s']} | "
                     f"{r['speedup_train']:.2f}x | {100 * r['efficiency']:.0f}% | "
                     + ", ".join(f"{100 * f:.1f}%" for f in r["blocked_fraction"]) + " | "
                     + ", ".join(f"{g:.2f}" for g in r["peak_rss_gb"]) + f" | {_f(r['cosine'])} |")
    return lines


def _latency_md(meta: dict, lat: list[dict]) -> list[str]:
    lines = ["", "## Artifact: size and INT8 latency", "", "Sizes are in the quality table (model.safetensors of "
              "each cell against 4 bytes per FP32 parameter). Latency of the exported W4A8 and W8A8 models, "
              f"{meta['latency_setup']}:", "",
              "| model (batch 32 x 128) | median ms | speed-up vs FP32 | cosine to FP32 |", "|---|---|---|---|"]
    for r in lat:
        if r.get("table") == "latency":
            if "refused" in r:
                lines.append(f"| {r['config']} | refused: {r['refused']} | | |")
            else:
                lines.append(f"| {r['config']} | {r['median_ms']} | {r['speedup_vs_fp32']:.2f}x | {_f(r['cosine_to_fp32'])} |")
    for r in lat:
        if r.get("table") == "gemm":
            lines.append(f"| GEMM alone: {r['config']} | {r['median_ms']} | {r['speedup_vs_fp32']:.2f}x | |")
    return lines


def _peer_md(meta: dict, pr: list[dict]) -> list[str]:
    lines = ["", "## The peer: DeepSpeed ZeroQuant, side by side", "", meta["peer_setup"], "",
              "| W bits | " + " | ".join(PEER_LABELS.values()) + " |", "|---|" + "---|" * len(PEER_LABELS)]
    cells = {(r["bits"], r["cell"]): r for r in pr}
    for bits in dict.fromkeys(r["bits"] for r in pr):
        lines.append(f"| W{bits} | " + " | ".join(_f(cells[(bits, c)]["cosine"]) if (bits, c) in cells else ""
                                                  for c in PEER_LABELS) + " |")
    return lines


def _prequant_md(meta: dict, pq: list[dict]) -> list[str]:
    from prequant import table

    return ["", "## PreQuant: quantize first, then fine-tune only the outlier columns and the head", "", meta["prequant_setup"], "", *table(pq)]


PEER_LABELS = {"ds_ptq": "DeepSpeed PTQ", "ptq": "mrem-dist PTQ", "ptq_full_range": "mrem-dist PTQ, full-range grid",
               "ds_lkd": "DeepSpeed LKD", "lkd": "mrem-dist LKD", "lkd_full_range": "mrem-dist LKD, full-range grid"}


def plots(out: Path, q: list[dict], sc: list[dict], pr: list[dict]) -> None:
    if q or pr:
        _quality_png(out, q, pr)
    if sc:
        _scaling_png(out, sc)


def _quality_png(out: Path, q: list[dict], pr: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in q))
    fig, (ax, ax_peer) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for label, method, *_ in CELLS:
        ys = {r["setting"]: r["cosine"] for r in q if r["method"] == label}
        style = "-o" if method != "ptq" else "--."
        ax.plot(range(len(settings)), [ys.get(s, math.nan) for s in settings], style, label=label, lw=1.5)
    ax.set_xticks(range(len(settings)), [s.upper() for s in settings])
    ax.set(ylabel="cosine to FP32 (sentence embeddings)", title="quality vs bits, per method", ylim=(min(0, ax.get_ylim()[0]), 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    bits = sorted(dict.fromkeys(r["bits"] for r in pr), reverse=True)
    for cell, label in PEER_LABELS.items():
        ys = {r["bits"]: r["cosine"] for r in pr if r["cell"] == cell}
        if ys:
            ax_peer.plot([f"W{b}" for b in bits], [ys.get(b, math.nan) for b in bits],
                         ("-s" if cell.startswith("ds") else "-o") if "lkd" in cell else ":.", label=label)
    ax_peer.set(ylabel="cosine to FP32", title="vs DeepSpeed ZeroQuant (A8 token-wise, FP emb.)")
    ax_peer.grid(alpha=0.3)
    ax_peer.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(f"{out}_quality.png", dpi=110)
    plt.close(fig)


def _scaling_png(out: Path, sc: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [f"{'MREM-S' if r['method'] == 'mrem_s' else 'MREM-P'}\n{r['ranks']} rank{'s' * (r['ranks'] > 1)}" for r in sc]
    x = range(len(sc))
    train, wall = [r["train_s"] for r in sc], [r["wall_s"] for r in sc]
    ax.bar([i - 0.2 for i in x], train, 0.4, label="training (slowest rank)", color="tab:blue")
    ax.bar([i + 0.2 for i in x], wall, 0.4, label="whole job (load, calibrate, evaluate, assemble)", color="tab:gray")
    for i, r in enumerate(sc):
        ax.text(i - 0.2, train[i], f"{r['speedup_train']:.2f}x\nblocked\n" + "/".join(f"{100 * f:.0f}%" for f in r["blocked_fraction"]),
                ha="center", va="bottom", fontsize=7)
        ax.text(i + 0.2, wall[i], f"{r['speedup_wall']:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), names)
    ax.set(ylabel="seconds", title="time vs ranks (W4A8, 2 modules, 1 thread per rank)", ylim=(0, 1.3 * max(wall)))
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(f"{out}_scaling.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: W4A8 only, 2 steps, 64 samples, peer at W4, "
                   "PreQuant at W4 with 2 steps")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to measure (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps per module (default 20; --quick: 2)")
    p.add_argument("--samples", type=int, default=None, help="calibration and evaluation samples (default 256; --quick: 64)")
    p.add_argument("--settings", nargs="+", default=None, choices=SETTINGS)
    p.add_argument("--peer-bits", type=int, nargs="+", default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed latency rounds (default 5; --quick: 1)")
    p.add_argument("--prequant-bits", type=int, nargs="+", default=None, help="PreQuant widths (default 4 3; --quick: 4)")
    p.add_argument("--prequant-steps", type=int, default=None, help="fine-tuning steps, FP and PreQuant (default 200; --quick: 2)")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/results/report, --quick: .../quick/report)")
    p.add_argument("--render", metavar="JSON", nargs="+", help="rebuild the markdown and plots from report json(s), run nothing")
    args = p.parse_args()
    if args.render:
        data = merge([json.loads(Path(f).read_text()) for f in args.render])
        write(Path(args.out or Path(args.render[0]).with_suffix("")), data)
        return
    quick = args.quick
    steps = args.steps or (2 if quick else 20)
    samples = args.samples or (64 if quick else 256)
    settings = args.settings or (["w4a8"] if quick else SETTINGS)
    peer_bits = args.peer_bits or ([4] if quick else [8, 4, 3, 2])
    rounds = args.rounds or (1 if quick else 5)
    pq_bits = args.prequant_bits or ([4] if quick else [4, 3])
    pq_steps = args.prequant_steps or (2 if quick else 200)
    out = Path(args.out or RESULTS / ("quick/report" if quick else "report"))
    data = [f"data.calib_samples={samples}", f"data.eval_samples={samples}"]
    todo = set(args.sections)

    started, t0 = datetime.datetime.now(), time.perf_counter()
    command = "python benchmarks/report.py " + " ".join(sys.argv[1:])
    found: dict = {name: [] for name in SECTIONS}
    meta: dict = {}
    cpu = None
    with hydra_configs(), tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Timing-sensitive sections first, on a machine that is otherwise idle.
        if "scaling" in todo:
            found["scaling"] = scaling(steps, data, tmp)
        if "latency" in todo:
            found["latency"], cpu = latency(rounds, tmp)
        if "quality" in todo:
            found["quality"] = quality(settings, steps, data, tmp)
        if "peer" in todo:
            found["peer"], peer_meta = peer(peer_bits, steps, data, tmp)
            meta["peer_setup"] = peer_meta["setup"]
        if "prequant" in todo:
            found["prequant"], pq_meta = prequant(pq_bits, pq_steps, 2 if quick else 30, 64 if quick else 1000, tmp)
            meta["prequant_setup"] = pq_meta["setup"]
        if "llm_peers" in todo:
            found["llm_peers"], meta["llm_peers_setup"] = llm_peers(quick, tmp, command)

    from importlib.metadata import PackageNotFoundError, version

    try:  # the peer section needs it; a report of the other sections does not
        ds = f", DeepSpeed {version('deepspeed')}"
    except PackageNotFoundError:
        ds = ""
    this_run = {"command": command.strip(), "started": started.strftime("%Y-%m-%d %H:%M"),
           "minutes": (time.perf_counter() - t0) / 60, "sections": [n for n in SECTIONS if n in todo],
           "machine": f"{os.cpu_count()} CPU cores ({cpu or _cpu()}), {platform.system()}, Python "
                      f"{platform.python_version()}, torch {torch.__version__}{ds}"}
    if todo & {"scaling", "latency", "quality", "peer"}:
        meta.update({
            "steps": steps, "samples": samples,
            "setup": (f"all-MiniLM-L6-v2 (real weights), built-in text: {samples} calibration and {samples} evaluation "
                      "sentences, batches of 32 x 128 tokens. Quality is the mean cosine of mean-pooled sentence "
                      "embeddings to FP32's. One-process cells use both cores; MREM-P runs as 2 torchrun ranks of "
                      "1 thread each (gloo)."),
        })
    if "scaling" in todo:
        meta["scaling_setup"] = (f"W4A8, MSE-clip init, 2 modules, {steps} steps per module; every rank and the MREM-S "
                                 "baseline get one thread (one device each). Speed-up and efficiency are of the training "
                                 "time (the slowest rank's), relative to MREM-S; efficiency = speed-up / ranks.")
    if "latency" in todo:
        meta["latency_setup"] = f"median of {rounds} interleaved rounds on the CPU, {torch.get_num_threads()} threads"
    write(out, {"runs": [this_run], **meta, **found})


def _cpu() -> str:
    from artifact import cpu_description

    return cpu_description()


def merge(reports: list[dict]) -> dict:
    """One report from several runs: each section (and its setup text) from the first report that
    measured it; every run listed. Reads reports written before `runs` existed (one run each)."""
    merged: dict = {"runs": []}
    for r in reports:
        if "budget" in r.get("setup", {}):  # a benchmarks/llm_peers.py report: its one section
            r = {"runs": [{**run, "sections": ["llm_peers"], "minutes": run.get("minutes", math.nan)} for run in r["runs"]],
                 "llm_peers": r["rows"], "llm_peers_setup": r["setup"]}
        runs = r.get("runs") or [{"command": r["command"], "started": r["started"], "minutes": r["minutes"],
                                  "machine": r["machine"], "sections": [n for n in SECTIONS if r.get(n)]}]
        merged["runs"] += runs
        for name in SECTIONS:
            if name == "quality" and r.get(name):
                # Measured a few settings at a time (--settings): each setting's rows from the
                # first report that has it.
                have = {row["setting"] for row in merged.get(name, [])}
                merged[name] = merged.get(name, []) + [row for row in r[name] if row["setting"] not in have]
            elif r.get(name) and not merged.get(name):
                merged[name] = r[name]
        for key, value in r.items():
            if key not in SECTIONS and key not in ("runs", "headlines", "command", "started", "minutes", "machine"):
                merged.setdefault(key, value)
    for name in SECTIONS:
        merged.setdefault(name, [])
    return merged


def write(out: Path, data: dict) -> None:
    """<out>.md / .json / _quality.png / _scaling.png from the run's rows and settings."""
    q, sc, lat, pr, pq, lp = (data.get(n, []) for n in ("quality", "scaling", "latency", "peer", "prequant",
                                                                       "llm_peers"))
    data["headlines"] = heads = headlines(q, sc, lat, pr, pq) + llm_peers_headlines(lp, data.get("llm_peers_setup", {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(data, q, sc, lat, pr, heads, pq, lp)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plots(out, q, sc, pr)
    if lp:
        from llm_peers import plot

        plot(Path(f"{out}_llm_peers.png"), lp, data["llm_peers_setup"].get("fp_perplexity"))
    print(text)
    print(f"wrote {out}.md / .json" + (" / _quality.png" if q or pr else "") + (" / _scaling.png" if sc else "")
          + (" / _llm_peers.png" if lp else ""))


if __name__ == "__main__":
    main()
