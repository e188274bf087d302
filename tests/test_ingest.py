import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.schemas import INTERACTIONS, TRUTH
from feature_store.store import Store
from frame_dist.config import load_config
from frame_dist.ingest.interactions import (
    IngestError,
    run_ingest,
    time_split,
    validate_interactions,
)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


def _videos(tmp_path, ids=("a", "b", "c")):
    path = tmp_path / "videos.csv"
    pd.DataFrame({"video_id": list(ids), "uri": [f"/v/{i}.mp4" for i in ids],
                  "duration_s": [10.0] * len(ids)}).to_csv(path, index=False)
    return path


def _cfg(*overrides):
    return load_config(None, list(overrides))


def _fail_message(lines):
    """The IngestError text of policy bad_rows=fail for these listed bad rows."""
    return (f"{len(lines)} bad row(s) (policy bad_rows=fail; set ingest.bad_rows=quarantine to "
            "ingest the good rows and keep these in the ingest_errors table):\n  "
            + "\n  ".join(lines))


def _errors(store):
    return [(e["row"], e["field"], e["reason"])
            for e in store.table("ingest_errors").read().to_pylist()]


def _nothing_committed(store):
    return not any(store.table(t).exists() for t in ("interactions", "videos", "ingest_errors"))


def test_frame_preset_ratio_cap_and_full_watch(tmp_path, store):
    inter = tmp_path / "inter.csv"
    inter.write_text("user_id,video_id,play_time_s,duration_s,timestamp\n"
                     "u1,a,5,10,1\n"      # r = 0.5
                     "u1,b,12,10,2\n"     # replay: r capped at 1, full watch
                     "u1,c,9.85,10,3\n")  # r = 0.985 >= 1 - 0.02: full watch
    summary = run_ingest(_cfg("ingest.min_user_interactions=10"), store, str(inter),
                         str(_videos(tmp_path)))
    t = store.table("interactions").read().to_pandas()
    assert t["watch_ratio"].tolist() == pytest.approx([0.5, 1.0, 0.985])
    assert t["full_watch"].tolist() == [False, True, True]
    assert t["source_row"].tolist() == [1, 2, 3]
    assert summary.ingested == 3 and summary.quarantined == 0
    assert store.table("interactions").read().schema.equals(INTERACTIONS)


def test_authors_preset_milliseconds_and_row_order_time(tmp_path, store):
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.table({"user_id": [7, 7], "photo_id": ["b", "a"],
                             "playing_time": [3000, 20000], "duration_ms": [12000, 10000]}),
                   inter)
    run_ingest(_cfg("ingest.preset=authors"), store, str(inter), str(_videos(tmp_path)))
    t = store.table("interactions").read().to_pandas()
    assert t["user_id"].tolist() == ["7", "7"]
    assert t["video_id"].tolist() == ["b", "a"]
    assert t["play_time_s"].tolist() == [3.0, 20.0]
    assert t["duration_s"].tolist() == [12.0, 10.0]
    assert t["watch_ratio"].tolist() == [0.25, 1.0]
    assert t["timestamp"].tolist() == [0, 1]  # no timestamp column: source order


