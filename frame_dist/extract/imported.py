"""Precomputed features into the store (``jobs.import_features``): read, check, stage, commit.

Input (``extract.import_*``; docs/extract.md, "Bringing precomputed features"):

- ``.npy``: one array (V, G, F) (``import_kind=frames``: G grid frames per video) or
  (V, N_c, F) (``import_kind=clips``), plus ``import_ids``: the V video ids in row order, a text
  file (one id per line) or a Parquet / CSV file with a ``video_id`` column. Read memory-mapped,
  one part of ``videos_per_commit`` videos at a time.
- ``.parquet``: columns ``video_id`` and ``feature``: per video a list of G x F floats (row-major,
  G = ``extract.grid_size``) or a list of G lists of F floats.

Clip features are stored as a grid of G = N_c frames (clip j = grid frame j), so the graph
stage's clip f_c = mean of G / N_c' grid frames gives them back exactly for N_c' = N_c, and the
means of consecutive clips for the divisors of N_c. Values are stored as float16 (as extracted
features); ``time_s`` is NaN (no video was read).

The features are committed under the identity ``{"arch": "external", "weights":
"external:<import_name>", "grid_size": G, "dim": F, "kind": frames | clips}`` in one commit
(all videos or none), under the ``extract`` stage lease. Parts carry no ``sources``: extraction
never re-extracts an imported video, and it refuses to add extracted features to the table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_store.frames import (
    FRAME_FEATURES,
    IMPORTED_PREFIX,
    check_encoder_identity,
    commit_frame_parts,
    committed_video_ids,
    frame_features_table,
    write_frame_part,
)
from feature_store.store import Store, StoreError
from frame_dist.config import Config, ConfigError

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger values would be stored as inf
LISTED = 5  # ids named in a message


class ImportFeaturesError(ValueError):
    """The features to import are malformed (shape, values, ids); the message names the file."""


@dataclass
class ImportSummary:
    imported: int  # videos committed by this import
    replaced: int  # of which already had imported features (the new ones are read from now on)
    grid_size: int  # G
    dim: int  # F
    identity: dict[str, Any]
    store: str  # uri of the frame_features table

    def line(self) -> str:
        return (f"import_features: {self.imported} video(s) of {self.identity['weights']} "
                f"({self.identity['kind']}, G={self.grid_size}, F={self.dim}) committed"
                f"{f', {self.replaced} replaced' if self.replaced else ''} -> {self.store}")


def imported_identity(name: str, grid_size: int, dim: int, kind: str) -> dict[str, Any]:
    """The identity of imported features (stored as the table's ``encoder``)."""
    return {"arch": "external", "weights": f"{IMPORTED_PREFIX}{name}", "grid_size": grid_size,
            "dim": dim, "kind": kind}


def _listed(ids: list[str]) -> str:
    more = f" and {len(ids) - LISTED} more" if len(ids) > LISTED else ""
    return f"{ids[:LISTED]}{more}"


# ------------------------------------------------------------------------------ reading


def read_ids(path: str) -> list[str]:
    """Video ids in order: text (one per line), or a Parquet / CSV file's ``video_id`` column."""
    if not os.path.isfile(path):
        raise ImportFeaturesError(f"{path}: ids file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".parquet", ".csv"):
        try:
            table = (pq.read_table(path) if suffix == ".parquet" else pacsv.read_csv(
                path, convert_options=pacsv.ConvertOptions(column_types={"video_id": pa.string()})))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ImportFeaturesError(f"{path}: not a readable {suffix[1:]} file ({exc})") from exc
        if "video_id" not in table.column_names:
            raise ImportFeaturesError(f"{path}: no video_id column; has {table.column_names}")
        return _id_column(table.column("video_id"), path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():  # a trailing blank line is not an id
        lines.pop()
    for k, line in enumerate(lines):
        if not line.strip():
            raise ImportFeaturesError(f"{path}: line {k + 1} holds no video id")
    return [line.strip() for line in lines]


def _id_column(col: pa.ChunkedArray, path: str) -> list[str]:
    if pa.types.is_integer(col.type):  # as ingest: integer ids become their decimal text
        col = pc.cast(col, pa.string())
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ImportFeaturesError(f"{path}: video_id has type {col.type}; ids must be text or "
                                  "integers")
    ids = col.to_pylist()
    empty = [k + 1 for k, v in enumerate(ids) if v is None or not v.strip()]
    if empty:
        raise ImportFeaturesError(f"{path}: row(s) {empty[:LISTED]} hold no video id")
    return ids


def _npy(path: str, ids_path: str) -> tuple[list[str], np.ndarray]:
    if not ids_path:
        raise ConfigError(f"extract.import_path={path!r} is a .npy file: set extract.import_ids "
                          "to the file of its video ids (one per line, or a video_id column)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ImportFeaturesError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number):
        raise ImportFeaturesError(f"{path}: array of shape {array.shape} and dtype {array.dtype}; "
                                  "expected numbers of shape (V, G, F): videos, grid frames (or "
                                  "clips), feature dim")
    ids = read_ids(ids_path)
    if len(ids) != array.shape[0]:
        raise ImportFeaturesError(f"{path}: {array.shape[0]} videos (array {array.shape}) but "
                                  f"{ids_path} lists {len(ids)} ids")
    return ids, array


def _parquet(path: str, grid_size: int) -> tuple[list[str], np.ndarray]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ImportFeaturesError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in ("video_id", "feature") if c not in table.column_names]
    if missing:
        raise ImportFeaturesError(f"{path}: missing column(s) {missing}; has "
                                  f"{table.column_names}")
    ids = _id_column(table.column("video_id"), path)
    col = table.column("feature").combine_chunks()
    if not _is_list(col.type):
        raise ImportFeaturesError(f"{path}: feature has type {col.type}; expected a list of "
                                  "G x F floats or a list of G lists of F floats")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)  # NaN where null
    if len(ids) == 0:
        raise ImportFeaturesError(f"{path}: no rows")
    nulls = np.flatnonzero(np.isnan(lengths))
    if nulls.size:
        raise ImportFeaturesError(f"{path}: video {ids[nulls[0]]!r}: feature is null "
                                  f"({nulls.size} video(s))")
    if _is_list(col.type.value_type):  # (G, F) per video
        inner = pc.list_flatten(col)
        inner_len = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        grid, dim = lengths[0], inner_len[0] if len(inner_len) else 0
        row_of_inner = np.repeat(np.arange(len(ids)), np.nan_to_num(lengths).astype(np.int64))
        bad_rows = set(np.flatnonzero(lengths != grid))
        bad_rows |= set(row_of_inner[inner_len != dim].tolist())
        values = pc.list_flatten(inner)
        shape = f"{grid} lists of {dim} floats"
    else:  # G * F per video, G = extract.grid_size
        if lengths[0] % grid_size:
            raise ImportFeaturesError(
                f"{path}: video {ids[0]!r}: feature holds {lengths[0]:.0f} floats, not a multiple"
                f" of extract.grid_size={grid_size} (a flat list is G x F, row-major)")
        grid, dim = grid_size, int(lengths[0]) // grid_size
        bad_rows = set(np.flatnonzero(lengths != lengths[0]))
        values = pc.list_flatten(col)
        shape = f"{grid} x {dim} floats"
    if bad_rows:
        k = int(min(bad_rows))
        raise ImportFeaturesError(f"{path}: video {ids[k]!r}: feature is not {shape} like the "
                                  f"first video's ({len(bad_rows)} video(s) differ)")
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise ImportFeaturesError(f"{path}: feature values have type {values.type}; expected "
                                  "floats")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32)  # nulls -> NaN
    return ids, flat.reshape(len(ids), int(grid), int(dim))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def read_features(path: str, ids_path: str, grid_size: int) -> tuple[list[str], np.ndarray]:
    """(video ids, features (V, G, F)) of a .npy (+ ids file) or Parquet file; shapes checked."""
    if not os.path.isfile(path):
        raise ImportFeaturesError(f"{path}: features file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return _npy(path, ids_path)
    if suffix == ".parquet":
        return _parquet(path, grid_size)
    raise ConfigError(f"extract.import_path={path!r}: expected a .npy or .parquet file")


# ------------------------------------------------------------------------------ checks


def check_ids(ids: list[str], known: set[str], path: str) -> None:
    """No duplicate id, every id in the videos table."""
    uniq, counts = np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True)
    dup = uniq[counts > 1].tolist()
    if dup:
        raise ImportFeaturesError(f"{path}: duplicate video id(s) {_listed(dup)}")
    unknown = [v for v in ids if v not in known]
    if unknown:
        raise ImportFeaturesError(f"{path}: {len(unknown)} video id(s) not in the videos table "
                                  f"(ingest them first): {_listed(unknown)}")


def check_values(ids: list[str], feats: np.ndarray, path: str) -> None:
    """Finite values within the float16 range the store keeps; names the first bad video."""
    bad = ~np.isfinite(feats)
    if bad.any():
        v, g, d = np.argwhere(bad)[0]
        raise ImportFeaturesError(f"{path}: video {ids[v]!r}: NaN or infinite value at grid "
                                  f"index {g}, dim {d}")
    big = np.abs(feats) > FLOAT16_MAX
    if big.any():
        v, g, d = np.argwhere(big)[0]
        raise ImportFeaturesError(f"{path}: video {ids[v]!r}: value {float(feats[v, g, d]):g} "
                                  f"at grid index {g}, dim {d} exceeds the float16 range "
                                  f"(|x| <= {FLOAT16_MAX:g}) the store keeps: scale the features")


# ------------------------------------------------------------------------------ the stage


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_import(cfg: Config, store: Store) -> ImportSummary:
    """Check ``extract.import_path`` against the videos table and the config; commit it."""
    x = cfg.extract
    if not x.import_path or not x.import_name:
        raise ConfigError("jobs.import_features needs extract.import_path (the .npy or .parquet "
                          "file) and extract.import_name (names the features: external:<name>)")
    path = x.import_path
    ids, feats = read_features(path, x.import_ids, x.grid_size)
    n, grid, dim = feats.shape
    if n == 0 or dim == 0:
        raise ImportFeaturesError(f"{path}: no features (shape {feats.shape})")
    if grid != x.grid_size:
        what = "grid frames" if x.import_kind == "frames" else "clips (stored as grid frames)"
        raise ImportFeaturesError(f"{path}: {grid} {what} per video but extract.grid_size="
                                  f"{x.grid_size}: set extract.grid_size={grid}")
    try:
        videos = store.table("videos").read(columns=["video_id"])
    except StoreError as exc:
        raise ImportFeaturesError(f"{exc}; run the ingest stage first") from exc
    check_ids(ids, set(videos.column("video_id").to_pylist()), path)
    identity = imported_identity(x.import_name, grid, dim, x.import_kind)
    check_encoder_identity(store, identity)
    before = committed_video_ids(store)
    parts = []
    for rows in _chunks(n, x.videos_per_commit):  # one part in memory at a time
        block = np.asarray(feats[rows], dtype=np.float32)  # (b, G, F)
        check_values(ids[rows], block, path)
        times = np.full(block.shape[:2], np.nan)  # no video was read: grid times unknown
        table = frame_features_table(ids[rows], times, block)
        parts.append(write_frame_part(store, table, ids[rows], {
            "precision": "float16", "imported_from": os.path.abspath(path)}))
    commit_frame_parts(store, parts, identity, config=cfg)  # all videos or none
    summary = ImportSummary(n, len(before & set(ids)), grid, dim, identity,
                            store.uri("tables", FRAME_FEATURES))
    print(summary.line(), flush=True)
    return summary
