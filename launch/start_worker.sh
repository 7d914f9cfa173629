#!/usr/bin/env bash
# Join this node to a running Ray cluster as a worker (GPUs and CPUs are detected by Ray).
#   launch/start_worker.sh HEAD_IP[:PORT] [extra `ray start` args, e.g. --block or --num-gpus=8]
# Environment (optional): RAY_PORT (default 6379, when HEAD has no :PORT), RAY_NODE_IP,
#   RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_AUTH_MODE / RAY_AUTH_TOKEN (same as the head's).
set -euo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: $0 HEAD_IP[:PORT] [ray start args...]" >&2
    exit 2
fi
head="$1"
shift
case "$head" in
    *:*) address="$head" ;;
    *) address="$head:${RAY_PORT:-6379}" ;;
esac
ray_bin="${RAY:-ray}"
args=(--address="$address")
[ -n "${RAY_NODE_IP:-}" ] && args+=(--node-ip-address="$RAY_NODE_IP")
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
echo "[start_worker] $ray_bin start ${args[*]} $*"
exec "$ray_bin" start "${args[@]}" "$@"
