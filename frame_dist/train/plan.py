"""Plan before running: memory per training worker and bytes per step, from data statistics.

Pure computation (numpy, no Ray, no torch): :func:`read_data_stats` reads what it needs from the
store (the interactions' ``video_id``, ``split``, ``watch_ratio``, ``full_watch`` and ``user_id``
columns, streamed, plus manifests), :func:`plan_training` turns statistics and the config into a
:class:`Plan`, and :func:`check_plan` refuses a plan that exceeds its budget with a message that
names the numbers and what to change. ``jobs.plan`` prints a plan; ``jobs.train`` refuses an
impossible setting with it before any cluster time is spent.

What one worker holds (``frame_dist.train.ray_loop``): its shards' rows of R~^p and R~^n (stored
scipy CSR, then torch CSR and the transpose), its users' interactions, the clip features of its
own videos (C_w x F float32), the model, its gradients and Adam states (ZeRO partitions them),
and for one step the activations of eqs. 1-16 over its C_w local clips, M_w local users, the
|U| clips of the global batch and its B_w pairs; after every epoch it scores its whole
validation (and at the end test) split at once. The model of each term is in docs/training.md
("Planner"); every byte count below names the tensors it stands for.

Edges of a graph that has not been built yet come from the watch-ratio histogram: per training
interaction R^p gets N_c edges for a full watch (``positives="full_watch"``) or ``watched`` edges
(``"watched_clips"``), R^n one edge when it is not a full watch (``frame_dist.graph.clip_graph``);
repeated
(user, video) pairs collapse in the real graph, so these counts are upper bounds. With a
committed graph of the same N_c (what training loads) its exact per-shard sizes are used.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.special import gammaln

from feature_store.frames import FRAME_FEATURES, PREFETCH_PARTS, committed_video_ids
from feature_store.schemas import FEATURE_DIM
from feature_store.store import Store, StoreError
from frame_dist.config import Config, bf16_activations
from frame_dist.graph.manifest import GraphManifest, ManifestError
from frame_dist.graph.shards import read_graph_manifest

MIB = 2**20
GIB = 2**30

# Peak RSS of a Ray Train worker that imports what frame_dist.train.ray_loop imports (torch, Ray
# Train, DeepSpeed, pyarrow, scipy), joins a gloo group, wraps a 4 x 4 nn.Linear in a DeepSpeed
# engine (ZeRO 0) and runs one step: 910 MiB, measured once with
# ``python -m benchmarks.plan_accuracy --baseline`` (torch 2.14.1, Ray 2.60, DeepSpeed 0.19, CPU,
# Linux x86_64; W = 1 and W = 2 gave 910 and 911 MiB). Re-measure after upgrading those.
WORKER_BASELINE_BYTES = 910 * MIB
# Extra RSS of a DeepSpeed ZeRO stage 1 or 2 engine over stage 0 (its partitioned optimizer and
# communication code paths), same measurement (956 MiB with ZeRO 2, W = 1 and 2): 46 MiB.
ZERO_OVERHEAD_BYTES = 46 * MIB
# DeepSpeed's default ZeRO reduce bucket (elements); jobs do not change it. On a GPU the caching
# allocator holds the whole bucket; on CPU only the pages the gradients touch become resident.
ZERO_REDUCE_BUCKET = 500_000_000
# GPU memory a CUDA context, cuBLAS and cuSPARSE workspaces take before any tensor (not measured
# here: no GPU was available; the usual figure for a recent GPU and CUDA 12).
CUDA_CONTEXT_BYTES = 512 * MIB


class PlanError(RuntimeError):
    """The estimated memory per worker exceeds the budget (the message names the numbers)."""


# --------------------------------------------------------------------------- data statistics


@dataclass
class DataStats:
    """What the planner needs to know about the data, whatever N_c or the number of workers.

    ``skip_hist`` counts the training interactions that are not full watches by
    ``k = floor(r * R)`` (clamped to [0, R - 1], R = ``len(skip_hist)``, the frame grid G): for any
    N_c dividing R the skip clip of such an interaction is ``k // (R / N_c)``, which is
    ``frame_dist.graph.clip_graph.clip_labels``' floor(r * N_c).
    """

    n_users: int  # M: users with an interaction on a video of the graph
    n_videos: int  # N: videos of the graph (with committed frame features)
    n_train: int  # training interactions (N_train)
    n_valid: int
    n_test: int
    n_full_train: int  # training interactions that are full watches
    skip_hist: np.ndarray  # (R,) non-full training interactions by floor(r * R)
    video_train: np.ndarray  # (N,) training interactions per video (popularity)
    video_rows: np.ndarray  # (N,) interactions of any split per video
    n_features: int = FEATURE_DIM  # F: size of a clip feature
    feature_part_rows: int = 0  # rows (videos x G) of the largest frame-features part file

    @property
    def n_rows(self) -> int:
        return self.n_train + self.n_valid + self.n_test

    @property
    def n_active_videos(self) -> int:
        """Videos with an interaction of any split (the others are in no worker's graph)."""
        return int(np.count_nonzero(self.video_rows))

    @property
    def full_watch_fraction(self) -> float:
        return self.n_full_train / max(self.n_train, 1)


def expected_edges(stats: DataStats, n_clips: int, positives: str = "full_watch"
                   ) -> tuple[int, int]:
    """(edges of R^p, edges of R^n) the training interactions give for N_c (upper bounds).

    R^p: N_c per full watch, plus ``watched = floor(r N_c)`` per other interaction when
    ``positives="watched_clips"``; R^n: one per interaction that is not a full watch.
    """
    resolution = len(stats.skip_hist)
    if n_clips <= 0 or resolution % n_clips:
        raise PlanError(f"N_c={n_clips} does not divide the watch-ratio resolution "
                        f"{resolution} (the frame grid G): choose N_c among its divisors")
    watched = np.arange(resolution) // (resolution // n_clips)  # (R,) skip clip of each bin
    pos = stats.n_full_train * n_clips
    if positives == "watched_clips":
        pos += int((watched * stats.skip_hist).sum())
    return int(pos), int(stats.n_train - stats.n_full_train)


def expected_distinct(counts: np.ndarray, total: int, draws: int) -> float:
    """E[distinct items] in ``draws`` rows drawn without replacement from ``total`` rows, item i
    owning ``counts[i]`` of them: sum_i 1 - C(total - n_i, draws) / C(total, draws)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts > 0]
    draws = min(int(draws), int(total))
    if draws <= 0 or counts.size == 0:
        return 0.0
    rest = total - counts  # rows that are not item i
    absent = np.zeros_like(rest)
    ok = rest >= draws
    absent[ok] = np.exp(gammaln(rest[ok] + 1) - gammaln(rest[ok] - draws + 1)
                        - gammaln(total + 1) + gammaln(total - draws + 1))
    return float((1.0 - absent).sum())


def read_data_stats(store: Store, cfg: Config, batch_rows: int = 1 << 20) -> DataStats:
    """Statistics of the committed interactions, streamed ``batch_rows`` rows at a time.

    Only interactions on videos with committed frame features count (the graph stage drops the
    others); before extraction every video of the ``videos`` table counts. Memory: one batch plus
    O(users + videos).
    """
    missing = [t for t in ("videos", "interactions") if not store.table(t).exists()]
    if missing:
        raise PlanError(f"no committed {' / '.join(missing)} table in {store.uri('tables')}: the "
                        "plan reads the data's statistics; run jobs.ingest (or the pipeline) "
                        "first")
    featured = sorted(committed_video_ids(store))
    if featured:
        video_ids = pa.array(featured, pa.string())
    else:
        video_ids = pc.unique(store.table("videos").read(columns=["video_id"])["video_id"])
        video_ids = video_ids.combine_chunks() if isinstance(video_ids, pa.ChunkedArray) \
            else video_ids
    meta = store.table(FRAME_FEATURES).metadata()
    resolution = int(meta.get("grid_size", cfg.extract.grid_size))
    parts = store.table(FRAME_FEATURES).parts()
    part_rows = max((p.rows for p in parts), default=cfg.extract.videos_per_commit * resolution)

    n_videos = len(video_ids)
    video_train = np.zeros(n_videos, np.int64)
    video_rows = np.zeros(n_videos, np.int64)
    skip_hist = np.zeros(resolution, np.int64)
    counts = {"train": 0, "valid": 0, "test": 0}
    n_full = 0
    users: list[pa.Array] = []
    columns = ["user_id", "video_id", "watch_ratio", "full_watch", "split"]
    table = store.table("interactions")
    if not table.exists():
        raise StoreError(f"table 'interactions' has no committed data in "
                         f"{store.uri('tables', 'interactions')}: run the ingest stage first")
    for path in table.part_paths():
        with store.fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
                video = pc.index_in(batch["video_id"], value_set=video_ids)
                keep = video.is_valid()
                batch = batch.filter(keep)
                vidx = np.asarray(video.filter(keep), dtype=np.int64)
                split = np.asarray(batch["split"].to_numpy(zero_copy_only=False)).astype(str)
                ratio = batch["watch_ratio"].to_numpy(zero_copy_only=False).astype(np.float64)
                full = np.asarray(batch["full_watch"].to_numpy(zero_copy_only=False), bool)
                train = split == "train"
                for name in counts:
                    counts[name] += int((split == name).sum())
                video_rows += np.bincount(vidx, minlength=n_videos)
                video_train += np.bincount(vidx[train], minlength=n_videos)
                n_full += int((full & train).sum())
                skip = np.clip(np.floor(ratio[train & ~full] * resolution + 1e-9), 0,
                               resolution - 1).astype(np.int64)
                skip_hist += np.bincount(skip, minlength=resolution)
                users.append(pc.unique(batch["user_id"]))
    n_users = len(pc.unique(pa.chunked_array(users, pa.string()))) if users else 0
    return DataStats(n_users=n_users, n_videos=n_videos, n_train=counts["train"],
                     n_valid=counts["valid"], n_test=counts["test"], n_full_train=n_full,
                     skip_hist=skip_hist, video_train=video_train, video_rows=video_rows,
                     n_features=int(meta.get("dim", FEATURE_DIM)), feature_part_rows=part_rows)


# --------------------------------------------------------------------------- model size


def n_parameters(cfg: Config, n_features: int, n_clips_total: int) -> int:
    """Trainable parameters of FRAME (``frame_dist.model.frame``) for this config."""
    m, d, h = cfg.model, cfg.model.dim, cfg.model.hidden
    mlp = h * 2 * d + h + h + 1  # PreferenceMLP: (hidden, 2d) + bias, (1, hidden) + bias
    n = 2 * d * d + mlp + 2  # W_p^(1), W_p^(2), MLP^p, alpha_0 / alpha_1
    if m.use_negative:
        n += 2 * d * d + mlp  # W_n^(1), W_n^(2), MLP^n
    if m.enhance:
        n += d * d  # W_t
    if m.use_visual:
        n += n_features * d + d  # the input FC
        if m.trainable_clip_features:
            n += n_clips_total * n_features  # the (C, F) clip feature table
    else:
        n += n_clips_total * d  # free clip embeddings
    return n


# --------------------------------------------------------------------------- the plan


@dataclass
class Budget:
    """Memory one worker may use: host RAM and, on GPU, device memory (None: not checked)."""

    host_bytes: float | None
    device_bytes: float | None = None
    source: str = ""  # where the numbers come from, for messages


def machine_memory_bytes() -> int:
    """Physical memory of this machine, or the cgroup limit of this process when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def worker_budget(cfg: Config, device: str = "cpu", gpu_bytes: float | None = None,
                  cluster_memory: float | None = None) -> Budget:
    """The memory of one worker: ``plan.worker_memory_gb``, else ``cluster_memory`` (a connected
    Ray cluster's memory resource) / W, else this machine's memory / W; on GPU
    ``plan.gpu_memory_gb``, else ``gpu_bytes`` (the visible GPU's memory), else unknown."""
    w = cfg.train.workers
    if cfg.plan.worker_memory_gb > 0:
        host = cfg.plan.worker_memory_gb * GIB
        source = f"plan.worker_memory_gb={cfg.plan.worker_memory_gb:g}"
    elif cluster_memory:
        host = cluster_memory / w
        source = f"the Ray cluster's memory resource {cluster_memory / GIB:.1f} GiB / {w} worker(s)"
    else:
        total = machine_memory_bytes()
        host, source = total / w, f"this machine's {total / GIB:.1f} GiB / {w} worker(s)"
    device_bytes = None
    if device == "cuda":
        if cfg.plan.gpu_memory_gb > 0:
            device_bytes = cfg.plan.gpu_memory_gb * GIB
            source += f", plan.gpu_memory_gb={cfg.plan.gpu_memory_gb:g}"
        elif gpu_bytes:
            device_bytes = gpu_bytes
            source += f", the GPU's {gpu_bytes / GIB:.1f} GiB"
        else:
            source += ", GPU memory unknown (set plan.gpu_memory_gb to check it)"
    return Budget(host, device_bytes, source)


@dataclass
class Term:
    """One itemised piece of a worker's memory."""

    name: str
    nbytes: float
    where: str  # "host" or "device"
    formula: str  # what it counts, with the sizes


@dataclass
class WorkerShare:
    """The part of the data one worker holds (exact from a committed graph, else expected)."""

    rank: int
    shards: int  # shards this worker loads (k = rank mod W)
    users: float  # M_w
    videos: float  # V_w: videos its users interacted with (any split)
    nnz_pos: float
    nnz_neg: float
    train: float
    valid: float
    test: float


@dataclass
class Plan:
    """Memory per worker (itemised, for the worker that needs the most) and bytes per step."""

    n_clips: int
    workers: int
    n_shards: int  # the shard count planned with
    recommended_shards: int  # >= W, a multiple of W, one shard's graph <= plan.shard_fraction
    device: str  # "cpu" or "cuda"
    dtype: str  # activations: "fp32" or "bf16"
    zero_stage: int
    exact_shards: bool  # sizes from the committed graph's manifest (else expected)
    edges: tuple[int, int]  # (R^p, R^n) of the whole graph
    n_params: int
    batch_clips: float  # |U|: expected distinct clips of a global batch
    comm_bytes_per_step: float  # per worker, as metrics.json's propagation_bytes_per_step
    shard_graph_bytes: float  # graph terms of one shard (the shard-count rule)
    worker: WorkerShare  # the worker whose total is largest
    terms: list[Term]
    budget: Budget
    stats: DataStats = field(repr=False)

    def total(self, where: str = "host") -> float:
        return sum(t.nbytes for t in self.terms if t.where == where)

    @property
    def fits(self) -> bool:
        return not self.overruns()

    def overruns(self) -> list[str]:
        """'host' and/or 'device' when that total exceeds its budget."""
        out = []
        if self.budget.host_bytes is not None and self.total("host") > self.budget.host_bytes:
            out.append("host")
        if self.budget.device_bytes is not None and \
                self.total("device") > self.budget.device_bytes:
            out.append("device")
        return out

    def largest(self, where: str = "host", k: int = 3) -> list[Term]:
        return sorted((t for t in self.terms if t.where == where), key=lambda t: -t.nbytes)[:k]

    def summary(self) -> str:
        """One line: totals per worker against the budget, the largest terms."""
        parts = []
        for where in ("host", "device") if self.device == "cuda" else ("host",):
            limit = self.budget.host_bytes if where == "host" else self.budget.device_bytes
            top = ", ".join(f"{t.name} {t.nbytes / GIB:.2f}" for t in self.largest(where))
            parts.append(f"{self.total(where) / GIB:.2f} GiB {where}"
                         + (f" of {limit / GIB:.2f}" if limit is not None else "")
                         + f" ({top})")
        return (f"plan: N_c={self.n_clips}, W={self.workers}, {self.n_shards} shard(s): per "
                f"worker " + "; ".join(parts) + f"; {self.comm_bytes_per_step:,.0f} B per step")

    def table(self) -> str:
        """The plan as text: data, shares, itemised terms, totals against the budget."""
        s, w = self.stats, self.worker
        c_total = s.n_videos * self.n_clips
        lines = [
            f"plan: N_c={self.n_clips}, W={self.workers} worker(s), {self.n_shards} shard(s) "
            f"({'committed graph' if self.exact_shards else 'expected sizes'}), "
            f"{self.device} {self.dtype}, ZeRO {self.zero_stage}",
            f"data: {s.n_users:,} users, {s.n_videos:,} videos (C = {c_total:,} clips), "
            f"F = {s.n_features}; interactions train {s.n_train:,} / valid {s.n_valid:,} / "
            f"test {s.n_test:,}; full watches {s.full_watch_fraction:.1%} of train",
            f"edges R^p {self.edges[0]:,}, R^n {self.edges[1]:,}"
            f"{'' if self.exact_shards else ' (upper bounds: repeated pairs collapse)'}; "
            f"model {self.n_params:,} parameters",
            f"largest worker: rank {w.rank} with {w.shards} shard(s): {w.users:,.0f} users, "
            f"{w.videos:,.0f} videos, {w.nnz_pos + w.nnz_neg:,.0f} edges, {w.train:,.0f} "
            f"train / {w.valid:,.0f} valid / {w.test:,.0f} test rows",
            "",
            "| term | where | MiB | counts |",
            "|---|---|---:|---|",
        ]
        for t in self.terms:
            lines.append(f"| {t.name} | {t.where} | {t.nbytes / MIB:,.1f} | {t.formula} |")
        lines.append("")
        for where in ("host", "device"):
            if where == "device" and self.device != "cuda":
                continue
            limit = self.budget.host_bytes if where == "host" else self.budget.device_bytes
            verdict = "not checked (no budget known)" if limit is None else (
                f"of {limit / GIB:.2f} GiB: {'fits' if self.total(where) <= limit else 'TOO MUCH'}")
            lines.append(f"total {where}: {self.total(where) / GIB:.2f} GiB per worker {verdict}")
        lines.append(f"budget: {self.budget.source}")
        lines.append(f"shards: {self.recommended_shards} recommended (graph.n_shards; one "
                     f"shard's graph {self.shard_graph_bytes / MIB:,.1f} MiB at "
                     f"{self.n_shards} shard(s))")
        lines.append(f"communication per step and worker: {self.comm_bytes_per_step:,.0f} B "
                     f"(U = {self.batch_clips:,.0f} clips of the global batch)")
        return "\n".join(lines)


def plan_training(stats: DataStats, cfg: Config, budget: Budget, device: str = "cpu",
                  graph_manifest: GraphManifest | None = None) -> Plan:
    """Memory per worker of training ``cfg`` on data ``stats``.

    ``graph_manifest``: the committed graph for ``cfg.graph.n_clips``; when given (with at least
    W shards), its shard count and exact shard sizes are used (that is what training loads),
    else the shard count is max(``cfg.graph.n_shards``, W) and sizes are expected values.
    ``device`` "cuda" means most tensors in device memory; ``train.precision`` decides whether
    activations are bf16 (``frame_dist.config.bf16_activations``).
    """
    n_c, w = cfg.graph.n_clips, cfg.train.workers
    if graph_manifest is not None and (graph_manifest.n_clips != n_c
                                       or graph_manifest.n_shards < w):
        graph_manifest = None  # another graph, or one training would refuse: expected sizes
    n_shards = graph_manifest.n_shards if graph_manifest is not None else cfg.graph.n_shards
    n_shards = max(n_shards, w)
    if graph_manifest is not None:
        edges = (graph_manifest.nnz_pos, graph_manifest.nnz_neg)
    else:
        edges = expected_edges(stats, n_c, cfg.graph.positives)
    shares = _shares(stats, n_shards, w, edges, graph_manifest)
    n_params = n_parameters(cfg, stats.n_features, stats.n_videos * n_c)
    batch = min(cfg.train.batch_size, max(stats.n_train, 1))
    batch_clips = n_c * expected_distinct(stats.video_train, stats.n_train, batch)
    comm = _comm_bytes_per_step(stats, cfg, shares, device)

    best: tuple[float, WorkerShare, list[Term]] | None = None
    for share in shares:
        terms = _worker_terms(stats, cfg, share, n_params, batch_clips, device)
        total = sum(t.nbytes for t in terms)
        if best is None or total > best[0]:
            best = (total, share, terms)
    assert best is not None
    _, worker, terms = best

    # shard count: a multiple of W (every worker then loads as many shards, the same share of
    # the graph), at least the configured one, each shard's graph within the fraction of budget
    per_edge = _graph_bytes_per_edge(cfg)
    shard_graph = per_edge * sum(edges) / n_shards
    recommended = w * math.ceil(max(cfg.graph.n_shards, w) / w)
    if budget.host_bytes:
        limit = cfg.plan.shard_fraction * budget.host_bytes
        recommended = max(recommended, w * math.ceil(per_edge * sum(edges) / (limit * w)))
    return Plan(n_clips=n_c, workers=w, n_shards=n_shards, recommended_shards=recommended,
                device=device,
                dtype="bf16" if bf16_activations(cfg.train.precision, device) else "fp32",
                zero_stage=cfg.train.zero_stage, exact_shards=graph_manifest is not None,
                edges=edges, n_params=n_params, batch_clips=batch_clips,
                comm_bytes_per_step=comm, shard_graph_bytes=shard_graph, worker=worker,
                terms=terms, budget=budget, stats=stats)


def _shares(stats: DataStats, n_shards: int, w: int, edges: tuple[int, int],
            manifest: GraphManifest | None) -> list[WorkerShare]:
    """What each worker loads: shards k with k mod W = rank (``train_loop_per_worker``)."""
    out = []
    for rank in range(w):
        ks = list(range(rank, n_shards, w))
        if manifest is not None:
            sh = [manifest.shards[k] for k in ks]
            out.append(WorkerShare(  # merged shards: at most every video with an interaction
                rank, len(ks), sum(s.users for s in sh),
                min(stats.n_active_videos, sum(s.videos for s in sh)),
                sum(s.nnz_pos for s in sh), sum(s.nnz_neg for s in sh),
                sum(s.train for s in sh), sum(s.valid for s in sh),
                sum(s.test for s in sh)))
            continue
        share = len(ks) / n_shards  # shards are balanced by edges and rows
        # a video is local when one of its viewers is: each view counted as a distinct user
        videos = float((1.0 - (1.0 - share) ** stats.video_rows).sum())
        out.append(WorkerShare(rank, len(ks), stats.n_users * share, videos,
                               edges[0] * share, edges[1] * share, stats.n_train * share,
                               stats.n_valid * share, stats.n_test * share))
    return out


def _batch_sizes(stats: DataStats, cfg: Config) -> list[int]:
    """Global batch sizes of one epoch (the last one partial), cut by train.steps_per_epoch."""
    b, n = cfg.train.batch_size, stats.n_train
    sizes = [b] * (n // b) + ([n % b] if n % b else [])
    return sizes[:cfg.train.steps_per_epoch] if cfg.train.steps_per_epoch else sizes


def _local_clips(stats: DataStats, n_clips: int, share: float, batch: int) -> float:
    """Expected clips of one worker's part of a global batch of ``batch`` rows: each of its
    ``share * n_v`` rows of video v is in the batch with probability batch / N_train."""
    p = min(1.0, batch / max(stats.n_train, 1))
    return n_clips * float((1.0 - (1.0 - p) ** (share * stats.video_train)).sum())


def _comm_bytes_per_step(stats: DataStats, cfg: Config, shares: list[WorkerShare],
                         device: str) -> float:
    """Mean payload per step and worker of ``DistributedPropagation`` (what metrics.json reports):
    per graph, the all-gather of the longest worker's clip ids ((L + 1) x 8 B, the +1 is the
    size) and the (|U|, d) all-reduce forward and backward (2 |U| d x 4 B: the partial sums
    are fp32 under bf16 autocast too); with frozen features once more for the owners' H_c^(0)
    rows of the batch's clips (``OwnedClipInputs``)."""
    if cfg.train.workers == 1 or stats.n_train == 0:
        return 0.0
    n_c, d = cfg.graph.n_clips, cfg.model.dim
    graphs = 2 if cfg.model.use_negative else 1
    owned = int(cfg.model.use_visual and not cfg.model.trainable_clip_features)  # W > 1 here
    value = 4  # fp32 sums (sparse_matmul runs outside autocast)
    total, sizes = 0.0, _batch_sizes(stats, cfg)
    cache: dict[int, float] = {}
    for b in sizes:
        if b not in cache:
            union = n_c * expected_distinct(stats.video_train, stats.n_train, b)
            longest = max(_local_clips(stats, n_c, s.train / stats.n_train, b) for s in shares)
            per_exchange = (longest + 1) * 8 + 2 * union * d * value
            cache[b] = (graphs + owned) * per_exchange  # + the owners' H_c^(0) rows
        total += cache[b]
    return total / max(len(sizes), 1)


def _graph_bytes_per_edge(cfg: Config) -> float:
    """Host bytes per stored edge: Parquet COO read 12 + merge into CSR ~48 (kept by the
    allocator) + stored CSR 8 + torch CSR of R~ 8 and of R~^T 12 (the torch copies only for the
    graphs the model uses)."""
    torch_part = 20 if cfg.model.use_negative else 10  # both graphs, or R^p's half of the edges
    return 12 + 48 + 8 + torch_part


def _worker_terms(stats: DataStats, cfg: Config, share: WorkerShare, n_params: int,
                  batch_clips: float, device: str) -> list[Term]:
    """Itemised memory of one worker (docs/training.md, "Planner")."""
    m, t = cfg.model, cfg.train
    n_c, d, h, f = cfg.graph.n_clips, m.dim, m.hidden, stats.n_features
    w, gpu = t.workers, device == "cuda"
    dev = "device" if gpu else "host"
    act = 2 if bf16_activations(t.precision, device) else 4  # dense activations (autocast)
    graphs = 2 if m.use_negative else 1  # torch graphs and MLPs the model uses
    c_total = stats.n_videos * n_c
    c_w = share.videos * n_c  # local clips
    m_w = share.users
    stored = share.nnz_pos + share.nnz_neg  # load_shards always reads both graphs
    used = share.nnz_pos + (share.nnz_neg if m.use_negative else 0)
    rows = share.train + share.valid + share.test
    train_share = share.train / max(stats.n_train, 1)
    batch = min(t.batch_size, stats.n_train) * train_share  # B_w: its part of a global batch
    clips_u = min(batch_clips, c_total)  # |U|, the global batch's clips
    local_u = min(c_w, _local_clips(stats, n_c, train_share, min(t.batch_size, stats.n_train)))
    p = n_params

    terms = [Term("runtime baseline", WORKER_BASELINE_BYTES, "host",
                  "torch + Ray Train worker + DeepSpeed engine (measured constant)")]
    if gpu:
        terms.append(Term("CUDA context", CUDA_CONTEXT_BYTES, "device", "constant (assumed)"))
    terms += [
        Term("interaction rows", 82 * rows + 40 * share.train + 8 * (share.valid + share.test)
             + 8 * stats.n_train, "host",
             f"{rows:,.0f} rows x (33 B Parquet + 16 B merge + 33 B numpy) + 40 B x "
             f"{share.train:,.0f} train (torch int64, sorted global positions) + 8 B x "
             f"{stats.n_train:,} (the epoch permutation)"),
        Term("graph shard: Parquet read + merge", 60 * stored, "host",
             f"{stored:,.0f} edges x (12 B COO + 48 B CSR assembly, kept by the allocator)"),
        Term("graph shard: stored CSR", 8 * stored + 8 * (m_w + 1), "host",
             f"{stored:,.0f} edges x 8 B (int32 column + fp32 value) + rows"),
        Term("graph shard: torch CSR R~, R~^T", 20 * used + graphs * 8 * (m_w + c_w + 2),
             "host", f"{used:,.0f} edges x (8 B R~ columns + 12 B R~^T) + int64 row pointers"),
    ]
    if gpu:
        terms.append(Term("graph shard on GPU", 24 * used + graphs * 8 * (m_w + c_w + 2),
                          "device", f"{used:,.0f} edges x 2 x (8 B column + 4 B value)"))
    part = stats.feature_part_rows * f * 2  # one frame-features part file, float16
    # frozen features: on W > 1 partitioned by owner (C' / W each, OwnedClipInputs: C' the
    # clips of videos with an interaction); on one worker with fewer users than clips, R~ X
    # precomputed from the local clips' features
    owned = w > 1 and m.use_visual and not m.trainable_clip_features
    frozen = owned or (m.use_visual and not m.trainable_clip_features and m_w < c_w)
    if m.use_visual and not m.trainable_clip_features:
        c_own = stats.n_active_videos * n_c / w if owned else c_w
        feats = c_own * f * 4
        terms.append(Term("clip features", feats, "host",
                          f"C' / W = {c_own:,.0f} owned clips (of videos with an interaction) "
                          f"x F = {f} x 4 B" if owned else
                          f"C_w = {c_w:,.0f} local clips x F = {f} x 4 B"))
        if gpu:
            terms.append(Term("clip features on GPU", feats, "device", "the same, copied"))
        terms.append(Term("clip feature read buffers", (PREFETCH_PARTS + 4) * part, "host",
                          f"{PREFETCH_PARTS} parts in flight + assembly: "
                          f"{PREFETCH_PARTS + 4} x {stats.feature_part_rows:,} rows x F x 2 B"))
    elif m.trainable_clip_features:
        terms.append(Term("clip table init (all clips)", c_total * f * 4, "host",
                          f"C = {c_total:,} clips x F = {f} x 4 B, read to start the table"))
        terms.append(Term("clip feature read buffers", (PREFETCH_PARTS + 4) * part, "host",
                          f"{PREFETCH_PARTS + 4} x {stats.feature_part_rows:,} rows x F x 2 B"))

    zero = t.zero_stage
    opt_share = "" if zero == 0 else f" / W={w}"
    terms += [
        Term("parameters", 4 * p, dev, f"{p:,} x 4 B (fp32 master weights)"),
        Term("gradients", 4 * p / (w if zero >= 2 else 1), dev,
             f"{p:,} x 4 B{' / W (ZeRO 2)' if zero >= 2 else ''}"),
        Term("Adam states", (8 if zero == 0 else 12) * p / (1 if zero == 0 else w), dev,
             f"{p:,} x {'8 B (m, v)' if zero == 0 else '12 B (m, v, fp32 partition)'}"
             f"{opt_share}"),
        Term("best weights copy", 4 * p, "host", f"{p:,} x 4 B (CPU copy kept for the test)"),
    ]
    if zero >= 1:
        bucket = ZERO_REDUCE_BUCKET if gpu else min(p, ZERO_REDUCE_BUCKET)
        terms.append(Term(f"ZeRO {zero} code paths", ZERO_OVERHEAD_BYTES, "host",
                          "measured constant"))
        terms.append(Term("ZeRO reduce bucket", 4 * bucket, dev,
                          f"{bucket:,} x 4 B ({'allocated whole' if gpu else 'touched pages'})"))

    # frozen: R~ X precomputed per graph, the FC on the users' sums and the batch's clips
    # (frame_dist.model.clip_inputs; on W > 1 each owner encodes its share of the batch's clips
    # and a (U, d) all-reduce, forward and backward, hands the rows to every worker)
    if frozen:
        terms.append(Term("precomputed R~X, R~1", graphs * m_w * (f + 1) * 4, dev,
                          f"{graphs} graph(s) x M_w = {m_w:,.0f} x (F = {f} + 1) x 4 B"))
        rows_fc = clips_u / w if owned else local_u  # the batch clips this worker encodes
        fc_rows = graphs * m_w + rows_fc
        exchange = 3 * clips_u * d * 4 if owned else 0
        fc_term = Term("step: input FC side", rows_fc * f * 4 + 5 * fc_rows * d * 4 + exchange,
                       dev, f"{rows_fc:,.0f} batch clips x F x 4 B (their features) + 5 x "
                       f"({graphs} x M_w + {rows_fc:,.0f}) = {fc_rows:,.0f} x d = {d} x 4 B (FC "
                       "outputs, W_t, gradients)"
                       + (f" + 3 x U = {clips_u:,.0f} x d x 4 B (owners' rows, all-reduced)"
                          if owned else ""))
    else:
        fc_term = Term("step: input FC side", 5 * c_w * d * 4, dev,
                       f"5 x C_w = {c_w:,.0f} x d = {d} x 4 B (f_c, e_c and their gradients)")
    # one training step: every tensor it allocates (the CPU allocator keeps freed blocks)
    terms += [
        fc_term,
        Term("step: user side", 8 * graphs * m_w * d * 4, dev,
             f"8 x {graphs} graph(s) x M_w = {m_w:,.0f} x d x 4 B (R~ H, W, ReLU, grads)"),
        Term("step: batch clips", (12 * graphs + 10) * clips_u * d * act, dev,
             f"{12 * graphs + 10} x U = {clips_u:,.0f} x d x {act} B (eqs. 8-10, "
             "all-reduce buffers, grads)"),
        Term("step: pair MLPs", batch * n_c * (5 * graphs * h + (graphs + 3) * d) * act, dev,
             f"B_w = {batch:,.0f} x N_c = {n_c} x ({5 * graphs} x hidden = {h} + "
             f"{graphs + 3} x d) x {act} B"),
        Term("step: sparse workspace", 96 * used * min(1.0, local_u / max(c_w, 1)), dev,
             "96 B x edges of the batch clips' rows (gathered, then transposed by a sort for "
             "the backward of eq. 8)"),
    ]
    if m.trainable_clip_features:
        terms.append(Term("step: gathered clip table rows", 2 * c_w * f * 4, dev,
                          f"2 x C_w = {c_w:,.0f} x F = {f} x 4 B (the rows of the local clips "
                          "and their gradient)"))
    # evaluation after every epoch (FRAME.score_pairs, no gradients): the user side once, then
    # chunks of evaluate.batch_size / W pairs per worker (ray_loop.eval_chunk), each with the
    # clip side of its clips only (on W > 1 the union of every worker's chunk, all-reduced)
    n_eval = max(share.valid, share.test)
    eval_batch = min(n_eval, -(-cfg.evaluate.batch_size // w))
    n_train = max(stats.n_train, 1)

    def chunk_clips(pairs: float) -> float:  # training popularity as the proxy of the split's
        return n_c * expected_distinct(stats.video_train, n_train, min(int(pairs), n_train))

    eval_union = min(c_total, chunk_clips(w * eval_batch))
    encoded = (eval_union / w if owned else min(c_w, chunk_clips(eval_batch))) if frozen else 0
    terms.append(Term(
        "evaluation",
        eval_batch * (n_c * (d + 2 * h) + graphs * d) * act + n_eval * 16 + encoded * f * 4
        + ((0 if frozen else 2 * c_w) + 2 * graphs * m_w + (2 * graphs + 3) * eval_union)
        * d * 4, dev,
        f"{eval_batch:,.0f} pairs at a time x (N_c x (d + 2 x hidden) + {graphs} x d) x {act} "
        f"B + 16 B x {n_eval:,.0f} pairs + "
        + (f"{encoded:,.0f} chunk clips' features x F x 4 B + " if frozen else "")
        + f"embeddings of {'' if frozen else 'C_w clips, '}M_w users and U = "
        f"{eval_union:,.0f} clips of a chunk"))
    n_eval_all = max(stats.n_valid, stats.n_test)
    if w > 1:
        terms.append(Term("evaluation: gathered scores", 60 * n_eval_all, "host",
                          f"{n_eval_all:,} pairs x 60 B (all_gather_object of every worker's)"))
    return terms


# --------------------------------------------------------------------------- refusal


def check_plan(plan: Plan, options: list[tuple[str, Plan]] | None = None) -> Plan:
    """Return ``plan`` when it fits its budget, else raise :class:`PlanError` naming the numbers:
    the estimate per worker, its largest terms, the budget, and ``options`` (label, plan), e.g.
    from :func:`alternatives`."""
    over = plan.overruns()
    if not over:
        return plan
    parts = []
    for where in over:
        limit = plan.budget.host_bytes if where == "host" else plan.budget.device_bytes
        top = ", ".join(f"{t.name} {t.nbytes / GIB:.2f} GiB" for t in plan.largest(where))
        parts.append(f"estimated {plan.total(where) / GIB:.2f} GiB of {where} memory per worker "
                     f"(rank {plan.worker.rank} of {plan.workers}) exceeds the budget of "
                     f"{limit / GIB:.2f} GiB; largest terms: {top}")
    lines = [f"plan: N_c={plan.n_clips}, W={plan.workers}, {plan.n_shards} shard(s), "
             f"{plan.device} {plan.dtype}: " + "; ".join(parts) + f" (budget: "
             f"{plan.budget.source})"]
    if options:
        ways = []
        for label, alt in options:
            verdict = "fits" if alt.fits else "still too much"
            amount = f"{alt.total('host') / GIB:.2f} GiB host"
            if alt.device == "cuda":
                amount += f" + {alt.total('device') / GIB:.2f} GiB device"
            ways.append(f"{label}: {amount} per worker ({verdict})")
        lines.append("to change: " + "; ".join(ways))
    lines.append("or raise plan.worker_memory_gb if the workers really have more memory")
    raise PlanError("\n  ".join(lines))


def alternatives(stats: DataStats, cfg: Config, budget_for: Callable[[Config, str], Budget],
                 device: str) -> list[tuple[str, Plan]]:
    """Plans of the usual ways out: twice the workers (and shards), a smaller N_c, a GPU (bf16).

    ``budget_for(cfg, device)`` gives the budget of a modified config (the per-worker share of
    the machine changes with W).
    """
    out = []
    more = copy.deepcopy(cfg)
    more.train.workers = 2 * cfg.train.workers
    more.graph.n_shards = max(cfg.graph.n_shards, more.train.workers)
    out.append((f"train.workers={more.train.workers} graph.n_shards={more.graph.n_shards}",
                plan_training(stats, more, budget_for(more, device), device)))
    grid = len(stats.skip_hist)
    smaller = [n for n in range(cfg.graph.n_clips - 1, 0, -1) if grid % n == 0]
    if smaller:
        fewer = copy.deepcopy(cfg)
        fewer.graph.n_clips = smaller[0]
        out.append((f"graph.n_clips={smaller[0]}",
                    plan_training(stats, fewer, budget_for(fewer, device), device)))
    if device == "cpu":
        out.append(("train.use_gpu=true (bf16 activations, tensors in GPU memory)",
                    plan_training(stats, cfg, budget_for(cfg, "cuda"), "cuda")))
    return out


# --------------------------------------------------------------------------- a configured run
# (Ray and torch are imported lazily: only to ask a connected cluster or this machine's GPU)


def _cluster() -> dict[str, float] | None:
    """The connected Ray cluster's resources, or None (Ray is never started here)."""
    if "ray" not in sys.modules:
        return None
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else None


def training_device(cfg: Config) -> str:
    """"cuda" or "cpu", as ``run_training`` decides: train.use_gpu, else the connected cluster's
    GPUs, else this machine's."""
    if cfg.train.use_gpu is not None:
        return "cuda" if cfg.train.use_gpu else "cpu"
    resources = _cluster()
    if resources is not None:
        return "cuda" if resources.get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_budget(cfg: Config, device: str) -> Budget:
    """plan.worker_memory_gb, else the connected cluster's memory resource / W, else this
    machine's memory / W; on GPU plan.gpu_memory_gb or the visible GPU's memory."""
    gpu_bytes = None
    if device == "cuda" and cfg.plan.gpu_memory_gb <= 0:
        import torch

        if torch.cuda.is_available():
            gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    resources = _cluster() or {}
    return worker_budget(cfg, device, gpu_bytes, resources.get("memory"))


def _usable_graph(store: Store, n_clips: int) -> GraphManifest | None:
    """The committed graph for ``n_clips``; None when there is none or training would refuse
    its manifest (an older layout, a damaged file): the plan then uses expected sizes."""
    try:
        return read_graph_manifest(store, n_clips)
    except ManifestError:
        return None


def plan_run(cfg: Config, store: Store | None = None, check: bool = True,
             manifest: GraphManifest | None = None) -> Plan:
    """The plan of training ``cfg`` on the committed data; raises PlanError when it does not fit
    (``check``), naming the numbers and the plans of the usual alternatives. ``manifest``: the
    graph the caller already checked (else read here)."""
    store = store or Store.from_config(cfg.store)
    stats = read_data_stats(store, cfg)
    device = training_device(cfg)
    manifest = manifest if manifest is not None else _usable_graph(store, cfg.graph.n_clips)
    result = plan_training(stats, cfg, memory_budget(cfg, device), device, manifest)
    if check and not result.fits:
        check_plan(result, alternatives(stats, cfg, memory_budget, device))
    return result


def print_plan(cfg: Config) -> Plan:
    store = Store.from_config(cfg.store)
    result = plan_run(cfg, store, check=False)
    print(result.table())
    grid = len(result.stats.skip_hist)
    sweep = []
    for n_c in (n for n in range(1, grid + 1) if grid % n == 0):
        other = copy.deepcopy(cfg)
        other.graph.n_clips = n_c
        alt = plan_training(result.stats, other, result.budget, result.device,
                            _usable_graph(store, n_c))
        sweep.append(f"N_c={n_c}: {alt.total('host') / GIB:.2f} GiB"
                     + (f" + {alt.total('device') / GIB:.2f} GiB device"
                        if alt.device == "cuda" else ""))
    print("per worker for every N_c of the grid: " + ", ".join(sweep))
    if not result.fits:
        check_plan(result, alternatives(result.stats, cfg, memory_budget, result.device))
    return result
