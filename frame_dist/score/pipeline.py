"""Stage [score]: the top-K videos of every user, with Ray Data over user chunks.

:func:`plan_scoring` reads model.pt, the graph manifest and the candidates (the run identity,
known before any propagation); :func:`prepare_scoring` propagates once, one Ray task per shard
(``frame_dist.score.embeddings``), the tasks turning their own users into chunk rows
(:class:`UserChunks`) and the driver fusing the clip side; :func:`run_scoring` scores the chunks
still to do on a pool of :class:`ScoreChunks` actors (kernel: ``frame_dist.score.kernel``) and
commits their parts as they arrive; :func:`read_scores` reads the table. Design: docs/score.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from feature_store.schemas import SCORES
from feature_store.store import Part, Store, StoreError, open_filesystem
from frame_dist.config import Config, ConfigError
from frame_dist.console import Progress, console_error, quiet_ray_data, route_worker_warnings
from frame_dist.graph.clip_graph import GraphError, IdMap
from frame_dist.graph.manifest import GraphManifest
from frame_dist.graph.shards import read_graph_manifest
from frame_dist.model.calibration import Calibration
from frame_dist.model.frame import FRAME
from frame_dist.score.embeddings import ShardUsers, propagate_shards
from frame_dist.score.kernel import AUTO_COMPILE_MIN_ELEMENTS, KERNELS, ClipSide, FusedScorer
from frame_dist.train.artifacts import SavedModel

SCORES_TABLE = "scores"
FAULT_ENV = "FRAME_DIST_FAULT_KILL_AFTER_COMMITS"  # tests: SIGKILL the driver after n commits
COMMIT_MIN_INTERVAL_S = 2.0  # bounds manifest rewrites; a kill loses at most this much work
# the shard tasks yield chunk rows in objects of at least this size: Ray returns a task's smaller
# objects inline to their owner, the driver (max_direct_call_object_size, 100 KiB), instead of
# keeping them in the object store
CHUNK_OBJECT_MIN_BYTES = 256 * 1024


class ScoreError(RuntimeError):
    """Scoring cannot run (bad candidates, inconsistent graph) or did not finish."""


# --------------------------------------------------------------------------- driver: inputs


@dataclass
class ScoringInputs:
    """What the driver hands the scoring actors (:func:`prepare_scoring`): nothing per user."""

    clip_side: ClipSide  # T_c of every candidate, w, beta, the model's aggregation
    video_ids: pa.Array  # (V,) string, the candidates in global video order
    user_chunks: list[Any]  # ObjectRefs of CHUNK_SCHEMA tables: the chunks still to score
    identity: dict[str, Any]  # what makes two result sets comparable (docs/score.md)
    n_users: int  # M, users of the graph
    cold_users: int  # users without any training interaction (H_u = 0)
    n_chunks: int  # every chunk of the run (scored or not)
    shard_tasks: int = 0  # Ray tasks that computed the embeddings
    bytes_from_tasks: int = 0  # what the shard tasks sent the driver (the clip side only)
    calibration: Calibration = field(default_factory=Calibration)  # model.pt's: probability


def read_candidates(path: str, store: Store, videos: IdMap) -> np.ndarray:
    """Sorted distinct global video indices of a candidate table (Parquet or CSV, video_id)."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    fs, local = open_filesystem(path, store.endpoint_url, store.region)
    if not fs.exists(local):
        raise ConfigError(f"score.candidates={path!r}: no such file")
    try:
        if local.endswith(".csv"):
            with fs.open(local, "rb") as f:
                table = pyarrow.csv.read_csv(f, convert_options=pyarrow.csv.ConvertOptions(
                    column_types={"video_id": pa.string()}))
        else:
            table = pq.read_table(local, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"score.candidates={path!r}: not a readable Parquet or CSV file: "
                          f"{exc}") from exc
    if "video_id" not in table.column_names:
        raise ConfigError(f"score.candidates={path!r}: no video_id column (has "
                          f"{table.column_names})")
    ids = pc.unique(pc.drop_null(table["video_id"].cast(pa.string())))
    if len(ids) == 0:
        raise ScoreError(f"score.candidates={path!r} lists no video")
    try:
        return np.unique(videos.lookup(ids, where=f"score.candidates={path!r}"))
    except GraphError as exc:
        raise ScoreError(f"{exc} (candidates must be videos of the graph, i.e. with frame "
                         "features)") from exc


