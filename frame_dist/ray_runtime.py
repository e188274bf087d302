"""Connecting to Ray: the cluster a job runs in, or a local instance when there is none."""

from __future__ import annotations

import os

# Ray Train's controller polls its workers this often (Ray's default: 2 s). Every report, the
# end of a run and its start wait for a poll, which makes a small run on one machine ~10 s
# slower; a local instance (and the tests' instances) poll every 0.25 s instead.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def use_local_ray_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Add :data:`LOCAL_RAY_ENV` to ``env`` (default: this process's environment, which a
    local Ray instance and its workers inherit) where not already set; return ``env``."""
    env = os.environ if env is None else env
    for key, value in LOCAL_RAY_ENV.items():
        env.setdefault(key, value)
    return env


def init_ray(num_cpus: int | None = None) -> None:
    """Join the Ray cluster named by ``RAY_ADDRESS``, or start a local instance.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver, so submitted jobs run on their
    cluster; on a cluster node, ``RAY_ADDRESS=auto python -m jobs.X`` joins the node's cluster.
    Without it a fresh local instance starts, bound to 127.0.0.1 (its dashboard, which Ray
    Train's state queries use, listens on 127.0.0.1 only): never another user's cluster that
    happens to run on the same machine. A local instance gets :data:`LOCAL_RAY_ENV`.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    use_local_ray_env()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=True)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
