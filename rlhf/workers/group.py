"""WorkerGroup: N Ray actors of one role, called like one object.

A worker method declares how a call is spread over the ranks and how the answers come back:

    class PolicyWorker(Worker):
        @dispatch("split_dp", collect="concat")
        def compute_logprobs(self, batch: RolloutBatch) -> Tensor: ...

    pending = policy.run(PolicyWorker.compute_logprobs, batch)   # futures, returns at once
    logprobs = policy.wait(pending)                               # the visible blocking point

Dispatch modes (the closed set of STYLE.md §2.5):
  broadcast  every rank gets the same arguments (large ones are `ray.put` once and shared).
  split_dp   every RolloutBatch, Tensor (along dim 0) and list argument is cut into world_size
             equal contiguous shards, rank i gets shard i; other arguments (numbers, strings,
             None, tuples, dicts) go whole to every rank. Shards are cut in the driver before
             they are serialised, so each actor receives only its own rows. A group made with
             `balance_tokens` (roles with a token budget) first reorders the rows so that the
             shards carry balanced real tokens, minibatch by minibatch
             (rlhf.data.token_budget.dp_shard_order; rows of the same length as the first
             RolloutBatch argument move together), and `concat` puts the answers back in the
             original row order.
  rank0      only rank 0 is called (the other ranks must not be needed by the method).
  all        per-rank arguments: every argument is a list or tuple of length world_size and
             rank i gets element i of each. With no arguments it calls every rank, like broadcast.
Collect modes: list (answers in rank order), concat (RolloutBatch.concat, torch.cat on dim 0, or
list concatenation), first (rank 0's answer), mean (per-key mean of dicts of floats, or of floats).

Any remote exception, a dead actor or a timeout becomes `WorkerError` naming the role and rank,
with the remote traceback (`WorkerDiedError` when the actor's process is gone); `wait` returns as
soon as any rank fails, so a rank blocked in a collective with a dead peer cannot hang the driver.
A rank that raises while its peers still run is often the victim of a peer's death (its collective
lost a member): `wait` then gives the peers a few seconds and reports the death, the root cause,
if one shows up. `wait` without a timeout uses the group's `call_timeout_s`. Call `shutdown()`
after such an error, or `restart(rank)` to replace a dead rank (rollout engines do; see
rlhf.trainers.roles.RolloutSupervisor). `wait_all` waits for calls on several groups that depend
on each other (weight sync: the policy sends while the engines receive).

Each rank's actor is a WorkerHost (rlhf.workers.host) that builds the worker and runs its methods; Ray names
the actor after the worker class. Where this driver reuses processes (a held local CPU cluster, the test
session: rlhf.utils.process_pool), `shutdown` parks a healthy, idle group instead of killing it, and the next
group with its ranks, resources and actor environment builds its workers in those processes.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Optional, TypeVar

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from rlhf.config import ResourceConfig
from rlhf.data.batch import RolloutBatch
from rlhf.data.token_budget import dp_shard_order, inverse_order, sequence_lengths
from rlhf.engines.train_engine import init_distributed
from rlhf.errors import ConfigError, WorkerDiedError, WorkerError
from rlhf.utils.distributed import free_port, node_id, node_ip, process_env, rank_env
from rlhf.utils.process_pool import PROCESS_POOL, ParkedGroup, kill_processes
from rlhf.utils.seeding import deterministic_from_env
from rlhf.workers.host import host_class

logger = logging.getLogger(__name__)

DispatchMode = Literal["broadcast", "split_dp", "rank0", "all"]
CollectMode = Literal["list", "concat", "first", "mean"]
DISPATCH_MODES: tuple[str, ...] = ("broadcast", "split_dp", "rank0", "all")
COLLECT_MODES: tuple[str, ...] = ("list", "concat", "first", "mean")
PLACEMENT_STRATEGIES: tuple[str, ...] = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
RELEASE_TIMEOUT_S = 30.0
"""How long `shutdown` waits for idle ranks to drop their workers before it parks them (else they are killed)."""
PEER_DEATH_GRACE_S = 5.0
"""After a rank raised, how long `wait` looks for a dead peer among the still-running ranks."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class DispatchSpec:
    """How a worker method is called on a group: stored on the function as `dispatch_spec`."""

    mode: str
    """One of DISPATCH_MODES."""
    collect: str
    """One of COLLECT_MODES."""