def test_kuairec_preset(tmp_path, store):
    inter = tmp_path / "k.csv"
    inter.write_text("user_id,video_id,play_duration,video_duration,timestamp,extra\n"
                     "14,a,1500,6000,1593878903.438,x\n")
    run_ingest(_cfg("ingest.preset=kuairec"), store, str(inter), str(_videos(tmp_path)))
    t = store.table("interactions").read().to_pandas()
    assert t["watch_ratio"].tolist() == [0.25]
    # KuaiRec timestamps are seconds with millisecond decimals: kept exactly, as milliseconds
    assert t["timestamp"].tolist() == [1593878903438]


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
def test_kuairec_timestamps_are_exact_milliseconds(tmp_path, store, policy):
    rng = np.random.default_rng(0)
    seconds = rng.integers(1_500_000_000, 1_700_000_000, 2000)
    millis = rng.integers(0, 1000, 2000)
    inter = tmp_path / "k.csv"
    inter.write_text("user_id,video_id,play_duration,video_duration,timestamp\n" + "".join(
        f"u{i},a,1,2,{s}.{m:03d}\n" for i, (s, m) in enumerate(zip(seconds, millis))))
    run_ingest(_cfg("ingest.preset=kuairec", f"ingest.bad_rows={policy}"), store, str(inter),
               str(_videos(tmp_path)))
    t = store.table("interactions").read().to_pandas()
    assert t["timestamp"].tolist() == (seconds * 1000 + millis).tolist()

    with inter.open("a") as f:
        f.write("u1,b,1,2,1593878903.4385\n")  # record 2001: finer than a millisecond
    reason = "timestamp timestamp is not a whole number of milliseconds: '1593878903.4385'"
    cfg = _cfg("ingest.preset=kuairec", f"ingest.bad_rows={policy}")
    if policy == "fail":
        with pytest.raises(IngestError) as err:
            run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert str(err.value) == _fail_message([f"{inter} row 2001: {reason}"])
    else:
        run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert _errors(store) == [(2001, "timestamp", reason)]
        assert store.table("interactions").read().num_rows == 2000


# KuaiRand's log files (log_standard_*.csv, log_random_*.csv), column for column
KUAIRAND_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,"
                   "is_forward,is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,"
                   "comment_stay_time,is_profile_enter,is_rand,tab\n")


def test_kuairand_preset_milliseconds(tmp_path, store):
    inter = tmp_path / "log_standard_4_08_to_4_21_1k.csv"
    inter.write_text(KUAIRAND_HEADER
                     + "0,a,20220421,1500,1650524400123,1,0,0,0,0,0,0,4500,18000,0,0,0,0,1\n"
                     + "0,b,20220421,1500,1650524401000,1,0,0,0,0,0,1,21000,10000,0,0,0,0,1\n"
                     + "7,a,20220408,0,1649347200000,0,0,0,0,0,0,0,0,18000,0,0,0,1,0\n")
    run_ingest(_cfg("ingest.preset=kuairand", "ingest.min_user_interactions=10"), store,
               str(inter), str(_videos(tmp_path)))
    t = store.table("interactions").read().to_pandas()
    assert t["user_id"].tolist() == ["0", "0", "7"]
    assert t["video_id"].tolist() == ["a", "b", "a"]
    assert t["play_time_s"].tolist() == [4.5, 21.0, 0.0]  # play_time_ms / 1000
    assert t["duration_s"].tolist() == [18.0, 10.0, 18.0]  # duration_ms / 1000
    assert t["watch_ratio"].tolist() == [0.25, 1.0, 0.0]  # a replay is capped at 1
    assert t["full_watch"].tolist() == [False, True, False]
    assert t["timestamp"].tolist() == [1650524400123, 1650524401000, 1649347200000]  # time_ms


def test_kuairand_preset_needs_its_columns(tmp_path, store):
    inter = tmp_path / "k.csv"  # KuaiRec's layout under the KuaiRand preset
    inter.write_text("user_id,video_id,play_duration,video_duration,timestamp\n14,a,1,2,3\n")
    with pytest.raises(IngestError) as err:
        run_ingest(_cfg("ingest.preset=kuairand"), store, str(inter), str(_videos(tmp_path)))
    assert ("k.csv: missing column(s) play_time (source column 'play_time_ms'), duration "
            "(source column 'duration_ms') for preset 'kuairand'") in str(err.value)


