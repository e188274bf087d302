"""Scoring throughput: the fused top-K kernel against the model's per-pair forward and matmul.

Not a test: run it standalone and read the ratios.

    python benchmarks/score_throughput.py                      # medium world, 1 thread, ~2 min
    python benchmarks/score_throughput.py --threads 2 --skip-job
    python benchmarks/score_throughput.py --users 12739 --videos 2000 --clips 8 --skip-naive

Shapes: the medium world (``world.preset=medium``: 3,000 users x 400 videos) with the paper's
d = 128, hidden H = 256 and N_c = 4. No medium store with a trained run exists on a fresh
machine (building one means rendering and encoding 400 videos), so the embeddings are
**synthesised** with the right shapes: a Xavier-initialised FRAME with random biases, H_c ~
N(0, 1), H_u = ReLU(N(0, 1)). The kernel's speed does not depend on the values.

FLOP model (what "GFLOP/s" means below): a (user, video) pair costs, per clip and per MLP
(positive and negative), H adds (Z_u + Z_c), H ReLUs and a dot product of width H (H
multiplies + H adds): 2 N_c H (1 + 1 + 2) = 8 N_c H FLOPs per pair (8,192 here). The bound is
``torch.matmul`` of two n x n float32 matrices (2 n^3 FLOPs) on the same number of threads,
measured before and after the kernels (best of several runs each: this machine is shared).

Printed, side by side:
1. the model's own forward, one pair per call (``FRAME.video_scores`` on precomputed
   embeddings): the naive per-pair baseline; and its batched form (``FRAME.score_block`` over
   user x video blocks), for context;
2. the fused kernel (``frame_dist.score.kernel.FusedScorer.top_k``, top-10 with seen videos
   excluded, i.e. the actor's whole per-chunk work) over every user, eager and compiled
   (``torch.compile``; compile time printed apart), with its parity against ``score_block``;
3. the whole job's Ray Data part (``run_scoring`` with the synthesised tables: actor pool,
   chunks, staged parts, commits) on a local Ray with ``--threads`` CPUs, Ray start-up apart;
4. ratios: kernel / naive per-pair (target >= 50x) and kernel GFLOP/s / matmul GFLOP/s
   (target >= 1/4), and the time to score every user of the medium world.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_store.store import Store  # noqa: E402
from frame_dist.config import ModelConfig, load_config  # noqa: E402
from frame_dist.model.frame import AGGREGATIONS, FRAME  # noqa: E402
from frame_dist.score.kernel import FusedScorer, fuse_tables  # noqa: E402
from frame_dist.score.pipeline import ScoringInputs, chunk_tables, run_scoring  # noqa: E402


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(n: int, repeat: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / best_time(lambda: a @ b, repeat) / 1e9


def synthesise(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    model = FRAME(2048, dim=args.dim, hidden=args.hidden, aggregation=args.aggregation).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    h_c = torch.randn(args.videos * args.clips, args.dim)  # (N N_c, d)
    h_u_pos = torch.relu(torch.randn(args.users, args.dim))  # (M, d)
    h_u_neg = torch.relu(torch.randn(args.users, args.dim))
    rng = np.random.default_rng(args.seed)
    seen_videos = np.stack([rng.choice(args.videos, args.seen, replace=False)
                            for _ in range(args.users)])  # (M, seen) training videos
    seen = sp.csr_matrix((np.ones(seen_videos.size, bool),
                          (np.repeat(np.arange(args.users), args.seen), seen_videos.ravel())),
                         shape=(args.users, args.videos))
    return model, h_c, h_u_pos, h_u_neg, seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--videos", type=int, default=400)
    p.add_argument("--clips", type=int, default=4, help="N_c")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--aggregation", default=ModelConfig().aggregation, choices=AGGREGATIONS,
                   help="the model's video score from its clip scores (default: the config's)")
    p.add_argument("--seen", type=int, default=40, help="training videos per user (excluded)")
    p.add_argument("--threads", type=int, default=1, help="torch threads / Ray CPUs")
    p.add_argument("--users-per-chunk", type=int, default=500)
    p.add_argument("--naive-pairs", type=int, default=2000)
    p.add_argument("--block-users", type=int, default=500,
                   help="users scored by score_block (timing and the parity reference)")
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--skip-compiled", action="store_true")
    p.add_argument("--skip-job", action="store_true")
    p.add_argument("--job-kernel", default="auto", choices=["auto", "eager", "compiled"],
                   help="the job's kernel (auto: what the job picks for this size)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n_c, h = args.clips, args.hidden
    pairs = args.users * args.videos
    flops_per_pair = 8 * n_c * h
    print(f"shapes: {args.users} users x {args.videos} videos = {pairs:,} pairs, N_c={n_c}, "
          f"d={args.dim}, H={h}, top-{args.top_k}, {args.seen} seen videos per user excluded; "
          f"aggregation {args.aggregation}; "
          f"{args.threads} thread(s); embeddings synthesised (no medium store)")
    print(f"FLOP model: 8 N_c H = {flops_per_pair:,} FLOPs per (user, video) pair")

    bound = [matmul_gflops(args.matmul_n, args.repeat)]
    print(f"matmul {args.matmul_n}^3 float32: {bound[0]:.1f} GFLOP/s")
    model, h_c, h_u_pos, h_u_neg, seen = synthesise(args)
    with torch.inference_mode():
        tables = fuse_tables(model, h_c, h_u_pos, h_u_neg, n_c)
    seen_coo = seen.tocoo()
    seen_t = (torch.from_numpy(seen_coo.row.astype(np.int64)),
              torch.from_numpy(seen_coo.col.astype(np.int64)))
    rows: list[tuple[str, float, str]] = []  # (what, pairs/s, note)

    # --- 1. the model's own forward
    naive = None
    with torch.inference_mode():
        if not args.skip_naive:
            rng = np.random.default_rng(1)
            us = torch.from_numpy(rng.integers(0, args.users, args.naive_pairs))
            vs = torch.from_numpy(rng.integers(0, args.videos, args.naive_pairs))

            def per_pair() -> None:
                for i in range(args.naive_pairs):  # the baseline: one forward call per pair
                    model.video_scores(us[i:i + 1], vs[i:i + 1], h_c, h_u_pos, h_u_neg, n_c)

            naive = args.naive_pairs / best_time(per_pair, 1)
            rows.append(("model forward, one pair per call", naive, ""))
        h_c_video = h_c.view(args.videos, n_c, args.dim)
        bu, sample = 64, min(args.users, args.block_users)
        expected = torch.empty(sample, args.videos)  # (sample, N) the reference scores

        def model_blocks() -> None:
            for i in range(0, sample, bu):
                j = min(i + bu, sample)
                expected[i:j] = model.score_block(h_u_pos[i:j], h_u_neg[i:j], h_c_video)

        t_block = best_time(model_blocks, 1)
        rows.append(("model score_block, 64-user blocks", sample * args.videos / t_block,
                     f"first {sample} users"))

        # --- 2. the fused kernel, whole per-chunk work (scores, exclusion, running top-k)
        def fused(kernel: str) -> tuple[float, float, float]:
            t0 = time.perf_counter()
            scorer = FusedScorer(tables.clip_thresholds, tables.out_weight, tables.out_bias,
                                 aggregation=tables.aggregation, kernel=kernel)
            scorer.scores(tables.user_table[:64])  # compiles, for "compiled"
            setup = time.perf_counter() - t0
            if scorer.kernel != kernel:
                raise RuntimeError(f"the {kernel} kernel fell back to {scorer.kernel}")
            err = float((scorer.scores(tables.user_table[:sample]) - expected).abs().max())
            t = best_time(lambda: scorer.top_k(tables.user_table, args.top_k, seen_t),
                          args.repeat)
            return t, setup, err

        results = {}
        for kernel in ("eager", "compiled"):
            if kernel == "compiled" and args.skip_compiled:
                continue
            t, setup, err = fused(kernel)
            results[kernel] = t
            note = (f"max |diff| vs score_block {err:.1e} ({sample} users)"
                    + (f", compile {setup:.1f}s" if kernel == "compiled" else ""))
            rows.append((f"fused kernel ({kernel}), top-{args.top_k}", pairs / t, note))
    bound.append(matmul_gflops(args.matmul_n, args.repeat))

    # --- 3. the whole job's Ray Data part
    job_time = None
    if not args.skip_job:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(None, [f"store.root={tmp}/store", f"score.top_k={args.top_k}",
                                     f"score.users_per_chunk={args.users_per_chunk}",
                                     f"score.kernel={args.job_kernel}",
                                     f"score.actors={args.threads}"])
            chunks = chunk_tables([f"u{i:06d}" for i in range(args.users)],
                                  tables.user_table.numpy(), (seen_coo.row, seen_coo.col),
                                  args.users_per_chunk)  # the rows shard tasks would yield
            inputs = ScoringInputs(
                tables, pa.array([f"v{i:06d}" for i in range(args.videos)]),
                [ray.put(chunk) for chunk in chunks], identity={"benchmark": True},
                n_users=args.users, cold_users=0,
                n_chunks=math.ceil(args.users / args.users_per_chunk))
            summary = run_scoring(cfg, Store(cfg.store.root), inputs=inputs)
        ray.shutdown()
        job_time = summary.seconds
        rows.append((f"whole job, Ray Data ({summary.actors} actor(s), {summary.kernel})",
                     pairs / job_time, f"{summary.chunks} chunks; Ray start-up "
                                       f"{ray_start:.1f}s not counted"))

    # --- 4. ratios
    best_bound = max(bound)
    print(f"matmul bound: {best_bound:.1f} GFLOP/s (runs: "
          + ", ".join(f"{b:.1f}" for b in bound) + ")\n")
    print(f"| {'what':<44} | {'pairs/s':>12} | {'GFLOP/s':>8} | {'/ naive':>8} | "
          f"{'/ bound':>7} | note")
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 9}|------")
    for what, rate, note in rows:
        gflops = rate * flops_per_pair / 1e9
        vs_naive = f"{rate / naive:.0f}x" if naive else "-"
        print(f"| {what:<44} | {rate:>12,.0f} | {gflops:>8.2f} | {vs_naive:>8} | "
              f"{gflops / best_bound:>7.3f} | {note}")
    print()
    for kernel, t in results.items():
        print(f"all {args.users} users x {args.videos} videos with the {kernel} kernel: "
              f"{t:.2f}s on {args.threads} thread(s)")
    if job_time is not None:
        print(f"all users through the whole job's Ray Data part: {job_time:.1f}s")
    best = min(results.values())
    rate = pairs / best
    print("\ntargets: kernel >= 50x the naive per-pair forward: "
          + (f"{rate / naive:.0f}x" if naive else "not measured")
          + f"; kernel >= 1/4 of the matmul bound: {rate * flops_per_pair / 1e9 / best_bound:.2f}")


if __name__ == "__main__":
    main()
