"""Per-worker memory of the clip side at W = 1, 2, 4 workers, measured beside the planner's terms.

    .venv/bin/python -m benchmarks.clip_partition                      # ~5 minutes on 2 cores
    .venv/bin/python -m benchmarks.clip_partition --clips 16 --root /data/cp

Not a test: read the table. A feature-only world (``world.preset=micro-video-a`` by default:
12,739 users, 58,291 videos; F = ``--features``) is written, ingested and imported as in
``benchmarks.real_sizes``, and its graph built with 4 shards. For each W, W gloo processes on
this machine each load their shards as a Ray Train worker does (``k % W == rank``), build the
model, and then, with their peak RSS reset (``/proc/self/clear_refs``), build their clip input
exactly as ``ray_loop.train_loop_per_worker`` does:

* W = 1: the local clips' features (all C clips) and R~ X precomputed from them
  (``clip_inputs_for`` -> ``FrozenClipInputs``);
* W > 1: the features of the clips the worker owns (C / W) and R~ X of its users, streamed from
  the store one part at a time (``worker_data.owned_clip_inputs`` -> ``OwnedClipInputs``).

Each worker reports what the clip input holds afterwards (RSS growth) and its peak while
building it (VmHWM growth); the table shows the largest worker's, its ratio to W = 1 against
1/W, and the planner's clip-side terms for the same W ("clip features" + "precomputed R~X,
R~1"; the step's input FC side, which the build does not allocate, beside them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.real_sizes import prepare, run_stage  # noqa: E402
from benchmarks.score_driver_memory import own_peak_bytes, reset_peak, rss_bytes  # noqa: E402
from feature_store.store import Store  # noqa: E402
from frame_dist.config import load_config  # noqa: E402

MIB = 2**20
SHARDS = 4  # divisible by every W of the table


def _worker(rank: int, world: int, overrides: list[str], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous-{world}", rank=rank,
                            world_size=world)
    try:
        torch.set_num_threads(1)
        from frame_dist.graph.shards import load_clip_features, load_shards
        from frame_dist.model.clip_inputs import clip_inputs_for
        from frame_dist.model.distributed import DistributedPropagation
        from frame_dist.train.trainer import build_model
        from frame_dist.train.worker_data import WorkerData, owned_clip_inputs

        cfg = load_config(None, overrides)
        store = Store.from_config(cfg.store)
        n_c = cfg.graph.n_clips
        shard, manifest = load_shards(store, n_c, [k for k in range(SHARDS) if k % world == rank])
        data = WorkerData.from_shard(shard, n_c, manifest.n_train, None,
                                     with_negative=cfg.model.use_negative)
        prop = DistributedPropagation(data.global_clip_ids, dist.new_group(backend="gloo"))
        model = build_model(cfg.model, len(manifest.feature_mean),
                            n_clips_total=manifest.n_videos * n_c, propagation=prop, seed=0)
        gc.collect()
        base = rss_bytes()
        if not reset_peak():  # VmHWM := VmRSS
            raise RuntimeError("this kernel refused to reset the peak RSS (/proc/self/clear_refs)")
        if world > 1:
            inputs = owned_clip_inputs(store, manifest, data, prop, rank, world)
        else:
            inputs = clip_inputs_for(model, torch.from_numpy(
                load_clip_features(store, manifest, shard.video_ids)), data.graph)
        gc.collect()
        held_tensors = sum(t.numel() * t.element_size() for t in inputs.buffers())
        row = {"rank": rank, "held_mib": (rss_bytes() - base) / MIB,
               "peak_mib": (own_peak_bytes() - base) / MIB,
               "tensors_mib": held_tensors / MIB, "users": data.graph.n_users,
               "clips": int(inputs.features.shape[0]), "kind": type(inputs).__name__}
        rows: list = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            with open(f"{out}/w{world}.json", "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def planner_clip_side(overrides: list[str], world: int) -> dict[str, float]:
    """The planner's clip-side host terms (MiB) of ``world`` workers on the committed graph."""
    from frame_dist.graph.shards import read_graph_manifest
    from frame_dist.train.plan import Budget, plan_training, read_data_stats

    cfg = load_config(None, [*overrides, f"train.workers={world}"])
    store = Store.from_config(cfg.store)
    plan = plan_training(read_data_stats(store, cfg), cfg, Budget(None), "cpu",
                         read_graph_manifest(store, cfg.graph.n_clips))
    return {t.name: t.nbytes / MIB for t in plan.terms if t.where == "host"
            and t.name in ("clip features", "precomputed R~X, R~1", "step: input FC side")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="micro-video-a", choices=["micro-video-a",
                                                                "micro-video-b"])
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--root", default="/tmp/frame-dist-real-sizes")
    args = p.parse_args(argv)

    base, _ = prepare(args)
    overrides = [*base, f"graph.n_clips={args.clips}", f"graph.n_shards={SHARDS}"]
    graph = run_stage("graph", overrides)
    print(f"{args.world}, N_c = {args.clips}, F = {args.features}: graph with {SHARDS} shards in "
          f"{graph['seconds']:.0f} s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for world in [int(w) for w in args.workers.split(",")]:
            mp.spawn(_worker, args=(world, overrides, out), nprocs=world)
            with open(f"{out}/w{world}.json") as f:
                results[world] = json.load(f)
    first = max(r["held_mib"] for r in results[min(results)])
    print("\nclip input per worker (the largest worker's), MiB; planner's clip-side terms")
    print(f"{'W':>3}{'kind':>17}{'clips':>10}{'users':>8}{'tensors':>10}{'held':>9}{'peak':>9}"
          f"{'held / W=1':>12}{'1/W':>7}{'planner feats+R~X':>19}{'+ step FC':>11}")
    for world, rows in results.items():
        top = max(rows, key=lambda r: r["held_mib"])
        plan = planner_clip_side(overrides, world)
        fc = plan.pop("step: input FC side", 0.0)
        print(f"{world:>3}{top['kind']:>17}{top['clips']:>10,}{top['users']:>8,}"
              f"{top['tensors_mib']:>10.1f}{top['held_mib']:>9.1f}"
              f"{max(r['peak_mib'] for r in rows):>9.1f}{top['held_mib'] / first:>12.3f}"
              f"{1 / world:>7.3f}{sum(plan.values()):>19.1f}{fc:>11.1f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
