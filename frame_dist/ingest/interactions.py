"""Stage [ingest]: validate raw interactions and videos, compute watch ratios, split by time.

Sources are CSV or Parquet files whose columns are mapped to ours by a preset or an explicit
mapping (``IngestConfig.columns``, our name -> source name):

=========  =============  ============  ================  =============  ==============
preset     user_id        video_id      play_time         duration       timestamp
=========  =============  ============  ================  =============  ==============
frame      user_id        video_id      play_time_s       duration_s     timestamp
authors    user_id        photo_id      playing_time      duration_ms    (row order)
kuairec    user_id        video_id      play_duration     video_duration timestamp
kuairand   user_id        video_id      play_time_ms      duration_ms    time_ms
=========  =============  ============  ================  =============  ==============

Times of the ``authors``, ``kuairec`` and ``kuairand`` presets are in milliseconds, ``frame`` in
seconds (``IngestConfig.duration_unit`` overrides); ``kuairand`` timestamps are milliseconds
since the epoch. A source without a timestamp column uses its row order.

**Truth** (``IngestConfig.truth_column``, optional): a source column holding the true
probability of a full watch of each row. Each value must be a finite number in [0, 1] (else the
row is bad, as below); the good rows' values are committed as the ``truth`` table
(:data:`~feature_store.schemas.TRUTH`), which the evaluate stage scores as the oracle.

**Files** are UTF-8 (a byte-order mark is allowed); any other encoding is refused, under either
policy, naming the line and byte (checked in a streaming pass). CSV / TSV columns are read as
text, so ids stay exactly as written (``007`` and ``7`` are two users); integer id columns of
Parquet files become their decimal text, ids of any other type are refused.

**Timestamps** are stored as int64 and only order the split, so each keeps its own unit: a
number must be whole, finite and |t| < 2**62 (``kuairec`` timestamps are seconds with three
decimals and become whole milliseconds); typed Parquet columns convert to integers in their
own unit (``timestamp[s|ms|us|ns]``: since the epoch in that unit, ``date32``: days,
``date64``: milliseconds; Parquet itself stores seconds as ms and dates as days). Nothing is
truncated or wrapped.

**Row numbers** in messages and in the errors table are 1-based record numbers: record 1 is the
first data row (line 2 of a CSV file with a header).

**Bad rows** (missing ids; NaN / non-numeric / infinite / negative play time; NaN / infinite /
zero / negative duration; a missing, non-numeric, fractional or out-of-range timestamp; a
missing, non-numeric, infinite or out-of-[0, 1] truth value; a video id absent from the videos
table; a later copy of an earlier good row's (user, video, timestamp), reported as "duplicate of
row N") are never dropped silently: with
``bad_rows="fail"`` the stage raises :class:`IngestError` listing them and writes nothing; with
``bad_rows="quarantine"`` they go to the ``ingest_errors`` table (one row per bad row and
reason) and the good rows are ingested. A source without data rows, or with no good row left,
is refused under either policy: nothing is committed.

**Watch ratio** r = play_time / duration, capped at ``max_watch_ratio`` (1 by default: replays
do not make a video "more than fully" watched). ``full_watch`` is r >= 1 - full_watch_tolerance.

**Split**: per user, interactions are ordered by (timestamp, record number); the last
``round(n * test_fraction)`` of them (at least 1, at most n - 1) are the test set, and the
``round(n * valid_fraction)`` before those (at least 1 when the fraction is positive, and never
the user's last train interaction) are the validation set used for early stopping. Users with
fewer than ``min_user_interactions`` interactions keep all of them in train, so every evaluated
user has history in train and no valid/test interaction precedes a train interaction of the
same user (nor a test one a valid one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feature_store.schemas import ERRORS, INTERACTIONS, TRUTH, VIDEOS, conform
from feature_store.store import Store
from frame_dist.config import Config, IngestConfig

# our column -> source column, and the unit of the time columns
PRESETS: dict[str, tuple[dict[str, str], str]] = {
    "frame": (dict(user_id="user_id", video_id="video_id", play_time="play_time_s",
                   duration="duration_s", timestamp="timestamp"), "s"),
    "authors": (dict(user_id="user_id", video_id="photo_id", play_time="playing_time",
                     duration="duration_ms"), "ms"),
    "kuairec": (dict(user_id="user_id", video_id="video_id", play_time="play_duration",
                     duration="video_duration", timestamp="timestamp"), "ms"),
    "kuairand": (dict(user_id="user_id", video_id="video_id", play_time="play_time_ms",
                      duration="duration_ms", timestamp="time_ms"), "ms"),
    "custom": ({}, "s"),
}
# timestamps multiplied by this to whole numbers: KuaiRec's are seconds with ms decimals
TIMESTAMP_SCALE: dict[str, tuple[int, str]] = {"kuairec": (1000, " of milliseconds")}
REQUIRED = ("user_id", "video_id", "play_time", "duration")
MAX_LISTED = 20  # bad rows spelled out in an IngestError message
TIMESTAMP_LIMIT = 2**62  # |timestamp| bound: far inside int64, so no conversion can wrap


class IngestError(ValueError):
    """Input files are unreadable, lack columns, or (policy "fail") contain bad rows."""


@dataclass
class IngestSummary:
    rows: int
    ingested: int
    quarantined: int
    users: int
    videos: int
    train: int
    valid: int
    test: int
    full_watch_rate: float

    def __str__(self) -> str:
        return (f"ingest: {self.rows} rows -> {self.ingested} interactions "
                f"({self.train} train / {self.valid} valid / {self.test} test, {self.users} users, "
                f"{self.videos} videos, full-watch rate {self.full_watch_rate:.3f}); "
                f"{self.quarantined} rows quarantined")


def read_source(path: str | Path) -> pa.Table:
    """Read a CSV or Parquet file (by extension) as an Arrow table, ids kept as strings."""
    path = Path(path)
    if not path.exists():
        raise IngestError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix in (".csv", ".tsv"):
            check_utf8(path)
            # Every column is read as text: ids stay as written, and validation reports
            # unparseable values by row. The names come from Arrow's own header parse (a
            # byte-order mark is not part of the first name).
            parse = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            with pacsv.open_csv(path, parse_options=parse) as reader:
                names = reader.schema.names
            table = pacsv.read_csv(path, parse_options=parse, convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=True))
            typed = [f"{f.name} ({f.type})" for f in table.schema if f.type != pa.string()]
            if typed:
                raise IngestError(f"{path}: column(s) {', '.join(typed)} were not read as text")
            return table
    except (pa.ArrowInvalid, OSError) as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from exc
    raise IngestError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv or .parquet)")


def check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Raise :class:`IngestError` naming the line and byte where ``path`` stops being UTF-8.

    Reads ``chunk_bytes`` at a time (memory stays bounded); a character split across two
    chunks is carried over to the next one.
    """
    offset, lines, carry, tail = 0, 0, b"", b""  # tail: the bytes before, for the message
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            data = carry + chunk
            if not data:
                return
            carry = b""
            try:
                if not data.isascii():
                    data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if not (chunk and exc.reason == "unexpected end of data"):
                    line = lines + data.count(b"\n", 0, exc.start) + 1
                    raise IngestError(_encoding_message(path, tail + data, len(tail) + exc.start,
                                                        offset + exc.start, line)) from None
                data, carry = data[:exc.start], data[exc.start:]  # a truncated last character
            lines += data.count(b"\n")
            offset += len(data)
            tail = (tail + data)[-40:]


