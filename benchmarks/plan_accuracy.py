"""Planner accuracy: estimated per-worker peak memory against the measured peak RSS of real runs.

    python -m benchmarks.plan_accuracy                   # 20,000 users, W = 1 and W = 2
    python -m benchmarks.plan_accuracy --users 10000 --videos 4000 --clips 8 --dim 64 --zero 2
    python -m benchmarks.plan_accuracy --baseline        # re-measure the planner's constants

Default: builds the synthetic store of ``benchmarks.train_scaling`` (long-tailed video
popularity, 35% full watches, random frame features), partitions it, plans each W with
``frame_dist.train.plan`` (exact shard sizes from the committed graph) and runs Ray Train +
DeepSpeed
for one short epoch with that W; prints, per W, the estimate, the measured peak RSS of the
largest worker (``peak_rss_mb`` of metrics.json) and their ratio, and the same for the
propagation bytes per step.

``--baseline``: the peak RSS of a Ray Train worker that imports what the training loop imports,
wraps a 4 x 4 ``nn.Linear`` in a DeepSpeed engine and runs one step, with ZeRO 0 and ZeRO 2:
the constants ``WORKER_BASELINE_BYTES`` and ``ZERO_OVERHEAD_BYTES`` of ``frame_dist.train.plan``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from feature_store.store import Store
from frame_dist.config import load_config
from frame_dist.graph.shards import build_shards, read_graph_manifest
from frame_dist.train.plan import GIB, MIB, plan_training, read_data_stats, worker_budget


def _baseline_loop(loop_config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from frame_dist.config import from_dict
    from frame_dist.train.loop import engine_step, peak_rss_mb
    from frame_dist.train.ray_loop import deepspeed_config, initialize_engine

    class Probe(torch.nn.Linear):  # a task as the engine wraps it: batch -> (loss, stats)
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = super().forward(x).square().mean()
            return loss, {"loss": loss.detach()}

    cfg = from_dict(loop_config["config"]).validate()
    world = ray.train.get_context().get_world_size()
    if world > 1:
        dist.new_group(backend=dist.get_backend())  # the propagation's group, as in training
    model = Probe(4, 4)
    engine = initialize_engine(model, torch.optim.Adam(model.parameters()),
                               deepspeed_config(cfg, world))
    engine_step(engine)(torch.randn(cfg.train.batch_size // world, 4))  # the workers' step
    rss = peak_rss_mb(world)
    if ray.train.get_context().get_world_rank() == 0:
        with open(loop_config["out"], "w") as f:
            json.dump(rss, f)


def measure_baseline(workers: int, zero_stage: int) -> list[float]:
    """Peak RSS (MiB) of each worker of a trivial Ray Train + DeepSpeed run."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = load_config(None, [f"train.workers={workers}", f"graph.n_shards={workers}",
                             f"train.zero_stage={zero_stage}", "train.batch_size=8"])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rss.json")
        TorchTrainer(
            _baseline_loop, train_loop_config={"config": cfg.to_dict(), "out": out},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="baseline", storage_path=tmp)).fit()
        with open(out) as f:
            return json.load(f)


def compare(overrides: list[str], workers: int, steps: int) -> dict:
    """Plan, then train one epoch of ``steps`` steps; estimate and measurement side by side."""
    from frame_dist.train.ray_loop import run_training

    cfg = load_config(None, [*overrides, f"train.workers={workers}",
                             f"train.run_name=plan-w{workers}", "train.epochs=1",
                             f"train.steps_per_epoch={steps}"])
    store = Store.from_config(cfg.store)
    t0 = time.perf_counter()
    stats = read_data_stats(store, cfg)
    plan = plan_training(stats, cfg, worker_budget(cfg), "cpu",
                         read_graph_manifest(store, cfg.graph.n_clips))
    plan_s = time.perf_counter() - t0
    metrics = run_training(cfg, store)
    epoch = metrics["history"][-1]
    return {"plan": plan, "plan_s": plan_s, "rss_mib": max(epoch["peak_rss_mb"]),
            "bytes": epoch["propagation_bytes_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--videos", type=int, default=5000)
    parser.add_argument("--per-user", type=int, default=55)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clips", type=int, default=4, help="N_c (the grid is max(4, N_c))")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--zero", type=int, default=0, help="DeepSpeed ZeRO stage")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more config overrides, e.g. model.trainable_clip_features=true")
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    if args.baseline:
        for workers, zero in ((1, 0), (2, 0), (1, 2), (2, 2)):
            rss = measure_baseline(workers, zero)
            print(f"W={workers} ZeRO {zero}: peak RSS per worker {[round(r) for r in rss]} MiB")
        ray.shutdown()
        return

    from benchmarks.train_scaling import make_store

    root = tempfile.mkdtemp(prefix="frame-plan-bench-")
    grid = max(4, args.clips)
    overrides = [f"store.root={root}/store", f"extract.grid_size={grid}",
                 f"graph.n_clips={args.clips}", f"graph.n_shards={max(args.workers)}",
                 f"train.batch_size={args.batch}", f"model.dim={args.dim}",
                 f"train.zero_stage={args.zero}", *args.set]
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    make_store(cfg.store.root, args.users, args.videos, args.per_user, grid, 0)
    manifest = build_shards(cfg, Store.from_config(cfg.store)).manifest
    print(f"store + graph in {time.perf_counter() - t0:.0f}s: {manifest.n_users} users, "
          f"{manifest.n_videos} videos, nnz R^p {manifest.nnz_pos:,}, "
          f"R^n {manifest.nnz_neg:,}, {manifest.n_train:,} train interactions")
    rows = [(w, compare(overrides, w, args.steps)) for w in args.workers]
    ray.shutdown()
    for w, r in rows:
        print(f"\n--- W={w} ---\n{r['plan'].table()}")
    print(f"\n{'':6s}{'estimate MiB':>14s}{'measured MiB':>14s}{'ratio':>8s}"
          f"{'est. bytes/step':>17s}{'measured':>12s}{'ratio':>8s}{'plan s':>8s}")
    for w, r in rows:
        est = r["plan"].total("host") / MIB
        est_b, got_b = r["plan"].comm_bytes_per_step, r["bytes"]
        print(f"W={w:<4d}{est:14,.0f}{r['rss_mib']:14,.0f}{est / r['rss_mib']:8.2f}"
              f"{est_b:17,.0f}{got_b:12,.0f}{(est_b / got_b if got_b else float('nan')):8.2f}"
              f"{r['plan_s']:8.1f}")
    print(f"(estimates include the {rows[0][1]['plan'].terms[0].nbytes / GIB:.2f} GiB runtime "
          "baseline; ratio = estimate / measured)")


if __name__ == "__main__":
    main()
