"""Frame-feature tables: writing parts, identity, and the clip-feature reader (paper eq. 1)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from feature_store.frames import (
    FRAME_FEATURES,
    EncoderIdentityError,
    check_encoder_identity,
    commit_frame_parts,
    committed_sources,
    committed_video_ids,
    extract_error_rows,
    frame_features_table,
    read_clip_features,
    read_frame_features,
    write_extract_errors,
    write_frame_part,
)
from feature_store.schemas import ERRORS, FEATURE_DIM, frame_features_schema
from feature_store.store import Store, StoreError
from frame_dist.cli import EXIT_CONFIG, run_stage

G = 4
IDENTITY = {"arch": "resnet50", "weights": "random(seed=0)", "image_size": 32, "grid_size": G,
            "dim": FEATURE_DIM, "preprocessing": "test"}


def constant_features(levels: list[list[float]]) -> np.ndarray:
    """(N, G, D) float16 where frame g of video v is the constant vector levels[v][g]."""
    return np.repeat(np.asarray(levels, np.float16)[:, :, None], FEATURE_DIM, axis=2)


@pytest.fixture
def store(tmp_path) -> Store:
    """Three videos in two committed parts: a = 1..4, b = 10, 20, 30, 40, c = 0.5, 0, 0, 2.5."""
    store = Store(str(tmp_path / "store"))
    times = np.tile((np.arange(G) + 0.5) / G, (2, 1))
    p1 = write_frame_part(store, frame_features_table(
        ["b", "a"], times, constant_features([[10, 20, 30, 40], [1, 2, 3, 4]])), ["b", "a"])
    p2 = write_frame_part(store, frame_features_table(
        ["c"], times[:1], constant_features([[0.5, 0, 0, 2.5]])), ["c"])
    commit_frame_parts(store, [p1], IDENTITY)
    commit_frame_parts(store, [p2], IDENTITY)
    return store


def test_table_rows_are_video_major_with_the_contract_schema():
    feats = np.arange(2 * 3 * FEATURE_DIM, dtype=np.float16).reshape(2, 3, FEATURE_DIM)
    table = frame_features_table(["x", "y"], np.array([[0.5, 1.5, 2.5], [1, 3, 5]]), feats)
    assert table.schema == frame_features_schema()
    assert table.column("video_id").to_pylist() == ["x", "x", "x", "y", "y", "y"]
    assert table.column("grid_index").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert table.column("time_s").to_pylist() == [0.5, 1.5, 2.5, 1.0, 3.0, 5.0]
    np.testing.assert_array_equal(table.column("feature")[4].values.to_numpy(), feats[1, 1])
    with pytest.raises(ValueError, match="2 ids, times \\(2, 2\\), features \\(2, 3, 2048\\)"):
        frame_features_table(["x", "y"], np.zeros((2, 2)), feats)


def test_committed_ids_and_frame_features_in_sorted_or_requested_order(store):
    assert committed_video_ids(store) == {"a", "b", "c"}
    ids, feats = read_frame_features(store)
    assert ids.tolist() == ["a", "b", "c"] and feats.dtype == np.float16
    assert feats.shape == (3, G, FEATURE_DIM)
    np.testing.assert_array_equal(feats[:, :, 7], [[1, 2, 3, 4], [10, 20, 30, 40],
                                                   [0.5, 0, 0, 2.5]])
    ids, feats = read_frame_features(store, ["c", "a"])
    assert ids.tolist() == ["c", "a"]
    np.testing.assert_array_equal(feats[:, :, 0], [[0.5, 0, 0, 2.5], [1, 2, 3, 4]])


@pytest.mark.parametrize("n_clips,expected", [
    (1, [[2.5], [25.0], [0.75]]),
    (2, [[1.5, 3.5], [15.0, 35.0], [0.25, 1.25]]),
    (4, [[1, 2, 3, 4], [10, 20, 30, 40], [0.5, 0, 0, 2.5]]),
])
def test_clip_features_are_means_of_their_grid_frames(store, n_clips, expected):
    clips = read_clip_features(store, n_clips)
    assert clips.video_ids.tolist() == ["a", "b", "c"]
    assert (clips.n_clips, clips.grid_size, clips.encoder) == (n_clips, G, IDENTITY)
    assert clips.features.shape == (3 * n_clips, FEATURE_DIM)
    assert clips.features.dtype == np.float32
    # row = video index * N_c + clip index; every dimension carries the same value
    np.testing.assert_allclose(clips.features, np.repeat(
        np.asarray(expected, np.float64).reshape(-1, 1), FEATURE_DIM, axis=1), atol=1e-6)


def test_clip_features_of_a_subset_in_requested_order(store):
    clips = read_clip_features(store, 2, video_ids=["c", "b"])
    assert clips.video_ids.tolist() == ["c", "b"]
    np.testing.assert_allclose(clips.features[:, 0], [0.25, 1.25, 15.0, 35.0])


def test_reader_touches_only_the_parts_it_needs(store):
    part_of_c = [p for p in store.table(FRAME_FEATURES).parts() if p.meta["video_ids"] == ["c"]]
    store.fs.rm(store.path("tables", FRAME_FEATURES, part_of_c[0].path))
    np.testing.assert_allclose(read_clip_features(store, 4, ["a"]).features[:, 0], [1, 2, 3, 4])
    with pytest.raises(FileNotFoundError):
        read_clip_features(store, 4, ["c"])


def test_reader_errors_name_the_problem(store, tmp_path):
    with pytest.raises(ValueError, match="n_clips=3 does not divide the grid size G=4"):
        read_clip_features(store, 3)
    with pytest.raises(StoreError, match=r"2 requested video\(s\) have no committed frame "
                                         r"features in .*: \['zz', 'yy'\]"):
        read_clip_features(store, 2, ["a", "zz", "yy"])
    with pytest.raises(ValueError, match=r"video_ids has duplicates: \['a'\]"):
        read_frame_features(store, ["a", "b", "a"])
    with pytest.raises(StoreError, match="has no committed data .* run the extract stage first"):
        read_frame_features(Store(str(tmp_path / "empty")))


def test_staged_parts_are_invisible_until_committed(tmp_path):
    store = Store(str(tmp_path / "s"))
    write_frame_part(store, frame_features_table(["a"], np.zeros((1, G)),
                                                 constant_features([[1, 2, 3, 4]])), ["a"])
    assert committed_video_ids(store) == set()
    with pytest.raises(StoreError):
        read_frame_features(store)
    assert store.table(FRAME_FEATURES).vacuum() == 1


def test_incomplete_video_in_a_part_is_reported(tmp_path):
    store = Store(str(tmp_path / "s"))
    table = frame_features_table(["a"], np.zeros((1, G)), constant_features([[1, 2, 3, 4]]))
    part = write_frame_part(store, table.slice(0, 3), ["a"])  # grid index 3 missing
    commit_frame_parts(store, [part], IDENTITY)
    with pytest.raises(StoreError, match=f"part {part.path}: video 'a' does not have exactly "
                                         "one row per grid index 0..3"):
        read_clip_features(store, 2)


def test_video_committed_again_is_read_from_its_latest_part(store):
    # "a" extracted again (its source changed): the old rows stay in the first part's file,
    # but no reader takes them any more
    new_a = {"uri": "/v/a2.mp4", "size": 2, "mtime_ns": 5}
    again = write_frame_part(store, frame_features_table(
        ["a"], np.zeros((1, G)), constant_features([[9, 9, 9, 9]])), ["a"],
        {"sources": {"a": new_a}})
    commit_frame_parts(store, [again], IDENTITY)
    ids, feats = read_frame_features(store)
    assert ids.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(feats[0, :, 0], [9, 9, 9, 9])
    np.testing.assert_array_equal(feats[1, :, 0], [10, 20, 30, 40])  # "b", same first part
    np.testing.assert_array_equal(read_frame_features(store, ["a"])[1][0, :, 0], [9, 9, 9, 9])
    np.testing.assert_allclose(read_clip_features(store, 1, ["b", "a"]).features[:, 0],
                               [25.0, 9.0])
    # the parts of the store fixture record no sources (an older writer): None, never a guess
    assert committed_sources(store) == {"a": new_a, "b": None, "c": None}


def test_identity_mismatch_is_refused_naming_the_fields(store):
    check_encoder_identity(store, dict(IDENTITY))  # same identity: fine
    other = dict(IDENTITY, weights="IMAGENET1K_V2", image_size=224)
    with pytest.raises(EncoderIdentityError) as info:
        check_encoder_identity(store, other)
    msg = str(info.value)
    assert "image_size: stored 32, this run 224" in msg
    assert "weights: stored 'random(seed=0)', this run 'IMAGENET1K_V2'" in msg
    assert "Use another store.root, or delete that table to re-extract." in msg
    # jobs exit with the configuration code (feature_store imports nothing of frame_dist, so the
    # error is not a ConfigError; the jobs' contract treats it as one)
    assert run_stage("extract", lambda: check_encoder_identity(store, other)) == EXIT_CONFIG


def test_errors_table_is_replaced_by_each_run(tmp_path):
    store = Store(str(tmp_path / "s"))
    write_extract_errors(store, extract_error_rows(["v1", "v2"], ["/a.mp4", "/b.mp4"],
                                                   ["file not found", "empty file (0 bytes)"]))
    write_extract_errors(store, extract_error_rows(["v2"], ["/b.mp4"], ["empty file (0 bytes)"]))
    rows = store.table("extract_errors").read().to_pylist()
    assert rows == [{"stage": "extract", "input_id": "v2", "uri": "/b.mp4", "row": None,
                     "field": None, "reason": "empty file (0 bytes)"}]
    write_extract_errors(store, extract_error_rows([], [], []))
    assert store.table("extract_errors").read(schema=ERRORS).num_rows == 0
    # each replacement deleted the part file of the version it replaced
    parts_dir = tmp_path / "s" / "tables" / "extract_errors" / "parts"
    assert [f"parts/{f.name}" for f in parts_dir.iterdir()] == [
        p.path for p in store.table("extract_errors").parts()]


def test_features_round_trip_float16_exactly(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(0, 5, (2, G, FEATURE_DIM)).astype(np.float16)
    store = Store(str(tmp_path / "s"))
    part = write_frame_part(store, frame_features_table(["p", "q"], np.zeros((2, G)), feats),
                            ["p", "q"])
    commit_frame_parts(store, [part], IDENTITY)
    np.testing.assert_array_equal(read_frame_features(store)[1], feats)
    expected = feats.astype(np.float64).reshape(2, 2, 2, FEATURE_DIM).mean(axis=2)
    np.testing.assert_allclose(read_clip_features(store, 2).features,
                               expected.reshape(4, FEATURE_DIM), atol=1e-5)
    assert pa.types.is_float16(store.table(FRAME_FEATURES).read().schema.field(
        "feature").type.value_type)
