#!/usr/bin/env bash
# Entrypoint of both images (docker/Dockerfile, docker/Dockerfile.cpu).
#   <image> head [ray start args]              Ray head on this container (blocks; dashboard :8265)
#   <image> worker HEAD_IP[:PORT] [args]       Ray worker joining the head (blocks)
#   <image> submit [launch/submit.py args]     submit a run to a cluster (ray job submit)
#   <image> <command ...>                      anything else, e.g. `rlhf run.total_steps=2` (default: bash)
# RLHF_DEVICE=cpu (set in the CPU image) sources scripts/env.sh, the CPU-mode environment.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${RLHF_DEVICE:-cuda}" = cpu ]; then
    # shellcheck source=../scripts/env.sh
    source "$repo/scripts/env.sh"
fi
command="${1:-bash}"
[ $# -gt 0 ] && shift
case "$command" in
    head) exec "$repo/launch/start_head.sh" --block "$@" ;;
    worker) exec "$repo/launch/start_worker.sh" "$@" --block ;;
    submit) exec "$repo/launch/submit.sh" "$@" ;;
    *) exec "$command" "$@" ;;
esac