def _encoding_message(path: Path, data: bytes, at: int, offset: int, line: int) -> str:
    start = max(data.rfind(b"\n", 0, at) + 1, at - 40)
    end = data.find(b"\n", at)
    context = data[start:min(end if end >= 0 else len(data), at + 20)]
    row = "the header" if line == 1 else f"data row {line - 1}"
    return (f"{path}: not UTF-8: byte 0x{data[at]:02x} at offset {offset} (line {line}, "
            f"{row}) in {context!r}. Re-save the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}` "
            "(with -f naming the encoding it was written in)")


def column_mapping(cfg: IngestConfig) -> tuple[dict[str, str], str]:
    mapping, unit = PRESETS[cfg.preset]
    mapping = {**mapping, **cfg.columns}
    unknown = sorted(set(cfg.columns) - set(REQUIRED) - {"timestamp"})
    if unknown:
        raise IngestError(f"ingest.columns: unknown target column(s) {unknown}; "
                          f"map to {list(REQUIRED) + ['timestamp']}")
    return mapping, cfg.duration_unit or unit


# --------------------------------------------------------------------------- validation


class _BadRows:
    """Collects (record number, field, reason, input id) of invalid rows, vectorised per rule."""

    def __init__(self, n: int):
        self.n = n
        self.bad = np.zeros(n, dtype=bool)
        self.rows: list[np.ndarray] = []
        self.fields: list[str | None] = []
        self.reasons: list[np.ndarray] = []

    def add(self, mask: np.ndarray, field: str | None,
            reason: str | Callable[[np.ndarray], list[str]]) -> None:
        """Flag rows in ``mask``; ``reason`` is a text, or a function of the flagged indices."""
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            return
        self.bad |= mask
        self.rows.append(idx)
        self.fields.append(field)
        texts = [reason] * idx.size if isinstance(reason, str) else reason(idx)
        self.reasons.append(np.asarray(texts, dtype=object))

    def table(self, stage: str, uri: str, input_ids: Callable[[np.ndarray], list[str]]
              ) -> pa.Table:
        if not self.rows:
            return ERRORS.empty_table()
        idx = np.concatenate(self.rows)
        fields = np.concatenate([np.full(len(r), f, dtype=object)
                                 for r, f in zip(self.rows, self.fields)])
        reasons = np.concatenate(self.reasons)
        order = np.argsort(idx, kind="stable")
        idx, fields, reasons = idx[order], fields[order], reasons[order]
        return pa.table({
            "stage": pa.array(np.full(len(idx), stage, dtype=object), pa.string()),
            "input_id": pa.array(input_ids(idx), pa.string()),
            "uri": pa.array(np.full(len(idx), uri, dtype=object), pa.string()),
            "row": pa.array(idx + 1, pa.int64()),
            "field": pa.array(fields, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }, schema=ERRORS)


def _text(col: pa.ChunkedArray) -> np.ndarray:
    """Column as an object array of str / None, with blank strings treated as missing."""
    strings = col.cast(pa.string())
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(strings), ""), True)
    values = strings.to_numpy(zero_copy_only=False).astype(object)
    values[blank.to_numpy(zero_copy_only=False)] = None
    return values


