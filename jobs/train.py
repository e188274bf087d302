"""Stage [train]: FRAME on Ray Train workers with DeepSpeed, exact data-parallel propagation.

    python -m jobs.train --config configs/demo.yaml train.workers=2 graph.n_shards=2
    ray job submit --working-dir . -- python -m jobs.train --config configs/demo.yaml

Plans first (``frame_dist.train.plan``, as ``jobs.plan``): when the estimated memory per worker
exceeds
``plan.worker_memory_gb`` (or the cluster's / this machine's memory per worker) it exits 1 with
the numbers, before any worker starts. Runs in ``<store>/runs/<train.run_name>``; submitting
again with the same run name resumes from the latest checkpoint (a finished run only
re-evaluates). Writes model.pt and metrics.json there. With tracking on (``tracking.mlflow_uri``
or ``MLFLOW_TRACKING_URI``; docs/tracking.md) the run is also an MLflow run: the config as
params, every epoch's loss and validation metrics, the test metrics, the model card.
"""

from __future__ import annotations

import os
import sys

from feature_store.lease import StageLease
from feature_store.store import Store
from frame_dist.cli import parse_config, run_stage
from frame_dist.config import Config
from frame_dist.ray_runtime import init_ray
from frame_dist.tracking import require_mlflow
from frame_dist.train.plan import plan_run
from frame_dist.train.ray_loop import check_trainable, finished_run, run_training


def train(cfg: Config) -> dict:
    require_mlflow(cfg)  # tracking asked without the extra: refused before anything runs
    store = Store.from_config(cfg.store)
    # the graph checked and the run's fingerprint computed once, before any cluster time
    run = check_trainable(cfg, store)
    metrics = finished_run(cfg, store, run.fingerprint)
    if metrics is not None:
        print(f"train: skipped (run {cfg.train.run_name} finished with these inputs and settings)")
    else:
        with StageLease(store, f"train-{cfg.train.run_name}"):  # one job per run at a time
            if os.environ.get("RAY_ADDRESS"):
                init_ray()  # joining a cluster costs nothing and gives the planner its memory
            # memory per worker from the data statistics: an impossible setting fails here
            # (PlanError, exit 1), before Ray Train starts a worker
            print(plan_run(cfg, store, manifest=run.manifest).summary())
            init_ray()
            metrics = run_training(cfg, store, run)
    test = metrics["test"]
    print(f"train: best epoch {metrics['best_epoch']} of {metrics['epochs_run']}; test "
          + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(__doc__.splitlines()[0], argv, tracked=True)
    return run_stage("train", lambda: train(cfg), cfg)


if __name__ == "__main__":
    sys.exit(main())
