"""Shared plumbing of the benchmark scripts: machine facts, summaries, JSON results, README tables.

Every comparison a script reports is a ratio of two quantities measured in the same run, repeated;
`summarize` gives the median and spread of the repeats. Results go to benchmarks/results/<name>.json
and a table between `<!-- bench:<name> -->` markers in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--quick (the smoke test's sizes), --out (results directory), --no-readme, plus script options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smallest sizes: checks the script runs (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the table in benchmarks/README.md")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What the numbers ran on: CPU, cores, memory, library versions, load average at the start."""
    import torch
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": load_average(),
    }
    for name in ("vllm", "deepspeed", "ray"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed or broken import: the benchmark says so, it does not fail
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, interquartile range) of repeated measurements."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2]}


def fmt(summary: dict[str, float], digits: int = 3, scale: float = 1.0) -> str:
    """'median [min–max]' for a table cell."""
    if not summary.get("n"):
        return "–"
    m, lo, hi = (summary[k] * scale for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """benchmarks/results/<name>.json (or <out>/<name>.json), load average at the end added."""
    out = out or RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload.setdefault("machine", {})["load_average_end"] = load_average()
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)
    logger.info("wrote %s", path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def machine_line(machine: dict[str, Any]) -> str:
    """One sentence for a README section: the machine and how loaded it was."""
    load = machine.get("load_average_start") or []
    end = machine.get("load_average_end") or []
    gpu = machine.get("gpu") or "no GPU"
    return (
        f"{machine.get('date', '?')[:10]}, {machine.get('cpu_count')}-core {machine.get('machine')} "
        f"({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB, {gpu}; torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}, vLLM {machine.get('vllm')}, DeepSpeed {machine.get('deepspeed')}. "
        f"Load average (1/5/15 min) {load} at the start, {end} at the end: other jobs shared the cores "
        f"when the 1-minute load exceeds {machine.get('cpu_count')}."
    )


def update_readme(name: str, markdown: str, readme: Path = README) -> None:
    """Replace the section between `<!-- bench:name -->` and `<!-- /bench:name -->` (appended if absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


def finish(name: str, payload: dict[str, Any], markdown: str, args: argparse.Namespace) -> Path:
    """Write the JSON; rewrite the README table unless --quick, --no-readme or --out elsewhere."""
    path = write_result(name, payload, args.out)
    if not (args.quick or args.no_readme or args.out):
        update_readme(name, markdown.replace("{machine}", machine_line(payload["machine"])))
    return path


def rerender(name: str, args: argparse.Namespace, render: Callable[[dict[str, Any]], str]) -> bool:
    """--render: rewrite the README section from results/<name>.json (no rerun); True when it did."""
    if not getattr(args, "render", False):
        return False
    payload = json.loads(((args.out or RESULTS_DIR) / f"{name}.json").read_text())
    finish(name, payload, render(payload), args)
    return True


@contextmanager
def ray_cluster(num_cpus: int = 8):
    """A local Ray cluster with the CPU-mode env for every actor (logical CPUs so all roles fit)."""
    from rlhf.config import RLHFConfig
    from rlhf.utils.ray_session import ray_session

    cfg = RLHFConfig()
    cfg.cluster.num_cpus = num_cpus
    with ray_session(cfg.cluster):
        yield


def compose(overrides: Sequence[str]):
    """The typed config `rlhf <overrides>` would run (Hydra compose, no working-directory change)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from rlhf.cli import CONF_DIR

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return OmegaConf.to_object(hydra_compose(config_name="config", overrides=list(overrides)))
    finally:
        GlobalHydra.instance().clear()


MODEL_SIZES: dict[str, dict[str, int]] = {
    # name: rlhf.models.tiny.tiny_config overrides (qwen2; head_dim 32 or 64, as vLLM's CPU kernels need)
    "tiny": {},  # the shipped tiny world policy's shape (hidden 128, 2 layers)
    "1m": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512},
    "10m": {"hidden_size": 384, "num_layers": 6, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 1152},
    # issue 20's shape (~25M with a 512-token vocab; ~21M with the tiny world's 263)
    "25m": {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1536},
    "30m": {"hidden_size": 512, "num_layers": 10, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1536},
    "100m": {"hidden_size": 768, "num_layers": 14, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 2304},
    "300m": {"hidden_size": 1024, "num_layers": 26, "num_heads": 16, "num_kv_heads": 4, "intermediate_size": 2816},
    "500m": {  # the GPU check's ~0.5B Qwen2 shape (benchmarks/gpu_check.py), room for 256 new tokens
        "hidden_size": 1024,
        "num_layers": 24,
        "num_heads": 16,
        "num_kv_heads": 2,
        "intermediate_size": 5632,
        "max_position_embeddings": 1024,
    },  # fmt: skip
}


def bench_model(size: str) -> tuple[str, int]:
    """(checkpoint dir, parameter count) of a random-init qwen2 of `size` with the tiny world's tokenizer.

    "tiny" is the shipped SFT-warmed tiny policy. The others are built once into
    $RLHF_CACHE/bench-models/<size> (seed 0), so every benchmark uses the same weights.
    """
    from rlhf.models.loading import load_tokenizer, resolve_model_path

    if size == "tiny":
        path = resolve_model_path("tiny")
        return path, _count_params(path)
    root = Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf")) / "bench-models" / size
    if not (root / "config.json").exists():
        from rlhf.models.tiny import build_tiny_model, save_tiny_model

        tokenizer = load_tokenizer("tiny")
        model = build_tiny_model(
            "qwen2",
            vocab_size=len(tokenizer),
            seed=0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **MODEL_SIZES[size],
        )
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        save_tiny_model(model, tokenizer, tmp)
        if not root.exists():
            tmp.replace(root)
    return str(root), _count_params(str(root))


def _count_params(path: str) -> int:
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += _prod(f.get_slice(key).get_shape())
    return total


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Stopwatch:
    """perf_counter seconds of a block: `with Stopwatch() as sw: ...; sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