def _present(values: np.ndarray) -> np.ndarray:
    return pd.notna(pd.Series(values, dtype=object)).to_numpy()


def _numbers(col: pa.ChunkedArray, bad: _BadRows, field: str, what: str) -> np.ndarray:
    """Column as float64. Unparseable and missing entries become NaN and are reported."""
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        parsed = col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        bad.add(np.isnan(parsed), field, f"{what} is missing or NaN")
        return parsed
    text = _text(col)
    parsed = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(np.float64)
    present = _present(text)
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(col.cast(pa.string())))
    nan_text = present & pc.fill_null(pc.is_in(lowered, pa.array(["nan", "-nan", "+nan"])),
                                      False).to_numpy(zero_copy_only=False)
    unparseable = present & np.isnan(parsed) & ~nan_text
    bad.add(unparseable, field,
            lambda idx: [f"{what} is not a number: {t!r}" for t in text[idx]])
    bad.add((~present) | nan_text, field, f"{what} is missing or NaN")
    return parsed


def _ids(col: pa.ChunkedArray, name: str, uri: str) -> np.ndarray:
    """Id column as text exactly as written; integer columns as their decimal text."""
    kind = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    if pa.types.is_integer(kind):
        return _text(col.cast(kind).cast(pa.string()))
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        # a float id prints as 7.0 or loses digits: refuse rather than guess the intended text
        raise IngestError(f"{uri}: id column {name!r} has type {col.type}; ids must be text or "
                          "integers")
    return _text(col)


