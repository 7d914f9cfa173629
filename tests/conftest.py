"""Shared test set-up: CPU-mode environment, markers, one real Ray cluster per session, tiny checkpoints and batches."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before torch/deepspeed/vllm are imported anywhere in this process (see shared STACK notes).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")  # as rlhf.utils.ray_session: no idle task workers
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RLHF_CACHE", str(Path.home() / ".cache" / "rlhf"))
from rlhf.utils.distributed import interpreter_bin_first, torch_extensions_dir  # noqa: E402 (after RLHF_CACHE, before torch)

os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
os.environ["PATH"] = interpreter_bin_first(os.environ.get("PATH", ""))  # one ninja for every JIT build of the run


def pytest_configure(config):
    """`-n N`: the controller collects nothing itself, so it warms the caches whatever the workers will run."""
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        _warm_caches(config)


def pytest_collection_finish(session):
    """A serial run that collected Ray tests warms the caches (`_warm_caches`)."""
    if not getattr(session.config.option, "numprocesses", None):
        if any(item.get_closest_marker("ray") for item in session.items):
            _warm_caches(session.config)


def _warm_caches(config) -> None:
    """When a one-time artefact is missing (a fresh machine), build the tiny world and DeepSpeed's CPU ops in the
    background from the start (tests/fixtures/warm_caches.py): the first tests that need them wait for them
    instead of building each in turn, one core working while the other idles."""
    if config.option.collectonly:
        return
    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    try:
        import warm_caches
    finally:
        sys.path.pop(0)
    if not warm_caches.missing():
        return
    log = Path(tempfile.gettempdir()) / f"rlhf-warm-caches-{os.getpid()}.log"
    with open(log, "w") as out:
        config._rlhf_warm_caches = subprocess.Popen(
            [sys.executable, warm_caches.__file__],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )


def pytest_unconfigure(config):
    """Let a build still running finish (killing it would leave a half-built op's lock behind)."""
    warm = getattr(config, "_rlhf_warm_caches", None)
    if warm is not None:
        try:
            warm.wait(timeout=600)
        except Exception:
            warm.kill()


LONGEST_FIRST = (
    "tests/e2e/test_pipelines.py",  # the SFT -> DPO recipe, learning (~100 s on 2 idle cores)
    "tests/integration/sync/test_policy_to_rollout.py",  # ZeRO-3 policy into vLLM, full and LoRA (~90 s)
    # third, not first: its job has time limits, and the two above meet the cold caches of a fresh machine
    "tests/e2e/test_launch.py",  # the multi-node job: four Ray nodes, a stop and a resume (~120 s)
    "tests/integration/online_dpo/test_online_dpo.py",  # rounds that learn, then resume (~80 s)
    "tests/integration/distill/test_distill.py",  # on-policy distillation that learns (~80 s)
    "tests/e2e/test_cli_rl.py",  # three RL runs through the console script (~60 s each)
    "tests/e2e/test_rl_learning.py",  # GRPO and PPO that learn (~50 s each)
)
"""Test files handed to the pytest-xdist workers first (longest first), so that no long test starts last while
the other worker has nothing left to do; the rest keep their collection order (e2e, integration, unit)."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = Path(__file__).resolve().parent.parent
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))  # stable
    if getattr(config.option, "dist", "no") == "loadgroup":
        # `make test`: a module's tests stay on one worker (they share module-scoped fixtures: Ray actor
        # groups, trained models), except the end-to-end CLI runs, which share nothing and spread out
        for item in items:
            if "tests/e2e/" not in item.path.as_posix():
                item.add_marker(pytest.mark.xdist_group(item.path.relative_to(root).as_posix()))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


PARKED_CPUS = 8
"""The most logical CPUs this session's parked worker processes hold (`ray_cluster`)."""


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test of the session (logical CPUs so all roles fit).

    Worker processes are reused from one test's groups to the next's (rlhf.workers.host: each new process costs
    ~6 s of CPU in imports, and the suite starts ~140 groups' worth): parked groups hold at most
    PARKED_CPUS of the cluster's logical CPUs, so the other half stays free for what is not a WorkerGroup (the
    CLI runs joining this cluster, plain Ray actors)."""
    import ray

    from rlhf.utils.process_pool import PROCESS_POOL

    if ray.is_initialized():
        yield ray
        return
    temp_dir = tempfile.mkdtemp(prefix="rlhf-ray-")
    ray.init(
        num_cpus=2 * PARKED_CPUS,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={
            "env_vars": {
                k: os.environ[k]
                for k in (
                    "DS_ACCELERATOR",
                    "RAY_AUTH_MODE",
                    "VLLM_ENABLE_V1_MULTIPROCESSING",
                    "VLLM_CPU_KVCACHE_SPACE",
                    "TOKENIZERS_PARALLELISM",
                    "TORCH_EXTENSIONS_DIR",
                    "RLHF_CACHE",
                )
            }
        },
    )
    PROCESS_POOL.enable(max_cpus=PARKED_CPUS)
    yield ray
    PROCESS_POOL.disable()
    ray.shutdown()


@dataclass(frozen=True)
class CliRun:
    """One run of the `rlhf` console script: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def used_ray(self) -> bool:
        """Whether the run started a Ray cluster or joined one (ray.init logs either line)."""
        text = self.stdout + self.stderr
        return "Started a local Ray instance" in text or "Connected to Ray cluster" in text

    def assert_ok(self) -> CliRun:
        assert self.returncode == 0, (
            f"exit {self.returncode}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-8000:]}"
        )
        return self


@pytest.fixture(scope="session")
def rlhf_cli(ray_cluster):
    """`rlhf_cli(cwd, *overrides, defaults=(), timeout=420, own_cluster=False) -> CliRun`: the `rlhf` console
    script of this environment as a user runs it (its own process), `defaults` before `overrides`, output captured.

    The run joins the session's Ray cluster through RAY_ADDRESS, as a run does on a cluster someone started
    (`ray start --head`): starting and stopping a local Ray costs ~5 s a run, measured on 2 cores. Its actors
    belong to its own Ray job and die with it. `own_cluster=True`: the run starts its own, as on a laptop.
    The repo is on PYTHONPATH so that overrides can name functions of tests/fixtures by import path."""
    script = str(Path(sys.executable).with_name("rlhf"))
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    session_address = ray_cluster.get_runtime_context().gcs_address

    def run(
        cwd: Path,
        *overrides: str,
        defaults: tuple[str, ...] | list[str] = (),
        timeout: int = 420,
        own_cluster: bool = False,
    ) -> CliRun:
        run_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        if not own_cluster:
            run_env["RAY_ADDRESS"] = session_address
        proc = subprocess.run(
            [script, *defaults, *overrides], cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout
        )
        return CliRun(proc.returncode, proc.stdout, proc.stderr)

    return run


TINY_VOCAB = 64


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """A random tiny qwen2 causal LM (vocab 64, hidden 128, 2 layers), as a plain HF checkpoint."""
    from rlhf.models.tiny import build_tiny_model, save_tiny_model

    model = build_tiny_model("qwen2", vocab_size=TINY_VOCAB, seed=0)
    return str(save_tiny_model(model, None, tmp_path_factory.mktemp("tiny-policy")))


# "### user:\n3+4=<|end|>\n### assistant:\n" where the tiny template writes "<|bos|><|user|>\n3+4=<|end|><|assistant|>\n"
OTHER_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '### ' + message['role'] + ':\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def other_tokenizer_dir(tmp_path_factory):
    """A tokenizer directory that differs from the tiny world's by construction: every token id reversed
    (the same text splits into the same pieces, each with another id) and another chat template."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from rlhf.models.loading import load_tokenizer, resolve_model_path

    tiny = load_tokenizer(resolve_model_path("tiny"))
    spec = json.loads(tiny.backend_tokenizer.to_str())
    last = len(tiny) - 1
    spec["model"]["vocab"] = {piece: last - i for piece, i in spec["model"]["vocab"].items()}
    for added in spec["added_tokens"]:
        added["id"] = last - added["id"]
    other = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=tiny.bos_token,
        eos_token=tiny.eos_token,
        pad_token=tiny.pad_token,
        unk_token=tiny.unk_token,
        additional_special_tokens=[t for t in tiny.all_special_tokens if t not in tiny.special_tokens_map.values()],
        clean_up_tokenization_spaces=False,
    )
    other.chat_template = OTHER_CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("other-tokenizer")
    other.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory):
    """`make(script) -> path`: a checkpoint (with the tiny world's tokenizer) that writes what `script` says.

    See rlhf.models.tiny.build_scripted_model: the next token depends only on the current one, so a
    test forces each output by construction instead of depending on what a trained model samples.
    """
    from transformers import AutoTokenizer

    from rlhf.data.tiny_world import tiny_world_dir
    from rlhf.models.tiny import build_scripted_model, save_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_world_dir().tokenizer_dir)

    def make(script: dict[str, str | list[str]]) -> str:
        model = build_scripted_model(tokenizer, script)
        return str(save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("scripted")))

    return make


LEARNING_SAMPLES = 64
"""Samples per prompt of `task_accuracy`."""


@pytest.fixture(scope="session")
def task_accuracy():
    """`accuracy(model_path, task) -> float`: how often a tiny-world policy answers the train prompts of `task`
    right (rlhf.models.warmup.evaluate_accuracy: LEARNING_SAMPLES samples per prompt at temperature 1, 4 new
    tokens as the learning tests train, seed 0). Cached per (model_path, task): the initial policy once a session.

    Learning tests compare the final policy with the initial one on it, rather than the rewards sampled
    during training: the expected rule reward itself (a letter before the digit counts, as in training),
    the whole gain, on the same sample seeds for both models, with a sampling error (standard error of
    the difference ~0.011 for the 44 sub_1d prompts) a tenth of their margins.
    """
    import functools

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.data.tiny_world import read_jsonl, tiny_world_dir
    from rlhf.models.loading import resolve_model_path
    from rlhf.models.warmup import evaluate_accuracy, one_thread

    @functools.cache
    def accuracy(model_path: str, task: str) -> float:
        rows = [r for r in read_jsonl(tiny_world_dir().data("rl", "train")) if r["task"] == task]
        path = resolve_model_path(model_path)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with one_thread():
            return evaluate_accuracy(model, tokenizer, rows, max_new_tokens=4, samples_per_prompt=LEARNING_SAMPLES)

    return accuracy


@pytest.fixture(scope="session")
def batch_factory():
    """`make_batch(rows=8, prompt_len=5, response_len=6, seed=0)`: random rollout batches over the tiny vocab.

    A fixture rather than an import: test folders are no packages (tests/integration/peft must not
    shadow the peft library).
    """
    import torch

    from rlhf.data.batch import RolloutBatch

    def make_batch(rows: int = 8, prompt_len: int = 5, response_len: int = 6, seed: int = 0) -> RolloutBatch:
        gen = torch.Generator().manual_seed(seed)
        prompt_ids = torch.randint(1, TINY_VOCAB, (rows, prompt_len), generator=gen)
        response_ids = torch.randint(1, TINY_VOCAB, (rows, response_len), generator=gen)
        prompt_mask = torch.ones(rows, prompt_len, dtype=torch.long)
        response_mask = torch.ones(rows, response_len, dtype=torch.long)
        for i in range(rows):
            pad = i % 3  # prompts of length prompt_len, -1, -2 (left padding)
            prompt_mask[i, :pad] = 0
            prompt_ids[i, :pad] = 0
            cut = response_len - i % 4  # responses of length response_len, -1, -2, -3 (right padding)
            response_mask[i, cut:] = 0
            response_ids[i, cut:] = 0
        return RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask
        )

    return make_batch


class RecordingBackend:
    """A rollout engine's real backend, with the calls that cross the engine boundary recorded in order:
    "generate", "load_weights", "sleep" and "wake:<tags>" ("wake:all" for every tag)."""

    RECORDED = ("generate", "load_weights", "sleep", "wake_up")

    def __init__(self, backend):
        self.backend = backend
        self.calls: list[str] = []

    def __getattr__(self, name):
        attribute = getattr(self.backend, name)
        if name not in self.RECORDED:
            return attribute

        def recorded(*args, **kwargs):
            if name == "wake_up":
                tags = args[0] if args else kwargs.get("tags")
                self.calls.append("wake:" + ("+".join(tags) if tags is not None else "all"))
            else:
                self.calls.append(name)
            return attribute(*args, **kwargs)

        return recorded


def _install_recorder(worker) -> None:
    worker.backend = RecordingBackend(worker.backend)


def _remove_recorder(worker) -> list[str]:
    if not isinstance(worker.backend, RecordingBackend):
        return []
    calls, worker.backend = worker.backend.calls, worker.backend.backend
    return calls


@pytest.fixture(scope="session")
def engine_calls():
    """Record what crosses the rollout engines' boundary, inside their actors (a wrapper around the real backend):
    `engine_calls.record(group)` starts recording on every RolloutWorker of a WorkerGroup, `engine_calls.take(group)`
    returns each engine's calls in order and puts the plain backend back (a no-op when nothing is recorded)."""
    import sys
    from types import SimpleNamespace

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

    def record(group) -> None:
        ray.get([actor.__ray_call__.remote(_install_recorder) for actor in group.actors])

    def take(group) -> list[list[str]]:
        return ray.get([actor.__ray_call__.remote(_remove_recorder) for actor in group.actors])

    return SimpleNamespace(record=record, take=take)
