"""The process behind one rank of a WorkerGroup (`WorkerHost`), which can host one worker after another.

A rank's process spends ~6 s of CPU importing torch, transformers and DeepSpeed before its worker does anything
(measured on the 2-core CI machine: `-X importtime` of rlhf.workers.policy). A driver that starts groups one after
another (the stages of a pipeline, the tests of the suite) can skip that: with reuse on, `WorkerGroup.shutdown`
parks a healthy group's processes, their placement group and their torch.distributed world instead of killing
them, and the next group with the same ranks, resources and actor environment builds its workers in them. The
worker class may differ: a host runs any Worker.

What a reused process must not carry over, and how it is put back:
- the worker object and what it holds: dropped, after `Worker.release` let go of what lives outside it
  (weight-sync groups); a worker that cannot be cleaned (a vLLM engine) says so and its process is killed;
- the process environment, the random-number states, deterministic-algorithm and default-dtype settings:
  restored to those the process started with, then the new rank's environment is applied;
- the default torch.distributed group: kept. Only a group of the same world size reuses it (same ranks, same
  rendezvous), so every rank's world, and what DeepSpeed cached about it, stays true.
Groups on a GPU are never parked (their memory must come back to the next role), nor groups that saw an error,
a restart or a dead rank.
"""

from __future__ import annotations

import gc
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class WorkerHost:
    """Ray actor hosting one Worker (`call` runs its methods); the group builds one subclass per worker class so
    that Ray's actor name and log prefix name the role's class (`host_class`)."""

    def __init__(self, worker_cls: type, init_args: Sequence[Any], init_kwargs: dict[str, Any]) -> None:
        self._fresh = _FreshState.capture()
        self._worker: Any = None
        self._worker = worker_cls(*init_args, **init_kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run `method` of the hosted worker (looked up on its class, as Ray looks up actor methods)."""
        worker = self._worker
        return getattr(type(worker), method)(worker, *args, **kwargs)

    def release(self) -> bool:
        """Drop the hosted worker; True if this process is fit to host another one (`Worker.release`)."""
        worker, self._worker = self._worker, None
        fit = worker is not None and bool(worker.release())
        del worker
        gc.collect()
        return fit

    def rebuild(self, worker_cls: type, env: dict[str, str], init_args: Sequence[Any], init_kwargs: dict[str, Any]):
        """Host a new worker: the process's start-up state back, then `env` (the new rank's variables), then
        the worker's constructor."""
        if self._worker is not None:
            raise RuntimeError(f"{type(self._worker).__name__} still hosted; release it first")
        self._fresh.restore(env)
        self._worker = worker_cls(*init_args, **init_kwargs)

    # `actor.__ray_call__.remote(fn)` hands the host to `fn`: it reads and sets the worker's attributes
    def __getattr__(self, name: str) -> Any:
        worker = self.__dict__.get("_worker")
        if worker is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(worker, name)

    def __setattr__(self, name: str, value: Any) -> None:
        worker = self.__dict__.get("_worker")
        if worker is None or name in ("_fresh", "_worker") or name.startswith("__"):
            object.__setattr__(self, name, value)  # the host's own, or Ray's
        else:
            setattr(worker, name, value)


_HOST_CLASSES: dict[type, type] = {}


def host_class(worker_cls: type) -> type:
    """WorkerHost under `worker_cls`'s name (Ray names actors, their processes and log lines after the class)."""
    cls = _HOST_CLASSES.get(worker_cls)
    if cls is None:
        cls = type(worker_cls.__name__, (WorkerHost,), {"__module__": WorkerHost.__module__})
        _HOST_CLASSES[worker_cls] = cls
    return cls


@dataclass
class _FreshState:
    """What a worker may change process-wide, as the process started."""

    env: dict[str, str]
    cwd: str
    torch_rng: torch.Tensor
    python_rng: Any
    numpy_rng: Any
    deterministic: bool
    default_dtype: torch.dtype

    @classmethod
    def capture(cls) -> _FreshState:
        return cls(
            env=dict(os.environ),
            cwd=os.getcwd(),
            torch_rng=torch.get_rng_state(),
            python_rng=random.getstate(),
            numpy_rng=np.random.get_state(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            default_dtype=torch.get_default_dtype(),
        )

    def restore(self, env: dict[str, str]) -> None:
        """Start-up state back, then `env` (a runtime_env's variables: a value naming another, "${PATH}", was
        expanded by Ray when the process started, from the same template; it keeps that value)."""
        os.environ.clear()
        os.environ.update(self.env)
        for key, value in env.items():
            os.environ[key] = self.env[key] if "$" in value and key in self.env else value
        os.chdir(self.cwd)
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        torch.use_deterministic_algorithms(self.deterministic)
        torch.set_default_dtype(self.default_dtype)
        torch.set_grad_enabled(True)
