"""Score driver memory: the job's driver holds nothing per user; the old gathering design did.

Not a test: run it standalone and read the slopes.

    python benchmarks/score_driver_memory.py                        # 5,000, 20,000 and 40,000 users
    python benchmarks/score_driver_memory.py --users 5000,20000,40000 --keep
    python benchmarks/score_driver_memory.py --users 2000,8000 --modes job

What is measured: the peak resident memory that the Ray *driver* process of the score stage adds
while it works, for several numbers of users M on the same videos, side by side for

* ``job``: ``frame_dist.score.pipeline.run_scoring(cfg, store)``, the whole job as it runs today
  (plan, one streaming-generator task per graph shard, the clip-side reduce, the Ray Data
  actor pool over the chunk rows the tasks leave in the object store, commits). Its driver
  should grow with the number of videos and chunks, not with M;
* ``gather``: the work of the driver *before* the change, which gathered every user on the
  driver: ``embeddings.sharded_embeddings`` (the same shard tasks, every user's H_u^p, H_u^n
  (M x d each) and the training pairs fetched into driver tables) followed by
  ``kernel.fuse_tables`` (Z_u, M x G with G = 2H, plus the clip side), FRAME rebuilt from
  model.pt (``SavedModel.read(...).build()``). Its scoring (the actors) is not run: only what
  the old driver held is measured.

How: for each M a store is built in a temporary directory with the project's own stages: the
synthetic world (``world.preset=custom``, the same ``--videos`` short videos for every M,
``world.min_duration_s=1 world.max_duration_s=2``) through the real ingest
(``jobs.ingest``; about 10 s for 40,000 users), then **random frame features** (N(0, 1) float16
on an 8-frame grid, written directly as the tests do; no video is decoded or encoded), the
graph (``partition.build_shards``, ``graph.n_shards`` shards, N_c = 4) and an **untrained**
FRAME (d = 128, H = 256: the paper's sizes, seeded Xavier initialisation) saved as
``model.pt`` of the run by the training stage's own writer (``ray_loop.write_outputs``).
Memory does not depend on the values, so neither the features nor the weights need to mean
anything. The world shows each user about ``--train-per-user / 0.7`` videos, so that about
``--train-per-user`` of them fall in the train split (ingest keeps the last 30% for validation
and test).

The benchmark starts one local Ray instance (``ray.init(address="local")``, ``--cpus`` CPUs,
no dashboard, its own temp dir) and runs every (M, mode) in a **fresh Python subprocess** that
joins it through ``RAY_ADDRESS`` (``frame_dist.ray_runtime.init_ray``, as a submitted job's
driver does), so each peak is that of one clean driver. In the subprocess, after the imports
(torch, Ray, Ray Data, the library) and ``init_ray``, it runs ``gc.collect()``, reads the
resident set size (RSS, ``/proc/self/statm``) and resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``, so start-up transients do not count; where the kernel
refuses, the peak since start-up is used and the row is flagged); after the work, the peak RSS
minus that RSS is the driver's **peak growth**. The peak is read as ``VmHWM`` of
``/proc/self/status``, not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps the
high-water mark of the address space an exec replaces, so ``ru_maxrss`` of a spawned process
never drops below its parent's peak at the spawn (here: the parent that ran the ingest) and
the reset does not lower it; VmHWM is the same mark for the process's own address space only
(``ru_maxrss`` after the work is kept in the per-run JSON). Object-store pages the driver maps
(``ray.get`` of large objects) count, as they do in a real driver's RSS.

Printed: per M, the peak growth of both modes, the bytes the shard tasks sent the driver, the
chunks and the wall time; then, between the smallest and the largest M, the slope of each mode
in bytes per user, their ratio, and the analytic figure of the old design's per-user tables,
M x (2d + G) x 4 bytes (H_u^p, H_u^n and Z_u in float32). The per-user slope of ``job`` is
expected to be near zero: what it still holds per user is a few bytes per chunk (object
references, Ray Data block metadata); the graph manifest it reads lists video ids only (its
JSON size per user is printed with the stores; it listed every user id before graph layout
2). Ray is shut down at the end, also after an error; the processes of its instance are looked
for (by an environment marker, never by name) and any left over are reported.

Small chunks: a chunk row is about users_per_chunk x (4 G + 16 x seen videos + id) bytes.
Ray returns a task's objects under ``max_direct_call_object_size`` (100 KiB: about 44 users per
chunk at G = 512) inline to their owner, the driver, instead of the object store. With one
object per chunk the job's driver grew by about 5 KB per user at 32 users per chunk
(``--users 2000,8000 --users-per-chunk 32 --modes job``), more than the old design's tables;
the shard tasks therefore yield runs of consecutive chunks of at least 256 KiB
(``scoring.CHUNK_OBJECT_MIN_BYTES``). The same command then measured 47.1 -> 49.6 MiB
(425 B per user, i.e. ~13 KB per chunk of driver bookkeeping: parts, their metadata, Ray
Data's block metadata).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2 ** 20
GRID = 8  # frames per video on the uniform time grid (N_c = 4 divides it)
RUN = "memory-bench"
MARKER_ENV = "FRAME_DIST_SCORE_MEMORY_BENCH"  # inherited by every process of our Ray instance
RESULT_PREFIX = "result.json"


def store_overrides(root: Path, args: argparse.Namespace, n_users: int) -> list[str]:
    shown = max(3, round(args.train_per_user / 0.7))  # ingest: 70% train, 10% valid, 20% test
    return [
        f"store.root={root}/store", f"world.out_dir={root}/world",
        "world.preset=custom", f"world.n_users={n_users}", f"world.n_videos={args.videos}",
        f"world.interactions_per_user={shown}", "world.min_duration_s=1",
        "world.max_duration_s=2", f"world.seed={args.seed}",
        f"extract.grid_size={GRID}", f"graph.n_clips={args.clips}",
        f"graph.n_shards={args.shards}", f"model.dim={args.dim}", f"model.hidden={args.hidden}",
        f"train.run_name={RUN}", f"score.users_per_chunk={args.users_per_chunk}",
        f"score.top_k={args.top_k}", "score.kernel=eager",
    ]


def write_random_features(store: Any, seed: int) -> None:
    """N(0, 1) float16 frame features of every video, on the grid of its true duration."""
    from feature_store.frames import commit_frame_parts, frame_features_table, write_frame_part
    from feature_store.schemas import FEATURE_DIM

    videos = store.table("videos").read()
    ids = videos["video_id"].to_pylist()
    duration = np.nan_to_num(np.asarray(videos["duration_s"].to_numpy(zero_copy_only=False),
                                        dtype=np.float64), nan=1.0)
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, len(ids), 250):
        block = ids[start:start + 250]
        times = (np.arange(GRID) + 0.5)[None, :] * duration[start:start + len(block), None] / GRID
        feats = rng.normal(size=(len(block), GRID, FEATURE_DIM)).astype(np.float16)
        parts.append(write_frame_part(store, frame_features_table(block, times, feats), block))
    commit_frame_parts(store, parts, {"weights": "benchmark-random", "grid_size": GRID,
                                      "dim": FEATURE_DIM, "image_size": 0})


def build_store(root: Path, args: argparse.Namespace, n_users: int) -> dict[str, Any]:
    """World -> ingest -> random frame features -> graph -> untrained model.pt."""
    from feature_store.schemas import FEATURE_DIM
    from feature_store.store import Store
    from frame_dist.config import load_config
    from frame_dist.graph.shards import build_shards, graph_dir
    from frame_dist.train.artifacts import TrainState
    from frame_dist.train.ray_loop import write_outputs
    from frame_dist.train.trainer import build_model
    from jobs import ingest as ingest_job

    t0 = time.perf_counter()
    overrides = store_overrides(root, args, n_users)
    if ingest_job.main(overrides) != 0:
        raise RuntimeError(f"ingest failed for M={n_users}")
    cfg = load_config(None, overrides)
    store = Store.from_config(cfg.store)
    write_random_features(store, args.seed)
    manifest = build_shards(cfg, store).manifest
    model = build_model(cfg.model, FEATURE_DIM, seed=args.seed)  # untrained: values do not matter
    write_outputs(cfg, store, model, TrainState(fingerprint="benchmark-untrained"), {})
    (root / "overrides.json").write_text(json.dumps(overrides))
    manifest_bytes = len(store.read_bytes(f"{graph_dir(args.clips)}/_manifest.json"))
    info = {"users": manifest.n_users, "videos": manifest.n_videos,
            "train": manifest.n_train, "manifest_bytes": manifest_bytes,
            "chunks": sum(-(-s.users // args.users_per_chunk) for s in manifest.shards),
            "seconds": time.perf_counter() - t0}
    print(f"store M={n_users}: {info['users']} users in the graph, {info['videos']} videos, "
          f"{info['train']:,} training interactions ({info['train'] / info['users']:.1f} per "
          f"user), {info['chunks']} chunks of {args.users_per_chunk}; graph manifest "
          f"{manifest_bytes / MIB:.1f} MiB ({manifest_bytes / info['users']:.0f} B/user); "
          f"built in {info['seconds']:.0f}s", flush=True)
    return info


# --------------------------------------------------------------------------- the subprocess


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...) in bytes; OSError when the
    process is gone, RuntimeError when it has no such field (a zombie)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def own_peak_bytes() -> int:
    """This process's own peak RSS (VmHWM): ``ru_maxrss`` once the pre-exec mark is gone.

    ``ru_maxrss`` of a spawned process is never below its parent's peak at the spawn (Linux
    keeps the replaced address space's high-water mark in ``signal->maxrss`` across exec), and
    the clear_refs reset does not touch that part; VmHWM is the live address space's mark alone.
    """
    return status_bytes("VmHWM")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return own_peak_bytes() <= rss_bytes() + 4 * MIB


def child(mode: str, root: Path, out: Path) -> None:
    """One driver: imports, init_ray, then the measured work of ``mode``; writes ``out``."""
    import ray
    import ray.data  # noqa: F401 - imported before the measurement, as run_scoring uses it
    import torch

    from feature_store.store import Store
    from frame_dist.config import load_config
    from frame_dist.ray_runtime import init_ray
    from frame_dist.score import embeddings, kernel
    from frame_dist.score import pipeline as scoring
    from frame_dist.train.artifacts import SavedModel

    cfg = load_config(None, json.loads((root / "overrides.json").read_text()))
    store = Store.from_config(cfg.store)
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    extra: dict[str, Any] = {}

    if mode == "job":
        prepare = scoring.prepare_scoring

        def recording_prepare(*a: Any, **k: Any) -> scoring.ScoringInputs:
            inputs = prepare(*a, **k)
            extra.update(bytes_from_tasks=inputs.bytes_from_tasks,
                         shard_tasks=inputs.shard_tasks, chunk_refs=len(inputs.user_chunks))
            return inputs

        scoring.prepare_scoring = recording_prepare  # run_scoring looks it up at call time

        def work() -> Any:
            summary = scoring.run_scoring(cfg, store)
            extra["summary"] = summary.line()
            return summary
    else:
        def work() -> Any:
            saved = SavedModel.read(store, RUN)
            model, n_clips = saved.build(), saved.n_clips
            emb = embeddings.sharded_embeddings(model, store, n_clips,
                                                cfg.score.shard_task_cpus)
            with torch.inference_mode():
                tables = kernel.fuse_tables(model, emb.h_c, emb.h_u_pos, emb.h_u_neg, n_clips)
            extra.update(bytes_from_tasks=emb.bytes_from_tasks, shard_tasks=emb.tasks,
                         user_table_bytes=tables.user_table.numel() * 4)
            return emb, tables  # held until the peak is read

    gc.collect()
    rss_before = rss_bytes()
    peak_at_start = own_peak_bytes()
    reset = reset_peak()
    t0 = time.perf_counter()
    kept = work()
    seconds = time.perf_counter() - t0
    peak_after = own_peak_bytes()
    result = {"mode": mode, "rss_before": rss_before, "peak_at_start": peak_at_start,
              "peak_reset": reset, "peak_after": peak_after, "growth": peak_after - rss_before,
              "ru_maxrss_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "rss_after": rss_bytes(), "seconds": seconds, **extra}
    del kept
    out.write_text(json.dumps(result))


def run_child(mode: str, root: Path, address: str, timeout: float) -> dict[str, Any]:
    out = root / f"{RESULT_PREFIX}.{mode}"
    log = root / f"driver-{mode}.log"
    env = {**os.environ, "RAY_ADDRESS": address}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode,
           "--child-root", str(root), "--child-out", str(out)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"driver ({mode}, {root.name}) exited with {proc.returncode}:\n{tail}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- the parent


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER_ENV=marker`` (ours), except this one."""
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def slope(a: tuple[int, int], b: tuple[int, int]) -> float:
    """Bytes per user between (M, bytes) points a and b."""
    return (b[1] - a[1]) / (b[0] - a[0])


