#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in about 8 minutes at most, run what only a GPU runs and write
# one results file. It stops at the first failure, loudly (exit 1, the step named, its output kept).
#
#   bash benchmarks/gpu_check.sh [results.md]         # default: $OUT/gpu_check.md, else benchmarks/results/
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh /tmp/gpu_check.md   # the same steps on the CPU (gloo):
#                                                     # checks the script itself where no GPU is at hand
#
# Steps: (1) the machine: torch, CUDA, the GPUs; (2) the GPU-marked tests (pytest -m gpu), none of
# which may skip; (3) MREM-P over NCCL on 2 GPUs (world size 1 on CUDA where there is one GPU), the
# report validated and its backend nccl; (4) a decoder run in bfloat16 (MREM-S, W4A16 g64, the
# compressed-tensors export); (5) the INT8 GEMM (torch._int_mm) against BF16/FP16/FP32 F.linear.
# The decoder is a Llama of random weights built on the spot (benchmarks/gpu_check_inputs.py says
# why: the GPU machine has no network and its transfers are too small for the real models).
#
# Python packages: mrem-dist's own dependencies that the machine lacks (hydra-core, omegaconf and
# antlr4 on the lent H200s, which reach no package index) are installed from ./.whl when it exists.
# Made beside a checkout that has network (and kept out of git: echo /.whl/ >> .git/info/exclude):
#   pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3      # an sdist on PyPI: built here
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${GPU_CHECK_DEVICE:-cuda}
RESULTS=${1:-${OUT:-benchmarks/results}/gpu_check.md}
mkdir -p "$(dirname "$RESULTS")"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS

{ echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), device=$DEVICE, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo; echo "\`bash benchmarks/gpu_check.sh\`"; echo; } >"$RESULTS"

# step NAME COMMAND...: run it, keep its output in the results, stop everything if it fails.
step() {
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS log="$WORK/step.log"
  "$@" >"$log" 2>&1
  local code=$?
  { echo "## $name ($((SECONDS - t0)) s, exit $code)"; echo; echo '```'; tail -n 40 "$log"; echo '```'; echo; } >>"$RESULTS"
  if [ "$code" != 0 ]; then
    tail -n 60 "$log"
    echo "GPU CHECK FAILED at '$name' (exit $code): see $RESULTS" | tee -a "$RESULTS" >&2
    exit 1
  fi
  tail -n 3 "$log"
}

if [ -d .whl ]; then
  step "install the wheels in .whl" "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

machine() {
  "$PY" - "$DEVICE" <<'EOF'
import sys, torch, transformers
device = sys.argv[1]
print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)
if device == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"capability {p.major}.{p.minor}")
import mrem_dist, hydra, omegaconf  # the package and its launch dependencies import
print("mrem_dist from", mrem_dist.__file__)
EOF
}
step "the machine" machine
NGPU=0
if [ "$DEVICE" = cuda ]; then NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())'); fi

gpu_tests() {
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_int8.py tests/test_distributed.py >"$WORK/pytest.log" 2>&1
  local code=$?
  cat "$WORK/pytest.log"
  [ "$code" = 0 ] || return "$code"
  if [ "$DEVICE" = cuda ] && grep -Eq "[0-9]+ skipped" "$WORK/pytest.log"; then
    echo "a GPU-marked test skipped on a CUDA machine"; return 1
  fi
  grep -Eq "[0-9]+ passed" "$WORK/pytest.log" || [ "$DEVICE" != cuda ]
}
step "GPU-marked tests (pytest -m gpu)" gpu_tests

step "inputs: a random-weight Llama and the built-in text" "$PY" benchmarks/gpu_check_inputs.py "$WORK/in"
DATA=(model.path="$WORK/in/decoder" data=local data.train_file="$WORK/in/calib.txt" data.validation_file="$WORK/in/eval.txt"
      data.seq_len=128 data.calib_samples=32 data.holdout_samples=8 data.eval_samples=16 data.batch_size=8
      quant=w4a16_g64 checkpoint.dir=null device="$DEVICE")

# check_report RUN_DIR RANKS BACKEND DTYPE: the run validated, on that many ranks, backend and dtype.
check_report() {
  "$PY" - "$@" <<'EOF'
import json, sys
from pathlib import Path
run, ranks, backend, dtype = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
r = json.loads((run / "report.json").read_text())
rec = r.get("reconstruction", {})
print("validation", r["validation"], "metrics", r["metrics"], "before", r.get("metrics_before_reconstruction"))
assert r["validation"]["passed"], "the run failed its validation"
assert rec.get("world_size", 1) == ranks, (rec.get("world_size"), ranks)
if ranks > 1:
    assert rec["backend"] == backend, (rec["backend"], backend)
got = r["config"]["model"]["dtype"] or ("bfloat16" if r["config"]["device"].startswith("cuda") else "float32")
assert got == dtype, (got, dtype)
print("seconds", r.get("timings_s"))
EOF
}

RANKS=$([ "$DEVICE" = cuda ] && { [ "$NGPU" -ge 2 ] && echo 2 || echo 1; } || echo 2)
BACKEND=$([ "$DEVICE" = cuda ] && echo nccl || echo gloo)
mrem_p() {
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$RANKS" -m mrem_dist method=mrem_p method.modules=2 \
    method.steps=20 "${DATA[@]}" hydra.run.dir="$WORK/mrem_p" && check_report "$WORK/mrem_p" "$RANKS" "$BACKEND" \
    "$([ "$DEVICE" = cuda ] && echo bfloat16 || echo float32)"
}
step "MREM-P on $RANKS rank(s) over $BACKEND" mrem_p

bf16() {
  "$PY" -m mrem_dist method=mrem_s method.modules=2 method.steps=20 model.dtype=bfloat16 export.format=compressed-tensors \
    "${DATA[@]}" hydra.run.dir="$WORK/bf16" && check_report "$WORK/bf16" 1 - bfloat16 && ls "$WORK/bf16/model-compressed-tensors"
}
step "a decoder run in bfloat16 (MREM-S, compressed-tensors export)" bf16

step "INT8 GEMM against BF16 / FP16 / FP32" "$PY" benchmarks/artifact.py --gemm-only --device "$DEVICE" --rounds 20 \
  --out "$WORK/gemm"
{ echo "## INT8 GEMM table"; echo; cat "$WORK/gemm.md"; echo; } >>"$RESULTS"
cp "$WORK/gemm.json" "${RESULTS%.md}_gemm.json"

echo "GPU CHECK PASSED in $((SECONDS - START)) s" | tee -a "$RESULTS"
