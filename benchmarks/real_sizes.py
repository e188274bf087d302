"""The pipeline at the paper's data sizes: graph -> train -> evaluate -> score, per-stage time and
peak memory, with the planner's estimate beside the training workers' measured peak.

    .venv/bin/python -m benchmarks.real_sizes --world micro-video-a --clips 4
    .venv/bin/python -m benchmarks.real_sizes --world micro-video-b --clips 4,16 --root /data/rs

Worlds are feature-only synthetic worlds (``frame_dist.ingest.feature_world``: the simulation
writes frame features directly, no mp4 and no encoder) at the sizes of the paper's datasets,
``world.preset=micro-video-a`` (12,739 users, 58,291 videos, ~343k interactions) and
``micro-video-b`` (22,049 users, 61,903 videos, ~2.1M interactions); G = 16 grid frames of
F = ``--features`` values (default 256: 2048 would be 7.6 GB of frames.npy for A). They enter
through ``jobs.ingest`` + ``jobs.import_features`` like outside data.

Each stage runs as its own ``python -m jobs.<stage>`` process (a local Ray instance each):
wall time and the stage process's peak RSS (VmHWM, polled; Ray's worker processes are not
counted: the training workers' peak comes from metrics.json, beside ``jobs.plan``'s estimate).
Training: ``--workers`` Ray Train workers, ``--epochs`` epochs. Scoring ranks ``--candidates``
videos (a random sample written as a candidates file) for every user: all 58k videos for 12.7k
users is 742M pairs x N_c, hours on a 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.score_driver_memory import status_bytes  # noqa: E402
from feature_store.store import Store  # noqa: E402
from frame_dist.config import load_config  # noqa: E402
from frame_dist.ingest.feature_world import FeatureSpec, write_feature_world  # noqa: E402


def _hwm_mib(pid: int) -> float:
    """VmHWM of a live process (MiB): its own peak RSS since its exec (ru_maxrss is not: Linux
    carries the parent's high-water mark across fork + exec); 0 once it is gone."""
    try:
        return status_bytes("VmHWM", pid) / 2**20
    except (OSError, RuntimeError):
        return 0.0


def run_stage(stage: str, overrides: list[str]) -> dict[str, float]:
    """``python -m jobs.<stage> overrides``: wall seconds and the process's peak RSS (MiB)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"jobs.{stage}", *overrides], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, _hwm_mib(proc.pid))
            time.sleep(0.2)
        log.seek(0)
        out = log.read()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"jobs.{stage} failed ({proc.returncode}):\n{out[-4000:]}")
    return {"seconds": seconds, "peak_rss_mib": peak, "log": out}


def prepare(args) -> tuple[list[str], dict[str, float]]:
    """The world written, ingested and imported: (store overrides, timings)."""
    cfg = load_config(None, [f"world.preset={args.world}",
                             f"world.out_dir={args.root}/{args.world}/world"]).world
    start = time.perf_counter()
    fw = write_feature_world(cfg, FeatureSpec(grid=16, dim=args.features), cfg.out_dir)
    world_s = time.perf_counter() - start
    base = [f"store.root={args.root}/{args.world}/store"]
    imports = [*base, *fw.import_overrides(args.world)]
    store = Store(f"{args.root}/{args.world}/store")
    timings = {"world": world_s}
    if not store.table("interactions").exists():
        timings["ingest"] = run_stage("ingest", imports)["seconds"]
    if not store.table("frame_features").exists():
        timings["import_features"] = run_stage("import_features", imports)["seconds"]
    return [*base, f"extract.grid_size={fw.spec.grid}"], timings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="micro-video-a", choices=["micro-video-a",
                                                                "micro-video-b"])
    p.add_argument("--clips", default="4", help="comma-separated N_c values")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--root", default="/tmp/frame-dist-real-sizes")
    p.add_argument("--run-suffix", default="", help="a new run name (the graph is reused)")
    args = p.parse_args(argv)

    base, timings = prepare(args)
    print(f"{args.world}: world written in {timings['world']:.0f} s"
          + "".join(f", {k} {v:.0f} s" for k, v in timings.items()
                    if k in ("ingest", "import_features")))
    with open(f"{args.root}/{args.world}/world/videos.csv") as f:
        ids = np.asarray([row["video_id"] for row in csv.DictReader(f)])
    pick = np.sort(np.random.default_rng(0).choice(len(ids), min(args.candidates, len(ids)),
                                                   replace=False))
    cand = f"{args.root}/{args.world}/candidates.parquet"
    pq.write_table(pa.table({"video_id": ids[pick]}), cand)

    results = []
    for n_c in [int(c) for c in args.clips.split(",")]:
        run = f"rs-nc{n_c}-w{args.workers}{args.run_suffix}"
        overrides = [*base, f"graph.n_clips={n_c}", f"graph.n_shards={args.workers}",
                     f"train.workers={args.workers}", f"train.epochs={args.epochs}",
                     f"train.run_name={run}", f"score.candidates={cand}"]
        row = {"n_clips": n_c}
        for stage in ("graph", "plan", "train", "evaluate", "score"):
            r = run_stage(stage, overrides)
            if stage == "plan":  # on the committed graph: exact shard sizes
                plan = r
                continue
            row[stage] = (r["seconds"], r["peak_rss_mib"])
            print(f"  N_c={n_c} {stage}: {r['seconds']:.0f} s, stage process peak "
                  f"{r['peak_rss_mib']:,.0f} MiB", flush=True)
        store = Store(f"{args.root}/{args.world}/store")
        metrics = json.loads(store.fs.cat_file(store.path("runs", run, "metrics.json")))
        history = metrics["history"]
        row["worker_peak_mib"] = max(max(h["peak_rss_mb"]) for h in history)
        row["train_seconds"] = sum(h["train_seconds"] for h in history)
        row["steps"] = sum(h["steps"] for h in history)
        row["auc"] = metrics.get("test", {}).get("auc")
        row["plan_log"] = [line for line in plan["log"].splitlines()
                           if line.startswith(("total host", "communication per step"))]
        results.append(row)
        print(json.dumps({k: v for k, v in row.items()}, default=str), flush=True)
    print(f"\n{args.world}, W = {args.workers}, {args.epochs} epoch(s), F = {args.features}")
    print(f"{'N_c':>4}{'graph s':>9}{'train s':>9}{'s/step':>8}{'evaluate s':>12}{'score s':>9}"
          f"{'worker peak MiB':>17}{'test AUC':>10}")
    for r in results:
        print(f"{r['n_clips']:>4}{r['graph'][0]:>9.0f}{r['train'][0]:>9.0f}"
              f"{r['train_seconds'] / max(r['steps'], 1):>8.3f}{r['evaluate'][0]:>12.0f}"
              f"{r['score'][0]:>9.0f}{r['worker_peak_mib']:>17,.0f}"
              f"{(r['auc'] or float('nan')):>10.4f}")
        print("     planner: " + " | ".join(r["plan_log"]))


if __name__ == "__main__":
    main()
