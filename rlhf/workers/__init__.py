"""Ray actors (policy, critic, reference, reward, rollout) and the WorkerGroup that drives them
(rlhf.workers.group).

Role classes live in their modules (`rlhf.workers.policy.PolicyWorker`, ...), imported where used; the
package itself imports nothing, so that a config check reading `rlhf.workers.objectives` loads no Ray.
"""
