"""Training step cost against the catalogue: precomputed R~ X (FrozenClipInputs) vs the FC over
every clip, side by side in one run.

    .venv/bin/python -m benchmarks.step_cost                  # ~3 minutes on 2 cores
    .venv/bin/python -m benchmarks.step_cost --parts shape --steps 20

Not a test: read the table. frame-dist's default model (``model.preset=frame-dist``: survival
aggregation, watched-clip positives, user-mean normalisation), F = 2048, batches of 1024, plain
torch Adam (the single-process trainer's step). Two copies of the same initial model step on
the same batches, alternately, so load drift on a shared machine hits both alike:

* ``dense``: H_c^(0) = W_t (W_fc X + b) for all C clips every step (the path before
  FrozenClipInputs; still the one for trainable clip features and free clip tables);
* ``frozen``: the FC on R~ X (M x F, precomputed once) and on the batch's clips only.

Parts (``--parts``):

* ``shape``: the world of the issue that compared frame-dist with the authors' public code
  (1,500 users, 2,000 videos, 25 views per user, ~37,500 training rows, N_c = 4): median step
  of each path, their ratio, and the authors' 0.98 s per 1024-row batch on this machine as
  the issue measured it (their code is not part of this repository).
* ``catalogue``: the same users and interactions with 4x the videos, (a) the 3N new videos
  cold (no interaction: a catalogue that grew), (b) the same number of interactions spread over
  4N videos (more distinct videos per batch): step of each path against the N-video world.
* ``clips``: N_c = 4, 16, 64 (frame grid G = 64 allows N_c = 64), one fresh process each for
  its peak RSS: the frozen step, the distinct clips per batch, and the arithmetic share of each
  term of the step (FC on users' sums, FC on the batch's clips, sparse products, MLPs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.propagation import synthetic  # noqa: E402
from benchmarks.score_driver_memory import own_peak_bytes  # noqa: E402
from frame_dist.config import ModelConfig, TrainConfig  # noqa: E402
from frame_dist.graph.clip_graph import build_graph, clip_labels, to_torch  # noqa: E402
from frame_dist.model.clip_inputs import FrozenClipInputs  # noqa: E402
from frame_dist.model.loss import FRAMETrainTask, InteractionBatch  # noqa: E402
from frame_dist.train.loop import torch_step  # noqa: E402
from frame_dist.train.trainer import (  # noqa: E402
    autocast_for,
    build_loss,
    build_model,
    cpu_has_bf16,
)

AUTHORS_STEP_S = 0.98  # the authors' code, 1024-row batch, this machine (issue 14's measurement)


def world(users: int, videos: int, per_user: int, n_c: int, features: int, seed: int,
          catalogue: int | None = None):
    """Graph, clip features and training arrays; ``catalogue`` > videos adds cold videos."""
    u, v, r, full = synthetic(users, videos, per_user, 0.35, seed)
    n_videos = catalogue or videos
    graph = build_graph(u, v, r, full, n_users=users, n_videos=n_videos, n_clips=n_c,
                        positives="watched_clips", normalisation="user_mean")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_videos * n_c, features, generator=gen)
    return to_torch(graph), x, (u, v, clip_labels(r, full, n_c))


def _task(x, pg, frozen: bool, features: int, seed: int = 0, precision: str = "fp32"):
    model = build_model(ModelConfig(), features, seed=seed)
    inputs = FrozenClipInputs.build(x, pg) if frozen else x
    task = FRAMETrainTask(model, build_loss(TrainConfig(), True), inputs, pg)
    return model, torch_step(task, torch.optim.Adam(model.parameters(), lr=1e-3),
                             autocast_for("cpu", precision))


def side_by_side(pg, x, arrays, steps: int, batch: int, features: int,
                 precision: str = "fp32") -> dict[str, float]:
    """Median step (s) of the dense and the frozen path, alternating on the same batches."""
    start = time.perf_counter()
    _, frozen_step = _task(x, pg, True, features, precision=precision)
    precompute_s = time.perf_counter() - start
    _, dense_step = _task(x, pg, False, features, precision=precision)
    u, v, w = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in arrays)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(u)))
    times: dict[str, list[float]] = {"dense": [], "frozen": []}
    distinct = []
    for i in range(steps + 1):  # step 0: warm-up
        idx = order[(i * batch) % len(u):][:batch]
        b = InteractionBatch(u[idx], v[idx], w[idx])
        distinct.append(len(torch.unique(v[idx])))
        for name, step in (("dense", dense_step), ("frozen", frozen_step)) if i % 2 else (
                ("frozen", frozen_step), ("dense", dense_step)):
            t = time.perf_counter()
            step(b)
            if i:
                times[name].append(time.perf_counter() - t)
    return {"dense": float(np.median(times["dense"])), "frozen": float(np.median(times["frozen"])),
            "precompute_s": precompute_s, "videos_per_batch": float(np.mean(distinct))}


def part_shape(args) -> None:
    print(f"\n[shape] 1,500 users, 2,000 videos, 37,500 rows, N_c=4, batch {args.batch}, "
          f"{args.steps} steps each (median); the authors' code: {AUTHORS_STEP_S} s per batch "
          "(F = 128 clip features)")
    print(f"  {'setting':<28}{'dense s':>9}{'frozen s':>10}{'dense/frozen':>14}"
          f"{'authors/frozen':>16}{'R~X build s':>13}")
    settings = [(args.features, "fp32"), (args.features, "bf16"), (128, "fp32")]
    for features, precision in settings:
        if precision == "bf16" and not cpu_has_bf16():
            continue
        pg, x, arrays = world(1500, 2000, 25, 4, features, args.seed)
        r = side_by_side(pg, x, arrays, args.steps, args.batch, features, precision)
        print(f"  {f'F={features}, {precision}':<28}{r['dense']:>9.4f}{r['frozen']:>10.4f}"
              f"{r['dense'] / r['frozen']:>13.2f}x{AUTHORS_STEP_S / r['frozen']:>15.1f}x"
              f"{r['precompute_s']:>13.2f}")
    print(f"  batch: ~{r['videos_per_batch'] * 4:,.0f} distinct clips of {pg.n_clips:,}; target: "
          "the default model (F = 2048, fp32) <= 0.05 s, 20x the authors'")


def part_catalogue(args) -> None:
    n = args.videos
    print(f"\n[catalogue] {args.users:,} users x {args.per_user} views, N_c=4: N = {n:,} videos "
          f"against 4N, median of {args.steps} steps each")
    base = side_by_side(*world(args.users, n, args.per_user, 4, args.features, args.seed),
                        args.steps, args.batch, args.features)
    cold = side_by_side(*world(args.users, n, args.per_user, 4, args.features, args.seed,
                               catalogue=4 * n), args.steps, args.batch, args.features)
    spread = side_by_side(*world(args.users, 4 * n, args.per_user, 4, args.features,
                                 args.seed), args.steps, args.batch, args.features)
    print(f"  {'world':<40}{'dense s':>9}{'frozen s':>10}{'videos/batch':>14}")
    for name, r in (("N videos", base), ("4N videos, 3N of them cold", cold),
                    ("4N videos, interactions spread over 4N", spread)):
        print(f"  {name:<40}{r['dense']:>9.4f}{r['frozen']:>10.4f}"
              f"{r['videos_per_batch']:>14.0f}")
    for name, r in (("cold", cold), ("spread", spread)):
        print(f"  4N {name} / N: dense {r['dense'] / base['dense']:.2f}x, frozen "
              f"{r['frozen'] / base['frozen']:.2f}x (target <= 1.2x)")


def child(args) -> None:
    """One N_c of the clips part, in its own process; prints one JSON line."""
    n_c = args.child
    pg, x, arrays = world(args.users, args.videos, args.per_user, n_c, args.features, args.seed)
    model, step = _task(x, pg, True, args.features)  # the features stay resident
    u, v, w = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in arrays)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(u)))
    times, clips = [], []
    for i in range(args.steps + 1):
        idx = order[(i * args.batch) % len(u):][:args.batch]
        clips.append(len(torch.unique(v[idx])) * n_c)
        t = time.perf_counter()
        step(InteractionBatch(u[idx], v[idx], w[idx]))
        if i:
            times.append(time.perf_counter() - t)
    m, f, d, h = pg.n_users, args.features, model.dim, model.hidden
    nnz = pg.pos.nnz + pg.neg.nnz
    u_clips = float(np.mean(clips))
    b = args.batch
    flops = {  # multiply-adds x 2, forward + backward (x3: forward, weight and input grads)
        "FC on users' R~X": 2 * 2 * m * f * d * 2,  # pos and neg; no input gradient
        "FC on batch clips": 2 * u_clips * f * d * 2,
        "sparse products": 2 * nnz * d * 3 * 2,
        "d x d layers": 2 * (4 * m + 2 * u_clips) * d * d * 3,
        # per side: user halves (B), clip halves once per distinct clip (U), ReLU + output
        # layer per (pair, clip), and the watched-mean score (B x 2d x hidden)
        "MLPs": 2 * 2 * ((b + u_clips) * d * h + b * n_c * h + b * 2 * d * h) * 3,
    }
    total = sum(flops.values())
    print(json.dumps(dict(n_c=n_c, C=pg.n_clips, step_s=float(np.median(times)),
                          batch_clips=u_clips,
                          peak_rss_mib=own_peak_bytes() / 2**20,  # VmHWM: not the parent's
                          shares={k: v / total for k, v in flops.items()})))


def part_clips(args) -> None:
    print(f"\n[clips] frozen path, {args.users:,} users, {args.videos:,} videos, one process per "
          f"N_c, median of {args.steps} steps")
    rows = []
    for n_c in (4, 16, 64):
        cmd = [sys.executable, "-m", "benchmarks.step_cost", "--child", str(n_c)] + [
            f"--{k.replace('_', '-')}={val}" for k, val in vars(args).items()
            if k not in ("child", "parts") and val is not None]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode:
            print(f"  N_c={n_c} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows:
        return
    names = list(rows[0]["shares"])
    print(f"  {'N_c':>4}{'C':>9}{'batch clips':>13}{'step s':>9}{'peak RSS MiB':>14}  "
          + "  ".join(f"{n}" for n in names))
    for r in rows:
        print(f"  {r['n_c']:>4}{r['C']:>9,}{r['batch_clips']:>13,.0f}{r['step_s']:>9.3f}"
              f"{r['peak_rss_mib']:>14,.0f}  "
              + "  ".join(f"{100 * r['shares'][n]:>{len(n)}.0f}%" for n in names))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="shape,catalogue,clips")
    p.add_argument("--users", type=int, default=1500, help="users of the catalogue/clips parts")
    p.add_argument("--videos", type=int, default=2000)
    p.add_argument("--per-user", type=int, default=25)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    parts = {"shape": part_shape, "catalogue": part_catalogue, "clips": part_clips}
    for name in args.parts.split(","):
        parts[name](args)


if __name__ == "__main__":
    main()