def _timestamps(col: pa.ChunkedArray, bad: _BadRows, field: str, scale: int = 1,
                unit: str = "") -> np.ndarray:
    """Timestamps as exact int64 (module docstring); bad ones are reported and become 0.

    Numbers are multiplied by ``scale`` (named ``unit`` in messages) and must then be whole.
    """
    what, limit = f"timestamp {field}", TIMESTAMP_LIMIT
    typed = pa.types.is_timestamp(col.type) or pa.types.is_date(col.type)
    if typed or pa.types.is_integer(col.type):
        if typed:  # in the column's own unit; date32 via int32 (no direct cast to int64)
            col = col.cast(pa.int32() if pa.types.is_date32(col.type) else pa.int64())
            scale = 1
        missing = col.is_null().to_numpy(zero_copy_only=False)
        raw = pc.fill_null(col, 0).to_numpy()  # int64, or uint64 beyond int64's range
        bound = limit // scale
        out = (raw >= bound) if raw.dtype.kind == "u" else (raw >= bound) | (raw <= -bound)
        bad.add(missing, field, f"{what} is missing")
        bad.add(out, field, lambda idx: [f"{what} is out of range (|t| >= 2**62): {raw[i]}"
                                         for i in idx])
        return np.where(out, 0, raw).astype(np.int64) * scale
    parsed = _numbers(col, bad, field, what)  # reports missing / NaN / not a number
    text = None if pa.types.is_floating(col.type) else _text(col)
    finite = np.isfinite(parsed)
    with np.errstate(invalid="ignore", over="ignore"):
        x = parsed * scale
        rounded = np.rint(x)
        # scaled decimals (1593878903.438 s -> ms) are whole up to the parse and product errors
        tol = 0.0 if scale == 1 else np.spacing(np.abs(parsed)) * scale + np.spacing(np.abs(x))
        whole = finite & (np.isinf(x) | (np.abs(x - rounded) <= tol))
        inside = np.abs(rounded) < limit
    values = np.where(whole & inside, rounded, 0).astype(np.int64)
    if text is not None:
        # beyond 2**52 a float no longer holds every integer: redo those rows exactly
        for i in np.flatnonzero(finite & ~(np.abs(x) < 2**52)):
            try:
                exact = Decimal(text[i].strip()) * scale
            except ArithmeticError:  # a spelling float() accepts and Decimal does not
                continue
            whole[i] = exact == exact.to_integral_value()
            inside[i] = abs(exact) < limit
            values[i] = int(exact) if whole[i] and inside[i] else 0

    def shown(i: int) -> str:
        return repr(float(parsed[i])) if text is None else repr(text[i])

    bad.add(np.isinf(parsed), field, lambda idx: [f"{what} is infinite: {shown(i)}" for i in idx])
    bad.add(finite & ~whole, field,
            lambda idx: [f"{what} is not a whole number{unit}: {shown(i)}" for i in idx])
    bad.add(whole & ~inside, field,
            lambda idx: [f"{what} is out of range (|t| >= 2**62): {shown(i)}" for i in idx])
    return values


