#!/usr/bin/env bash
# Start the Ray head of a multi-node cluster on this node (GPUs and CPUs are detected by Ray).
#   launch/start_head.sh [extra `ray start` args, e.g. --block (containers, srun) or --num-gpus=8]
# Environment (all optional):
#   RAY_PORT=6379              GCS port the workers join (launch/start_worker.sh HEAD_IP:RAY_PORT)
#   RAY_DASHBOARD_PORT=8265    dashboard + job server (launch/submit.sh --address http://HEAD_IP:8265)
#   RAY_NODE_IP                this node's address on the cluster network (default: Ray's guess)
#   RAY_NUM_CPUS, RAY_NUM_GPUS override detection; RAY_TEMP_DIR moves /tmp/ray
#   RAY_AUTH_MODE              token (share the token with every node) or disabled (trusted network)
# Then: `ray status` lists the nodes and GPUs; `ray stop` on each node tears it down.
set -euo pipefail
ray_bin="${RAY:-ray}"
args=(
    --head
    --port="${RAY_PORT:-6379}"
    --include-dashboard=true
    --dashboard-host=0.0.0.0
    --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
)
[ -n "${RAY_NODE_IP:-}" ] && args+=(--node-ip-address="$RAY_NODE_IP")
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
echo "[start_head] $ray_bin start ${args[*]} $*"
exec "$ray_bin" start "${args[@]}" "$@"
