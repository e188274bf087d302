"""Propagation benchmark: FRAME's 2-hop dual GCN against the bare sparse products it is made of.

Not a test: run it standalone and read the table.

    python benchmarks/propagation.py                       # ~1M positive edges, N_c sweep 4,8,16
    python benchmarks/propagation.py --users 40000 --videos 10000 --sweep 4,8,16,32 --steps 10

Part 1 (N_c = --clips): one forward+backward of the model's propagation (eqs. 7-10 from a
given H_c^(0)), of the whole embedding pass (input FC + W_t + propagation), and of one training
step (restricted clip side, MLPs, hybrid loss, Adam), each next to the 8 sparse products the
propagation needs (R~ X and R~^T H for both graphs, forward, plus their transposed products in the
backward pass) timed alone in torch and in SciPy on the same matrices; ratios are printed. The
embedding pass and the training step are timed again under bf16 autocast on the CPU
(``train.precision=bf16``: dense layers in bf16, the sparse products still fp32), against the
same fp32 sparse products.

Part 2: for each N_c of --sweep, in a fresh subprocess (so peak RSS is per setting), build the
graph and clip features, run --steps training steps and report the mean step time, the
estimated epoch time (steps per epoch x mean step) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.score_driver_memory import own_peak_bytes  # noqa: E402
from frame_dist.graph.clip_graph import build_graph, clip_labels, to_torch  # noqa: E402
from frame_dist.model.frame import FRAME  # noqa: E402
from frame_dist.model.loss import FRAMETrainTask, HybridLoss, InteractionBatch  # noqa: E402
from frame_dist.train.loop import torch_step  # noqa: E402
from frame_dist.train.trainer import autocast_for, cpu_has_bf16  # noqa: E402


def synthetic(users: int, videos: int, per_user: int, full_rate: float, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interactions with a long-tailed video popularity; ``full_rate`` of them full watches."""
    rng = np.random.default_rng(seed)
    n = users * per_user
    popularity = 1.0 / (np.arange(videos) + 10.0) ** 0.8
    u = np.repeat(np.arange(users), per_user)
    v = rng.choice(videos, n, p=popularity / popularity.sum())
    full = rng.random(n) < full_rate
    r = np.where(full, 1.0, rng.random(n) * 0.98)
    return u, v, r, full


def median_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (allocations, lazy initialisation)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def setup(args: argparse.Namespace, n_clips: int):
    u, v, r, full = synthetic(args.users, args.videos, args.per_user, args.full_rate, args.seed)
    start = time.perf_counter()
    graph = build_graph(u, v, r, full, n_users=args.users, n_videos=args.videos,
                        n_clips=n_clips)
    build_s = time.perf_counter() - start
    pg = to_torch(graph)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.videos * n_clips, args.features, generator=gen)  # (C, F)
    watched = clip_labels(r, full, n_clips)
    return graph, pg, x, (u, v, watched), build_s


