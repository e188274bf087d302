"""Arrow schemas of every table in the feature store (docs/architecture.md, "Data contracts").

Defined once here; every writer builds its tables with these schemas and every reader checks
them with :func:`conform`, which names the table and column of any mismatch.
"""

from __future__ import annotations

import pyarrow as pa

FEATURE_DIM = 2048  # ResNet-50 trunk after global average pooling

# Source videos: one row per video. duration_s is optional (probed at extraction when null).
VIDEOS = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),  # local path or s3://...
    pa.field("duration_s", pa.float64()),
])

# Clean interactions after ingest, one row per (user, video) view, with the time split.
INTERACTIONS = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("play_time_s", pa.float64(), nullable=False),
    pa.field("duration_s", pa.float64(), nullable=False),
    pa.field("watch_ratio", pa.float64(), nullable=False),  # r = play / duration, capped
    pa.field("full_watch", pa.bool_(), nullable=False),  # r >= 1 - tolerance
    pa.field("timestamp", pa.int64(), nullable=False),  # source order when the source has none
    pa.field("split", pa.string(), nullable=False),  # "train", "valid" or "test"
    pa.field("source_row", pa.int64(), nullable=False),  # 1-based record number in the source
])

# One row per input (video or interaction row) that failed a stage.
ERRORS = pa.schema([
    pa.field("stage", pa.string(), nullable=False),  # ingest, extract, ...
    pa.field("input_id", pa.string()),  # video id, or user/video ids of an interaction row
    pa.field("uri", pa.string()),  # source file
    pa.field("row", pa.int64()),  # 1-based record number in the source file, when a row failed
    pa.field("field", pa.string()),  # the offending column, when one is to blame
    pa.field("reason", pa.string(), nullable=False),
])


def frame_features_schema(dim: int = FEATURE_DIM) -> pa.Schema:
    """Frame features on the uniform time grid: one row per (video, grid index).

    The encoder identity (weights, input size, grid size) lives in the table's manifest metadata.
    """
    return pa.schema([
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("grid_index", pa.int32(), nullable=False),  # 0 .. G-1
        pa.field("time_s", pa.float64(), nullable=False),  # grid timestamp inside the video
        pa.field("feature", pa.list_(pa.float16(), dim), nullable=False),
    ])


FRAME_FEATURES = frame_features_schema()

# Top-K recommendations of the score stage.
SCORES = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),  # 1 = best
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),  # logit of a full watch, y(u, v)
    # P(full watch) = sigmoid(a y + b), the run's calibration (model.pt)
    pa.field("probability", pa.float32(), nullable=False),
])

# Synthetic world only: the true probability of a full watch of every interaction.
TRUTH = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("timestamp", pa.int64(), nullable=False),
    pa.field("p_full", pa.float64(), nullable=False),
])

# Synthetic world only: the topic timeline of every video (for the case-study plot).
SCENES = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("scene_index", pa.int32(), nullable=False),  # 0-based, in time order
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("topic", pa.int32(), nullable=False),
])


class SchemaError(ValueError):
    """A table does not match its data contract."""


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns and types, or raise naming the problem.

    Extra columns are dropped; safe casts (int32 -> int64, large_string -> string) are applied;
    nulls in non-nullable columns are reported with their first row numbers (1-based).
    """
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{name}: missing column(s) {missing}; has {table.column_names}")
    columns = []
    for f in schema:
        col = table.column(f.name)
        if not col.type.equals(f.type):
            try:
                col = col.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(f"{name}.{f.name}: type {col.type} cannot be read as {f.type}"
                                  f" ({exc})") from exc
        if not f.nullable and col.null_count:
            nulls = [i + 1 for i, v in enumerate(col.is_null().to_pylist()) if v][:10]
            raise SchemaError(f"{name}.{f.name}: {col.null_count} null value(s) in a required "
                              f"column, rows {nulls}")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)
