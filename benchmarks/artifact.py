"""The exported artifact on the real MiniLM: how small it is, and how fast its INT8 path runs.

Size: the model is quantized (min-max PTQ: the packed size does not depend on how the codes were
found) at W8 / W4 / W2 with word embeddings kept in FP32, at E8 and at E4, exported with
`export_quantized`, and model.safetensors is compared with the FP32 model's own safetensors file.

Latency: one batch of 32 x 128 tokens of the built-in text, through the FP32 model, the artifact
loaded with kernel=float (dequantized weights, fake-quant activations) and with kernel=int8 (integer
GEMMs), for each activation scheme. Every configuration is timed in turn, round after round, in one
process, and the median per configuration is reported: these machines are shared and noisy.

Agreement: each quantized model's fidelity to FP32 (mean cosine of the mean-pooled sentence
embeddings), and the INT8 kernel's relative L2 difference from the float kernel (real tokens). Each
INT8 layer matches its float twin to float rounding (tests/test_int8.py), but a rounding difference
that lands an activation on the other side of a grid boundary moves its code by one step, and
those flips compound over the layers: the whole-model difference is that of two equally good
quantized models, not of one rounding error.

    python benchmarks/artifact.py                  # CPU
    python benchmarks/artifact.py --device cuda    # GPU (torch._int_mm)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, hydra_configs, write_results

from mrem_dist import data as D
from mrem_dist.data import mean_pool
from mrem_dist.artifact import export_quantized, load_quantized
from mrem_dist.config import BUILTIN_MODEL
from mrem_dist.scheme import QuantScheme
from mrem_dist.models import load_model
from mrem_dist.quant import int8
from mrem_dist.quant.int8 import cpu_int8_code_limit
from mrem_dist.quantize import calibrate_activations, needs_calibration, quantize_model


def _quantized(loaded, scheme: QuantScheme, calib_ids: torch.Tensor):
    q = quantize_model(copy.deepcopy(loaded.model), loaded.family, scheme, learnable=False)
    if needs_calibration(q):
        calibrate_activations(q, lambda m, ids: m(input_ids=ids, attention_mask=torch.ones_like(ids)), calib_ids.split(16))
    return q


def _export(loaded, scheme: QuantScheme, calib_ids: torch.Tensor, folder: Path) -> Path:
    export_quantized(_quantized(loaded, scheme, calib_ids), loaded.tokenizer, scheme, loaded.task.kind, folder,
                     source=BUILTIN_MODEL)
    return folder


def builtin_inputs(loaded) -> tuple[dict, torch.Tensor]:
    """The timed batch (32 x 128 tokens of the built-in evaluation text) and 64 calibration rows."""
    texts = D.load_builtin("evaluation").texts_a
    enc = loaded.tokenizer(texts[:32], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    calib = loaded.tokenizer(D.load_builtin("calibration").texts_a[:64], padding="max_length", truncation=True,
                             max_length=128, return_tensors="pt")["input_ids"]
    return batch, calib


def cpu_description() -> str:
    return (f"{platform.processor() or platform.machine()}, torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, INT8 weight-code limit {cpu_int8_code_limit()}")


def sizes(loaded, calib_ids: torch.Tensor, tmp: Path) -> list[dict]:
    loaded.model.save_pretrained(tmp / "fp32", safe_serialization=True)
    fp32 = (tmp / "fp32" / "model.safetensors").stat().st_size
    rows = []
    for e_bits in (None, 8, 4):
        for w_bits in (8, 4, 2):
            scheme = QuantScheme(name=f"w{w_bits}e{e_bits}", w_bits=w_bits, e_bits=e_bits)
            folder = _export(loaded, scheme, calib_ids, tmp / scheme.name)
            size = (folder / "model.safetensors").stat().st_size
            rows.append({"table": "size", "w_bits": w_bits, "e_bits": e_bits, "bytes": size, "fp32_bytes": fp32,
                         "ratio": round(size / fp32, 4)})
            print(rows[-1], flush=True)
    return rows


def latency(loaded, calib_ids: torch.Tensor, batch: dict, tmp: Path, device: torch.device, rounds: int) -> list[dict]:
    schemes = [
        QuantScheme(name="w4a8-static", w_bits=4),
        QuantScheme(name="w4a8-dynamic", w_bits=4, a_mode="dynamic"),
        QuantScheme(name="w8a8-static", w_bits=8),
    ]
    fp = copy.deepcopy(loaded.model).to(device)
    runners = {"fp32": fp}
    refused = {}
    outputs = {}
    for scheme in schemes:
        folder = _export(loaded, scheme, calib_ids, tmp / f"lat-{scheme.name}")
        runners[f"{scheme.name} float"] = load_quantized(folder, "float", device=device).model
        try:
            runners[f"{scheme.name} int8"] = load_quantized(folder, "int8", device=device).model
        except ValueError as e:  # e.g. 8-bit weights on a CPU whose INT8 kernel would saturate
            refused[f"{scheme.name} int8"] = str(e).split(": ", 1)[-1]
    batch = {k: v.to(device) for k, v in batch.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for name, model in runners.items():  # warm-up; outputs for the agreement figures
            outputs[name] = model(**batch).last_hidden_state.float().cpu()
        for _ in range(rounds):
            for name, model in runners.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(**batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    mask = batch["attention_mask"].cpu().bool()
    pooled = {k: mean_pool(v, mask.long()) for k, v in outputs.items()}
    rows = []
    for name, t in times.items():
        diff = None
        if name.endswith(" int8"):
            ref = outputs[name.replace(" int8", " float")][mask]
            diff = float((outputs[name][mask] - ref).norm() / ref.norm())
        cosine = float(torch.nn.functional.cosine_similarity(pooled[name], pooled["fp32"], dim=-1).mean())
        rows.append({"table": "latency", "config": name, "median_ms": round(1e3 * statistics.median(t), 1),
                     "min_ms": round(1e3 * min(t), 1), "speedup_vs_fp32": round(base / statistics.median(t), 3),
                     "cosine_to_fp32": round(cosine, 4), "rel_diff_vs_float_kernel": diff})
        print(rows[-1], flush=True)
    for name, why in refused.items():
        rows.append({"table": "latency", "config": name, "refused": why})
    return rows


# The GEMM shapes timed alone (tokens x in x out): MiniLM's FFN; on CUDA also a 7B Llama's attention
# projection and FFN, where a GPU is busy enough for the kernel, not the launch, to set the time.
GEMM_SHAPES = {"cpu": [(32 * 128, 384, 1536)],
               "cuda": [(32 * 128, 384, 1536), (4096, 4096, 4096), (4096, 4096, 11008)]}


def gemm(device: torch.device, rounds: int) -> list[dict]:
    """The GEMM alone: F.linear in FP32 (and on CUDA in BF16 and FP16, what LLMs are served in)
    against the integer kernel on codes that are already quantized (what the INT8 path cannot
    beat, whatever it does around it)."""
    rows = []
    for m, k, n in GEMM_SHAPES[device.type]:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device)
        codes = torch.randint(-7, 8, (n, k), dtype=torch.int8)
        qx = torch.randint(0, 256, (m, k), dtype=torch.uint8)
        runs = {"FP32 F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w)}
        if device.type == "cuda":
            for name, dtype in (("BF16", torch.bfloat16), ("FP16", torch.float16)):
                xd, wd = x.to(dtype), w.to(dtype)
                runs[f"{name} F.linear"] = lambda xd=xd, wd=wd: torch.nn.functional.linear(xd, wd)
            codes_t, sx = codes.to(device).t(), (qx.to(torch.int16) - 128).to(torch.int8).to(device)
            runs["torch._int_mm"] = lambda sx=sx, codes_t=codes_t: torch._int_mm(sx, codes_t)
        else:
            packed, ones = torch.ops.onednn.qlinear_prepack(codes, None), torch.ones(n)
            runs["onednn qlinear"] = lambda qx=qx, packed=packed, ones=ones: int8._onednn_linear(
                qx, 1.0, 128, packed, ones, None)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(rounds + 1):  # the first round warms up
            for name, fn in runs.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        for name, med in medians.items():
            row = {"table": "gemm", "config": f"{name} {m}x{k}x{n}", "median_ms": round(1e3 * med, 3),
                   "speedup_vs_fp32": round(medians["FP32 F.linear"] / med, 3)}
            if "BF16 F.linear" in medians:
                row["speedup_vs_bf16"] = round(medians["BF16 F.linear"] / med, 3)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=10, help="timed forward passes per configuration")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--skip-size", action="store_true")
    p.add_argument("--gemm-only", action="store_true",
                   help="time the GEMMs alone (needs no model: benchmarks/gpu_check.sh on a machine without MiniLM)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    if not args.gemm_only:
        with hydra_configs():
            loaded = load_model(BUILTIN_MODEL)
        batch, calib = builtin_inputs(loaded)
        with tempfile.TemporaryDirectory() as tmp:
            rows += [] if args.skip_size else sizes(loaded, calib, Path(tmp))
            rows += latency(loaded, calib, batch, Path(tmp), device, args.rounds)
    rows += gemm(device, 3 * args.rounds)

    table = []
    if not (args.skip_size or args.gemm_only):
        table += ["| weights | word embeddings | model.safetensors MB | vs FP32 |", "|---|---|---|---|"]
        for r in rows:
            if r["table"] == "size":
                emb = "FP32" if r["e_bits"] is None else f"E{r['e_bits']}"
                table.append(f"| W{r['w_bits']} | {emb} | {r['bytes'] / 1e6:.2f} | {r['ratio']:.3f}x |")
        table += ["", f"FP32 model.safetensors: {rows[0]['fp32_bytes'] / 1e6:.2f} MB.", ""]
    if not args.gemm_only:
        table += ["| model (batch 32 x 128) | median ms | speed-up vs FP32 | cosine to FP32 | INT8 vs float kernel "
                  "(rel. L2) |", "|---|---|---|---|---|"]
    for r in rows:
        if r["table"] != "latency":
            continue
        if "refused" in r:
            table.append(f"| {r['config']} | refused: {r['refused']} | | | |")
            continue
        diff = "" if r["rel_diff_vs_float_kernel"] is None else f"{r['rel_diff_vs_float_kernel']:.3f}"
        table.append(f"| {r['config']} | {r['median_ms']} | {r['speedup_vs_fp32']:.2f}x | {r['cosine_to_fp32']:.4f} | {diff} |")
    vs_bf16 = device.type == "cuda"
    table += ([""] if table else []) + ["| GEMM alone | median ms | speed-up vs FP32 |" + (" vs BF16 |" if vs_bf16 else ""),
              "|---|---|---|" + ("---|" if vs_bf16 else "")]
    for r in rows:
        if r["table"] == "gemm":
            table.append(f"| {r['config']} | {r['median_ms']} | {r['speedup_vs_fp32']:.2f}x |"
                         + (f" {r['speedup_vs_bf16']:.2f}x |" if vs_bf16 else ""))
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = cpu_description()
    model = "GEMMs alone (--gemm-only)" if args.gemm_only else "all-MiniLM-L6-v2 (real weights, 22.7M parameters), built-in text"
    header = (f"{model}. Latency: {device} ({where}), "
              f"{torch.get_num_threads()} threads, median of {args.rounds} rounds, configurations interleaved; "
              f"torch {torch.__version__}.")
    out = args.out or str(RESULTS / ("artifact" if device.type == "cpu" else f"artifact_{device.type}"))
    write_results(out, "artifact.py", header, rows, table)


if __name__ == "__main__":
    main()
