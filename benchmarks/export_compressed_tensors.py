"""The compressed-tensors export on SmolLM2 + wiki: MREM-P on 2 torchrun ranks at W4A16 g64 and
W3A16 g64 writes both formats (export.format=[mrem,compressed-tensors]); the compressed-tensors folder
is then scored by `python -m mrem_dist.evaluate`, which loads it with transformers alone
(from_pretrained, compressed-tensors installed: what a user of the folder runs). The perplexity of the
folder must equal the one the run reported (target: within 0.1% relative); the folder's size is set
against the FP16 safetensors of the same model (2 bytes a parameter). One more cell writes the folder
in bfloat16 (export.dtype=bfloat16, what a server runs in) after RTN, to show its size and what the
cast costs. Writes benchmarks/results/export_compressed_tensors.{md,json}.

    python benchmarks/export_compressed_tensors.py            # about 25 min on 2 cores
    python benchmarks/export_compressed_tensors.py --bits 4 --steps 10
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, launch, write_results

TARGET = 1e-3  # relative perplexity difference allowed between the folder and the run's report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "export_compressed_tensors"))
    args = p.parse_args()
    data = ["model=smollm2", "data=wiki", f"data.calib_samples={args.calib}", f"data.seq_len={args.seq_len}",
            f"data.eval_samples={args.eval}", "data.batch_size=2", "checkpoint.dir=null"]
    mrem_p = ["method=mrem_p", "method.init=gptq", f"method.steps={args.steps}", "method.modules=2",
              "method.lr_weight=1e-3"]
    cells = [(f"MREM-P (2 ranks), {args.steps} steps", bits, 2, mrem_p, []) for bits in args.bits]
    cells.append(("RTN", 4, 1, ["method=ptq"], ["export.dtype=bfloat16"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, bits, ranks, overrides, export) in enumerate(cells):
            run_dir = Path(tmp) / f"run{i}"
            formats = "compressed-tensors" if export else "[mrem,compressed-tensors]"
            report, wall = launch([*data, f"quant=w{bits}a16_g64", *overrides, f"export.format={formats}", *export],
                                  run_dir, ranks=ranks, threads=2 // ranks)
            folder = report["artifacts"]["compressed-tensors"]
            evaluated, eval_wall = launch([f"artifact={folder['path']}", "data=wiki", f"data.seq_len={args.seq_len}",
                                           f"data.eval_samples={args.eval}", "data.batch_size=2", "compare=false"],
                                          Path(tmp) / f"eval{i}", threads=2, module="mrem_dist.evaluate",
                                          result="evaluation.json")
            reported = report["metrics"]["quantized"]["perplexity"]
            loaded = evaluated["metrics"]["quantized"]["perplexity"]
            mrem = report["artifacts"].get("mrem", {})
            row = {"bits": bits, "method": method, "dtype": export[0].split("=")[1] if export else "float32 (as run)",
                   "reported_perplexity": round(reported, 4), "transformers_perplexity": round(loaded, 4),
                   "relative_difference": abs(loaded / reported - 1), "folder_bytes": folder["bytes"],
                   "ratio_to_fp16": folder["ratio_to_fp16"], "mrem_artifact_bytes": mrem.get("bytes"),
                   "fp16_bytes": folder["fp32_parameter_bytes"] // 2, "run_wall_s": round(wall, 1),
                   "evaluate_wall_s": round(eval_wall, 1), "fp_perplexity": round(report["metrics"]["full_precision"]["perplexity"], 3)}
            rows.append(row)
            print(row, flush=True)
            write_table(args, rows)


def write_table(args, rows: list[dict]) -> None:
    table = ["| W | method | folder dtype | perplexity (run's report) | perplexity (folder, transformers) | rel. diff "
             "| folder MB | x FP16 | mrem artifact MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mrem = f"{r['mrem_artifact_bytes'] / 1e6:.1f}" if r["mrem_artifact_bytes"] else "-"
        table.append(f"| W{r['bits']}A16 g64 | {r['method']} | {r['dtype']} | {r['reported_perplexity']:.4f} | "
                     f"{r['transformers_perplexity']:.4f} | {r['relative_difference']:.2e} | {r['folder_bytes'] / 1e6:.1f} "
                     f"| {r['ratio_to_fp16']:.3f} | {mrem} |")
    exact = [r for r in rows if r["dtype"].startswith("float32")]
    table += ["", *(f"- W{r['bits']} {r['method']}: the folder's perplexity is {r['relative_difference']:.2e} relative from "
                    f"the report: {'met' if r['relative_difference'] <= TARGET else 'NOT met'} (target: within 0.1%)"
                    for r in exact)]
    fp16 = rows[0]["fp16_bytes"]
    header = (f"SmolLM2-135M-Instruct, data=wiki ({args.eval} windows of {args.seq_len} tokens), full-precision "
              f"perplexity {rows[0]['fp_perplexity']}; calibration {args.calib} x {args.seq_len} tokens. FP16 "
              f"safetensors of the model: {fp16 / 1e6:.1f} MB (2 bytes a parameter). The folder's perplexity is "
              "`python -m mrem_dist.evaluate artifact=<folder> compare=false`, which loads it with transformers' "
              "from_pretrained alone. Its Linear weights were Q4_1 in the GGUF it ships as (see the decoder benchmark).")
    write_results(args.out, "export_compressed_tensors.py", header, rows, table)


if __name__ == "__main__":
    main()