def dispatch(mode: DispatchMode, collect: CollectMode = "list") -> Callable[[F], F]:
    """Declare how `WorkerGroup.run` spreads a call of this method and gathers its answers."""
    if mode not in DISPATCH_MODES:
        raise ValueError(f"unknown dispatch mode {mode!r}; known: {', '.join(DISPATCH_MODES)}")
    if collect not in COLLECT_MODES:
        raise ValueError(f"unknown collect mode {collect!r}; known: {', '.join(COLLECT_MODES)}")
    spec = DispatchSpec(mode, collect)

    def decorator(fn: F) -> F:
        fn.dispatch_spec = spec  # type: ignore[attr-defined]
        return fn

    return decorator


@dataclass(frozen=True)
class Pending:
    """The futures of one `WorkerGroup.run`; hand it to `WorkerGroup.wait`."""

    method: str
    """Name of the worker method."""
    spec: DispatchSpec
    """The method's dispatch and collect modes."""
    ranks: tuple[int, ...]
    """Ranks that were called, in order."""
    refs: tuple[ray.ObjectRef, ...]
    """One future per called rank."""
    order: Optional[tuple[int, ...]] = None
    """split_dp of a token-balancing group: the row order the shards were cut from (None: unchanged)."""


class Worker:
    """Base of every actor class a WorkerGroup hosts (a plain class; the group wraps it in ray.remote).

    The group sets RANK/WORLD_SIZE/LOCAL_RANK in the process environment before the actor starts,
    and MASTER_ADDR/MASTER_PORT before any method runs, so subclasses can read `self.rank` in
    `__init__` and call `setup_distributed()` from their first method. In a run.deterministic run
    (RLHF_DETERMINISTIC=1 in the actor's environment) torch's deterministic algorithms are on
    before any subclass code runs.
    """

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.role = os.environ.get("RLHF_ROLE", type(self).__name__)
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        _configure_worker_logging(self.rank)
        self.deterministic = deterministic_from_env()

    def release(self) -> bool:
        """Let go of what this worker holds outside its own attributes before its process hosts another worker
        (rlhf.workers.host: process reuse); False if the process cannot be handed on clean."""
        return True

    @dispatch("broadcast", collect="list")
    def ping(self) -> dict[str, Any]:
        """Liveness answer: who and where this actor is (queued behind a running call)."""
        return {"role": self.role, "rank": self.rank, "pid": os.getpid(), "node_ip": node_ip(), "node_id": node_id()}

    @dispatch("broadcast", collect="list")
    def read_text(self, path: str) -> Optional[str]:
        """The text of `path` as this actor's node sees it, or None if it cannot read it (shared-path checks)."""
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return None

    @dispatch("rank0", collect="first")
    def free_address(self) -> tuple[str, int]:
        """(node IP, free TCP port) of this actor's node: a rendezvous address hosted by rank 0."""
        return node_ip(), free_port()

    @dispatch("broadcast", collect="list")
    def set_env(self, env: dict[str, str]) -> None:
        """Set process environment variables (the group uses it for MASTER_ADDR/MASTER_PORT)."""
        os.environ.update(env)

    def setup_distributed(self, backend: str, timeout_s: float) -> None:
        """Join the group's default torch.distributed group through DeepSpeed (idempotent).

        Uses the env:// variables the group set. On CUDA, LOCAL_RANK is mapped onto the devices this
        actor sees (Ray narrows CUDA_VISIBLE_DEVICES per actor), because DeepSpeed calls
        set_device(LOCAL_RANK).
        """
        if dist.is_initialized():  # a reused process (rlhf.workers.host): same world, this run's timeout
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
            return
        if backend == "nccl":
            device_index = self.local_rank % max(torch.cuda.device_count(), 1)
            os.environ["LOCAL_RANK"] = str(device_index)
            torch.cuda.set_device(device_index)
        init_distributed(backend, timeout_s)