def test_truth_column_becomes_the_truth_table(tmp_path, store):
    inter = tmp_path / "t.csv"
    inter.write_text("user_id,video_id,play_time_s,duration_s,timestamp,p_full\n"
                     "u1,a,5,10,3,0.25\n"
                     "u1,b,10,10,1,1\n"
                     "u2,a,1,10,2,0\n")
    run_ingest(_cfg("ingest.truth_column=p_full"), store, str(inter), str(_videos(tmp_path)))
    truth = store.table("truth").read()
    assert truth.schema.equals(TRUTH)
    assert truth.to_pylist() == [
        {"user_id": "u1", "video_id": "a", "timestamp": 3, "p_full": 0.25},
        {"user_id": "u1", "video_id": "b", "timestamp": 1, "p_full": 1.0},
        {"user_id": "u2", "video_id": "a", "timestamp": 2, "p_full": 0.0}]
    assert store.table("truth").metadata()["column"] == "p_full"
    # without a truth column no truth is written; a configured column must exist
    other = Store(str(tmp_path / "other"))
    run_ingest(_cfg(), other, str(inter), str(_videos(tmp_path)))
    assert not other.table("truth").exists()
    with pytest.raises(IngestError) as err:
        run_ingest(_cfg("ingest.truth_column=p_true"), other, str(inter),
                   str(_videos(tmp_path)))
    assert "missing column(s) truth (source column 'p_true', ingest.truth_column)" in str(
        err.value)


TRUTH_ROWS = ("user_id,video_id,play_time_s,duration_s,timestamp,p\n"
              "u1,a,5,10,1,0.5\n"    # row 1 good
              "u1,b,5,10,2,\n"       # row 2 missing
              "u1,c,5,10,3,nan\n"    # row 3 NaN
              "u2,a,5,10,4,high\n"   # row 4 not a number
              "u2,b,5,10,5,inf\n"    # row 5 infinite
              "u2,c,5,10,6,-0.1\n"   # row 6 below 0
              "u3,a,5,10,7,1.5\n"    # row 7 above 1
              "u3,b,5,10,8,1.0\n")   # row 8 good
TRUTH_ERRORS = [(2, "p", "truth p is missing or NaN"),
                (3, "p", "truth p is missing or NaN"),
                (4, "p", "truth p is not a number: 'high'"),
                (5, "p", "truth p is infinite"),
                (6, "p", "truth p is outside [0, 1]: -0.1"),
                (7, "p", "truth p is outside [0, 1]: 1.5")]


@pytest.mark.parametrize("policy", ["fail", "quarantine"])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_truth_column_bad_values_are_bad_rows(tmp_path, store, policy, suffix):
    inter = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        inter.write_text(TRUTH_ROWS)
    else:  # typed: a float column (the unparseable row becomes a null)
        frame = pd.read_csv(io.StringIO(TRUTH_ROWS), dtype={"user_id": str, "video_id": str})
        frame["p"] = pd.to_numeric(frame["p"], errors="coerce")
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), inter)
    expected = [e if suffix == ".csv" or e[0] != 4 else (4, "p", "truth p is missing or NaN")
                for e in TRUTH_ERRORS]
    cfg = _cfg("ingest.truth_column=p", f"ingest.bad_rows={policy}")
    if policy == "fail":
        with pytest.raises(IngestError) as err:
            run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert str(err.value) == _fail_message([f"{inter} row {r}: {reason}"
                                                for r, _, reason in expected])
        assert _nothing_committed(store) and not store.table("truth").exists()
    else:
        run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert _errors(store) == expected
        assert store.table("interactions").read()["source_row"].to_pylist() == [1, 8]
        truth = store.table("truth").read().to_pylist()
        assert [(t["user_id"], t["video_id"], t["p_full"]) for t in truth] == [
            ("u1", "a", 0.5), ("u3", "b", 1.0)]


def test_custom_mapping_and_missing_column_message(tmp_path, store):
    inter = tmp_path / "c.csv"
    inter.write_text("uid,vid,played,length,ts\nx,a,1,2,5\n")
    cfg = _cfg("ingest.preset=custom", "ingest.columns={user_id: uid, video_id: vid, "
               "play_time: played, duration: length, timestamp: ts}")
    run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert store.table("interactions").read().column("watch_ratio").to_pylist() == [0.5]
    with pytest.raises(IngestError) as err:
        run_ingest(_cfg(), store, str(inter), str(_videos(tmp_path)))
    assert "c.csv: missing column(s) user_id (source column 'user_id')" in str(err.value)
    assert "play_time (source column 'play_time_s')" in str(err.value)
    assert "for preset 'frame'" in str(err.value)