def validate_videos(table: pa.Table, uri: str, uri_optional: bool = False
                    ) -> tuple[pa.Table, pa.Table]:
    """Return (valid videos conforming to VIDEOS, error rows).

    ``uri_optional`` (features are imported: ``extract.import_path``): a missing uri, or no uri
    column, is stored as "" and left to extract (imported features, or "no uri" there).
    """
    for name in ("video_id",) if uri_optional else ("video_id", "uri"):
        if name not in table.column_names:
            raise IngestError(f"{uri}: videos table lacks column {name!r}; "
                              f"has {table.column_names}")
    n = table.num_rows
    bad = _BadRows(n)
    ids = _ids(table.column("video_id"), "video_id", uri)
    uris = (_text(table.column("uri")) if "uri" in table.column_names
            else np.full(n, None, dtype=object))
    bad.add(~_present(ids), "video_id", "missing video_id")
    if uri_optional:
        uris[~_present(uris)] = ""
    else:
        bad.add(~_present(uris), "uri", "missing uri")
    dup = pd.Series(ids, dtype=object).duplicated(keep="first").to_numpy() & _present(ids)
    bad.add(dup, "video_id", "duplicate video_id")
    if "duration_s" in table.column_names:
        text = _text(table.column("duration_s"))
        dur = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(np.float64)
        bad.add(_present(text) & np.isnan(dur),
                "duration_s", "duration_s is not a number")
        bad.add(np.isinf(dur), "duration_s", "duration_s is infinite")
        bad.add((dur <= 0) & ~np.isinf(dur), "duration_s", "duration_s must be > 0")
    else:
        dur = np.full(n, np.nan)
    good = ~bad.bad
    videos = pa.table({
        "video_id": pa.array(ids[good], pa.string()),
        "uri": pa.array(uris[good], pa.string()),
        "duration_s": pa.array(dur[good], pa.float64(), mask=np.isnan(dur[good])),
    })
    return conform(videos, VIDEOS, "videos"), bad.table("ingest", uri, lambda idx: ids[idx])


def validate_interactions(
    table: pa.Table, cfg: IngestConfig, known_videos: np.ndarray, uri: str
) -> tuple[pd.DataFrame, pa.Table]:
    """Map columns, validate every row; return (good rows as a DataFrame, error rows)."""
    mapping, unit = column_mapping(cfg)
    missing = [f"{ours} (source column {mapping.get(ours)!r})" for ours in REQUIRED
               if mapping.get(ours) not in table.column_names]
    if cfg.truth_column and cfg.truth_column not in table.column_names:
        missing.append(f"truth (source column {cfg.truth_column!r}, ingest.truth_column)")
    if missing:
        raise IngestError(f"{uri}: missing column(s) {', '.join(missing)} for preset "
                          f"{cfg.preset!r}; the file has {table.column_names}")
    n = table.num_rows
    bad = _BadRows(n)
    user = _ids(table.column(mapping["user_id"]), mapping["user_id"], uri)
    video = _ids(table.column(mapping["video_id"]), mapping["video_id"], uri)
    bad.add(~_present(user), mapping["user_id"], "missing user_id")
    bad.add(~_present(video), mapping["video_id"], "missing video_id")

    play_col, dur_col = mapping["play_time"], mapping["duration"]
    play = _numbers(table.column(play_col), bad, play_col, f"play time {play_col}")
    dur = _numbers(table.column(dur_col), bad, dur_col, f"duration {dur_col}")
    bad.add(np.isinf(play), play_col, f"play time {play_col} is infinite")
    bad.add((play < 0) & ~np.isinf(play), play_col, f"play time {play_col} is negative")
    bad.add(dur == 0, dur_col, f"duration {dur_col} is zero")
    bad.add(np.isinf(dur), dur_col, f"duration {dur_col} is infinite")
    bad.add((dur < 0) & ~np.isinf(dur), dur_col, f"duration {dur_col} is negative")
    truth = _truth(table, cfg.truth_column, bad) if cfg.truth_column else None

    ts_col = mapping.get("timestamp")
    has_time = bool(ts_col) and ts_col in table.column_names
    if has_time:
        timestamps = _timestamps(table.column(ts_col), bad, ts_col,
                                 *TIMESTAMP_SCALE.get(cfg.preset, (1, "")))
    else:
        timestamps = np.arange(n, dtype=np.int64)  # source order

    known = np.isin(video.astype(str), known_videos) | ~_present(video)
    bad.add(~known, mapping["video_id"],
            lambda idx: [f"video_id {v!r} is not in the videos table" for v in video[idx]])
    if has_time:  # last: a copy of a row that is bad for another reason is no duplicate
        _duplicates(user, video, timestamps, bad)

    scale = 1e-3 if unit == "ms" else 1.0
    good = ~bad.bad
    ratio = np.minimum(play[good] / dur[good], cfg.max_watch_ratio)
    frame = pd.DataFrame({
        "user_id": user[good].astype(str),
        "video_id": video[good].astype(str),
        "play_time_s": play[good] * scale,
        "duration_s": dur[good] * scale,
        "watch_ratio": ratio,
        "full_watch": ratio >= 1.0 - cfg.full_watch_tolerance,
        "timestamp": timestamps[good],
        "source_row": np.flatnonzero(good).astype(np.int64) + 1,
    })
    if truth is not None:
        frame["p_full"] = truth[good]  # the truth table's column (run_ingest)
    return frame, bad.table("ingest", uri, lambda idx: [f"{u}/{v}" for u, v in
                                                         zip(user[idx], video[idx])])


