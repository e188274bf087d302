"""Frame features in the store: the writer helpers of [extract] and the clip-feature reader.

Table ``frame_features`` (schema :func:`feature_store.schemas.frame_features_schema`): one row per
(video, grid index) with the float16 2048-d trunk feature of the grid frame. Each committed part
file holds whole videos and lists them in its Part meta (``video_ids``), so the set of committed
videos is known from the manifest alone and extraction resumes video by video. The Part meta
also holds each video's source identity (``sources``: video id -> uri, size, mtime or ETag;
frame_dist.extract.sources), so a video whose uri or file changed is extracted again; its new
features are committed in a later part, and the readers take every video from the **latest**
part listing it, so the old version is never read again. The manifest metadata holds the
encoder identity (``encoder``: weights, image size, grid size G, dim, preprocessing); a run
with another identity is refused (:class:`EncoderIdentityError`). Features imported by
``jobs.import_features`` carry ``weights = "external:<name>"`` (:func:`is_imported`), any dim F,
and parts without ``sources`` (there is no video to re-extract them from); a table holds either
imported or extracted features, never both.

Table ``extract_errors`` (schema :data:`feature_store.schemas.ERRORS`): the failures of the last
run, replaced at the end of each run (failed videos are retried by the next one); the part file
of the replaced version is deleted.

Reading. :func:`read_clip_features` gives the clip features of any N_c dividing G as the mean of
each clip's G / N_c grid frames (paper eq. 1) without touching a video. Both readers read only
the columns they need (``video_id``, ``grid_index``, ``feature``), only the parts holding the
requested videos, and one part at a time (a few parts prefetched by threads). Peak memory:

- :func:`read_frame_features`: the result, N x G x 2048 x 2 bytes (float16), plus about two
  copies of the parts in flight (each ``videos_per_commit`` x G x 2048 x 2 bytes);
- :func:`read_clip_features`: the result, N x N_c x 2048 x 4 bytes (float32), plus the parts in
  flight and one float32 copy of one part. The full (N, G, 2048) array is never built.

For Micro-video-A (58,291 videos, G = 64) the frame features are 15.3 GB on disk-equivalent
float16, the clip features at N_c = 8 are 3.8 GB; ask for ``video_ids`` subsets when that is
too much.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.schemas import ERRORS, FEATURE_DIM, conform, frame_features_schema
from feature_store.store import Part, Store, StoreError

FRAME_FEATURES = "frame_features"
EXTRACT_ERRORS = "extract_errors"
READ_COLUMNS = ["video_id", "grid_index", "feature"]
IMPORTED_PREFIX = "external:"  # weights of imported features: external:<name>
PREFETCH_PARTS = 4  # part files read ahead by threads while the previous one is assembled


class EncoderIdentityError(ValueError):
    """The store holds frame features made by another encoder / grid than this config's.

    A configuration error for the jobs (exit 2, ``frame_dist.cli.run_stage``)."""


@dataclass
class ClipFeatures:
    """Clip features f_c (paper eq. 1) of N videos cut into ``n_clips`` clips each."""

    video_ids: np.ndarray  # (N,) str; index = video index
    n_clips: int  # N_c
    features: np.ndarray  # (N * N_c, D) float32; row = video index * N_c + clip index
    grid_size: int  # G of the stored grid (each clip is the mean of G / N_c grid frames)
    encoder: dict[str, Any]  # the encoder identity of the stored features


# ------------------------------------------------------------------------------------ writing


def frame_features_table(video_ids: Sequence[str], times: np.ndarray, features: np.ndarray
                         ) -> pa.Table:
    """Rows of ``frame_features`` for N videos: times (N, G) float, features (N, G, D)."""
    n, g, dim = features.shape
    if times.shape != (n, g) or len(video_ids) != n:
        raise ValueError(f"frame_features_table: {len(video_ids)} ids, times {times.shape}, "
                         f"features {features.shape} disagree")
    flat = np.ascontiguousarray(features, dtype=np.float16).reshape(-1)  # (N * G * D,)
    columns = [
        pa.array(np.repeat(np.asarray(video_ids, dtype=object), g), pa.string()),
        pa.array(np.tile(np.arange(g, dtype=np.int32), n)),
        pa.array(np.asarray(times, np.float64).reshape(-1)),
        pa.FixedSizeListArray.from_arrays(pa.array(flat), dim),
    ]
    return pa.Table.from_arrays(columns, schema=frame_features_schema(dim))


def write_frame_part(store: Store, table: pa.Table, video_ids: Sequence[str],
                     meta: dict[str, Any] | None = None) -> Part:
    """Stage one part file of whole videos; its meta lists ``video_ids`` (not yet visible)."""
    return store.table(FRAME_FEATURES).write_part(
        table, {"video_ids": list(video_ids), **(meta or {})})


def committed_video_ids(store: Store) -> set[str]:
    """Ids of the videos whose features are committed (from the manifest, no data read)."""
    ids: set[str] = set()
    for part in store.table(FRAME_FEATURES).parts():
        ids.update(_part_ids(part))
    return ids


def committed_sources(store: Store) -> dict[str, dict[str, Any] | None]:
    """Committed video id -> the source identity its read features were extracted from.

    From the latest part listing the video (the one the readers take); None for a part that
    records no ``sources`` (written by an older version or another tool).
    """
    out: dict[str, dict[str, Any] | None] = {}
    for part in store.table(FRAME_FEATURES).parts():  # in commit order: later parts win
        sources = part.meta.get("sources") or {}
        out.update((vid, sources.get(vid)) for vid in _part_ids(part))
    return out


def stored_identity(store: Store) -> dict[str, Any] | None:
    """The encoder identity recorded with the committed frame features, or None."""
    return store.table(FRAME_FEATURES).metadata().get("encoder")


def is_imported(identity: dict[str, Any] | None) -> bool:
    """True for the identity of imported features (``weights`` = ``external:<name>``)."""
    return bool(identity) and str(identity.get("weights", "")).startswith(IMPORTED_PREFIX)


def check_encoder_identity(store: Store, identity: dict[str, Any]) -> None:
    """Refuse to mix features of different encoders or grids in one table."""
    stored = stored_identity(store)
    if stored is None or stored == identity:
        return
    if is_imported(stored) != is_imported(identity):
        have, this = (("imported", "extracted") if is_imported(stored)
                      else ("extracted", "imported"))
        raise EncoderIdentityError(
            f"{store.uri('tables', FRAME_FEATURES)} holds {have} features "
            f"({stored.get('weights')}); this run's are {this} ({identity.get('weights')}): "
            "imported and extracted features are never mixed in one table. Use another "
            "store.root, or delete that table.")
    keys = sorted(set(stored) | set(identity))
    diffs = [f"{k}: stored {stored.get(k)!r}, this run {identity.get(k)!r}"
             for k in keys if stored.get(k) != identity.get(k)]
    raise EncoderIdentityError(
        f"{store.uri('tables', FRAME_FEATURES)} holds frame features of another encoder "
        f"({'; '.join(diffs)}). Use another store.root, or delete that table to re-extract.")


def commit_frame_parts(store: Store, parts: Sequence[Part], identity: dict[str, Any],
                       config: Any | None = None) -> None:
    """Append ``parts`` to the committed frame features (manifest written last)."""
    store.table(FRAME_FEATURES).commit(
        parts, {"encoder": identity, "grid_size": identity["grid_size"], "dim": identity["dim"]},
        config=config)


def write_extract_errors(store: Store, errors: pa.Table, config: Any | None = None) -> None:
    """Replace ``extract_errors`` with ``errors`` (ERRORS schema; may be empty).

    The part file of the replaced version is deleted after the commit (one extraction runs at a
    time, under the stage's lease).
    """
    store.table(EXTRACT_ERRORS).write(conform(errors, ERRORS, EXTRACT_ERRORS), config=config,
                                      reclaim=True)


def extract_error_rows(video_ids: Sequence[str], uris: Sequence[str], reasons: Sequence[str]
                       ) -> pa.Table:
    """ERRORS rows of stage ``extract``: input_id = video id."""
    n = len(video_ids)
    return pa.table({
        "stage": pa.array(["extract"] * n, pa.string()),
        "input_id": pa.array(list(video_ids), pa.string()),
        "uri": pa.array(list(uris), pa.string()),
        "row": pa.nulls(n, pa.int64()),
        "field": pa.nulls(n, pa.string()),
        "reason": pa.array(list(reasons), pa.string()),
    }, schema=ERRORS)


# ------------------------------------------------------------------------------------ reading


def _dim(encoder: dict[str, Any]) -> int:
    """D of the stored features: the encoder identity's ``dim`` (2048 for the ResNet trunk,
    any F for imported features)."""
    return int(encoder.get("dim", FEATURE_DIM))


def _part_ids(part: Part) -> list[str]:
    ids = part.meta.get("video_ids")
    if ids is None:
        raise StoreError(f"{FRAME_FEATURES} part {part.path} lists no video_ids in its meta")
    return ids


def _plan(store: Store, video_ids: Sequence[str] | None
          ) -> tuple[np.ndarray, list[tuple[Part, np.ndarray, np.ndarray]], int, dict[str, Any]]:
    """Output order of the videos and, per part to read, (part, its ids to take, their rows).

    A video committed in several parts (extracted again after its source changed) is taken
    from the latest.
    """
    table = store.table(FRAME_FEATURES)
    manifest = table.manifest()
    if manifest is None:
        raise StoreError(f"table {FRAME_FEATURES!r} has no committed data in "
                         f"{store.uri('tables', FRAME_FEATURES)}: run the extract stage first")
    meta = manifest.get("metadata", {})
    if "grid_size" not in meta:
        raise StoreError(f"{store.uri('tables', FRAME_FEATURES)}: manifest metadata lacks "
                         "grid_size (not written by the extract stage)")
    grid = int(meta["grid_size"])
    parts = [Part(**p) for p in manifest["parts"]]
    part_ids = [_part_ids(part) for part in parts]
    all_ids = np.concatenate([np.asarray(ids, dtype=object) for ids in part_ids]
                             or [np.empty(0, object)])
    part_of = np.repeat(np.arange(len(parts)), [len(ids) for ids in part_ids])
    # sorted ids and the last occurrence of each (its latest part)
    committed, from_end = np.unique(all_ids[::-1], return_index=True)
    latest = len(all_ids) - 1 - from_end
    if video_ids is None:
        order, where = committed, np.arange(len(committed))
    else:
        order = np.asarray(list(video_ids)).astype(str).astype(object)
        uniq, counts = np.unique(order, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"video_ids has duplicates: {list(uniq[counts > 1][:5])}")
        found = pc.index_in(pa.array(order, pa.string()), value_set=pa.array(committed,
                                                                             pa.string()))
        if found.null_count:
            absent = order[np.asarray(found.is_null())]
            raise StoreError(f"{len(absent)} requested video(s) have no committed frame "
                             f"features in {store.uri('tables', FRAME_FEATURES)}: "
                             f"{list(absent[:5])}")
        where = found.to_numpy().astype(np.int64)
    owner = part_of[latest[where]]  # part to read each output video from
    by_part = np.argsort(owner, kind="stable")
    bounds = np.flatnonzero(np.diff(owner[by_part])) + 1
    plan = [(parts[owner[rows[0]]], order[rows], rows)
            for rows in np.split(by_part, bounds) if len(rows)]
    return order, plan, grid, meta.get("encoder", {})


def _iter_parts(store: Store, plan: list[tuple[Part, np.ndarray, np.ndarray]], grid: int
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (output rows, features (len(rows), G, D) float16) per planned part, prefetched."""
    table_dir = store.table(FRAME_FEATURES).dir

    def read(part: Part) -> pa.Table:
        path = posixpath.join(table_dir, part.path)
        return pq.read_table(path, columns=READ_COLUMNS, filesystem=store.fs)

    with ThreadPoolExecutor(max_workers=PREFETCH_PARTS) as pool:
        pending = [pool.submit(read, part) for part, _, _ in plan[:PREFETCH_PARTS]]
        for k, (part, ids, rows) in enumerate(plan):
            data = pending[k].result()
            if k + PREFETCH_PARTS < len(plan):
                pending.append(pool.submit(read, plan[k + PREFETCH_PARTS][0]))
            pending[k] = None  # drop the reference: one part at a time in memory
            yield rows, _assemble(data, ids, grid, part.path)


