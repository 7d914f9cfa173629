"""The worker processes a driver keeps for its next groups (`PROCESS_POOL`; rlhf.workers.host says why and
what a reused process is cleaned of). Ray bookkeeping only: which parked group fits which new one, and making
room in the cluster for groups that do not fit any."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

logger = logging.getLogger(__name__)


@dataclass
class ParkedGroup:
    """A shut-down group's processes, waiting for the next group with its `key`."""

    key: tuple
    hosts: list[Any]
    placement_group: PlacementGroup
    rendezvous: dict[str, str]
    bundles: list[dict[str, float]]

    def cpus(self) -> float:
        return sum(b.get("CPU", 0.0) for b in self.bundles)

    def kill(self) -> None:
        kill_processes(self.hosts, self.placement_group, "parked worker")


@dataclass
class ProcessPool:
    """The parked groups of this driver (module-level `PROCESS_POOL`); off until `enable`."""

    enabled: bool = False
    max_cpus: float = 0.0
    """The most CPUs parked groups may hold reserved: the rest of the cluster stays free for others (a CLI run
    joining it, a plain Ray actor)."""
    parked: list[ParkedGroup] = field(default_factory=list)
    cluster: Optional[tuple[str, str]] = None
    """(GCS address, job id) the parked handles belong to; a new ray.init drops them."""

    def enable(self, max_cpus: float) -> None:
        """Park shut-down CPU groups of this driver, holding at most `max_cpus` CPUs of the cluster reserved."""
        self.enabled, self.max_cpus = True, max_cpus

    def disable(self) -> None:
        """Stop parking; kill what is parked."""
        self.enabled = False
        self.drain()

    def drain(self) -> None:
        """Kill every parked group (their resources come back to the cluster)."""
        parked, self.parked = self.parked, []
        for group in parked:
            group.kill()

    def take(self, key: tuple) -> Optional[ParkedGroup]:
        """The oldest parked group with `key`, removed from the pool (None: none, or reuse is off)."""
        if not self.enabled or not self._same_cluster():
            return None
        for i, group in enumerate(self.parked):
            if group.key == key:
                return self.parked.pop(i)
        return None

    def make_room(self, bundles: Sequence[dict[str, float]]) -> None:
        """Kill parked groups, oldest first, until what is free in the cluster, with what they give back, holds a
        new placement group of `bundles` (Ray's free count lags a removal a little: at worst one more goes)."""
        if not self.parked:
            return
        if not self._same_cluster():
            self.parked = []  # their cluster is gone, and its actors with it
            return
        free = ray.available_resources()
        need: dict[str, float] = {}
        for bundle in bundles:
            for k, v in bundle.items():
                need[k] = need.get(k, 0.0) + v
        while self.parked and any(v > free.get(k, 0.0) for k, v in need.items()):
            oldest = self.parked.pop(0)
            for bundle in oldest.bundles:
                for k, v in bundle.items():
                    free[k] = free.get(k, 0.0) + v
            oldest.kill()

    def park(self, group: ParkedGroup) -> bool:
        """Keep `group` for a later one (the oldest make way beyond max_cpus); False if reuse is off."""
        if not self.enabled or group.cpus() > self.max_cpus:
            return False
        if not self._same_cluster():
            self.parked = []
        self.cluster = _cluster_id()
        self.parked.append(group)
        while sum(g.cpus() for g in self.parked) > self.max_cpus:
            self.parked.pop(0).kill()
        return True

    def _same_cluster(self) -> bool:
        return ray.is_initialized() and self.cluster == _cluster_id()


def kill_processes(actors: Sequence[Any], placement_group: Optional[PlacementGroup], what: str) -> None:
    """Kill `actors` and remove `placement_group` (None: leave it), passing over what is already gone (or whose
    cluster is); `what` names them in the debug log."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:
            logger.debug("%s: kill: %s", what, e)
    if placement_group is not None:
        try:
            remove_placement_group(placement_group)
        except Exception as e:
            logger.debug("%s: remove placement group: %s", what, e)


def _cluster_id() -> tuple[str, str]:
    context = ray.get_runtime_context()
    return context.gcs_address, context.get_job_id()


PROCESS_POOL = ProcessPool()
"""This driver's parked worker processes: on in the test session (tests/conftest.py) and in a held local CPU
cluster (rlhf.utils.ray_session.held_ray_session), off elsewhere."""