BAD = ("user_id,video_id,play_time_s,duration_s,timestamp\n"
       "u1,a,5,10,1\n"        # row 1 good
       ",a,5,10,2\n"          # row 2 missing user id
       "u1,,5,10,3\n"         # row 3 missing video id
       "u1,a,NaN,10,4\n"      # row 4 NaN play time
       "u1,b,-1,10,5\n"       # row 5 negative play time
       "u1,b,3,0,6\n"         # row 6 zero duration
       "u1,zz,3,10,7\n"       # row 7 unknown video
       "u1,c,abc,10,8\n"      # row 8 non-numeric play time
       "u1,c,3,,9\n"          # row 9 missing duration
       "u2,c,3,10,10\n")      # row 10 good

EXPECTED = [
    (2, "user_id", "missing user_id"),
    (3, "video_id", "missing video_id"),
    (4, "play_time_s", "play time play_time_s is missing or NaN"),
    (5, "play_time_s", "play time play_time_s is negative"),
    (6, "duration_s", "duration duration_s is zero"),
    (7, "video_id", "video_id 'zz' is not in the videos table"),
    (8, "play_time_s", "play time play_time_s is not a number: 'abc'"),
    (9, "duration_s", "duration duration_s is missing or NaN"),
]


def test_bad_rows_fail_policy_names_rows_and_writes_nothing(tmp_path, store):
    inter = tmp_path / "bad.csv"
    inter.write_text(BAD)
    with pytest.raises(IngestError) as err:
        run_ingest(_cfg(), store, str(inter), str(_videos(tmp_path)))
    message = str(err.value)
    assert message.startswith("8 bad row(s)")
    for row, _, reason in EXPECTED:
        assert f"bad.csv row {row}: {reason}" in message
    assert not store.table("interactions").exists()
    assert not store.table("videos").exists()


def test_bad_rows_quarantine_policy(tmp_path, store):
    inter = tmp_path / "bad.csv"
    inter.write_text(BAD)
    summary = run_ingest(_cfg("ingest.bad_rows=quarantine"), store, str(inter),
                         str(_videos(tmp_path)))
    errors = store.table("ingest_errors").read().to_pylist()
    assert [(e["row"], e["field"], e["reason"]) for e in errors] == EXPECTED
    assert {e["stage"] for e in errors} == {"ingest"}
    assert errors[5]["input_id"] == "u1/zz"
    good = store.table("interactions").read().to_pandas()
    assert good["source_row"].tolist() == [1, 10]
    assert (summary.rows, summary.ingested, summary.quarantined) == (10, 2, 8)


def test_bad_video_rows(tmp_path, store):
    videos = tmp_path / "videos.csv"
    videos.write_text("video_id,uri,duration_s\na,/a.mp4,3\na,/a2.mp4,3\nb,,4\nc,/c.mp4,0\n")
    inter = tmp_path / "i.csv"
    inter.write_text("user_id,video_id,play_time_s,duration_s,timestamp\nu,a,1,2,3\n")
    with pytest.raises(IngestError) as err:
        run_ingest(_cfg(), store, str(inter), str(videos))
    assert "videos.csv row 2: duplicate video_id" in str(err.value)
    assert "videos.csv row 3: missing uri" in str(err.value)
    assert "videos.csv row 4: duration_s must be > 0" in str(err.value)


def test_unreadable_sources(tmp_path, store):
    with pytest.raises(IngestError, match="nope.csv: file not found"):
        run_ingest(_cfg(), store, str(tmp_path / "nope.csv"), str(_videos(tmp_path)))
    other = tmp_path / "x.json"
    other.write_text("{}")
    with pytest.raises(IngestError, match="unsupported file type '.json'"):
        run_ingest(_cfg(), store, str(other), str(_videos(tmp_path)))


