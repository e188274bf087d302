"""Stage [extract]: videos -> frame features on the uniform grid, with Ray Data.

Pipeline (each arrow is a Ray Data operator; the driver only commits)::

    videos table, minus committed videos whose source is unchanged
      -> decode_videos       map_batches tasks (CPU), ``videos_per_decode_task`` videos each:
                             G grid frames per video (frame_dist.extract.video), failures become
                             rows
      -> EncodeFrames        actor pool (``encoder_actors``; one GPU each when the cluster has
                             GPUs): the ResNet-50 trunk, loaded once per actor
      -> write_frame_parts   map_batches tasks: ``videos_per_commit`` videos per Parquet part,
                             staged in the store from the worker
      -> driver              commits the parts that arrived (manifest written last, at most
                             every COMMIT_MIN_INTERVAL_S), writes ``extract_errors`` at the end

Frames and features travel between operators as one ``large_binary`` value per video (zero-copy
views on both sides); a failed video carries an empty value and its reason, so one bad file never
fails the dataset. A run killed at any point leaves the committed videos readable; the next run
skips them (``skipped``) and retries the rest, including the previous run's failures. Staged parts
of a killed run are never listed by a manifest; ``store.table("frame_features").vacuum()``
removes them when no extraction is running.

Changed videos. Each committed video records its source identity (uri, size, mtime or ETag:
frame_dist.extract.sources) in the Part meta; a committed video whose uri or file changed since
is extracted again (the summary names it and why), and the readers take its new features (the
latest part listing a video wins).

Fault injection (tests): with ``FRAME_DIST_FAULT_KILL_AFTER_COMMITS=k`` in the driver's
environment, the driver SIGKILLs itself right after its k-th commit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.frames import (
    EXTRACT_ERRORS,
    EncoderIdentityError,
    check_encoder_identity,
    commit_frame_parts,
    committed_sources,
    extract_error_rows,
    frame_features_table,
    is_imported,
    stored_identity,
    write_extract_errors,
    write_frame_part,
)
from feature_store.schemas import FEATURE_DIM, VIDEOS, conform
from feature_store.store import Part, Store
from frame_dist.config import Config, ConfigError, ExtractConfig
from frame_dist.console import Progress, console_error, quiet_ray_data
from frame_dist.extract.sources import source_change, source_identities

FAULT_ENV = "FRAME_DIST_FAULT_KILL_AFTER_COMMITS"
COMMIT_MIN_INTERVAL_S = 2.0  # bounds manifest rewrites; a kill loses at most this much work
# Part writers reserve no CPU: they are short and mostly wait on storage, and with a CPU
# reservation they queue behind decode tasks until decoding ends (no commits until then).
WRITE_CPUS = 0
DECODER_MEMORY = 192 * 2**20  # a decode worker: Python, PyArrow, FFmpeg (~130 MiB measured)
CHANGED_LISTED = 5  # changed videos named in the summary line (ExtractSummary holds all)
CHANGED_PRINTED = 100  # changed videos printed one per line before the work starts
NO_URI = "no uri and no imported features (jobs.import_features)"  # extract_errors reason

DECODED = pa.schema([
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("times", pa.list_(pa.float64())),  # (G,) grid times; empty for a failed video
    ("frames", pa.large_binary()),  # G x S x S x 3 uint8; empty for a failed video
    ("error", pa.string()),  # null, or why the video failed
])
ENCODED = pa.schema([
    ("video_id", pa.string()),
    ("uri", pa.string()),
    ("times", pa.list_(pa.float64())),
    ("features", pa.large_binary()),  # G x 2048 float16; empty for a failed video
    ("error", pa.string()),
])
WRITTEN = pa.schema([
    ("part_path", pa.string()),  # a staged part (null on a failure row)
    ("part_rows", pa.int64()),
    ("part_meta", pa.string()),  # JSON of the Part meta (video_ids, precision)
    ("video_id", pa.string()),  # a failed video (null on a part row)
    ("uri", pa.string()),
    ("reason", pa.string()),
])


class ExtractError(RuntimeError):
    """The extract stage cannot run (no videos table, duplicate ids) or produced nothing."""


@dataclass
class ExtractSummary:
    """Outcome of one run of the extract stage."""

    done: int  # videos extracted and committed by this run (changed ones included)
    skipped: int  # videos already committed before this run, source unchanged
    failed: int  # videos that failed (rows of extract_errors)
    frames: int  # grid frames encoded by this run (done * G)
    seconds: float
    store: str  # uri of the frame_features table
    failures: dict[str, str] = field(default_factory=dict)  # video id -> reason
    first_part_s: float | None = None  # seconds until the first part reached the driver
    # committed videos whose uri or file changed, extracted again by this run: id -> why
    changed: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        text = (f"extract: {self.done} done, {self.skipped} skipped (already committed), "
                f"{self.failed} failed; {self.frames} frames in {self.seconds:.1f} s "
                f"({rate:.1f} frames/s) -> {self.store}")
        again = [v for v in self.changed if v not in self.failures]
        if again:
            text += f"; re-extracted {len(again)} changed video(s): {_listed(again, self.changed)}"
        kept = [v for v in self.changed if v in self.failures]
        if kept:
            text += (f"; {len(kept)} changed video(s) failed and keep their previous features: "
                     f"{_listed(kept, self.changed)}")
        return text


def _listed(ids: list[str], why: dict[str, str]) -> str:
    named = ", ".join(f"{v} ({why[v]})" for v in ids[:CHANGED_LISTED])
    more = len(ids) - CHANGED_LISTED
    return named + (f" and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------- binary columns


def pack_arrays(arrays: list[np.ndarray | None]) -> pa.LargeBinaryArray:
    """One binary value per array (raw bytes, C order); None -> empty value. One copy."""
    sizes = np.array([0 if a is None else a.nbytes for a in arrays], np.int64)
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    present = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays
               if a is not None]
    data = np.concatenate(present) if present else np.empty(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(arrays), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _packed_contiguous(data: np.ndarray, lengths: np.ndarray) -> pa.LargeBinaryArray:
    """Binary values that are consecutive slices of ``data``'s bytes (zero-copy)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(lengths),
        [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))])


