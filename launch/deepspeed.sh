#!/usr/bin/env bash
# MREM-P started by the DeepSpeed launcher: the same entry point, ranks from the RANK / WORLD_SIZE /
# LOCAL_RANK / MASTER_ADDR it exports (as torchrun does).
#
#   bash launch/deepspeed.sh                       # NPROC ranks on this machine
#   NPROC=4 bash launch/deepspeed.sh quant=w2a8
#   HOSTFILE=hosts bash launch/deepspeed.sh        # multi-node: a DeepSpeed hostfile
#
# Environment: NPROC (default: one per GPU, else 2), MASTER_PORT (29500), HOSTFILE.
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=2
fi
args=(--num_gpus="$NPROC" --master_port="${MASTER_PORT:-29500}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile="$HOSTFILE")
# --no_local_rank: the rank comes from the environment; a --local_rank argument is not a Hydra override.
exec deepspeed "${args[@]}" --no_local_rank --module mrem_dist method=mrem_p "$@"
