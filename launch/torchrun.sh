#!/usr/bin/env bash
# MREM-P with torchrun: one module partition per rank, every rank training at the same time.
#
#   bash launch/torchrun.sh                          # NPROC ranks on this machine
#   NPROC=4 bash launch/torchrun.sh quant=w2a8       # Hydra overrides follow the script
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=node0:29500 bash launch/torchrun.sh   # on each node
#
# Environment (all optional): NPROC ranks per node (default: one per GPU, else 2), NNODES (1),
# NODE_RANK, RDZV_ENDPOINT (host:port of node 0; multi-node), RDZV_ID, MAX_RESTARTS (0: a failed
# rank ends the run), PYTHON (python). Needs method.modules >= total ranks (mrem_p's default: 4).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
NNODES=${NNODES:-1}
args=(--nnodes="$NNODES" --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}")
if [ "$NNODES" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  args+=(--standalone)
else
  args+=(--rdzv-backend=c10d --rdzv-id="${RDZV_ID:-mrem}" --node-rank="${NODE_RANK:-0}"
         --rdzv-endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=<node 0 host>:29500 for a multi-node run}")
fi
# torchrun exits 1 when any worker fails, whatever the worker said: every rank leaves its own exit
# code in MREM_EXIT_DIR, and this script exits with the first non-zero one (4: stopped cleanly on a
# signal, rerun to resume; 2: invalid input; 3: failed validation), else with torchrun's.
if [ -z "${MREM_EXIT_DIR:-}" ]; then
  MREM_EXIT_DIR=$(mktemp -d)
  trap 'rm -rf "$MREM_EXIT_DIR"' EXIT
fi
export MREM_EXIT_DIR
"${PYTHON:-python}" -m torch.distributed.run "${args[@]}" -m mrem_dist method=mrem_p "$@" &
run=$!
trap 'kill -TERM "$run" 2>/dev/null' TERM INT USR1
code=0
while :; do wait "$run" && code=0 || code=$?; kill -0 "$run" 2>/dev/null || break; done
if [ "$code" != 0 ]; then
  for f in $(ls "$MREM_EXIT_DIR"/rank*.code 2>/dev/null | sort -V); do
    c=$(cat "$f"); if [ "$c" != 0 ]; then code=$c; break; fi
  done
fi
exit "$code"
