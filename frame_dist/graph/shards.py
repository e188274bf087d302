"""Stage [graph N_c]: build R~^p and R~^n for one N_c and partition them into user shards.

Each shard holds, for its users only (docs/architecture.md, "Graph shards"):

* the rows of R~^p and R~^n (normalised with the degrees of the **whole** graph, eq. 6), with
  their columns renumbered into the shard's *local clip space*: the shard's videos (every video
  its users interacted with, in any split) get local indices 0..V_s-1 and clip j of local video
  v is local clip v * N_c + j, the same layout as the global clip order. A worker therefore
  needs the clip features of its own videos only, never the whole clip table;
* ``video_ids``: the global video index of each local video (what the all-reduce of the
  clip-side aggregation is keyed on, see ``frame_dist.model.distributed``);
* its users' interactions: training rows with their position in the global training order
  (so every worker can draw the same global batches and keep its own members) and the clip
  label ``watched``; validation and test rows with their full-watch labels.

Users are split into P shards balanced by edge count (nnz of both graphs plus training rows):
sorted by weight, dealt in snake order 0..P-1, P-1..0, ... (vectorised, within one user's weight
of the greedy optimum in practice).

Storage, under ``<store>/graphs/nc=<N_c>/``: one Parquet file per shard and table with a unique
name (a shard's ``users`` file holds its users' global rows and ids), the user id map (row i =
user i) as one Parquet file, then ``_manifest.json`` written last (the commit,
:class:`frame_dist.graph.manifest.GraphManifest`, read and checked by :func:`read_graph_manifest`):
it lists the files and carries the metadata the training stage sizes itself from (the video id
map, counts, fingerprint). User ids are never in the manifest: every worker and task reads the
manifest, and a JSON list of every user id costs each of them O(users) Python strings; a shard's
readers get its users' ids from its own file (:attr:`Shard.user_ids`), whole-graph readers from
:func:`read_graph_user_ids`. A rerun with the same inputs and settings is skipped; a killed run
leaves the previous commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from feature_store.frames import (
    committed_video_ids,
    frame_feature_moments,
    iter_clip_features,
    read_clip_features,
    stored_identity,
)
from feature_store.store import Store, StoreError, write_atomic
from frame_dist.config import Config
from frame_dist.graph.clip_graph import (
    IdMap,
    build_graph,
    clip_labels,
    encode_interactions,
)
from frame_dist.graph.manifest import (
    LAYOUT,
    GraphManifest,
    ManifestError,
    PartitionError,
    ShardInfo,
    graph_dir,
)
from frame_dist.model.propagation import clip_ids

SPLITS = ("train", "valid", "test")


@dataclass
class Shard:
    """One user partition in the local clip space (see module docstring)."""

    index: int
    user_rows: np.ndarray  # (M_s,) global user index of each local row
    video_ids: np.ndarray  # (V_s,) global video index of each local video (sorted)
    pos: sp.csr_matrix  # (M_s, V_s * N_c) rows of R~^p, local columns
    neg: sp.csr_matrix  # (M_s, V_s * N_c) rows of R~^n, local columns
    train: dict[str, np.ndarray]  # order (global training position), user, video, watched
    valid: dict[str, np.ndarray]  # user, video, label (local indices)
    test: dict[str, np.ndarray]
    user_ids: pa.Array | None = None  # (M_s,) string id of each local row

    @property
    def n_users(self) -> int:
        return len(self.user_rows)


def partition_users(weights: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of every user: sort by weight (heaviest first) and deal in snake order."""
    order = np.argsort(-weights, kind="stable")
    rank = np.arange(len(order))
    lap, pos = np.divmod(rank, n_shards)
    shard_of_rank = np.where(lap % 2 == 0, pos, n_shards - 1 - pos)
    shard = np.empty(len(order), dtype=np.int64)
    shard[order] = shard_of_rank
    return shard


