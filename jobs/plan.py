"""Plan a training run: memory per worker (itemised), shard count, bytes per step.

    python -m jobs.plan --config configs/demo.yaml train.workers=2 graph.n_shards=2
    python -m jobs.plan --config configs/demo.yaml graph.n_clips=16 plan.worker_memory_gb=4
    ray job submit --working-dir . -- python -m jobs.plan --config configs/demo.yaml

Reads only the store (interaction columns, manifests); needs no cluster. With ``RAY_ADDRESS``
set it asks that cluster for its memory (the budget is then the cluster's memory resource / W);
otherwise the budget is ``plan.worker_memory_gb`` or this machine's memory / W. Prints the plan
for ``graph.n_clips`` (exact shard sizes when that graph is committed) and the total per worker
for every other N_c of the grid; exits 1 when the plan does not fit its budget.
"""

from __future__ import annotations

import copy
import os
import sys

from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.partition import read_graph_manifest
from frame_dist.plan import (
    GIB,
    Budget,
    Plan,
    alternatives,
    check_plan,
    plan_training,
    read_data_stats,
    worker_budget,
)


def _cluster() -> dict[str, float] | None:
    """The connected Ray cluster's resources, or None (Ray is never started here)."""
    if "ray" not in sys.modules:
        return None
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else None


def training_device(cfg: Config) -> str:
    """"cuda" or "cpu", as ``run_training`` decides: train.use_gpu, else the connected cluster's
    GPUs, else this machine's."""
    if cfg.train.use_gpu is not None:
        return "cuda" if cfg.train.use_gpu else "cpu"
    resources = _cluster()
    if resources is not None:
        return "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_budget(cfg: Config, device: str) -> Budget:
    """plan.worker_memory_gb, else the connected cluster's memory resource / W, else this
    machine's memory / W; on GPU plan.gpu_memory_gb or the visible GPU's memory."""
    gpu_bytes = None
    if device == "cuda" and cfg.plan.gpu_memory_gb <= 0:
        import torch

        if torch.cuda.is_available():
            gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    resources = _cluster() or {}
    return worker_budget(cfg, device, gpu_bytes, resources.get("memory"))


def plan(cfg: Config, store: Store | None = None, check: bool = True) -> Plan:
    """The plan of training ``cfg`` on the committed data; raises PlanError when it does not fit
    (``check``), naming the numbers and the plans of the usual alternatives."""
    store = store or Store.from_config(cfg.store)
    stats = read_data_stats(store, cfg)
    device = training_device(cfg)
    manifest = read_graph_manifest(store, cfg.graph.n_clips)
    result = plan_training(stats, cfg, memory_budget(cfg, device), device, manifest)
    if check and not result.fits:
        check_plan(result, alternatives(stats, cfg, memory_budget, device))
    return result


def print_plan(cfg: Config) -> Plan:
    store = Store.from_config(cfg.store)
    result = plan(cfg, store, check=False)
    print(result.table())
    grid = len(result.stats.skip_hist)
    sweep = []
    for n_c in (n for n in range(1, grid + 1) if grid % n == 0):
        other = copy.deepcopy(cfg)
        other.graph.n_clips = n_c
        alt = plan_training(result.stats, other, result.budget, result.device,
                            read_graph_manifest(store, n_c))
        sweep.append(f"N_c={n_c}: {alt.total('host') / GIB:.2f} GiB"
                     + (f" + {alt.total('device') / GIB:.2f} GiB device"
                        if alt.device == "cuda" else ""))
    print("per worker for every N_c of the grid: " + ", ".join(sweep))
    if not result.fits:
        check_plan(result, alternatives(result.stats, cfg, memory_budget, result.device))
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    if os.environ.get("RAY_ADDRESS"):
        try:  # a reachable cluster gives the budget; none is needed to plan
            import ray

            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - fall back to this machine's memory
            print(f"plan: no Ray cluster at RAY_ADDRESS ({exc}); budget from this machine",
                  file=sys.stderr)
    return run_stage("plan", lambda: print_plan(cfg))


if __name__ == "__main__":
    sys.exit(main())
