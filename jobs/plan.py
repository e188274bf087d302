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

import os
import sys

from frame_dist.cli import parse_config, run_stage
from frame_dist.train.plan import print_plan


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv)
    if os.environ.get("RAY_ADDRESS"):
        try:  # a reachable cluster gives the budget; none is needed to plan
            import ray

            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - fall back to this machine's memory
            print(f"plan: no Ray cluster at RAY_ADDRESS ({exc}); budget from this machine",
                  file=sys.stderr)
    return run_stage("plan", lambda: print_plan(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