class WorkerGroup:
    """`num_workers` actors of `worker_cls` in one placement group, one bundle per rank.

    Roles can share bundles (colocation): create the placement group once with
    `create_placement_group` (bundles big enough for every role on them) and pass it with the
    bundle indices to each role's group; fractional `num_cpus`/`num_gpus` let them fit.
    """

    def __init__(
        self,
        worker_cls: type,
        *,
        role: str,
        num_workers: int,
        resources: ResourceConfig,
        placement_strategy: str = "PACK",
        init_args: Sequence[Any] = (),
        init_kwargs: Optional[dict[str, Any]] = None,
        env_vars: Optional[dict[str, str]] = None,
        device: str = "cpu",
        threads_per_worker: int = 1,
        placement_group: Optional[PlacementGroup] = None,
        bundle_indices: Optional[Sequence[int]] = None,
        startup_timeout_s: float = 300.0,
        call_timeout_s: Optional[float] = None,
        balance_tokens: bool = False,
        minibatch_rows: Optional[int] = None,
        wait_ready: bool = True,
    ):
        """`balance_tokens`: split_dp deals rows so that ranks get balanced real tokens, keeping the
        rows of each minibatch of `minibatch_rows` rows per rank (one optimizer step) together.

        `wait_ready=False` returns once the actors are requested, before their constructors ran: a
        controller starts all its roles so, and their processes start (import torch, transformers: ~6 s
        of CPU each) side by side instead of one group after the other. `ready()`, which the first `run`
        calls, waits for them (a constructor's error is raised there)."""
        if num_workers < 1:
            raise ConfigError(f"{role}: num_workers must be >= 1, got {num_workers}")
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, Worker)):
            raise TypeError(f"{role}: worker_cls must be a subclass of rlhf.workers.group.Worker, got {worker_cls!r}")
        self.worker_cls = worker_cls
        self.role = role
        self.startup_timeout_s = startup_timeout_s
        self.call_timeout_s = call_timeout_s or None  # `wait`'s limit when none is given; 0/None: no limit
        self.world_size = num_workers
        self.balance_tokens = balance_tokens
        self.minibatch_rows = minibatch_rows
        self._owns_placement_group = placement_group is None
        self._healthy = True  # no error, timeout or restart seen: the processes may be parked for reuse
        self._last_refs: tuple[ray.ObjectRef, ...] = ()
        self._rebuilding: tuple[ray.ObjectRef, ...] = ()
        self._reuse_key: Optional[tuple] = None
        parked: Optional[ParkedGroup] = None
        env_vars = dict(env_vars or {})
        if placement_group is None:
            bundles = [resource_bundle(resources)] * num_workers
            if device == "cpu" and PROCESS_POOL.enabled:
                self._reuse_key = (
                    num_workers,
                    tuple(sorted(bundles[0].items())),
                    placement_strategy,
                    threads_per_worker,
                    tuple(sorted(env_vars.items())),
                )
                parked = PROCESS_POOL.take(self._reuse_key)
            if parked is not None:
                placement_group = parked.placement_group
            else:
                placement_group = create_placement_group(
                    bundles,
                    placement_strategy,
                    timeout_s=startup_timeout_s,
                    name=f"rlhf-{role}-{uuid.uuid4().hex[:8]}",  # Ray's placement-group names are cluster-wide
                )
            bundle_indices = list(range(num_workers))
        elif bundle_indices is None:
            bundle_indices = list(range(num_workers))
        if len(bundle_indices) != num_workers:
            raise ConfigError(f"{role}: {len(bundle_indices)} bundle indices given for {num_workers} workers")
        self.placement_group = placement_group
        self.bundle_indices = list(bundle_indices)
        self._actors: list[Any] = []
        self._actor_options: list[dict[str, Any]] = []
        self._rendezvous: dict[str, str] = {}
        self._ready = False
        try:
            self._start_actors(
                resources, init_args, dict(init_kwargs or {}), env_vars, device, threads_per_worker, parked
            )
        except BaseException:
            self.shutdown()
            raise
        if wait_ready:
            self.ready()

    def ready(self) -> None:
        """Wait until every actor's constructor finished (within startup_timeout_s) and give the ranks their
        rendezvous address; once, before any other call. WorkerError (and the group shut down) if one failed."""
        if self._ready:
            return
        self._ready = True  # the rendezvous calls below go through `run`
        try:
            if self._rebuilding:  # reused processes: their worlds and rendezvous stand
                refs, self._rebuilding = self._rebuilding, ()
                rebuilt = Pending("__init__", DispatchSpec("all", "list"), tuple(range(self.world_size)), refs)
                wait_all([(self, rebuilt)], timeout=self.startup_timeout_s)
            else:
                self._set_rendezvous(self.startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        logger.info("%s: %d workers up (%s)", self.role, self.world_size, self.worker_cls.__name__)

    # -- calling ------------------------------------------------------------------------------

    def run(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
        """Start `method` on the ranks its @dispatch mode names; returns futures at once."""
        self.ready()
        name, spec = self._resolve(method)
        order = self._balanced_order(args, kwargs) if spec.mode == "split_dp" else None
        calls = _per_rank_arguments(spec.mode, self.world_size, args, kwargs, f"{self.role}.{name}", order)
        ranks = tuple(sorted(calls))
        label = f"{self.worker_cls.__name__}.{name}"  # the task's name in Ray's state API and tracebacks
        refs = tuple(self._actors[r].call.options(name=label).remote(name, *calls[r][0], **calls[r][1]) for r in ranks)
        self._last_refs = refs
        return Pending(name, spec, ranks, refs, order)

    def wait(self, pending: Pending, timeout: Optional[float] = None) -> Any:
        """Block until every rank answered, then collect per the method's mode.

        Raises WorkerError at the first failing rank (remote exception, dead actor) or when
        `timeout` seconds (default: the group's call_timeout_s) pass first; the other ranks are
        left running (call `shutdown`).
        """
        return wait_all([(self, pending)], timeout=timeout)[0]

    def call(self, method: Callable[..., Any], *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """`wait(run(method, ...))`: a blocking call, for phases with nothing to overlap."""
        return self.wait(self.run(method, *args, **kwargs), timeout=timeout)

    def ping(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Health check: every rank's (role, rank, pid, node_ip, node_id); WorkerError if one is dead or silent."""
        return self.call(Worker.ping, timeout=timeout)

    def dead_ranks(self, timeout: Optional[float] = None) -> list[int]:
        """Ranks whose actor process is gone. Live ranks answer a ping after their running call,
        so this waits for busy ranks (up to `timeout`, default call_timeout_s; WorkerError after)."""
        pending = self.run(Worker.ping)
        dead = []
        for ref, rank in zip(pending.refs, pending.ranks):
            try:
                wait_all([(self, Pending(pending.method, pending.spec, (rank,), (ref,)))], timeout=timeout)
            except WorkerDiedError:
                dead.append(rank)
        return dead

    def restart(self, rank: int, timeout_s: Optional[float] = None) -> None:
        """Replace rank `rank`'s actor with a new one built exactly like it (same bundle, environment,
        constructor arguments, rendezvous address); blocks until its constructor finished (within
        `timeout_s`, default the group's startup_timeout_s).

        The new actor has none of the old one's state beyond its constructor: the caller re-runs
        whatever set-up followed (rollout engines: weight-sync join and the current weights).
        """
        self.ready()  # the rendezvous address the new actor gets
        self._healthy = False
        try:
            ray.kill(self._actors[rank], no_restart=True)
        except Exception as e:  # already dead
            logger.debug("%s rank %d: kill before restart: %s", self.role, rank, e)
        self._actors[rank] = self._new_actor(rank)
        name, spec = self._resolve(Worker.set_env)
        ref = self._actors[rank].call.remote(name, self._rendezvous)  # the first call: waits for the constructor
        wait_all([(self, Pending(name, spec, (rank,), (ref,)))], timeout=timeout_s or self.startup_timeout_s)
        logger.warning("%s rank %d restarted", self.role, rank)

    def shutdown(self) -> None:
        """Kill the actors and remove the placement group if this group created it (idempotent). With process
        reuse on (rlhf.workers.host), a healthy idle CPU group's processes are parked for the next group instead."""
        if self._park():
            return
        kill_processes(self._actors, self.placement_group if self._owns_placement_group else None, self.role)
        self._actors = []
        if self._owns_placement_group:
            self.placement_group = None

    def _park(self) -> bool:
        """Hand the processes to PROCESS_POOL if they are fit for another group; True if they were."""
        if not (self._reuse_key is not None and self._actors and self._ready and self._healthy):
            return False
        try:
            _, busy = ray.wait(list(self._last_refs), num_returns=len(self._last_refs), timeout=0)
            if busy:  # a call still runs (the run stopped on another group's error)
                return False
            fit = ray.get([actor.release.remote() for actor in self._actors], timeout=RELEASE_TIMEOUT_S)
        except Exception as e:
            logger.debug("%s: not parked: %s", self.role, e)
            return False
        bundles = [dict(b) for b in self.placement_group.bundle_specs]
        parked = ParkedGroup(self._reuse_key, self._actors, self.placement_group, self._rendezvous, bundles)
        if not all(fit) or not PROCESS_POOL.park(parked):
            return False
        logger.debug("%s: %d processes parked for reuse", self.role, self.world_size)
        self._actors = []
        self.placement_group = None
        return True

    @property
    def actors(self) -> list[Any]:
        """The Ray actor handles, in rank order (for wiring, e.g. passing to another role); waits for `ready`."""
        self.ready()
        return list(self._actors)

    # -- internals ----------------------------------------------------------------------------

    def _balanced_order(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[tuple[int, ...]]:
        """The token-balancing row order of a split_dp call's first RolloutBatch (None: keep the order)."""
        batch = next((a for a in (*args, *kwargs.values()) if isinstance(a, RolloutBatch)), None)
        if not self.balance_tokens or batch is None or self.world_size == 1 or len(batch) % self.world_size:
            return None
        order = tuple(dp_shard_order(sequence_lengths(batch), self.world_size, self.minibatch_rows))
        return None if order == tuple(range(len(batch))) else order

    def _start_actors(
        self,
        resources: ResourceConfig,
        init_args: Sequence[Any],
        init_kwargs: dict[str, Any],
        env_vars: dict[str, str],
        device: str,
        threads: int,
        parked: Optional[ParkedGroup],
    ) -> None:
        self._remote_cls = ray.remote(host_class(self.worker_cls))
        self._init_args = (tuple(init_args), init_kwargs)
        local_ranks, local_sizes = _local_ranks(self.placement_group, self.bundle_indices)
        for rank, bundle in enumerate(self.bundle_indices):
            env = {
                **process_env(device=device, threads=threads),
                **rank_env(
                    rank=rank,
                    world_size=self.world_size,
                    local_rank=local_ranks[rank],
                    local_world_size=local_sizes[rank],
                ),
                "RLHF_ROLE": self.role,
                **env_vars,
            }
            self._actor_options.append(
                dict(
                    num_cpus=resources.num_cpus,
                    num_gpus=resources.num_gpus,
                    max_restarts=0,  # restarts are explicit (`restart`): the caller knows what state to rebuild
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=bundle
                    ),
                    runtime_env={"env_vars": env},
                )
            )
            if parked is None:
                self._actors.append(self._new_actor(rank))
        if parked is not None:
            self._actors = list(parked.hosts)
            self._rendezvous = dict(parked.rendezvous)
            self._rebuilding = tuple(
                actor.rebuild.remote(
                    self.worker_cls, {**opts["runtime_env"]["env_vars"], **self._rendezvous}, *self._init_args
                )
                for actor, opts in zip(self._actors, self._actor_options)
            )

    def _new_actor(self, rank: int) -> Any:
        args, kwargs = self._init_args
        return self._remote_cls.options(**self._actor_options[rank]).remote(self.worker_cls, args, kwargs)

    def _set_rendezvous(self, timeout_s: float) -> None:
        # Rank 0's node and a port free there; every rank learns it before any method runs.
        host, port = self.call(Worker.free_address, timeout=timeout_s)
        self._rendezvous = {"MASTER_ADDR": host, "MASTER_PORT": str(port)}
        self.call(Worker.set_env, self._rendezvous, timeout=timeout_s)

    def _resolve(self, method: Callable[..., Any]) -> tuple[str, DispatchSpec]:
        name = getattr(method, "__name__", None)
        owners = [c for c in self.worker_cls.__mro__ if name is not None and vars(c).get(name) is method]
        if not owners:
            raise TypeError(
                f"{self.role}: {method!r} is not a method of {self.worker_cls.__name__}; pass the method "
                f"object, e.g. group.run({self.worker_cls.__name__}.<method>, ...)"
            )
        spec = getattr(getattr(self.worker_cls, name), "dispatch_spec", None)
        if not isinstance(spec, DispatchSpec):
            raise TypeError(f"{self.worker_cls.__name__}.{name} has no @dispatch(...) declaration")
        return name, spec

    def _get(self, ref: ray.ObjectRef, rank: int, method: str) -> Any:
        try:
            return self._get_or_raise(ref, rank, method)
        except BaseException:
            self._healthy = False
            raise

    def _get_or_raise(self, ref: ray.ObjectRef, rank: int, method: str) -> Any:
        actor = f"{self.role} rank {rank}"
        try:
            return ray.get(ref)
        except RayTaskError as e:
            # str(e) of Ray's task error is the remote traceback with the actor's pid and ip
            cause = e.cause if e.cause is not None else e
            raise WorkerError(actor, f"{method} raised {type(cause).__name__}: {cause}", str(e)) from None
        except RayActorError as e:
            raise WorkerDiedError(self.role, rank, f"actor died during {method}", str(e)) from None
        except (GetTimeoutError, RayError) as e:
            raise WorkerError(actor, f"{method} failed: {type(e).__name__}", str(e)) from None


def answered(pendings: Sequence[Pending], timeout: Optional[float] = None) -> list[int]:
    """Indices of the `pendings` whose every rank has answered (returned or raised), waiting up to `timeout` seconds
    (None: as long as it takes) until at least one has; [] if the time ran out. Their `wait` then returns at once."""
    refs = [ref for pending in pendings for ref in pending.refs]
    deadline = None if timeout is None else time.monotonic() + timeout
    while refs:
        ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(ready)
        found = [i for i, pending in enumerate(pendings) if all(ref in done for ref in pending.refs)]
        left = None if deadline is None else deadline - time.monotonic()
        if found or (left is not None and left <= 0):
            return found
        ray.wait(waiting, num_returns=1, timeout=left)
    return []


def wait_all(calls: Sequence[tuple[WorkerGroup, Pending]], timeout: Optional[float] = None) -> list[Any]:
    """Wait for calls on one or more groups together; each call's answers collected per its mode.

    For calls that depend on each other (a collective spanning groups), so a failure on either
    side raises at once. `timeout` defaults to the largest call_timeout_s of the groups (None if
    one has none). A rank that raises while others still run makes `wait_all` look for a dead
    rank for up to PEER_DEATH_GRACE_S and raise that `WorkerDiedError` (the likely root cause).
    """
    if timeout is None:
        limits = [group.call_timeout_s for group, _ in calls]
        timeout = None if None in limits else max(limits)
    deadline = None if timeout is None else time.monotonic() + timeout
    remaining = {
        ref: (i, rank) for i, (_, pending) in enumerate(calls) for ref, rank in zip(pending.refs, pending.ranks)
    }
    results: list[dict[int, Any]] = [{} for _ in calls]
    while remaining:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready, _ = ray.wait(list(remaining), num_returns=1, timeout=left)
        if not ready:
            for group, _ in calls:
                group._healthy = False
            raise WorkerError(_waiting_ranks(calls, remaining.values()), _timeout_message(calls, timeout))
        for ref in ready:
            i, rank = remaining.pop(ref)
            group, pending = calls[i]
            try:
                results[i][rank] = group._get(ref, rank, pending.method)
            except WorkerDiedError:
                raise
            except WorkerError as error:
                _raise_peer_death(calls, remaining, error)
                raise
    return [
        _collect(
            pending.spec.collect,
            [results[i][r] for r in pending.ranks],
            f"{group.role}.{pending.method}",
            pending.order,
        )
        for i, (group, pending) in enumerate(calls)
    ]


def _raise_peer_death(calls: Sequence[tuple[WorkerGroup, Pending]], remaining: dict, error: WorkerError) -> None:
    """Raise the first WorkerDiedError among `remaining` that shows up within PEER_DEATH_GRACE_S."""
    deadline = time.monotonic() + PEER_DEATH_GRACE_S
    waiting = dict(remaining)
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
        if not ready:
            return
        for ref in ready:
            i, rank = waiting.pop(ref)
            group, pending = calls[i]
            try:
                group._get(ref, rank, pending.method)
            except WorkerDiedError as died:
                raise died from error
            except WorkerError:
                pass


def _waiting_ranks(calls: Sequence[tuple[WorkerGroup, Pending]], waiting: Any) -> str:
    by_call: dict[int, list[int]] = {}
    for i, rank in waiting:
        by_call.setdefault(i, []).append(rank)
    return ", ".join(f"{calls[i][0].role} ranks {sorted(ranks)}" for i, ranks in sorted(by_call.items()))


def _timeout_message(calls: Sequence[tuple[WorkerGroup, Pending]], timeout: Optional[float]) -> str:
    methods = "/".join(pending.method for _, pending in calls)
    return (
        f"{methods} did not finish within {timeout:g}s; raise the timeout (cluster.call_timeout_s) or check "
        f"the workers' logs (a rank may be stuck in a collective)"
    )


def resource_bundle(resources: ResourceConfig) -> dict[str, float]:
    """One rank's placement-group bundle; zero entries are left out (Ray rejects them)."""
    bundle = {"CPU": float(resources.num_cpus), "GPU": float(resources.num_gpus)}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    if not bundle:
        raise ConfigError("a worker needs num_cpus > 0 or num_gpus > 0 to get a placement-group bundle")
    return bundle


def create_placement_group(
    bundles: list[dict[str, float]], strategy: str = "PACK", *, timeout_s: float = 300.0, name: str = ""
) -> PlacementGroup:
    """A placement group with `bundles`, ready to use; WorkerError if the cluster cannot host it in time."""
    if strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"unknown placement strategy {strategy!r}; known: {', '.join(PLACEMENT_STRATEGIES)}")
    PROCESS_POOL.make_room(bundles)  # parked worker processes (rlhf.workers.host) make way
    pg = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        total: dict[str, float] = {}
        for bundle in bundles:
            for k, v in bundle.items():
                total[k] = total.get(k, 0.0) + v
        raise WorkerError(
            name or "placement group",
            f"{len(bundles)} bundles {bundles[0]} ({strategy}, {total} in all) could not be placed within "
            f"{timeout_s:g}s; the cluster has {ray.available_resources()} free. Lower num_workers or the "
            f"per-role num_cpus/num_gpus, or add nodes",
        ) from None
    return pg


def _local_ranks(pg: PlacementGroup, bundle_indices: Sequence[int]) -> tuple[list[int], list[int]]:
    """LOCAL_RANK and LOCAL_WORLD_SIZE of each rank from the node its bundle landed on."""
    table = ray.util.placement_group_table(pg)
    nodes = [table["bundles_to_node_id"].get(b, "") for b in bundle_indices]
    counts: dict[str, int] = {}
    local = []
    for node in nodes:
        local.append(counts.get(node, 0))
        counts[node] = counts.get(node, 0) + 1
    return local, [counts[n] for n in nodes]


def _per_rank_arguments(
    mode: str,
    world_size: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    where: str,
    order: Optional[Sequence[int]] = None,
) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
    """rank -> (args, kwargs) for one call in `mode`; split_dp arguments with len(order) rows are
    reordered by `order` before they are cut."""
    if mode == "rank0":
        return {0: (args, kwargs)}
    if mode == "broadcast":
        shared_args = tuple(_put_if_large(a) for a in args)
        shared_kwargs = {k: _put_if_large(v) for k, v in kwargs.items()}
        return {r: (shared_args, shared_kwargs) for r in range(world_size)}
    if mode == "split_dp":
        split_args = [_split(a, world_size, f"{where} argument {i}", order) for i, a in enumerate(args)]
        split_kwargs = {k: _split(v, world_size, f"{where} argument {k!r}", order) for k, v in kwargs.items()}
        return {
            r: (tuple(s[r] for s in split_args), {k: s[r] for k, s in split_kwargs.items()}) for r in range(world_size)
        }
    # mode == "all": per-rank values
    for label, value in [*((str(i), a) for i, a in enumerate(args)), *kwargs.items()]:
        if not isinstance(value, (list, tuple)) or len(value) != world_size:
            raise ValueError(
                f"{where}: dispatch mode 'all' needs every argument to be a list of {world_size} per-rank "
                f"values; argument {label} is {type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, (list, tuple)) else "")
            )
    return {r: (tuple(a[r] for a in args), {k: v[r] for k, v in kwargs.items()}) for r in range(world_size)}


def _split(value: Any, n: int, where: str, order: Optional[Sequence[int]] = None) -> list[Any]:
    """n equal shards of a RolloutBatch / Tensor / list (rows first reordered by `order` when it has
    as many); anything else is repeated."""
    if isinstance(value, RolloutBatch):
        rows = len(value)
    elif isinstance(value, Tensor):
        rows = value.shape[0] if value.dim() else 0
    elif isinstance(value, list):
        rows = len(value)
    else:
        return [value] * n
    if rows % n:
        raise ConfigError(
            f"{where}: {rows} rows cannot be split into {n} equal data-parallel shards; make the batch "
            f"(rollout_batch_size × n_samples_per_prompt) divisible by num_workers {n}"
        )
    size = rows // n
    if order is not None and len(order) == rows:
        value = _reorder(value, order)
    if isinstance(value, RolloutBatch):
        return value.split(n)
    if isinstance(value, Tensor):
        # clone: pickling a view would ship the whole underlying storage to every rank
        return [value[i * size : (i + 1) * size].clone() for i in range(n)]
    return [value[i * size : (i + 1) * size] for i in range(n)]


def _put_if_large(value: Any) -> Any:
    """Store tensors and batches once in the object store so N ranks share one copy."""
    if isinstance(value, (RolloutBatch, Tensor)):
        return ray.put(value)
    return value


def _reorder(value: Any, order: Sequence[int]) -> Any:
    """Rows of a RolloutBatch / Tensor / list in `order`."""
    if isinstance(value, RolloutBatch):
        return value.select(list(order))
    if isinstance(value, Tensor):
        return value[torch.as_tensor(order, dtype=torch.long, device=value.device)]
    return [value[i] for i in order]


def _collect(mode: str, results: list[Any], where: str, order: Optional[Sequence[int]] = None) -> Any:
    """Answers per `mode`; `concat` undoes a split_dp call's row `order` (rows back where they came from)."""
    if mode == "list":
        return results
    if mode == "first":
        return results[0]
    if mode == "concat":
        if all(isinstance(r, RolloutBatch) for r in results):
            joined: Any = RolloutBatch.concat(results)
        elif all(isinstance(r, Tensor) for r in results):
            joined = torch.cat(results, dim=0)
        elif all(isinstance(r, list) for r in results):
            joined = [x for r in results for x in r]
        else:
            raise TypeError(
                f"{where}: collect 'concat' needs RolloutBatch, Tensor or list results, got {type(results[0]).__name__}"
            )
        if order is None:
            return joined
        if len(joined) != len(order):
            raise TypeError(
                f"{where}: the group balanced the rows of its split_dp argument, so 'concat' needs one answer row "
                f"per input row ({len(order)}), got {len(joined)}"
            )
        return _reorder(joined, inverse_order(order))
    # mode == "mean"
    if all(isinstance(r, dict) for r in results):
        keys = list(dict.fromkeys(k for r in results for k in r))
        return {k: sum(float(r[k]) for r in results if k in r) / sum(1 for r in results if k in r) for k in keys}
    return sum(float(r) for r in results) / len(results)


def _configure_worker_logging(rank: int) -> None:
    """Rank 0 of a group logs INFO, the others WARNING (STYLE.md §2.12); actor stderr reaches the driver."""
    package_logger = logging.getLogger("rlhf")
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO dumps the whole config per rank