def print_table(args: argparse.Namespace, users: list[int], stores: dict[int, dict],
                results: dict[tuple[int, str], dict]) -> None:
    g = 2 * args.hidden
    per_user_old = (2 * args.dim + g) * 4
    modes = args.modes
    print(f"\ndriver peak RSS growth, {args.videos} videos, N_c={args.clips}, "
          f"{args.shards} shards, d={args.dim}, H={args.hidden} (G={g}), "
          f"{args.users_per_chunk} users per chunk, {args.cpus} Ray CPUs\n")
    head = "| M users | chunks |"
    rule = "|--------:|-------:|"
    for mode in modes:
        head += f" {mode}: growth MiB | {mode}: MiB from tasks | {mode}: s |"
        rule += "-------------:|-------------:|------:|"
    if len(modes) == 2:
        head += " gather / job |"
        rule += "-------------:|"
    head += " old design M(2d+G)4, MiB |"
    rule += "-------------------------:|"
    print(head)
    print(rule)
    for m in users:
        graph_users = stores[m]["users"]
        line = f"| {graph_users:>7,} | {stores[m]['chunks']:>6} |"
        for mode in modes:
            r = results[(m, mode)]
            flag = "" if r["peak_reset"] else "*"
            line += (f" {r['growth'] / MIB:>12.1f}{flag} | {r['bytes_from_tasks'] / MIB:>12.1f} |"
                     f" {r['seconds']:>5.1f} |")
        if len(modes) == 2:
            ratio = results[(m, "gather")]["growth"] / max(results[(m, "job")]["growth"], 1)
            line += f" {ratio:>11.1f}x |"
        line += f" {graph_users * per_user_old / MIB:>25.1f} |"
        print(line)
    if any(not r["peak_reset"] for r in results.values()):
        print("\n* the kernel refused to reset the peak-RSS mark: growth = peak since start-up "
              "- RSS before the work (start-up transients may count)")

    if len(users) < 2:
        return
    lo, hi = users[0], users[-1]
    m_lo, m_hi = stores[lo]["users"], stores[hi]["users"]
    print(f"\nper-user slope between M={m_lo:,} and M={m_hi:,} (bytes per user)\n")
    print("| what | bytes/user | MiB per 1M users |")
    print("|------|-----------:|-----------------:|")
    slopes = {}
    for mode in modes:
        s = slope((m_lo, results[(lo, mode)]["growth"]), (m_hi, results[(hi, mode)]["growth"]))
        slopes[mode] = s
        print(f"| {mode}: driver peak growth | {s:,.0f} | {s * 1e6 / MIB:,.0f} |")
    print(f"| old design, analytic (2d + G) x 4 | {per_user_old:,} | "
          f"{per_user_old * 1e6 / MIB:,.0f} |")
    manifest = slope((m_lo, stores[lo]["manifest_bytes"]), (m_hi, stores[hi]["manifest_bytes"]))
    print(f"| graph manifest JSON (read by the driver) | {manifest:,.0f} | "
          f"{manifest * 1e6 / MIB:,.0f} |")
    if len(modes) == 2:
        job, gather = slopes["job"], slopes["gather"]
        ratio = f"{gather / job:,.0f}x" if job > 0 else "job slope <= 0 (flat within noise)"
        print(f"\nslope ratio gather / job: {ratio}; job slope / analytic old-design slope: "
              f"{job / per_user_old:.3f}")
    for m in users:
        if (m, "job") in results and results[(m, "job")].get("summary"):
            r = results[(m, "job")]
            print(f"M={stores[m]['users']:,} job: {r['shard_tasks']} shard tasks, "
                  f"{r['chunk_refs']} chunk refs; {r['summary']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", default="5000,20000,40000", help="comma-separated user counts M")
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--clips", type=int, default=4, help="N_c")
    p.add_argument("--shards", type=int, default=4, help="graph.n_shards")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--train-per-user", type=int, default=12,
                   help="training interactions per user (about)")
    p.add_argument("--users-per-chunk", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--modes", default="job,gather", help="job, gather or both")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--object-store-mib", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=900, help="seconds per driver subprocess")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the stores and driver logs")
    p.add_argument("--child", choices=["job", "gather"], help=argparse.SUPPRESS)
    p.add_argument("--child-root", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, Path(args.child_root), Path(args.child_out))
        return
    users = sorted({int(u) for u in args.users.split(",")})
    args.modes = [m for m in ("job", "gather") if m in args.modes.split(",")]
    if not args.modes:
        p.error("--modes: job, gather or both")

    import ray

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="frame-score-memory-"))
    ray_tmp = tempfile.mkdtemp(prefix="sdm-ray-", dir="/tmp")  # short: Unix socket paths
    marker = uuid.uuid4().hex
    os.environ[MARKER_ENV] = marker  # every process of our Ray instance inherits it
    os.environ.pop("RAY_ADDRESS", None)  # never another instance
    print(f"work dir {work}; Ray temp dir {ray_tmp}", flush=True)
    stores: dict[int, dict] = {}
    results: dict[tuple[int, str], dict] = {}
    try:
        for m in users:
            stores[m] = build_store(work / f"m{m}", args, m)
        ctx = ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                       _node_ip_address="127.0.0.1", object_store_memory=args.object_store_mib
                       * MIB, _temp_dir=ray_tmp, log_to_driver=False)
        address = ctx.address_info["gcs_address"]
        print(f"local Ray at {address}: {args.cpus} CPUs, object store "
              f"{args.object_store_mib} MiB", flush=True)
        for m in users:
            for mode in args.modes:
                r = run_child(mode, work / f"m{m}", address, args.timeout)
                results[(m, mode)] = r
                print(f"M={stores[m]['users']:,} {mode}: driver RSS before "
                      f"{r['rss_before'] / MIB:.0f} MiB, peak growth {r['growth'] / MIB:.1f} "
                      f"MiB, {r['seconds']:.1f}s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for _ in range(30):  # Ray's daemons exit asynchronously
            left = marked_pids(marker)
            if not left:
                break
            time.sleep(1)
        if left:
            print(f"WARNING: processes of this benchmark's Ray instance still running: {left}",
                  file=sys.stderr)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(args, users, stores, results)
    print(f"\ntotal {time.perf_counter() - start:.0f}s "
          f"({math.fsum(r['seconds'] for r in results.values()):.0f}s of measured driver work)")


if __name__ == "__main__":
    main()
