"""Throughput of the extract stage, measured side by side in one run.

    python benchmarks/extract_throughput.py                      # 48 videos, G=32, 112 px
    python benchmarks/extract_throughput.py --videos 24 --image-size 64

Three ways to turn the same videos into grid-frame features, in frames per second:

- **encoder alone** (the bound): the ResNet-50 trunk on frames decoded beforehand, batches of
  ``--batch`` frames, torch using every core; measured before and after the others (mean);
- **single process**: the obvious loop, PyAV decoding then encoding video after video;
- **Ray pipeline**: ``run_extract`` end to end on a local Ray (decode tasks -> encoder actor ->
  part writers -> commits), including the actor's start-up.

The videos are the synthetic world's (``frame_dist.ingest.synthetic``), rendered at ``--size`` so
that
decoding costs something (default 320x240, 12-25 fps, 3-9 s). Target on 2 cores: pipeline >= 0.8
of the encoder alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from feature_store.store import Store  # noqa: E402
from frame_dist.config import WorldConfig, load_config  # noqa: E402
from frame_dist.extract.encoder import load_encoder  # noqa: E402
from frame_dist.extract.video import decode_grid  # noqa: E402


def make_videos(n: int, size: tuple[int, int], out_dir: str) -> pa.Table:
    from frame_dist.ingest.synthetic import generate_world

    world = WorldConfig(preset="custom", n_videos=n, n_users=8, interactions_per_user=3,
                        sizes=(size,), out_dir=out_dir, seed=7)
    info = generate_world(world)
    table = pacsv.read_csv(info.videos_csv)
    uris = [str(info.videos_csv.parent / u) if not os.path.isabs(u) else u
            for u in table.column("uri").to_pylist()]
    return pa.table({"video_id": table.column("video_id").cast(pa.string()), "uri": uris,
                     "duration_s": pa.nulls(len(uris), pa.float64())})


def encoder_alone(encoder, frames: np.ndarray, batch: int) -> float:
    encoder.encode(frames[:batch], batch)  # warm-up: first-call allocations
    t = time.perf_counter()
    encoder.encode(frames, batch)
    return len(frames) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    parser.add_argument("--world-dir", default=str(REPO / "out" / "bench_extract_world"))
    args = parser.parse_args()

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    t = time.perf_counter()
    videos = make_videos(args.videos, tuple(args.size), args.world_dir)
    print(f"{len(videos)} videos {args.size[0]}x{args.size[1]} ready in "
          f"{time.perf_counter() - t:.1f}s; G={args.grid}, image {args.image_size} px, "
          f"{cpus} CPUs")
    uris = videos.column("uri").to_pylist()
    work = tempfile.mkdtemp(prefix="bench_extract_")
    cfg = load_config(None, [f"store.root={work}/store", f"extract.grid_size={args.grid}",
                             f"extract.image_size={args.image_size}", "extract.weights=random",
                             f"extract.batch_size={args.batch}", "extract.device=cpu",
                             "extract.videos_per_commit=8"])
    encoder = load_encoder(cfg.extract)
    torch.set_num_threads(cpus)

    t = time.perf_counter()
    frames = np.concatenate([decode_grid(u, args.grid, args.image_size).frames for u in uris])
    decode_fps = len(frames) / (time.perf_counter() - t)
    bound_before = encoder_alone(encoder, frames, args.batch)

    t = time.perf_counter()
    for u in uris:  # the single-process loop
        encoder.encode(decode_grid(u, args.grid, args.image_size).frames, args.batch)
    single_fps = len(frames) / (time.perf_counter() - t)

    import ray

    from frame_dist.extract.pipeline import run_extract

    ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = Store.from_config(cfg.store)
    store.table("videos").write(videos)
    summary = run_extract(cfg, store)
    ray.shutdown()
    assert summary.done == len(videos), summary
    pipeline_fps = summary.frames / summary.seconds
    steady_fps = None  # after the first part: without Ray Data's and the actor's start-up
    if summary.first_part_s is not None and summary.seconds > 1.2 * summary.first_part_s:
        first = cfg.extract.videos_per_commit * args.grid  # frames of the first part
        steady_fps = (summary.frames - first) / (summary.seconds - summary.first_part_s)

    bound_after = encoder_alone(encoder, frames, args.batch)
    bound = (bound_before + bound_after) / 2
    shutil.rmtree(work, ignore_errors=True)

    print(f"decode only (PyAV, 1 thread)     {decode_fps:8.1f} frames/s")
    print(f"encoder alone (bound)            {bound:8.1f} frames/s "
          f"(before {bound_before:.1f}, after {bound_after:.1f})")
    print(f"single-process loop              {single_fps:8.1f} frames/s  "
          f"ratio to bound {single_fps / bound:.2f}")
    print(f"Ray pipeline, end to end         {pipeline_fps:8.1f} frames/s  "
          f"ratio to bound {pipeline_fps / bound:.2f}  (first part after "
          f"{summary.first_part_s or 0:.1f}s of {summary.seconds:.1f}s)")
    if steady_fps is not None:
        print(f"Ray pipeline, after first part   {steady_fps:8.1f} frames/s  "
              f"ratio to bound {steady_fps / bound:.2f}  (approximate: assumes the first "
              "block held one part)")
    print(f"pipeline / single process        {pipeline_fps / single_fps:8.2f}")


if __name__ == "__main__":
    main()
