#!/usr/bin/env bash
# Submit `python -m rlhf <overrides>` to a running Ray cluster with `ray job submit`.
# A thin wrapper of launch/submit.py (stdlib only) that picks the repo's .venv Python when present.
#   launch/submit.sh [--address http://head:8265] [--no-wait] [--dry-run] [--] <hydra overrides...>
# See `launch/submit.sh --help` and docs/launch.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$here/../.venv/bin/python" ]; then
        python="$here/../.venv/bin/python"
    else
        python=python3
    fi
fi
exec "$python" "$here/submit.py" "$@"