def part_one(args: argparse.Namespace) -> None:
    n_c, d = args.clips, args.dim
    graph, pg, x, (u, v, watched), build_s = setup(args, n_c)
    m, c = graph.pos.shape
    print(f"graph: M={m} users, C={c} clips (N={args.videos}, N_c={n_c}), "
          f"nnz R^p={graph.pos.nnz:,}, nnz R^n={graph.neg.nnz:,}, {len(u):,} interactions, "
          f"built in {build_s:.2f}s; d={d}, F={args.features}, torch threads="
          f"{torch.get_num_threads()}")

    gen = torch.Generator().manual_seed(1)
    xc = torch.randn(c, d, generator=gen)  # (C, d)
    xu = torch.randn(m, d, generator=gen)  # (M, d)
    adj = [pg.pos, pg.neg]

    def torch_spmm() -> None:
        for a in adj:  # forward: users <- clips, clips <- users; backward: the transposes
            torch.sparse.mm(a.matrix, xc)
            torch.sparse.mm(a.transpose, xu)
            torch.sparse.mm(a.transpose, xu)
            torch.sparse.mm(a.matrix, xc)

    mats = [(graph.pos_norm, sp.csr_matrix(graph.pos_norm.T)),
            (graph.neg_norm, sp.csr_matrix(graph.neg_norm.T))]
    xc_np, xu_np = xc.numpy(), xu.numpy()

    def scipy_spmm() -> None:
        for a, at in mats:
            a @ xc_np
            at @ xu_np
            at @ xu_np
            a @ xc_np

    torch.manual_seed(0)
    model = FRAME(args.features, dim=d, hidden=args.hidden)
    h_c0 = torch.randn(c, d, generator=gen, requires_grad=True)

    def propagation() -> None:
        h_c, h_u_pos, h_u_neg = model.propagate(h_c0, pg)
        (h_c.sum() + h_u_pos.sum() + h_u_neg.sum()).backward()

    def embeddings() -> None:
        h_c, h_u_pos, h_u_neg = model.embeddings(x, pg)
        (h_c.sum() + h_u_pos.sum() + h_u_neg.sum()).backward()

    task = FRAMETrainTask(model, HybridLoss(), x, pg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def batch() -> InteractionBatch:
        idx = torch.from_numpy(rng.choice(len(u), args.batch, replace=False))
        return InteractionBatch(torch.from_numpy(u)[idx], torch.from_numpy(v)[idx],
                                torch.from_numpy(watched)[idx])

    step = torch_step(task, opt)  # the trainers' step (fp32)

    def train_step() -> None:
        step(batch())

    bf16 = autocast_for("cpu", "bf16")  # train.precision=bf16; backward outside, as trainers do
    step_bf16 = torch_step(task, opt, bf16)

    def embeddings_bf16() -> None:
        with bf16:
            h_c, h_u_pos, h_u_neg = model.embeddings(x, pg)
            total = h_c.float().sum() + h_u_pos.float().sum() + h_u_neg.float().sum()
        total.backward()

    def train_step_bf16() -> None:
        step_bf16(batch())

    def full_clip_side_step() -> None:
        # the same step without restricting the clip side: every clip propagated (eq. 8 on C)
        opt.zero_grad(set_to_none=True)
        b = batch()
        h_c, h_u_pos, h_u_neg = model.embeddings(x, pg)
        y = model.video_scores(b.users, b.videos, h_c, h_u_pos, h_u_neg, n_c)
        y.sum().backward()
        opt.step()

    rows = [("8 SpMMs, torch CSR (baseline)", torch_spmm),
            ("8 SpMMs, SciPy CSR", scipy_spmm),
            ("propagation fwd+bwd (eqs. 7-10)", propagation),
            ("embeddings fwd+bwd (FC + W_t + eqs. 7-10)", embeddings),
            (f"train step, batch {args.batch}, restricted clip side", train_step),
            (f"train step, batch {args.batch}, all C clips", full_clip_side_step),
            ("embeddings fwd+bwd, bf16 autocast", embeddings_bf16),
            (f"train step, batch {args.batch}, restricted, bf16 autocast", train_step_bf16)]
    results = [(name, median_time(fn, args.repeat)) for name, fn in rows]
    base = results[0][1]
    print(f"\n{'what':<52}{'seconds':>10}{'x torch SpMMs':>16}")
    for name, t in results:
        print(f"{name:<52}{t:>10.4f}{t / base:>16.2f}")
    prop = results[2][1]
    print(f"\npropagation / sparse matmuls = {prop / base:.2f} (target <= 3)")
    print(f"training step / sparse matmuls = {results[4][1] / base:.2f} fp32, "
          f"{results[7][1] / base:.2f} bf16 autocast (target <= 3)")
    flops = 2.0 * c * args.features * d
    print(f"input FC alone: {flops / 1e9:.1f} GFLOP forward per step (C x F x d), the same again "
          "for its weight gradient")
    if not cpu_has_bf16():
        print("this CPU has no AVX512-BF16 / AMX-BF16: the bf16 rows run emulated")


def child(args: argparse.Namespace) -> None:
    """One sweep point; prints one JSON line."""
    n_c = args.child
    graph, pg, x, (u, v, watched), build_s = setup(args, n_c)
    torch.manual_seed(0)
    model = FRAME(args.features, dim=args.dim, hidden=args.hidden)
    task = FRAMETrainTask(model, HybridLoss(), x, pg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(len(u))
    ut, vt, wt = (torch.from_numpy(a) for a in (u, v, watched))
    train_step = torch_step(task, opt)  # the trainers' step
    times = []
    for step in range(args.steps + 1):
        idx = torch.from_numpy(order[step * args.batch:(step + 1) * args.batch])
        start = time.perf_counter()
        stats = train_step(InteractionBatch(ut[idx], vt[idx], wt[idx]))
        if step:  # step 0 is warm-up
            times.append(time.perf_counter() - start)
    steps_per_epoch = -(-len(u) // args.batch)
    print(json.dumps(dict(n_clips=n_c, C=graph.n_clips, nnz_pos=int(graph.pos.nnz),
                          nnz_neg=int(graph.neg.nnz), build_s=build_s,
                          step_s=float(np.mean(times)), steps_per_epoch=steps_per_epoch,
                          epoch_s=float(np.mean(times)) * steps_per_epoch,
                          peak_rss_mib=own_peak_bytes() / 2**20,  # VmHWM: not the parent's
                          loss=float(stats["loss"]))))


def sweep(args: argparse.Namespace) -> None:
    print(f"\nN_c sweep: {args.steps} training steps of batch {args.batch} each, fresh process "
          "per setting")
    print(f"{'N_c':>4}{'C':>9}{'nnz R^p':>12}{'nnz R^n':>10}{'graph s':>9}{'step s':>9}"
          f"{'epoch s (est.)':>16}{'peak RSS MiB':>14}")
    for n_c in [int(s) for s in args.sweep.split(",") if s]:
        cmd = [sys.executable, __file__, "--child", str(n_c)] + [
            f"--{k.replace('_', '-')}={val}" for k, val in vars(args).items()
            if k not in ("child", "sweep") and val is not None]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{n_c:>4}  failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n_c:>4}{res['C']:>9}{res['nnz_pos']:>12,}{res['nnz_neg']:>10,}"
              f"{res['build_s']:>9.2f}{res['step_s']:>9.3f}{res['epoch_s']:>16.0f}"
              f"{res['peak_rss_mib']:>14.0f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=20000)
    p.add_argument("--videos", type=int, default=5000)
    p.add_argument("--per-user", type=int, default=44, help="interactions per user")
    p.add_argument("--full-rate", type=float, default=0.3, help="fraction of full watches")
    p.add_argument("--clips", type=int, default=4, help="N_c of part 1")
    p.add_argument("--sweep", default="4,8,16", help="N_c values of part 2 ('' to skip)")
    p.add_argument("--steps", type=int, default=5, help="training steps per sweep point")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions in part 1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        child(args)
        return
    part_one(args)
    if args.sweep:
        sweep(args)


if __name__ == "__main__":
    main()