def unpack_rows(column: pa.ChunkedArray | pa.Array, row_shape: tuple[int, ...],
                dtype: np.dtype | type, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty values of a binary column as one array (n_nonempty, *row_shape), zero-copy.

    Returns the array and the boolean mask of non-empty rows. A value whose size is neither 0
    nor the size of ``row_shape`` raises ValueError naming ``where``.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    if n == 0:
        return np.empty((0, *row_shape), dtype), np.zeros(0, bool)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + n + 1]
    lengths = np.diff(offsets)
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    bad = np.flatnonzero((lengths != 0) & (lengths != row_bytes))
    if bad.size:
        raise ValueError(f"{where}: row {int(bad[0])} holds {int(lengths[bad[0]])} bytes, "
                         f"expected {row_bytes} (shape {row_shape})")
    nonempty = lengths > 0
    if not nonempty.any():
        return np.empty((0, *row_shape), dtype), nonempty
    raw = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    return raw.view(dtype).reshape(-1, *row_shape), nonempty


# ----------------------------------------------------------------------- operators


def decode_videos(batch: pa.Table, *, grid_size: int, image_size: int, threads: int,
                  seek_min_frames: int, endpoint_url: str | None, region: str | None
                  ) -> pa.Table:
    """Ray Data task: videos (video_id, uri, duration_s) -> DECODED rows, failures included."""
    from frame_dist.extract.video import VideoDecodeError, decode_grid

    ids = batch.column("video_id").to_pylist()
    uris = batch.column("uri").to_pylist()
    durations = batch.column("duration_s").to_pylist()
    frames: list[np.ndarray | None] = []
    times: list[list[float]] = []
    errors: list[str | None] = []
    for uri, duration in zip(uris, durations):  # one video's decode is the unit of work
        decoded, error = None, None
        try:
            decoded = decode_grid(uri, grid_size, image_size, duration_s=duration,
                                  threads=threads, seek_min_frames=seek_min_frames,
                                  endpoint_url=endpoint_url, region=region)
        except VideoDecodeError as exc:
            error = exc.reason
        except Exception as exc:  # noqa: BLE001 - one bad video must not fail the dataset
            error = f"unexpected {type(exc).__name__}: {exc}"
        frames.append(None if decoded is None else decoded.frames)
        times.append([] if decoded is None else decoded.grid_times.tolist())
        errors.append(error)
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(uris, pa.string()),
         pa.array(times, pa.list_(pa.float64())), pack_arrays(frames),
         pa.array(errors, pa.string())], schema=DECODED)