def _assemble(data: pa.Table, ids: np.ndarray, grid: int, where: str) -> np.ndarray:
    """Scatter a part's rows of ``ids`` into (len(ids), G, D) float16; check completeness."""
    local = pc.index_in(data.column("video_id"), value_set=pa.array(ids, pa.string()))
    keep = np.asarray(local.is_valid())  # rows of the videos taken from this part
    vidx = local.filter(local.is_valid()).to_numpy().astype(np.int64)
    gidx = data.column("grid_index").to_numpy()[keep].astype(np.int64)
    if gidx.size and (gidx.min() < 0 or gidx.max() >= grid):
        raise StoreError(f"{FRAME_FEATURES} part {where}: grid_index outside 0..{grid - 1}")
    feature = data.column("feature").combine_chunks()
    dim = feature.type.list_size
    values = feature.flatten().to_numpy().reshape(-1, dim)[keep]  # (rows, D) float16
    pos = vidx * grid + gidx
    counts = np.bincount(pos, minlength=len(ids) * grid)
    if counts.max(initial=0) > 1 or counts.min(initial=1) < 1:
        bad = int(np.flatnonzero(counts != 1)[0]) // grid
        raise StoreError(f"{FRAME_FEATURES} part {where}: video {ids[bad]!r} does not have "
                         f"exactly one row per grid index 0..{grid - 1}")
    out = np.empty((len(ids) * grid, dim), np.float16)
    out[pos] = values
    return out.reshape(len(ids), grid, dim)