def graph_fingerprint(cfg: Config, store: Store) -> str:
    """Identity of a graph build: input table versions plus the settings that shape it."""
    parts = {
        "interactions": (store.table("interactions").manifest() or {}).get("version"),
        "features": sorted(committed_video_ids(store)),
        "encoder": stored_identity(store),
        "graph": dataclasses.asdict(cfg.graph),
        "grid": cfg.extract.grid_size,
        "layout": LAYOUT,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_graph_manifest(store: Store, n_clips: int) -> GraphManifest | None:
    """The committed graph's manifest for ``n_clips`` (None when there is none); raises
    :class:`ManifestError` when it is malformed or of an older layout."""
    return GraphManifest.read(store, n_clips)


def _require_graph_manifest(store: Store, n_clips: int) -> GraphManifest:
    manifest = read_graph_manifest(store, n_clips)
    if manifest is None:
        raise PartitionError(f"no committed graph for N_c={n_clips} in "
                             f"{store.uri(graph_dir(n_clips))}: run the graph stage first")
    return manifest


def read_graph_user_ids(store: Store, manifest: GraphManifest) -> pa.Array:
    """The graph's user id map: (M,) string, row i = user i (global user index i)."""
    gdir = graph_dir(manifest.n_clips)
    path = store.path(gdir, manifest.user_ids_file)
    try:
        ids = pq.read_table(path, filesystem=store.fs)["user_id"]
    except (FileNotFoundError, OSError) as exc:
        raise PartitionError(f"the user id map of the graph for N_c={manifest.n_clips} is "
                             f"missing or unreadable: {store.uri(gdir, manifest.user_ids_file)}"
                             f": {exc}") from exc
    if len(ids) != manifest.n_users:
        raise PartitionError(f"the user id map of the graph for N_c={manifest.n_clips} has "
                             f"{len(ids)} rows, the manifest {manifest.n_users} users")
    return ids.combine_chunks()


@dataclass(frozen=True)
class GraphBuild:
    """What :func:`build_shards` did: the committed manifest, and whether it was reused."""

    manifest: GraphManifest
    skipped: bool  # inputs and settings unchanged since the commit: nothing was built


def build_shards(cfg: Config, store: Store) -> GraphBuild:
    """Build, partition and commit the graph for ``cfg.graph.n_clips``.

    Skipped (the committed manifest, ``skipped=True``) when inputs and settings are unchanged.
    """
    n_clips, n_shards = cfg.graph.n_clips, cfg.graph.n_shards
    fingerprint = graph_fingerprint(cfg, store)
    try:
        current = read_graph_manifest(store, n_clips)
    except ManifestError:  # an older layout or a damaged commit: build it again
        current = None
    if current is not None and current.fingerprint == fingerprint:
        return GraphBuild(current, skipped=True)

    table = store.table("interactions").read()
    featured = committed_video_ids(store)
    if not featured:
        raise PartitionError("no committed frame features: run the extract stage first")
    has_features = pc.is_in(table["video_id"], pa.array(sorted(featured), pa.string()))
    dropped = table.num_rows - int(pc.sum(has_features).as_py() or 0)
    table = table.filter(has_features)
    users = IdMap.from_values(table["user_id"], name="user_id")
    videos = IdMap.from_values(pa.array(sorted(featured), pa.string()), name="video_id")

    split = np.asarray(table["split"].to_numpy(zero_copy_only=False)).astype(str)
    every = encode_interactions(table, users, videos, split=None)
    is_train = split == "train"
    graph = build_graph(every.user_idx[is_train], every.video_idx[is_train],
                        every.watch_ratio[is_train], every.full_watch[is_train],
                        n_users=len(users), n_videos=len(videos), n_clips=n_clips,
                        positives=cfg.graph.positives,
                        normalisation=cfg.graph.normalisation)
    watched = clip_labels(every.watch_ratio, every.full_watch, n_clips, every.source_row)

    train_per_user = np.bincount(every.user_idx[is_train], minlength=len(users))
    weights = (np.diff(graph.pos_norm.indptr) + np.diff(graph.neg_norm.indptr) + train_per_user)
    shard_of_user = partition_users(weights, n_shards)
    # global training order = order of the train rows in the interactions table
    train_position = np.full(len(split), -1, dtype=np.int64)
    train_position[is_train] = np.arange(int(is_train.sum()))

    mean, std = frame_feature_moments(store, videos.ids.to_pylist())
    gdir = graph_dir(n_clips)
    files: list[dict[str, str]] = []
    shard_stats: list[ShardInfo] = []
    for k in range(n_shards):  # one iteration per shard, vectorised inside
        shard = _make_shard(k, shard_of_user, graph, every, split, watched, train_position,
                            n_clips, users.ids)
        names = _write_shard(store, gdir, shard)
        files.append(names)
        shard_stats.append(ShardInfo(users=shard.n_users, videos=len(shard.video_ids),
                                     nnz_pos=int(shard.pos.nnz), nnz_neg=int(shard.neg.nnz),
                                     train=len(shard.train["order"]),
                                     valid=len(shard.valid["user"]),
                                     test=len(shard.test["user"])))
    user_ids_file = f"users-{uuid.uuid4().hex[:12]}.parquet"
    pq.write_table(pa.table({"user_id": users.ids}), store.path(gdir, user_ids_file),
                   filesystem=store.fs)
    manifest = GraphManifest(
        layout=LAYOUT, n_clips=n_clips, n_shards=n_shards, positives=cfg.graph.positives,
        n_users=len(users), n_videos=len(videos), n_train=int(is_train.sum()),
        nnz_pos=int(graph.pos.nnz), nnz_neg=int(graph.neg.nnz), dropped_no_features=dropped,
        user_ids_file=user_ids_file, video_ids=videos.ids.to_pylist(), shards=shard_stats,
        files=files, feature_mean=mean.tolist(), feature_std=std.tolist(),
        fingerprint=fingerprint)
    write_atomic(store.fs, store.path(gdir, "config.yaml"), cfg.to_yaml().encode())
    manifest.write(store)
    return GraphBuild(manifest, skipped=False)


def _make_shard(k: int, shard_of_user: np.ndarray, graph, every, split: np.ndarray,
                watched: np.ndarray, train_position: np.ndarray, n_clips: int,
                user_ids: pa.Array) -> Shard:
    rows = np.flatnonzero(shard_of_user == k)  # (M_s,) global users of this shard
    mine = np.isin(every.user_idx, rows)  # interactions of this shard's users
    videos = np.unique(every.video_idx[mine])  # (V_s,) sorted global video indices
    # local clip space: columns of this shard's videos, renumbered v_local * N_c + j
    cols = clip_ids(videos, n_clips)  # (V_s * N_c,)
    pos = graph.pos_norm[rows][:, cols].tocsr()
    neg = graph.neg_norm[rows][:, cols].tocsr()
    local_user = np.searchsorted(rows, every.user_idx[mine])
    local_video = np.searchsorted(videos, every.video_idx[mine])
    s = split[mine]
    label = every.full_watch[mine].astype(np.int8)

    def rows_of(name: str) -> dict[str, np.ndarray]:
        m = s == name
        return {"user": local_user[m], "video": local_video[m], "label": label[m],
                "watched": watched[mine][m], "order": train_position[mine][m]}

    train = rows_of("train")
    return Shard(k, rows, videos, pos, neg, train, rows_of("valid"), rows_of("test"),
                 user_ids=pc.take(user_ids, pa.array(rows)))


def _csr_table(m: sp.csr_matrix) -> pa.Table:
    coo = m.tocoo()
    return pa.table({"row": pa.array(coo.row, pa.int32()), "col": pa.array(coo.col, pa.int32()),
                     "value": pa.array(coo.data.astype(np.float32), pa.float32())})


def _write_shard(store: Store, gdir: str, shard: Shard) -> dict[str, str]:
    """Write one shard's Parquet files under unique names; return {table: file name}."""
    tag = uuid.uuid4().hex[:12]
    tables = {
        "users": pa.table({"user_row": pa.array(shard.user_rows, pa.int64()),
                           "user_id": shard.user_ids}),
        "videos": pa.table({"video": pa.array(shard.video_ids, pa.int64())}),
        "pos": _csr_table(shard.pos),
        "neg": _csr_table(shard.neg),
    }
    for name in SPLITS:
        part = getattr(shard, name)
        tables[name] = pa.table({
            "order": pa.array(part["order"], pa.int64()),
            "user": pa.array(part["user"], pa.int64()),
            "video": pa.array(part["video"], pa.int64()),
            "watched": pa.array(part["watched"], pa.int64()),
            "label": pa.array(part["label"], pa.int8()),
        })
    names = {}
    store.fs.makedirs(store.path(gdir), exist_ok=True)
    for name, table in tables.items():
        fname = f"shard{shard.index:04d}-{name}-{tag}.parquet"
        pq.write_table(table, store.path(gdir, fname), filesystem=store.fs)
        names[name] = fname
    return names


def load_clip_features(store: Store, manifest: GraphManifest, videos: np.ndarray
                       ) -> np.ndarray:
    """Standardised clip features of global video indices ``videos``: (len * N_c, D) float32.

    f_c (eq. 1, the mean of the clip's grid frames) minus the mean and divided by the standard
    deviation of the grid-frame features (per dimension, over every video of the graph; both
    stored in the graph manifest). The encoder's raw scale (e.g. a randomly initialised trunk
    gives feature norms in the hundreds) then never reaches the model's initialisation.
    """
    features = read_clip_features(store, manifest.n_clips, _video_ids(manifest, videos)).features
    return _standardise(features, manifest)  # (V * N_c, D)


def stream_clip_features(store: Store, manifest: GraphManifest, videos: np.ndarray
                         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`load_clip_features` one stored part at a time: yields (positions in ``videos``
    (n,), their standardised clip features (n, N_c, D) float32)."""
    _, _, _, parts = iter_clip_features(store, manifest.n_clips, _video_ids(manifest, videos))
    for rows, clips in parts:
        yield rows, _standardise(clips, manifest)


def _video_ids(manifest: GraphManifest, videos: np.ndarray) -> list[str]:
    return [manifest.video_ids[v] for v in np.asarray(videos, dtype=np.int64)]


def _standardise(features: np.ndarray, manifest: GraphManifest) -> np.ndarray:
    """In place: minus the manifest's mean, divided by its standard deviation (floored)."""
    features -= np.asarray(manifest.feature_mean, dtype=np.float32)
    features /= np.maximum(np.asarray(manifest.feature_std, dtype=np.float32), 1e-6)
    return features


def load_shards(store: Store, n_clips: int, indices: list[int]) -> tuple[Shard, GraphManifest]:
    """Load and merge the given shards of the committed graph (one worker's share)."""
    manifest = _require_graph_manifest(store, n_clips)
    bad = [k for k in indices if not 0 <= k < manifest.n_shards]
    if bad:
        raise PartitionError(f"shards {bad} do not exist: the graph for N_c={n_clips} has "
                             f"{manifest.n_shards} shard(s)")
    gdir = graph_dir(n_clips)

    def read(k: int, name: str) -> pa.Table:
        path = store.path(gdir, manifest.files[k][name])
        try:
            return pq.read_table(path, filesystem=store.fs)
        except (FileNotFoundError, OSError) as exc:
            raise PartitionError(f"graph shard {k} ({name}) is missing or unreadable: "
                                 f"{store.uri(gdir, manifest.files[k][name])}: {exc}") from exc

    parts = []
    for k in indices:
        parts.append({name: read(k, name) for name in
                      ("users", "videos", "pos", "neg", *SPLITS)})
    videos = np.unique(np.concatenate([p["videos"]["video"].to_numpy() for p in parts]))
    user_rows, user_ids, pos_blocks, neg_blocks = [], [], [], []
    splits: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in SPLITS}
    offset = 0
    for p in parts:
        local_videos = p["videos"]["video"].to_numpy()
        remap = np.searchsorted(videos, local_videos)  # shard-local video -> merged video
        n_users = p["users"].num_rows
        user_rows.append(p["users"]["user_row"].to_numpy())
        user_ids.append(p["users"]["user_id"])
        for key, blocks in (("pos", pos_blocks), ("neg", neg_blocks)):
            t = p[key]
            col = t["col"].to_numpy().astype(np.int64)
            new_col = remap[col // n_clips] * n_clips + col % n_clips
            blocks.append(sp.csr_matrix((t["value"].to_numpy(), (t["row"].to_numpy(), new_col)),
                                        shape=(n_users, len(videos) * n_clips)))
        for s in SPLITS:
            t = p[s]
            splits[s].append({"order": t["order"].to_numpy(),
                              "user": t["user"].to_numpy() + offset,
                              "video": remap[t["video"].to_numpy()],
                              "watched": t["watched"].to_numpy(),
                              "label": t["label"].to_numpy()})
        offset += n_users
    merged = {s: {k: np.concatenate([d[k] for d in splits[s]]) for k in
                  ("order", "user", "video", "watched", "label")} for s in SPLITS}
    shard = Shard(indices[0] if len(indices) == 1 else -1, np.concatenate(user_rows), videos,
                  sp.vstack(pos_blocks).tocsr().astype(np.float32),
                  sp.vstack(neg_blocks).tocsr().astype(np.float32),
                  merged["train"], merged["valid"], merged["test"],
                  user_ids=pa.chunked_array(
                      [c for ids in user_ids for c in ids.chunks], pa.string()).combine_chunks())
    return shard, manifest


def load_whole_graph(store: Store, n_clips: int) -> tuple[Shard, GraphManifest]:
    """Every shard of the committed graph merged into one :class:`Shard` in the *global* space.

    The one place the whole graph is assembled in one process (the evaluate stage, the
    reference embeddings of the score tests, benchmarks). Local row i is user i of the manifest's
    ``user_ids`` and local video v is video v of its ``video_ids``: **every** video of the graph,
    also the ones nobody interacted with (``video_ids = arange(N)``), so local clip v * N_c + j
    is global clip v * N_c + j. Interaction indices are global too. Raises
    :class:`PartitionError` when the graph is missing or its shards do not hold every user of
    the manifest exactly once.
    """
    manifest = _require_graph_manifest(store, n_clips)
    merged, manifest = load_shards(store, n_clips, list(range(manifest.n_shards)))
    n_users, n_videos = manifest.n_users, manifest.n_videos
    if not np.array_equal(np.sort(merged.user_rows), np.arange(n_users)):
        raise PartitionError(f"graph N_c={n_clips}: its shards hold {merged.n_users} user rows, "
                             f"not each of the manifest's {n_users} users once")

    def to_global(matrix: sp.csr_matrix) -> sp.csr_matrix:
        coo = matrix.tocoo()
        video = merged.video_ids[coo.col // n_clips]  # merged video -> global video
        return sp.csr_matrix((coo.data, (merged.user_rows[coo.row],
                                         video * n_clips + coo.col % n_clips)),
                             shape=(n_users, n_videos * n_clips), dtype=np.float32)

    def split_to_global(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return part | {"user": merged.user_rows[part["user"]],
                       "video": merged.video_ids[part["video"]]}

    user_ids = read_graph_user_ids(store, manifest)
    if not pc.take(user_ids, pa.array(merged.user_rows)).equals(merged.user_ids):
        raise PartitionError(f"graph N_c={n_clips}: its shards' user ids disagree with its user "
                             "id map")
    whole = Shard(-1, np.arange(n_users), np.arange(n_videos), to_global(merged.pos),
                  to_global(merged.neg), *(split_to_global(getattr(merged, s)) for s in SPLITS),
                  user_ids=user_ids)
    return whole, manifest


def check_graph(store: Store, n_clips: int, workers: int) -> GraphManifest:
    """Fail before training when the graph is absent, malformed, of an older layout, has too
    few shards, or lost a file; return its manifest."""
    manifest = _require_graph_manifest(store, n_clips)
    if workers > manifest.n_shards:
        raise PartitionError(f"train.workers={workers} exceeds the {manifest.n_shards} "
                             f"shard(s) of the graph for N_c={n_clips}: rebuild it with "
                             f"graph.n_shards >= {workers}")
    gdir = graph_dir(n_clips)
    for k, names in enumerate(manifest.files):
        for name, fname in names.items():
            if not store.exists(gdir, fname):
                raise StoreError(f"graph shard {k} is missing its {name} file "
                                 f"{store.uri(gdir, fname)}")
    return manifest


def split_label_counts(store: Store, manifest: GraphManifest, split: str) -> tuple[int, int]:
    """(rows, full watches) of ``split`` over every shard of the graph: the training workers'
    evaluation pairs, counted from the label column alone (no worker, no graph in memory)."""
    gdir = graph_dir(manifest.n_clips)
    rows = positives = 0
    for names in manifest.files:
        labels = pq.read_table(store.path(gdir, names[split]), columns=["label"],
                               filesystem=store.fs)["label"]
        rows += len(labels)
        positives += int(pc.sum(labels).as_py() or 0)
    return rows, positives