def test_time_split_is_chronological_per_user_without_leakage():
    rng = np.random.default_rng(0)
    n = 500
    frame = pd.DataFrame({
        "user_id": rng.choice([f"u{i}" for i in range(30)], n),
        "timestamp": rng.integers(0, 50, n),
        "source_row": np.arange(1, n + 1),
    })
    split = time_split(frame, test_fraction=0.2, min_user_interactions=5, valid_fraction=0.1)
    frame["split"] = split
    for user, g in frame.groupby("user_id"):
        g = g.sort_values(["timestamp", "source_row"])
        k = len(g)
        if k < 5:
            assert (g["split"] == "train").all(), user
            continue
        n_test = min(max(round(k * 0.2), 1), k - 1)
        n_valid = min(max(round(k * 0.1), 1), k - n_test - 1)
        assert g["split"].tolist() == (["train"] * (k - n_test - n_valid) + ["valid"] * n_valid
                                       + ["test"] * n_test), user


def test_time_split_small_cases():
    frame = pd.DataFrame({"user_id": ["a"] * 5 + ["b"] * 4, "timestamp": [5, 4, 3, 2, 1] + [1] * 4,
                          "source_row": range(1, 10)})
    split = time_split(frame, 0.2, min_user_interactions=5)
    # user a: 5 rows, the earliest timestamp-wise last one is row 1 (t=5); b has 4 < 5 rows
    assert split.tolist() == ["test"] + ["train"] * 8
    assert time_split(frame, 0.0, 1).tolist() == ["train"] * 9
    # a: t=5 (row 1) test, t=4 (row 2) valid; b (4 rows, min 3): last row test, third valid
    assert time_split(frame, 0.2, 3, valid_fraction=0.2).tolist() == [
        "test", "valid", "train", "train", "train", "train", "train", "valid", "test"]
    # two interactions: one test, none left for valid (train keeps one)
    two = pd.DataFrame({"user_id": ["c", "c"], "timestamp": [1, 2], "source_row": [1, 2]})
    assert time_split(two, 0.2, 2, valid_fraction=0.3).tolist() == ["train", "test"]


# --------------------------------------------------------------------------- data is never changed


HEADER = "user_id,video_id,play_time_s,duration_s,timestamp\n"
POLICIES = pytest.mark.parametrize("policy", ["fail", "quarantine"])


@POLICIES
@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_ids_stay_text_with_a_byte_order_mark(tmp_path, store, policy, suffix):
    inter = tmp_path / f"bom{suffix}"
    sep = "\t" if suffix == ".tsv" else ","
    rows = [HEADER.strip(), "007,a,5,10,1", "7,a,5,10,1", "7.0,b,5,10,2"]
    inter.write_bytes(b"\xef\xbb\xbf" + "".join(r.replace(",", sep) + "\n" for r in rows).encode())
    summary = run_ingest(_cfg(f"ingest.bad_rows={policy}", "ingest.min_user_interactions=9"),
                         store, str(inter), str(_videos(tmp_path)))
    t = store.table("interactions").read().to_pandas()
    assert t["user_id"].tolist() == ["007", "7", "7.0"]
    assert (summary.users, summary.quarantined) == (3, 0)
    assert _errors(store) == []


@POLICIES
def test_parquet_integer_ids_become_decimal_text_and_float_ids_are_refused(tmp_path, store,
                                                                            policy):
    inter = tmp_path / "i.parquet"
    data = {"user_id": pa.array([7, 12], pa.int32()), "video_id": pa.array([1, 2], pa.uint64()),
            "play_time_s": [1.0, 2.0], "duration_s": [2.0, 2.0], "timestamp": [1, 2]}
    pq.write_table(pa.table(data), inter)
    cfg = _cfg(f"ingest.bad_rows={policy}")
    run_ingest(cfg, store, str(inter), str(_videos(tmp_path, ids=("1", "2"))))
    t = store.table("interactions").read().to_pandas()
    assert (t["user_id"].tolist(), t["video_id"].tolist()) == (["7", "12"], ["1", "2"])

    pq.write_table(pa.table({**data, "user_id": [7.0, 12.0]}), inter)
    with pytest.raises(IngestError) as err:
        run_ingest(cfg, store, str(inter), str(_videos(tmp_path, ids=("1", "2"))))
    assert str(err.value) == (f"{inter}: id column 'user_id' has type double; ids must be text "
                              "or integers")