@dataclass
class ScoringPlan:
    """What a run will score, known before any propagation: enough to skip or resume."""

    identity: dict[str, Any]  # run name, model.pt SHA-256, graph, N_c, K, exclusion, candidates
    saved: SavedModel  # the run's model.pt
    manifest: GraphManifest  # the graph manifest of the run's N_c
    candidates: np.ndarray  # (V,) sorted global video indices
    first_chunk: list[int]  # (P + 1,) chunk id of each shard's first chunk; the last: n_chunks

    @property
    def n_chunks(self) -> int:
        return self.first_chunk[-1]


def plan_scoring(cfg: Config, store: Store) -> ScoringPlan:
    """Read model.pt, the graph manifest and the candidates; refuse what is missing."""
    s, run = cfg.score, cfg.train.run_name
    saved = SavedModel.read(store, run)
    n_clips = saved.n_clips
    manifest = read_graph_manifest(store, n_clips)
    if manifest is None:
        raise StoreError(f"no committed graph for N_c={n_clips} (run {run}) in "
                         f"{store.uri('graphs')}: run the graph stage first")
    if s.candidates:
        video_map = IdMap(manifest.video_ids, name="video_id")
        candidates = read_candidates(s.candidates, store, video_map)
        candidate_identity: Any = {"path": s.candidates, "sha256": hashlib.sha256(
            "\n".join(video_map.decode(candidates).to_pylist()).encode()).hexdigest()}
    else:
        candidates = np.arange(manifest.n_videos)
        candidate_identity = "all"
    identity = {
        "run": run,
        "model_sha256": saved.sha256,
        "graph": manifest.fingerprint,
        "n_clips": n_clips,
        "top_k": s.top_k,
        "exclude_seen": s.exclude_seen,
        "candidates": candidate_identity,
        "users_per_chunk": s.users_per_chunk,  # defines the chunk ids (with the graph)
        # the probability column's map (model.pt's; a table from before it is scored again)
        "calibration": saved.calibration.to_dict(),
    }
    # chunk (k, b): users b * U .. (b + 1) * U - 1 of shard k, numbered shard after shard
    per_shard = [-(-shard.users // s.users_per_chunk) for shard in manifest.shards]
    return ScoringPlan(identity, saved, manifest, candidates,
                       first_chunk=np.concatenate([[0], np.cumsum(per_shard)]).tolist())


@dataclass
class UserChunks:
    """The user side of a shard's embedding task (``embeddings.propagate_shards``): its users'
    chunk rows (CHUNK_SCHEMA), made inside the task and left in the object store.

    Z_u (one (M_k, d) x (d, G) product) and the seen candidates come from the shard's own rows,
    so no user's data passes through the driver. Picklable: it travels with each task.
    """

    users_per_chunk: int
    first_chunk: list[int]  # (P + 1,) ScoringPlan.first_chunk
    todo: np.ndarray  # sorted chunk ids still to score
    candidate_of_video: np.ndarray | None  # (N,) candidate position of each video, -1: none;
    # None: seen videos are not excluded

    def __call__(self, model: FRAME, users: ShardUsers) -> Iterator[pa.Table]:
        z_u = model.fused_user_table(users.h_u_pos, users.h_u_neg)  # (M_k, G)
        if not torch.isfinite(z_u).all():
            raise ScoreError(f"graph shard {users.index}: non-finite values in the fused user "
                             "table (diverged weights?)")
        seen = None
        if self.candidate_of_video is not None:
            position = self.candidate_of_video[users.train_videos]  # (n_k,)
            keep = position >= 0
            seen = (users.train_rows[keep], position[keep])
        yield from chunk_tables(users.user_ids.to_pylist(), z_u.numpy(), seen,
                                self.users_per_chunk, self.first_chunk[users.index], self.todo,
                                min_bytes=CHUNK_OBJECT_MIN_BYTES)


@torch.inference_mode()
def prepare_scoring(cfg: Config, store: Store, plan: ScoringPlan | None = None,
                    done: set[int] | frozenset[int] = frozenset()) -> ScoringInputs:
    """Rebuild the run's model, propagate once (one Ray task per shard), fuse the clip side.

    The shard tasks turn their users into the chunk rows of the chunks not in ``done``
    (:class:`UserChunks`); the driver keeps only references to them (docs/score.md).
    """
    plan = plan if plan is not None else plan_scoring(cfg, store)
    model = plan.saved.build()
    n_clips = plan.identity["n_clips"]
    candidates = plan.candidates
    candidate_of_video = None
    if cfg.score.exclude_seen:
        candidate_of_video = np.full(plan.manifest.n_videos, -1, dtype=np.int64)
        candidate_of_video[candidates] = np.arange(len(candidates))
    todo = np.array(sorted(set(range(plan.n_chunks)) - set(done)), dtype=np.int64)
    user_side = UserChunks(cfg.score.users_per_chunk, plan.first_chunk, todo,
                           candidate_of_video)
    whole = propagate_shards(model, store, n_clips, user_side, cfg.score.shard_task_cpus)
    if whole.manifest.fingerprint != plan.identity["graph"]:
        raise ScoreError(f"the graph for N_c={n_clips} was rebuilt while scoring started")
    clip_side = ClipSide(*model.fused_clip_side(whole.h_c, n_clips,
                                                torch.from_numpy(candidates)))
    for name in ("clip_thresholds", "out_weight"):
        if not torch.isfinite(getattr(clip_side, name)).all():
            raise ScoreError(f"run {cfg.train.run_name}: non-finite values in the fused "
                             f"{name} (diverged weights?)")
    refs = [ref for shard in whole.user_refs for ref in shard]  # the chunks to score
    video_ids = pa.array(whole.manifest.video_ids, pa.string())
    return ScoringInputs(clip_side, pc.take(video_ids, pa.array(candidates)), refs,
                         plan.identity, n_users=whole.manifest.n_users,
                         cold_users=whole.cold_users, n_chunks=plan.n_chunks,
                         shard_tasks=whole.tasks, bytes_from_tasks=whole.bytes_from_tasks,
                         calibration=plan.saved.calibration)


# --------------------------------------------------------------------------- Ray Data actors

CHUNK_SCHEMA = pa.schema([
    pa.field("chunk", pa.int64()),
    pa.field("user_ids", pa.list_(pa.string())),
    pa.field("user_table", pa.large_binary()),  # (U, G) float32 rows of Z_u
    pa.field("seen_rows", pa.large_binary()),  # (n,) int64 chunk row of every seen pair
    pa.field("seen_positions", pa.large_binary()),  # (n,) int64 candidate position
])
PART_SCHEMA = pa.schema([
    pa.field("chunk", pa.int64()),
    pa.field("part_path", pa.string()),
    pa.field("part_rows", pa.int64()),
    pa.field("part_meta", pa.string()),  # JSON
])


def chunk_tables(user_ids: list[str], z_u: np.ndarray,
                 seen: tuple[np.ndarray, np.ndarray] | None, users_per_chunk: int,
                 first_chunk: int = 0, todo: np.ndarray | None = None,
                 min_bytes: int = 0) -> Iterator[pa.Table]:
    """Dataset rows (CHUNK_SCHEMA) of consecutive users: chunk ``first_chunk + b`` holds users
    b * U .. (b + 1) * U - 1; only the chunks in ``todo`` (default: all).

    ``z_u`` (n, G) their Z_u rows; ``seen`` = (row, candidate position) of the pairs to exclude.
    Yields tables of consecutive chunk rows, each of at least ``min_bytes`` (0: one row each)
    except the last.
    """
    rows = positions = np.zeros(0, np.int64)
    if seen is not None:
        order = np.lexsort((seen[1], seen[0]))  # by row: each chunk's pairs are one slice
        rows, positions = seen[0][order].astype(np.int64), seen[1][order].astype(np.int64)
    wanted = None if todo is None else set(np.asarray(todo).tolist())
    group: list[dict[str, Any]] = []
    size = 0
    for b in range(-(-len(user_ids) // users_per_chunk)):  # one iteration per chunk
        chunk = first_chunk + b
        if wanted is not None and chunk not in wanted:
            continue
        first, stop = b * users_per_chunk, min((b + 1) * users_per_chunk, len(user_ids))
        lo, hi = np.searchsorted(rows, [first, stop])
        row = {"chunk": chunk, "user_ids": user_ids[first:stop],
               "user_table": np.ascontiguousarray(z_u[first:stop], np.float32).tobytes(),
               "seen_rows": (rows[lo:hi] - first).tobytes(),
               "seen_positions": positions[lo:hi].tobytes()}
        group.append(row)
        size += (len(row["user_table"]) + 2 * len(row["seen_rows"])
                 + sum(len(u) + 4 for u in row["user_ids"]))
        if size >= min_bytes:
            yield pa.Table.from_pylist(group, schema=CHUNK_SCHEMA)
            group, size = [], 0
    if group:
        yield pa.Table.from_pylist(group, schema=CHUNK_SCHEMA)


def top_k_table(user_ids: pa.Array, values: np.ndarray, positions: np.ndarray,
                video_ids: pa.Array, calibration: Calibration | None = None) -> pa.Table:
    """SCORES rows of a top-k result (U, k'); -inf entries (no candidate left) are dropped.

    ``probability`` = ``calibration.apply(score)`` (sigmoid(score) without one)."""
    valid = np.isfinite(values)  # a prefix of every row: topk sorts descending
    per_user = valid.sum(1)
    rank = np.broadcast_to(np.arange(1, values.shape[1] + 1, dtype=np.int32), values.shape)
    return pa.Table.from_arrays([
        pc.take(user_ids, pa.array(np.repeat(np.arange(len(per_user)), per_user))),
        pa.array(rank[valid], pa.int32()),
        pc.take(video_ids, pa.array(positions[valid])),
        pa.array(values[valid].astype(np.float32), pa.float32()),
        pa.array((calibration or Calibration()).apply(values[valid]).astype(np.float32),
                 pa.float32()),
    ], schema=SCORES)


class ScoreChunks:
    """Ray Data actor: chunk rows -> one committed-to-be part of ``scores`` per chunk.

    The clip side arrives once (an object-store reference, resolved in ``__init__``); each call
    scores its chunks (``FusedScorer.top_k``), writes each chunk's rows as a staged part with
    the chunk id in its meta, and returns only the part names (PART_SCHEMA).
    """

    def __init__(self, clip_side: dict[str, Any], store: Store, top_k: int, kernel: str,
                 use_gpu: bool, videos_per_block: int):
        import ray

        route_worker_warnings()  # ours (the compiled kernel's fallback) on the job's console
        side = ray.get(clip_side["ref"])
        with warnings.catch_warnings():  # object-store arrays are read-only; never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t_c = torch.from_numpy(side["clip_thresholds"])
            w = torch.from_numpy(side["out_weight"])
        self.scorer = FusedScorer(t_c, w, side["out_bias"],
                                  aggregation=side.get("aggregation", "mean"),  # older: mean
                                  kernel=kernel, device="cuda" if use_gpu else "cpu",
                                  videos_per_block=videos_per_block)
        self.video_ids = side["video_ids"]
        self.calibration = Calibration.from_dict(side["calibration"], "score: calibration")
        self.top_k = top_k
        self.table = store.table(SCORES_TABLE)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        width = self.scorer.width
        for row in batch.to_pylist():  # one row per chunk of users
            user_ids = pa.array(row["user_ids"], pa.string())
            z_u = torch.from_numpy(np.frombuffer(row["user_table"], np.float32).reshape(
                len(user_ids), width).copy())  # (U, G)
            seen = (torch.from_numpy(np.frombuffer(row["seen_rows"], np.int64).copy()),
                    torch.from_numpy(np.frombuffer(row["seen_positions"], np.int64).copy()))
            values, positions = self.scorer.top_k(z_u, self.top_k, seen)
            rows = top_k_table(user_ids, values.cpu().numpy(), positions.cpu().numpy(),
                               self.video_ids, self.calibration)
            part = self.table.write_part(rows, {"chunks": [row["chunk"]],
                                                "users": len(user_ids)})
            out.append({"chunk": row["chunk"], "part_path": part.path, "part_rows": part.rows,
                        "part_meta": json.dumps(part.meta)})
        return pa.Table.from_pylist(out, schema=PART_SCHEMA)


# --------------------------------------------------------------------------- driver: run


@dataclass
class ScoreSummary:
    users: int  # M, users of the graph
    candidates: int  # V
    chunks: int  # all chunks of the run
    scored_chunks: int  # scored by this call
    skipped_chunks: int  # already committed with the same identity
    rows: int  # committed rows of the table
    cold_users: int  # users without training interactions (scored from the clip side)
    kernel: str
    actors: int
    started_over: bool  # another identity was committed before: replaced
    seconds: float
    table_uri: str
    shard_tasks: int = 0  # Ray tasks that computed the embeddings (0: embeddings given)

    def line(self) -> str:
        if not self.scored_chunks:
            return (f"score: skipped ({self.chunks} chunks of {self.users} users already "
                    f"committed with this run identity) -> {self.table_uri}")
        return (f"score: {self.users} users x {self.candidates} candidate videos; "
                f"{self.scored_chunks} chunks scored, {self.skipped_chunks} skipped (already "
                f"committed); {self.rows} rows, {self.cold_users} cold users; embeddings "
                f"{f'{self.shard_tasks} shard task(s)' if self.shard_tasks else 'given'}; "
                f"kernel {self.kernel}, {self.actors} actor(s), {self.seconds:.1f}s -> "
                f"{self.table_uri}")


def committed_chunks(store: Store, identity: dict[str, Any]) -> set[int] | None:
    """Chunk ids committed under ``identity``; None when the table holds another identity."""
    table = store.table(SCORES_TABLE)
    manifest = table.manifest()
    if manifest is None:
        return set()
    if manifest.get("metadata", {}).get("identity") != json.loads(json.dumps(identity)):
        return None
    return {int(c) for p in table.parts() for c in p.meta.get("chunks", [])}


def resolve_kernel(kernel: str, use_gpu: bool, inputs: ScoringInputs, actors: int) -> str:
    """``auto``: eager on GPUs and for small work; compiled for large CPU work with a compiler."""
    if kernel not in KERNELS:
        raise ConfigError(f"score.kernel={kernel!r} must be one of {list(KERNELS)}")
    if kernel != "auto":
        return kernel
    if use_gpu:
        return "eager"
    elements = inputs.n_users * inputs.clip_side.clip_thresholds.numel()  # U x V x N_c x G
    has_compiler = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++",
                                                 "clang++"))
    return "compiled" if has_compiler and elements / actors > AUTO_COMPILE_MIN_ELEMENTS \
        else "eager"


def run_scoring(cfg: Config, store: Store, *, inputs: ScoringInputs | None = None
                ) -> ScoreSummary:
    """Score every user against the candidates with Ray Data; commit the top-K (docs/score.md).

    Settings from ``cfg.score``: ``kernel`` ("auto", "eager" or "compiled",
    :class:`FusedScorer`), ``videos_per_block``, ``actors`` (the actor pool; 0: one per GPU, else
    one per CPU; never more than objects of chunk rows). ``inputs`` (benchmarks) skips the
    propagation and uses these tables and this identity instead.
    """
    s = cfg.score
    start = time.monotonic()
    plan = None
    if inputs is None:
        plan = plan_scoring(cfg, store)  # refuses a missing run, graph or candidate file
    identity = plan.identity if plan is not None else inputs.identity
    n_chunks = plan.n_chunks if plan is not None else inputs.n_chunks
    done = committed_chunks(store, identity)
    started_over = done is None
    done = done or set()
    todo = [c for c in range(n_chunks) if c not in done]
    table = store.table(SCORES_TABLE)
    if not todo:  # nothing to score: no propagation, no Ray
        meta = table.metadata()
        if not meta.get("complete"):  # a driver killed before its final commit
            meta.update(complete=True)
            table.commit([], meta)
        summary = ScoreSummary(
            users=meta["users"], candidates=meta["candidates"], chunks=n_chunks,
            scored_chunks=0, skipped_chunks=n_chunks, rows=sum(p.rows for p in table.parts()),
            cold_users=meta["cold_users"], kernel="-", actors=0, started_over=False,
            seconds=time.monotonic() - start, table_uri=store.uri("tables", SCORES_TABLE))
        print(summary.line(), flush=True)
        return summary
    if inputs is None:
        inputs = prepare_scoring(cfg, store, plan, done)

    import ray  # Ray from here on: the pool of scoring actors

    from frame_dist.ray_runtime import cluster_has_gpus, init_ray

    init_ray()
    use_gpu = cluster_has_gpus()
    resources = ray.cluster_resources()
    actors = s.actors or (int(resources.get("GPU", 0)) if use_gpu
                          else int(resources.get("CPU", 1)))
    n_actors = max(1, min(actors, len(inputs.user_chunks)))  # one object: one actor's work
    used_kernel = resolve_kernel(s.kernel, use_gpu, inputs, n_actors)
    t = inputs.clip_side
    clip_side = {"ref": ray.put({
        "clip_thresholds": t.clip_thresholds.numpy(), "out_weight": t.out_weight.numpy(),
        "out_bias": t.out_bias, "aggregation": t.aggregation, "video_ids": inputs.video_ids,
        "calibration": inputs.calibration.to_dict()})}
    quiet_ray_data()
    ds = ray.data.from_arrow_refs(inputs.user_chunks)  # made by the shard tasks
    ds = ds.map_batches(
        ScoreChunks, batch_size=1, batch_format="pyarrow",
        fn_constructor_kwargs=dict(clip_side=clip_side, store=store,
                                   top_k=cfg.score.top_k, kernel=used_kernel,
                                   use_gpu=use_gpu, videos_per_block=s.videos_per_block),
        compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=1,
        num_gpus=1 if use_gpu else 0)
    _commit_as_they_arrive(ds, store, cfg, inputs, done, replace=started_over)
    summary = ScoreSummary(
        users=inputs.n_users, candidates=len(inputs.video_ids), chunks=n_chunks,
        scored_chunks=len(todo), skipped_chunks=n_chunks - len(todo),
        rows=sum(p.rows for p in table.parts()), cold_users=inputs.cold_users,
        kernel=used_kernel, actors=n_actors, started_over=started_over,
        shard_tasks=inputs.shard_tasks,
        seconds=time.monotonic() - start, table_uri=store.uri("tables", SCORES_TABLE))
    print(summary.line(), flush=True)
    return summary


def _table_metadata(inputs: ScoringInputs, committed: int, complete: bool) -> dict[str, Any]:
    """Manifest metadata of ``scores``: the run identity and how far the run got."""
    return {"identity": inputs.identity, "chunks": inputs.n_chunks,
            "chunks_committed": committed, "complete": complete,
            "users": inputs.n_users, "candidates": len(inputs.video_ids),
            "cold_users": inputs.cold_users}


def _commit_as_they_arrive(ds: Any, store: Store, cfg: Config, inputs: ScoringInputs,
                           done: set[int], replace: bool) -> None:
    """Drive the dataset, committing staged parts as they arrive; mark the table complete."""
    table = store.table(SCORES_TABLE)
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    committed = set(done)
    pending: list[Part] = []
    pending_chunks: set[int] = set()
    commits, last_commit = 0, -math.inf
    bar = Progress(inputs.n_chunks - len(done), "score", "chunk")

    def commit(final: bool = False) -> None:
        nonlocal pending, commits, last_commit, replace
        new = len(pending_chunks)
        committed.update(pending_chunks)
        metadata = _table_metadata(inputs, len(committed),
                                   complete=final and len(committed) == inputs.n_chunks)
        table.commit(pending, metadata, replace=replace, config=None if commits else cfg)
        pending, replace, commits, last_commit = [], False, commits + 1, time.monotonic()
        pending_chunks.clear()
        if new:  # the final commit may only mark the table complete: no second line
            bar.update(new)
            bar.note(f"score: {len(committed)}/{inputs.n_chunks} chunks committed")
        if kill_after and commits >= kill_after and not final:
            console_error(f"{FAULT_ENV}={kill_after}: killing the driver after commit {commits}")
            os.kill(os.getpid(), signal.SIGKILL)

    with bar:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in block.to_pylist():
                if row["chunk"] in committed or row["chunk"] in pending_chunks:
                    continue  # a retried task's second part: stays an uncommitted orphan
                pending.append(Part(row["part_path"], row["part_rows"],
                                    json.loads(row["part_meta"])))
                pending_chunks.add(row["chunk"])
            if pending and time.monotonic() - last_commit >= COMMIT_MIN_INTERVAL_S:
                commit()
        commit(final=True)
    if len(committed) != inputs.n_chunks:
        missing = sorted(set(range(inputs.n_chunks)) - committed)
        raise ScoreError(f"{len(missing)} chunk(s) were not scored, e.g. {missing[:5]}")


def read_scores(store: Store) -> pa.Table:
    """The committed ``scores`` table sorted by (user_id, rank)."""
    table = store.table(SCORES_TABLE).read(schema=SCORES)
    return table.sort_by([("user_id", "ascending"), ("rank", "ascending")])


__all__ = ["ScoreChunks", "ScoreError", "ScoreSummary", "ScoringInputs", "ScoringPlan",
           "UserChunks", "chunk_tables", "committed_chunks", "plan_scoring", "prepare_scoring",
           "read_candidates", "read_scores", "resolve_kernel", "run_scoring", "top_k_table"]
