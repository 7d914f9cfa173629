#!/usr/bin/env bash
# Sweep the KL coefficient: one run per value, each in <sweep dir>/<job num>/, then
# <sweep dir>/summary.md (+ summary.json) with final reward/mean, eval/accuracy and KL per run.
#   launch/sweep_kl.sh [extra hydra overrides...]          # basic launcher: runs one after another
#   LAUNCHER=ray launch/sweep_kl.sh cluster=multi_node     # hydra-ray-launcher on a running cluster
# Defaults to the tiny world on CPU (model.path=tiny data.train=tiny): a few minutes per run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# CPU-mode environment (scripts/env.sh) unless a GPU cluster preset is chosen.
# shellcheck disable=SC1091
case " $* " in
    *" cluster=single_gpu "* | *" cluster=multi_node "*) ;;
    *) source scripts/env.sh ;;
esac
rlhf="${RLHF:-rlhf}"
[ -x .venv/bin/rlhf ] && [ -z "${RLHF:-}" ] && rlhf=.venv/bin/rlhf
# Absolute: with the Ray launcher the jobs run in Ray worker processes, not in this directory.
sweep_dir="${SWEEP_DIR:-$PWD/outputs/sweeps/kl_$(date +%Y%m%d_%H%M%S)}"
launcher=()
if [ "${LAUNCHER:-basic}" = ray ]; then
    # Jobs become Ray tasks on the cluster at RAY_INIT_ADDRESS (GCS host:port; default: the one
    # on this node) and run in parallel as far as its resources allow. The task itself holds no
    # CPU (the actors each run starts do); object_store_memory=null undoes the plugin's default,
    # which Ray refuses when joining an existing cluster.
    launcher=(
        hydra/launcher=ray
        "hydra.launcher.ray.init.address=${RAY_INIT_ADDRESS:-auto}"
        ++hydra.launcher.ray.init.object_store_memory=null
        ++hydra.launcher.ray.remote.num_cpus=0
    )
fi
set -x
"$rlhf" -m "algorithm.kl_coef=${KL_VALUES:-0.0,0.01,0.1}" \
    "hydra.sweep.dir=$sweep_dir" "${launcher[@]}" "$@"