def _truth(table: pa.Table, name: str, bad: _BadRows) -> np.ndarray:
    """The truth column as float64: p(full watch) of every row, finite and in [0, 1]."""
    what = f"truth {name}"
    p = _numbers(table.column(name), bad, name, what)  # reports missing / NaN / not a number
    bad.add(np.isinf(p), name, f"{what} is infinite")
    bad.add(np.isfinite(p) & ((p < 0) | (p > 1)), name,
            lambda idx: [f"{what} is outside [0, 1]: {float(p[i])!r}" for i in idx])
    return p


def _duplicates(user: np.ndarray, video: np.ndarray, timestamps: np.ndarray,
                bad: _BadRows) -> None:
    """Report later copies of a good row's (user, video, timestamp) as "duplicate of row N"."""
    rows = np.flatnonzero(~bad.bad)
    keys = pd.DataFrame({"u": user[rows], "v": video[rows], "t": timestamps[rows]})
    group = keys.groupby(["u", "v", "t"], sort=False).ngroup().to_numpy()
    _, first = np.unique(group, return_index=True)  # position of each key's first copy
    original = np.zeros(bad.n, dtype=np.int64)
    original[rows] = rows[first[group]] + 1
    mask = np.zeros(bad.n, dtype=bool)
    mask[rows] = original[rows] != rows + 1
    bad.add(mask, None, lambda idx: [f"duplicate of row {original[i]} (same user, video and "
                                     "timestamp)" for i in idx])


def time_split(frame: pd.DataFrame, test_fraction: float, min_user_interactions: int,
               valid_fraction: float = 0.0) -> np.ndarray:
    """Per-user chronological split (module docstring): "train", "valid" or "test" per row."""
    n = len(frame)
    order = np.lexsort((frame["source_row"].to_numpy(), frame["timestamp"].to_numpy(),
                        frame["user_id"].to_numpy()))
    users_sorted = frame["user_id"].to_numpy()[order]
    starts = np.r_[True, users_sorted[1:] != users_sorted[:-1]] if n else np.zeros(0, bool)
    group = np.cumsum(starts) - 1
    group_start = np.flatnonzero(starts)
    counts = np.diff(np.r_[group_start, n])
    eligible = counts >= min_user_interactions
    n_test = np.where(eligible & (test_fraction > 0),
                      np.clip(np.rint(counts * test_fraction), 1, np.maximum(counts - 1, 0)), 0)
    room = np.maximum(counts - n_test - 1, 0)  # train keeps at least one interaction
    n_valid = np.where(eligible & (valid_fraction > 0),
                       np.minimum(np.maximum(np.rint(counts * valid_fraction), 1), room), 0)
    position = np.arange(n) - group_start[group]  # rank inside the user's history
    from_end = counts[group] - position  # 1 for the user's last interaction
    labels = np.where(from_end <= n_test[group], "test",
                      np.where(from_end <= (n_test + n_valid)[group], "valid", "train"))
    split = np.empty(n, dtype=object)
    split[order] = labels
    return split


# --------------------------------------------------------------------------- the stage


