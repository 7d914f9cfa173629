"""`make bench`: every CPU benchmark in turn, each in its own process (its own Ray cluster).

Order follows the issue's priorities; a failing script is reported and the rest still run. Pass
--quick to run the smoke-test sizes (results then go to --out, README untouched).

    python -m benchmarks.run_all [--quick] [--out DIR] [--only weight_sync,rl_step]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time

from benchmarks.common import BENCH_DIR

logger = logging.getLogger("benchmarks.run_all")

SCRIPTS = (
    "weight_sync", "memory", "rl_step", "async_rl", "packing", "rollout_backends", "learning", "agentic", "recipes",
    "trl_compare", "compute_ceiling",
)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=",".join(SCRIPTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    failed = []
    start = time.perf_counter()
    for name in args.only.split(","):
        cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if args.quick else [])
        cmd += ["--out", args.out] if args.out else []
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode
        logger.info("benchmarks.%s: exit %d in %.0fs", name, rc, time.perf_counter() - t0)
        if rc:
            failed.append(name)
    logger.info("all benchmarks: %.0fs; failed: %s", time.perf_counter() - start, ", ".join(failed) or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