def read_frame_features(store: Store, video_ids: Sequence[str] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Grid-frame features: (video_ids (N,) str, features (N, G, 2048) float16).

    ``video_ids`` None: every committed video, sorted by id; else exactly these, in this order.
    """
    order, plan, grid, encoder = _plan(store, video_ids)
    out = np.empty((len(order), grid, _dim(encoder)), np.float16)
    for rows, feats in _iter_parts(store, plan, grid):
        out[rows] = feats
    return order.astype(str), out


def read_clip_features(store: Store, n_clips: int, video_ids: Sequence[str] | None = None
                       ) -> ClipFeatures:
    """Clip features for N_c = ``n_clips``: f_c = mean of the clip's G / N_c grid frames (eq. 1).

    Row ``v * n_clips + c`` of ``features`` is clip c of video v; frames of clip c are the grid
    indices c * G / N_c .. (c + 1) * G / N_c - 1 (equal-duration clips of the uniform grid).
    ``video_ids`` None: every committed video, sorted by id; else exactly these, in this order.
    """
    order, grid, encoder, parts = iter_clip_features(store, n_clips, video_ids)
    out = np.empty((len(order), n_clips, _dim(encoder)), np.float32)
    for rows, clips in parts:
        out[rows] = clips
    return ClipFeatures(order.astype(str), n_clips, out.reshape(-1, _dim(encoder)), grid, encoder)


def iter_clip_features(store: Store, n_clips: int, video_ids: Sequence[str] | None = None
                       ) -> tuple[np.ndarray, int, dict[str, Any],
                                  Iterator[tuple[np.ndarray, np.ndarray]]]:
    """:func:`read_clip_features` one stored part at a time, in bounded memory.

    Returns (video order, G, encoder, parts): ``parts`` yields (rows, clip features (len(rows),
    N_c, D) float32) per part read, ``rows`` the positions of its videos in the order.
    """
    order, plan, grid, encoder = _plan(store, video_ids)
    if n_clips <= 0 or grid % n_clips:
        raise ValueError(f"n_clips={n_clips} does not divide the grid size G={grid} of the "
                         f"stored frame features (choose N_c among the divisors of G)")
    per_clip, dim = grid // n_clips, _dim(encoder)

    def parts() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, feats in _iter_parts(store, plan, grid):
            clips = feats.reshape(len(rows), n_clips, per_clip, dim)  # (n, N_c, G/N_c, D)
            yield rows, clips.mean(axis=2, dtype=np.float32)  # (n, N_c, D)

    return order, grid, encoder, parts()


def frame_feature_moments(store: Store, video_ids: Sequence[str] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (float64, (D,)) over every grid frame.

    Streams one part at a time (float64 sums), so memory stays at one part whatever the store
    size. Clip features are means of grid frames, so their mean equals this mean for any N_c.
    """
    _, plan, grid, encoder = _plan(store, video_ids)
    total = np.zeros(_dim(encoder))
    squares = np.zeros(_dim(encoder))
    count = 0
    for _, feats in _iter_parts(store, plan, grid):
        flat = feats.reshape(-1, feats.shape[-1]).astype(np.float64)  # (n * G, D)
        total += flat.sum(0)
        squares += np.einsum("ij,ij->j", flat, flat)
        count += flat.shape[0]
    if count == 0:
        raise StoreError("frame_feature_moments: no frame features to summarise")
    mean = total / count
    var = np.maximum(squares / count - mean**2, 0.0)
    return mean, np.sqrt(var)