def run_ingest(cfg: Config, store: Store, interactions: str | None = None,
               videos: str | None = None) -> IngestSummary:
    """Validate and commit ``videos``, ``interactions`` and ``ingest_errors`` to the store.

    Nothing is committed when the policy is "fail" and any row is bad, or when no good row is
    left (a header-only source, or every row quarantined). The three tables are replaced as a
    whole; each commit writes the resolved config beside the table.
    """
    icfg = cfg.ingest
    icfg.interactions = interactions = interactions or icfg.interactions
    icfg.videos = videos = videos or icfg.videos
    if not interactions or not videos:
        raise IngestError("ingest needs both ingest.interactions and ingest.videos files")
    video_table, video_errors = validate_videos(read_source(videos), str(videos),
                                                uri_optional=bool(cfg.extract.import_path))
    source = read_source(interactions)
    known = video_table.column("video_id").to_numpy(zero_copy_only=False).astype(str)
    frame, row_errors = validate_interactions(source, icfg, known, str(interactions))
    errors = pa.concat_tables([video_errors, row_errors])
    if errors.num_rows and icfg.bad_rows == "fail":
        raise IngestError(_describe(errors))
    if source.num_rows == 0:
        raise IngestError(f"{interactions}: no data rows, nothing to ingest; nothing was "
                          "committed")
    if len(frame) == 0:
        raise IngestError(f"{interactions}: all {source.num_rows} rows are bad, nothing to "
                          "ingest (policy bad_rows=quarantine); nothing was committed:\n  "
                          + _listing(errors))

    frame["split"] = time_split(frame, icfg.test_fraction, icfg.min_user_interactions,
                                icfg.valid_fraction)
    table = conform(pa.Table.from_pandas(frame, preserve_index=False), INTERACTIONS,
                    "interactions")
    store.table("videos").write(video_table, {"source": str(videos)}, config=cfg)
    store.table("ingest_errors").write(errors, {"policy": icfg.bad_rows}, config=cfg)
    if icfg.truth_column:  # keyed like the interactions, so evaluate joins it to the test rows
        truth = conform(pa.Table.from_pandas(frame, preserve_index=False), TRUTH, "truth")
        store.table("truth").write(truth, {"source": str(interactions),
                                           "column": icfg.truth_column}, config=cfg)
    summary = IngestSummary(
        rows=source.num_rows,
        ingested=len(frame),
        quarantined=source.num_rows - len(frame),
        users=int(frame["user_id"].nunique()),
        videos=video_table.num_rows,
        train=int((frame["split"] == "train").sum()),
        valid=int((frame["split"] == "valid").sum()),
        test=int((frame["split"] == "test").sum()),
        full_watch_rate=float(frame["full_watch"].mean()) if len(frame) else 0.0,
    )
    store.table("interactions").write(
        table, {"source": str(interactions), "summary": summary.__dict__,
                "fingerprint": ingest_fingerprint(cfg)}, config=cfg)
    return summary


def ingest_fingerprint(cfg: Config) -> str:
    """Identity of an ingest: its source files (path, size, mtime) and the ingest config."""
    parts = [json.dumps(dataclasses.asdict(cfg.ingest), sort_keys=True, default=str)]
    if cfg.extract.import_path:  # videos without a uri are accepted (validate_videos)
        parts.append("uri optional")
    for path in (cfg.ingest.interactions, cfg.ingest.videos):
        stat = os.stat(path) if path and os.path.exists(path) else None
        parts.append(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}" if stat
                     else f"{path}:absent")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ingest_is_current(cfg: Config, store: Store) -> bool:
    """True when the committed interactions came from exactly these sources and settings."""
    table = store.table("interactions")
    return table.exists() and table.metadata().get("fingerprint") == ingest_fingerprint(cfg)


def _describe(errors: pa.Table) -> str:
    return (f"{errors.num_rows} bad row(s) (policy bad_rows=fail; set ingest.bad_rows=quarantine "
            "to ingest the good rows and keep these in the ingest_errors table):\n  "
            + _listing(errors))


def _listing(errors: pa.Table) -> str:
    rows = errors.slice(0, MAX_LISTED).to_pylist()
    lines = [f"{r['uri']} row {r['row']}: {r['reason']}" for r in rows]
    more = (f"\n  ... and {errors.num_rows - MAX_LISTED} more" if errors.num_rows > MAX_LISTED
            else "")
    return "\n  ".join(lines) + more
