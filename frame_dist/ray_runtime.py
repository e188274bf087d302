"""Connecting to Ray: the cluster a job runs in, or a local instance when there is none."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the Ray cluster this process belongs to, or start a local one.

    Under ``ray job submit`` (RAY_ADDRESS set, or a running cluster) this connects to it; on a
    laptop with no cluster it starts a local instance bound to 127.0.0.1 (its dashboard, which
    Ray Train's state queries use, listens on 127.0.0.1 only).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=True)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
