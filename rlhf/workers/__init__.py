"""Ray actors (policy, critic, reference, reward, rollout) and the WorkerGroup that drives them.

Role classes live in their modules (`rlhf.workers.policy.PolicyWorker`, ...), imported where used.
"""

from rlhf.workers.group import DispatchSpec, Pending, Worker, WorkerGroup, create_placement_group, dispatch

__all__ = ["DispatchSpec", "Pending", "Worker", "WorkerGroup", "create_placement_group", "dispatch"]
