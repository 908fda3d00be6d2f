#!/bin/bash
# Run one training stage by hand on N nodes (what the flow does on a Slurm pool): the same command on
# every node; torchrun's c10d rendezvous at $RDZV (host:port of node 0) forms the group.
#   NNODES=4 RDZV=node0:29400 infra/templates/torchrun-multinode.sh CONFIG OUT data=DATA_ARTIFACT [init=…]
set -euo pipefail
config=$1; out=$2; shift 2
inputs=(); for kv in "$@"; do inputs+=(--input "$kv"); done
exec torchrun --nnodes "${NNODES:?}" --nproc_per_node "${NPROC:-8}" --rdzv_backend c10d \
  --rdzv_endpoint "${RDZV:?}" --rdzv_id "$(basename "$out")" --max_restarts 2 \
  -m stages.train --config "$config" --out "$out" "${inputs[@]}"
