"""Connecting to Ray: the cluster a job runs in, or a local instance when there is none."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the Ray cluster named by ``RAY_ADDRESS``, or start a local instance.

    ``ray job submit`` sets ``RAY_ADDRESS`` for the job's driver, so submitted jobs run on their
    cluster; on a cluster node, ``RAY_ADDRESS=auto python -m jobs.X`` joins the node's cluster.
    Without it a fresh local instance starts, bound to 127.0.0.1 (its dashboard, which Ray
    Train's state queries use, listens on 127.0.0.1 only): never another user's cluster that
    happens to run on the same machine.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=True)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
