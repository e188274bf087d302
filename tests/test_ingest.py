import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.schemas import INTERACTIONS
from feature_store.store import Store
from frame_dist.config import load_config
from frame_dist.ingest.interactions import IngestError, run_ingest, time_split


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
    assert t["timestamp"].tolist() == [1593878903]


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