class EncodeFrames:
    """Ray Data actor: DECODED rows -> ENCODED rows (G x 2048 float16 per video).

    The encoder is built once in ``__init__`` (on the actor's GPU when it has one).
    """

    def __init__(self, extract_cfg: ExtractConfig, use_gpu: bool):
        import torch

        from frame_dist.extract.encoder import load_encoder

        self.cfg = extract_cfg
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.encoder = load_encoder(extract_cfg, self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        g, s = self.cfg.grid_size, self.cfg.image_size
        frames, ok = unpack_rows(batch.column("frames"), (g, s, s, 3), np.uint8,
                                 "decoded frames")
        feats = self.encoder.encode(frames.reshape(-1, s, s, 3), self.cfg.batch_size)  # (n*G, D)
        lengths = np.where(ok, g * FEATURE_DIM * 2, 0)
        return pa.Table.from_arrays(
            [batch.column("video_id"), batch.column("uri"), batch.column("times"),
             _packed_contiguous(feats.reshape(-1).view(np.uint8), lengths),
             batch.column("error")], schema=ENCODED)


def write_frame_parts(batch: pa.Table, *, store: Store, grid_size: int, precision: str
                      ) -> pa.Table:
    """Ray Data task: ENCODED rows -> one staged part of the good videos + one row per failure."""
    feats, ok = unpack_rows(batch.column("features"), (grid_size, FEATURE_DIM), np.float16,
                            "encoded features")
    failed = batch.filter(pa.array(~ok))
    n_parts = int(ok.any())
    part_path: list[str | None] = [None] * n_parts
    part_rows: list[int | None] = [None] * n_parts
    part_meta: list[str | None] = [None] * n_parts
    if n_parts:
        good = batch.filter(pa.array(ok))
        ids = good.column("video_id").to_pylist()
        times = pc.list_flatten(good.column("times")).to_numpy()
        table = frame_features_table(ids, times.reshape(len(ids), grid_size), feats)
        part = write_frame_part(store, table, ids, {"precision": precision})
        part_path, part_rows, part_meta = [part.path], [part.rows], [json.dumps(part.meta)]
    lead = [pa.nulls(n_parts, pa.string())]  # failure columns are null on the part row
    return pa.Table.from_arrays([
        pa.array(part_path + [None] * len(failed), pa.string()),
        pa.array(part_rows + [None] * len(failed), pa.int64()),
        pa.array(part_meta + [None] * len(failed), pa.string()),
        pa.concat_arrays(lead + failed.column("video_id").chunks),
        pa.concat_arrays(lead + failed.column("uri").chunks),
        pa.concat_arrays(lead + pc.fill_null(failed.column("error"), "no features").chunks),
    ], schema=WRITTEN)


# ----------------------------------------------------------------------- driver


def decode_memory_bytes(x: ExtractConfig) -> int:
    """Memory a decoding task reserves: its frames twice (decoded + packed) plus the worker.

    Besides keeping many concurrent 1080p decodes from exhausting a node, the reservation keeps
    Ray Data from fusing the decode tasks into the encoder actors (it fuses only operators with
    equal remote args), so decoding runs in parallel tasks, not serially inside the actor.
    """
    frames = x.videos_per_decode_task * x.grid_size * x.image_size ** 2 * 3
    return 2 * frames + DECODER_MEMORY


def videos_to_extract(store: Store) -> tuple[pa.Table, int, dict[str, str], dict[str, Any]]:
    """What to extract: (videos, number skipped, changed: id -> why, source identities by id).

    The videos are the table's minus the committed ones whose source identity is unchanged;
    ``changed`` lists the committed ones extracted again; the identities (of every video to
    extract) are committed with their features.
    """
    from feature_store.store import StoreError

    try:
        videos = store.table("videos").read(schema=VIDEOS)
    except StoreError as exc:
        raise ExtractError(f"{exc}; run the ingest stage first") from exc
    videos = conform(videos, VIDEOS, "videos")
    ids = videos.column("video_id")
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(dup):
        raise ExtractError(f"videos table has {len(dup)} duplicated video_id(s): "
                           f"{dup.to_pylist()[:5]}")
    vids = ids.to_pylist()
    current = dict(zip(vids, source_identities(videos.column("uri").to_pylist(),
                                               store.endpoint_url, store.region)))
    committed = committed_sources(store)
    changed = {}
    for vid in vids:  # in the videos table's order
        why = source_change(committed[vid], current[vid]) if vid in committed else None
        if why is not None:
            changed[vid] = why
    todo = [vid not in committed or vid in changed for vid in vids]
    todo_ids = [vid for vid, t in zip(vids, todo) if t]
    return (videos.filter(pa.array(todo, pa.bool_())), len(vids) - len(todo_ids), changed,
            {vid: current[vid] for vid in todo_ids})


def run_extract(cfg: Config, store: Store) -> ExtractSummary:
    """Extract the frame features of every video of the ``videos`` table not yet committed, or
    committed from a source that changed since (its uri, or the file's size, mtime or ETag).

    Encoder weights / image size / grid must match what the store already holds
    (:class:`feature_store.frames.EncoderIdentityError` otherwise). Videos without a uri are
    failures (:data:`NO_URI`); a store of imported features extracts nothing
    (:func:`_imported_store`). Returns the summary (also printed); raises
    :class:`ExtractError` when every video failed.
    """
    import ray

    from frame_dist.extract.encoder import encoder_identity
    from frame_dist.ray_runtime import cluster_has_gpus, init_ray

    start = time.monotonic()
    x = cfg.extract
    if is_imported(stored_identity(store)):
        return _imported_store(cfg, store, start)
    identity = encoder_identity(x)
    check_encoder_identity(store, identity)
    todo, skipped, changed, sources = videos_to_extract(store)
    failures: dict[str, tuple[str, str]] = {}
    todo = _without_uri(todo, failures)
    for k, (vid, why) in enumerate(changed.items()):
        if k == CHANGED_PRINTED:  # a whole bucket re-uploaded, say
            print(f"extract: ... and {len(changed) - k} more changed videos", flush=True)
            break
        print(f"extract: {vid} changed since its commit ({why}): extracting it again",
              flush=True)
    features_uri = store.uri("tables", "frame_features")
    done, first_part_at = 0, None
    if len(todo):
        init_ray()
        has_gpus = cluster_has_gpus()
        if x.device == "cuda" and not has_gpus:
            raise ConfigError("extract.device='cuda' but the Ray cluster has no GPUs")
        use_gpu = has_gpus and x.device != "cpu"
        # one input block per decoding task: small tasks spread over the cluster's CPUs
        quiet_ray_data()
        ds = ray.data.from_items(todo.to_pylist(), override_num_blocks=math.ceil(
            len(todo) / x.videos_per_decode_task))
        ds = ds.map_batches(
            decode_videos, batch_size=None, batch_format="pyarrow", num_cpus=x.decode_cpus,
            memory=decode_memory_bytes(x),
            fn_kwargs=dict(grid_size=x.grid_size, image_size=x.image_size,
                           threads=x.decoder_threads, seek_min_frames=x.seek_min_frames,
                           endpoint_url=store.endpoint_url, region=store.region))
        ds = ds.map_batches(
            EncodeFrames, fn_constructor_kwargs=dict(extract_cfg=x, use_gpu=use_gpu),
            batch_size=max(1, x.batch_size // x.grid_size), batch_format="pyarrow",
            # one CPU reserved, encoder_threads used: reserving them all would starve decoding
            compute=ray.data.ActorPoolStrategy(size=x.encoder_actors), num_cpus=1,
            num_gpus=1 if use_gpu else 0)
        ds = ds.map_batches(
            write_frame_parts, batch_size=x.videos_per_commit, batch_format="pyarrow",
            num_cpus=WRITE_CPUS,
            compute=ray.data.TaskPoolStrategy(size=max(2, x.encoder_actors)),
            fn_kwargs=dict(store=store, grid_size=x.grid_size,
                           precision="bf16-autocast" if use_gpu else "float32"))
        done, first_part_at = _commit_as_they_arrive(ds, store, identity, cfg, failures,
                                                     sources)
    summary = ExtractSummary(done, skipped, len(failures), done * x.grid_size,
                             time.monotonic() - start, features_uri,
                             {vid: reason for vid, (_, reason) in failures.items()},
                             None if first_part_at is None else first_part_at - start,
                             changed)
    return _finish(cfg, store, summary, failures, bool(len(todo)))


def _without_uri(todo: pa.Table, failures: dict[str, tuple[str, str]]) -> pa.Table:
    """``todo`` minus its videos without a uri, which become failures (:data:`NO_URI`)."""
    has_uri = pc.greater(pc.utf8_length(todo.column("uri")), 0)
    for vid in todo.filter(pc.invert(has_uri)).column("video_id").to_pylist():
        failures[vid] = ("", NO_URI)
    return todo.filter(has_uri)


def _finish(cfg: Config, store: Store, summary: ExtractSummary,
            failures: dict[str, tuple[str, str]], ran: bool) -> ExtractSummary:
    """Write ``extract_errors``, print the summary; raise when every video failed."""
    if ran or failures or not store.table(EXTRACT_ERRORS).exists():
        # nothing to do means every video is committed: the table already says "no failure"
        errors = extract_error_rows(list(failures), [u for u, _ in failures.values()],
                                    [r for _, r in failures.values()])
        write_extract_errors(store, errors, config=cfg)
    print(summary.line(), flush=True)
    if failures and not summary.done and not summary.skipped:
        raise ExtractError(f"all {len(failures)} videos failed; first: "
                           f"{next(iter(summary.failures.items()))}")
    return summary


def _imported_store(cfg: Config, store: Store, start: float) -> ExtractSummary:
    """Extract on a store of imported features: nothing to extract, nothing to mix.

    Videos with imported features are skipped; videos without a uri nor features are failures
    (:data:`NO_URI`); a video with a uri but no features would need the encoder, whose features
    never join imported ones: refused (:class:`EncoderIdentityError`).
    """
    stored = stored_identity(store)
    todo, skipped, changed, _ = videos_to_extract(store)  # changed: none (parts lack sources)
    failures: dict[str, tuple[str, str]] = {}
    todo = _without_uri(todo, failures)
    features_uri = store.uri("tables", "frame_features")
    if len(todo):
        ids = todo.column("video_id").to_pylist()
        raise EncoderIdentityError(
            f"{features_uri} holds imported features ({stored.get('weights')}), but {len(ids)} "
            f"video(s) of the videos table have a uri and no features: "
            f"{ids[:CHANGED_LISTED]}{' ...' if len(ids) > CHANGED_LISTED else ''}. Imported "
            "and extracted features are never mixed in one table: import their features too "
            "(jobs.import_features), or use another store.root to extract every video.")
    print(f"extract: {features_uri} holds imported features ({stored.get('weights')}): "
          "nothing to extract", flush=True)
    summary = ExtractSummary(0, skipped, len(failures), 0, time.monotonic() - start,
                             features_uri, {vid: r for vid, (_, r) in failures.items()}, None,
                             changed)
    return _finish(cfg, store, summary, failures, False)


def _commit_as_they_arrive(ds: Any, store: Store, identity: dict[str, Any], cfg: Config,
                           failures: dict[str, tuple[str, str]], sources: dict[str, Any]
                           ) -> tuple[int, float | None]:
    """Drive the dataset; commit staged parts as they arrive, with their videos' ``sources``.

    Returns the number of videos committed and the time (monotonic) the first part arrived.
    """
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    pending: list[Part] = []
    done = commits = 0
    last_commit = -math.inf
    first_part_at: float | None = None

    def commit() -> None:
        nonlocal pending, done, commits, last_commit
        commit_frame_parts(store, pending, identity, config=cfg if commits == 0 else None)
        done += sum(len(p.meta["video_ids"]) for p in pending)
        pending, commits, last_commit = [], commits + 1, time.monotonic()
        if kill_after and commits >= kill_after:
            console_error(f"{FAULT_ENV}={kill_after}: killing the driver after commit {commits}")
            os.kill(os.getpid(), signal.SIGKILL)

    # prefetch_batches=0: with prefetching, Ray Data hands over block k only once block k+1
    # exists, so every commit would lag one part behind.
    with Progress(len(sources), "extract", "video") as bar:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow",
                                     prefetch_batches=0):
            is_part = block.column("part_path").is_valid()
            parts = block.filter(is_part).to_pydict()
            for path, rows, meta in zip(parts["part_path"], parts["part_rows"],
                                        parts["part_meta"]):
                meta = json.loads(meta)
                meta["sources"] = {vid: sources[vid] for vid in meta["video_ids"]}
                pending.append(Part(path, rows, meta))
                bar.update(len(meta["video_ids"]))
            if pending and first_part_at is None:
                first_part_at = time.monotonic()
            bad = block.filter(pc.invert(is_part)).to_pydict()
            failures.update((vid, (uri, reason)) for vid, uri, reason in
                            zip(bad["video_id"], bad["uri"], bad["reason"]))
            bar.update(len(bad["video_id"]))
            if pending and time.monotonic() - last_commit >= COMMIT_MIN_INTERVAL_S:
                commit()
        if pending:
            commit()
    return done, first_part_at