DUPLICATES = (HEADER
              + "u1,a,5,10,1\n"     # 1
              "u1,b,5,10,2\n"       # 2
              "u1,a,5,10,1\n"       # 3 copy of 1
              "u1,a,NaN,10,3\n"     # 4 bad: its key is free for row 5
              "u1,a,7,10,3\n"       # 5 good
              "u1,a,8,10,1\n"       # 6 copy of 1 (another play time: still the same view)
              "u1,a,5,10,3\n")      # 7 copy of 5
DUPLICATE_ERRORS = [
    (3, None, "duplicate of row 1 (same user, video and timestamp)"),
    (4, "play_time_s", "play time play_time_s is missing or NaN"),
    (6, None, "duplicate of row 1 (same user, video and timestamp)"),
    (7, None, "duplicate of row 5 (same user, video and timestamp)"),
]


@POLICIES
def test_duplicate_rows_are_bad_rows(tmp_path, store, policy):
    inter = tmp_path / "dup.csv"
    inter.write_text(DUPLICATES)
    cfg = _cfg(f"ingest.bad_rows={policy}", "ingest.min_user_interactions=2",
               "ingest.test_fraction=0.4")
    if policy == "fail":
        with pytest.raises(IngestError) as err:
            run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert str(err.value) == _fail_message(
            [f"{inter} row {row}: {reason}" for row, _, reason in DUPLICATE_ERRORS])
        assert _nothing_committed(store)
        return
    summary = run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert _errors(store) == DUPLICATE_ERRORS
    t = store.table("interactions").read().to_pandas()
    assert t["source_row"].tolist() == [1, 2, 5]  # one copy of each view, in one split only
    assert t["split"].tolist() == ["train", "valid", "test"]
    assert (summary.ingested, summary.quarantined) == (3, 4)


TIMESTAMPS = (HEADER
              + "u1,a,5,10,1e30\n"                     # 1 beyond int64
              "u1,a,5,10,1.7\n"                        # 2 fractional
              "u1,a,5,10,inf\n"                        # 3
              "u1,a,5,10,4611686018427387904\n"        # 4 2**62
              "u1,a,5,10,-4611686018427387903\n"       # 5 good: -(2**62 - 1), exactly
              "u1,b,5,10,4611686018427387903\n"        # 6 good: 2**62 - 1, exactly
              "u1,c,5,10,1.5e3\n"                      # 7 good: 1500
              "u1,a,inf,10,8\n"                        # 8
              "u1,a,5,inf,9\n"                         # 9
              "u1,a,5,-inf,10\n"                       # 10
              "u1,a,-inf,10,11\n"                      # 11
              "u1,a,5,10,1x\n"                         # 12
              "u1,a,5,10,4611686018427387903.5\n"      # 13 fractional beyond a float's digits
              "u1,a,5,10,\n")                          # 14
TIMESTAMP_ERRORS = [
    (1, "timestamp", "timestamp timestamp is out of range (|t| >= 2**62): '1e30'"),
    (2, "timestamp", "timestamp timestamp is not a whole number: '1.7'"),
    (3, "timestamp", "timestamp timestamp is infinite: 'inf'"),
    (4, "timestamp", "timestamp timestamp is out of range (|t| >= 2**62): "
                     "'4611686018427387904'"),
    (8, "play_time_s", "play time play_time_s is infinite"),
    (9, "duration_s", "duration duration_s is infinite"),
    (10, "duration_s", "duration duration_s is infinite"),
    (11, "play_time_s", "play time play_time_s is infinite"),
    (12, "timestamp", "timestamp timestamp is not a number: '1x'"),
    (13, "timestamp", "timestamp timestamp is not a whole number: '4611686018427387903.5'"),
    (14, "timestamp", "timestamp timestamp is missing or NaN"),
]


@POLICIES
def test_timestamps_and_times_are_range_checked(tmp_path, store, policy):
    inter = tmp_path / "ts.csv"
    inter.write_text(TIMESTAMPS)
    cfg = _cfg(f"ingest.bad_rows={policy}", "ingest.min_user_interactions=9")
    if policy == "fail":
        with pytest.raises(IngestError) as err:
            run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert str(err.value) == _fail_message(
            [f"{inter} row {row}: {reason}" for row, _, reason in TIMESTAMP_ERRORS])
        assert _nothing_committed(store)
        return
    run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert _errors(store) == TIMESTAMP_ERRORS
    t = store.table("interactions").read().to_pandas()
    assert t["source_row"].tolist() == [5, 6, 7]
    assert t["timestamp"].tolist() == [-(2**62 - 1), 2**62 - 1, 1500]


def _parquet_interactions(path, timestamps):
    n = len(timestamps)
    pq.write_table(pa.table({"user_id": ["u"] * n, "video_id": ["a", "b", "c", "a", "b", "c"][:n],
                             "play_time_s": [1.0] * n, "duration_s": [2.0] * n,
                             "timestamp": timestamps}), path)


@POLICIES
@pytest.mark.parametrize("typ", [pa.timestamp("s"), pa.timestamp("ms"), pa.timestamp("us"),
                                 pa.timestamp("ns", tz="UTC"), pa.date32(), pa.date64()])
def test_typed_parquet_timestamps_convert_in_their_own_unit(tmp_path, store, policy, typ):
    ints = pa.int32() if typ == pa.date32() else pa.int64()
    day = 86_400_000 if typ == pa.date64() else 1  # date64 counts ms of whole days
    column = pa.array([5 * day, 3 * day, None], ints).cast(typ)
    cfg = _cfg(f"ingest.bad_rows={policy}", "ingest.min_user_interactions=2",
               "ingest.test_fraction=0.5")
    # in memory: the column's own unit
    table = pa.table({"user_id": ["u"] * 3, "video_id": ["a", "b", "c"],
                      "play_time_s": [1.0] * 3, "duration_s": [2.0] * 3, "timestamp": column})
    frame, errors = validate_interactions(table, cfg.ingest, np.array(["a", "b", "c"]), "mem")
    assert frame["timestamp"].tolist() == [5 * day, 3 * day]
    assert errors.column("reason").to_pylist() == ["timestamp timestamp is missing"]
    # through Parquet, which stores seconds as milliseconds and every date as days
    inter = tmp_path / "typed.parquet"
    _parquet_interactions(inter, column)
    expected = [5000, 3000] if typ == pa.timestamp("s") else [5, 3]
    if policy == "fail":
        with pytest.raises(IngestError) as err:
            run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert str(err.value) == _fail_message([f"{inter} row 3: timestamp timestamp is missing"])
        assert _nothing_committed(store)
        return
    run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert _errors(store) == [(3, "timestamp", "timestamp timestamp is missing")]
    t = store.table("interactions").read().to_pandas()
    assert t["timestamp"].tolist() == expected
    assert t["split"].tolist() == ["test", "train"]  # ordered by time, not by row


@POLICIES
@pytest.mark.parametrize("column, good, reasons", [
    (pa.array([2**62, -(2**62), 2**62 - 1, None], pa.int64()), [2**62 - 1], [
        (1, "timestamp timestamp is out of range (|t| >= 2**62): 4611686018427387904"),
        (2, "timestamp timestamp is out of range (|t| >= 2**62): -4611686018427387904"),
        (4, "timestamp timestamp is missing")]),
    (pa.array([2**64 - 1, 7], pa.uint64()), [7], [
        (1, "timestamp timestamp is out of range (|t| >= 2**62): 18446744073709551615")]),
    (pa.array([2.0, 1.5, float("inf"), float("nan"), 1e19, -3.0]), [2, -3], [
        (2, "timestamp timestamp is not a whole number: 1.5"),
        (3, "timestamp timestamp is infinite: inf"),
        (4, "timestamp timestamp is missing or NaN"),
        (5, "timestamp timestamp is out of range (|t| >= 2**62): 1e+19")]),
])
def test_numeric_parquet_timestamps(tmp_path, store, policy, column, good, reasons):
    inter = tmp_path / "n.parquet"
    _parquet_interactions(inter, column)
    cfg = _cfg(f"ingest.bad_rows={policy}", "ingest.min_user_interactions=9")
    if policy == "fail":
        with pytest.raises(IngestError) as err:
            run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
        assert str(err.value) == _fail_message([f"{inter} row {r}: {m}" for r, m in reasons])
        return
    run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert _errors(store) == [(r, "timestamp", m) for r, m in reasons]
    assert store.table("interactions").read().column("timestamp").to_pylist() == good


def _latin1_message(path, offset, line, context):
    return (f"{path}: not UTF-8: byte 0xe9 at offset {offset} (line {line}, data row {line - 1}) "
            f"in {context}. Re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
            f"{path.name} > {path.stem}.utf8{path.suffix}` (with -f naming the encoding it was "
            "written in)")


@POLICIES
def test_latin1_files_are_refused_naming_line_and_byte(tmp_path, store, policy):
    inter = tmp_path / "latin.csv"
    inter.write_bytes((HEADER + "u1,a,5,10,1\ncafé,a,5,10,2\n").encode("latin-1"))
    cfg = _cfg(f"ingest.bad_rows={policy}")
    with pytest.raises(IngestError) as err:
        run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert str(err.value) == _latin1_message(inter, 65, 3, r"b'caf\xe9,a,5,10,2'")
    assert _nothing_committed(store)

    videos = tmp_path / "videos.tsv"
    videos.write_bytes("video_id\turi\na\t/v/a.mp4\nb\t/v/caf\xe9.mp4\n".encode("latin-1"))
    inter.write_text(HEADER + "u1,a,5,10,1\n")
    with pytest.raises(IngestError) as err:
        run_ingest(cfg, store, str(inter), str(videos))
    assert str(err.value) == _latin1_message(videos, 32, 3, r"b'b\t/v/caf\xe9.mp4'")
    assert _nothing_committed(store)


def test_utf8_check_streams_in_chunks(tmp_path):
    from frame_dist.ingest.interactions import check_utf8

    good = tmp_path / "good.csv"
    good.write_bytes(b"\xef\xbb\xbf" + "user,€,😀\nü,ß,中\n".encode() * 3)
    bad = tmp_path / "bad.csv"
    bad.write_bytes("user,€\nü,ß\n".encode() + b"x\xe9y\n")
    expected = _latin1_message(bad, 16, 3, r"b'x\xe9y'")
    for chunk in (1, 2, 3, 5, 7, 64):  # characters split across every chunk boundary
        check_utf8(good, chunk)
        with pytest.raises(IngestError) as err:
            check_utf8(bad, chunk)
        assert str(err.value) == expected, chunk


@POLICIES
def test_header_only_or_all_bad_commits_nothing(tmp_path, store, policy):
    cfg = _cfg(f"ingest.bad_rows={policy}")
    inter = tmp_path / "i.csv"
    inter.write_text(HEADER + "u1,a,5,10,1\n")
    run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    version = store.table("interactions").manifest()["version"]

    inter.write_text(HEADER)
    with pytest.raises(IngestError) as err:
        run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert str(err.value) == f"{inter}: no data rows, nothing to ingest; nothing was committed"
    assert store.table("interactions").manifest()["version"] == version

    inter.write_text(HEADER + "u1,zz,5,10,1\nu1,a,-1,10,2\nu1,a,5,10,1.7\n")
    lines = [f"{inter} row 1: video_id 'zz' is not in the videos table",
             f"{inter} row 2: play time play_time_s is negative",
             f"{inter} row 3: timestamp timestamp is not a whole number: '1.7'"]
    with pytest.raises(IngestError) as err:
        run_ingest(cfg, store, str(inter), str(_videos(tmp_path)))
    assert str(err.value) == (_fail_message(lines) if policy == "fail" else (
        f"{inter}: all 3 rows are bad, nothing to ingest (policy bad_rows=quarantine); nothing "
        "was committed:\n  " + "\n  ".join(lines)))
    assert store.table("interactions").manifest()["version"] == version
    assert store.table("interactions").read().num_rows == 1
