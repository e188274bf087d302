"""Graph building: clip labels, R^p / R^n, normalisation, id maps, slicing, torch conversion,
clip ids, the graph manifest's reader and writer."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
import torch

from feature_store.store import Store
from frame_dist.graph.clip_graph import (
    GraphError,
    IdMap,
    build_graph,
    clip_labels,
    csr_to_coo_torch,
    csr_to_torch,
    encode_interactions,
    normalise,
    slice_users,
    to_torch,
)
from frame_dist.graph.manifest import (
    GraphManifest,
    ManifestError,
    PartitionError,
    ShardInfo,
    manifest_path,
)
from frame_dist.graph.shards import check_graph, read_graph_manifest
from frame_dist.model.propagation import clip_ids

N_C = 4

# (user, video, watch ratio, full watch) -> expected labels with N_c = 4
HAND = [
    (0, 0, 1.00, True),   # full watch: clips 0..3 of v0 positive (c 0-3)
    (0, 1, 0.60, False),  # s = floor(2.4) = 2: clips 0,1 watched (c 4,5), skip c 6
    (1, 1, 0.00, False),  # s = 0: skip c 4, nothing watched
    (1, 2, 0.99, True),   # full within tolerance: c 8-11 positive
    (2, 0, 0.95, False),  # s = 3: watched c 0,1,2, skip c 3
    (2, 0, 0.25, False),  # s = 1 exactly on the boundary: watched c 0, skip c 1
]


def _arrays(rows):
    u, v, r, f = zip(*rows)
    return np.array(u), np.array(v), np.array(r, dtype=float), np.array(f)


def _edges(m: sp.csr_matrix) -> set[tuple[int, int]]:
    c = m.tocoo()
    return set(zip(c.row.tolist(), c.col.tolist()))


@pytest.fixture
def hand_graph():
    u, v, r, f = _arrays(HAND)
    return build_graph(u, v, r, f, n_users=4, n_videos=3, n_clips=N_C)


def test_clip_labels_exact() -> None:
    u, v, r, f = _arrays(HAND)
    assert clip_labels(r, f, N_C).tolist() == [4, 2, 0, 4, 3, 1]


@pytest.mark.parametrize("n_clips,ratio,expected", [
    (4, 0.0, 0), (4, 0.2499, 0), (4, 0.25, 1), (4, 0.75, 3), (4, 0.999, 3), (4, 1.0, 3),
    (4, 1.7, 3),  # not flagged full (inconsistent ratio): clamped to the last clip
    (10, 0.7, 7), (10, 0.3, 3), (100, 0.29, 29), (1, 0.5, 0), (8, 0.124, 0), (8, 0.125, 1),
])
def test_skip_clip_boundaries(n_clips: int, ratio: float, expected: int) -> None:
    assert clip_labels(np.array([ratio]), np.array([False]), n_clips).tolist() == [expected]


def test_clip_labels_reject_bad_ratios() -> None:
    with pytest.raises(GraphError, match=r"watch_ratio must be finite and >= 0: 2 bad row\(s\), "
                                         r"e.g. rows \[2, 4\]"):
        clip_labels(np.array([0.1, np.nan, 0.5, -0.2]), np.zeros(4, bool), 4)
    with pytest.raises(GraphError, match=r"rows \[17\]"):
        clip_labels(np.array([0.1, np.inf]), np.zeros(2, bool), 4, rows=np.array([3, 17]))


def test_full_watch_positives_exact(hand_graph) -> None:
    assert _edges(hand_graph.pos) == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 8), (1, 9), (1, 10),
                                      (1, 11)}
    assert _edges(hand_graph.neg) == {(0, 6), (1, 4), (2, 3), (2, 1)}
    assert hand_graph.pos.shape == (4, 12) and hand_graph.n_clips == 12
    assert set(hand_graph.pos.data.tolist()) == {1.0}


def test_watched_clips_positives_exact() -> None:
    u, v, r, f = _arrays(HAND)
    g = build_graph(u, v, r, f, n_users=4, n_videos=3, n_clips=N_C, positives="watched_clips")
    assert _edges(g.pos) == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 8), (1, 9),
                             (1, 10), (1, 11), (2, 0), (2, 1), (2, 2)}
    assert _edges(g.neg) == {(0, 6), (1, 4), (2, 3), (2, 1)}
    # (2, 0) was watched twice: duplicates collapse to one binary edge
    assert g.pos[2, 0] == 1.0 and set(g.pos.data.tolist()) == {1.0}


def test_user_without_interactions_has_empty_rows(hand_graph) -> None:
    assert hand_graph.pos[3].nnz == 0 and hand_graph.neg[3].nnz == 0
    assert hand_graph.pos_norm[3].nnz == 0


@pytest.mark.parametrize("positives", ["full_watch", "watched_clips"])
@pytest.mark.parametrize("n_clips", [1, 3, 8])
def test_matches_loop_reference(positives: str, n_clips: int) -> None:
    rng = np.random.default_rng(n_clips)
    n, m, nv = 400, 25, 30
    u, v = rng.integers(0, m, n), rng.integers(0, nv, n)
    r = np.round(rng.random(n) * 1.1, 3)
    full = r >= 0.98
    g = build_graph(u, v, r, full, n_users=m, n_videos=nv, n_clips=n_clips, positives=positives)
    pos, neg = set(), set()
    for ui, vi, ri, fi in zip(u, v, r, full):  # the obvious per-interaction definition
        if fi:
            pos |= {(ui, vi * n_clips + j) for j in range(n_clips)}
            continue
        s = min(int(math.floor(ri * n_clips + 1e-9)), n_clips - 1)
        neg.add((ui, vi * n_clips + s))
        if positives == "watched_clips":
            pos |= {(ui, vi * n_clips + j) for j in range(s)}
    assert _edges(g.pos) == pos
    assert _edges(g.neg) == neg


def test_normalisation_hand_computed_2x3() -> None:
    r = sp.csr_matrix(np.array([[1, 1, 1], [0, 1, 0]], dtype=np.float32))
    # user degrees (3, 1), clip degrees (1, 2, 1)
    expected = np.array([[1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(3)],
                         [0.0, 1 / math.sqrt(2), 0.0]])
    np.testing.assert_allclose(normalise(r).toarray(), expected, rtol=1e-6)
    assert normalise(r).dtype == np.float32


def test_normalisation_zero_degree_is_safe() -> None:
    r = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32))
    out = normalise(r).toarray()
    assert np.isfinite(out).all()
    expected = np.array([[0.5, 0, 1 / math.sqrt(2), 0], [0, 0, 0, 0], [1 / math.sqrt(2), 0, 0, 0]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    empty = normalise(sp.csr_matrix((3, 5), dtype=np.float32))
    assert empty.nnz == 0 and np.isfinite(empty.toarray()).all()


def test_graph_norm_uses_whole_graph_degrees(hand_graph) -> None:
    dense = hand_graph.neg.toarray()
    du, dc = dense.sum(1), dense.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.nan_to_num(dense / np.sqrt(du[:, None]) / np.sqrt(dc[None, :]))
    np.testing.assert_allclose(hand_graph.neg_norm.toarray(), expected, rtol=1e-6)
    # clip 4 of the negative graph: user 1 (degree 1) and clip degree 1
    assert hand_graph.neg_norm[1, 4] == pytest.approx(1.0)
    # positive graph: user 0 has 4 edges, clips 0..3 each degree 1 -> 1/2
    np.testing.assert_allclose(hand_graph.pos_norm[0].toarray()[0, :4], 0.5, rtol=1e-6)


def test_bad_inputs_name_field_and_rows() -> None:
    u, v, r, f = _arrays(HAND)
    with pytest.raises(GraphError, match=r"video_idx out of range \[0, 2\) at rows \[4\]: \[2\]"):
        build_graph(u, v, r, f, n_users=4, n_videos=2, n_clips=N_C)
    with pytest.raises(GraphError, match="positives='all' must be one of"):
        build_graph(u, v, r, f, n_users=4, n_videos=3, n_clips=N_C, positives="all")
    with pytest.raises(GraphError, match=r"full_watch has shape \(2,\), user_idx has \(6,\)"):
        build_graph(u, v, r, f[:2], n_users=4, n_videos=3, n_clips=N_C)


def test_user_out_of_range_message() -> None:
    u, v, r, f = _arrays(HAND)
    with pytest.raises(GraphError, match=r"user_idx out of range \[0, 2\) at rows \[5, 6\]: "
                                         r"\[2, 2\]"):
        build_graph(u, v, r, f, n_users=2, n_videos=3, n_clips=N_C)


# --------------------------------------------------------------------------- id maps


def test_id_map_sorted_and_vectorised_lookup() -> None:
    ids = IdMap.from_values(np.array(["v9", "v1", "v5", "v1"]), name="video_id")
    assert ids.ids.to_pylist() == ["v1", "v5", "v9"] and len(ids) == 3
    assert ids.lookup(["v9", "v1", "v9", "v5"]).tolist() == [2, 0, 2, 1]
    assert ids.lookup(pa.chunked_array([["v5"], ["v1"]])).dtype == np.int64
    assert ids.decode(np.array([2, 0])).to_pylist() == ["v9", "v1"]


def test_id_map_unknown_ids_named_with_rows() -> None:
    ids = IdMap(["u1", "u2"], name="user_id")
    with pytest.raises(GraphError, match=r"interactions: 2 row\(s\) with a user_id not in the id "
                                         r"map \(2 ids\), e.g. \['zz'\] at rows \[2, 4\]"):
        ids.lookup(["u1", "zz", "u2", "zz"], where="interactions")
    with pytest.raises(GraphError, match=r"null user_id at rows \[11\]"):
        ids.lookup(pa.array(["u1", None]), rows=np.array([10, 11]))
    with pytest.raises(GraphError, match=r"duplicate ids \['a'\]"):
        IdMap(["a", "b", "a"])
    with pytest.raises(GraphError, match=r"indices \[5\] out of range \[0, 2\)"):
        ids.decode(np.array([0, 5]))


def _table(rows):
    user, video, ratio, full, split = zip(*rows)
    return pa.table({"user_id": list(user), "video_id": list(video),
                     "watch_ratio": list(ratio), "full_watch": list(full),
                     "split": list(split), "source_row": list(range(101, 101 + len(rows)))})


def test_test_interactions_never_enter_the_graph() -> None:
    train_rows = [("a", "x", 1.0, True, "train"), ("b", "x", 0.3, False, "train"),
                  ("b", "y", 1.0, True, "train")]
    test_rows = [("a", "y", 1.0, True, "test"), ("a", "x", 0.1, False, "test"),
                 ("b", "x", 1.0, True, "test")]
    users, videos = IdMap(["a", "b"], "user_id"), IdMap(["x", "y"], "video_id")

    def graph(table):
        inter = encode_interactions(table, users, videos, split="train")
        return build_graph(inter.user_idx, inter.video_idx, inter.watch_ratio,
                           inter.full_watch, n_users=2, n_videos=2, n_clips=2)

    g_train = graph(_table(train_rows))
    g_all = graph(_table(train_rows + test_rows))
    for name in ("pos", "neg", "pos_norm", "neg_norm"):
        assert (getattr(g_train, name) != getattr(g_all, name)).nnz == 0, name
    # the test full watch of (a, y) would have added clips 2, 3 to user a's positives
    assert _edges(g_all.pos) == {(0, 0), (0, 1), (1, 2), (1, 3)}
    assert _edges(g_all.neg) == {(1, 0)}


def test_encode_interactions_names_source_rows() -> None:
    users, videos = IdMap(["a"], "user_id"), IdMap(["x"], "video_id")
    table = _table([("a", "x", 1.0, True, "train"), ("a", "q", 0.5, False, "train")])
    with pytest.raises(GraphError, match=r"interactions: 1 row\(s\) with a video_id not in the "
                                         r"id map \(1 ids\), e.g. \['q'\] at rows \[102\]"):
        encode_interactions(table, users, videos)
    with pytest.raises(GraphError, match=r"missing column\(s\) \['watch_ratio'\]"):
        encode_interactions(table.drop(["watch_ratio"]), users, videos)


# --------------------------------------------------------------------------- slicing, torch


def test_slice_users_keeps_whole_graph_normalisation() -> None:
    rng = np.random.default_rng(3)
    u, v = rng.integers(0, 12, 150), rng.integers(0, 9, 150)
    r = rng.random(150)
    g = build_graph(u, v, r, r > 0.6, n_users=12, n_videos=9, n_clips=3)
    rows = np.array([7, 2, 11])
    shard = slice_users(g, rows)
    assert shard.user_rows.tolist() == [7, 2, 11] and shard.n_users == 12
    for name in ("pos", "neg", "pos_norm", "neg_norm"):
        np.testing.assert_array_equal(getattr(shard, name).toarray(),
                                      getattr(g, name).toarray()[rows])
    # not a re-normalisation of the shard's own rows
    assert not np.allclose(shard.pos_norm.toarray(), normalise(shard.pos).toarray())
    # shards partition the clip-side sum: sum over shards of R~_s^T x_s = R~^T x
    x = rng.normal(size=(12, 5))
    parts = [slice_users(g, s) for s in (np.arange(0, 5), np.arange(5, 12))]
    total = sum(p.pos_norm.T @ x[p.user_rows] for p in parts)
    np.testing.assert_allclose(total, g.pos_norm.T @ x, rtol=1e-6)
    with pytest.raises(GraphError, match=r"rows \[12\] out of range \[0, 12\)"):
        slice_users(g, np.array([0, 12]))


def test_torch_conversions(hand_graph) -> None:
    dense = hand_graph.pos_norm.toarray()
    t = csr_to_torch(hand_graph.pos_norm)
    assert t.layout == torch.sparse_csr and t.dtype == torch.float32
    np.testing.assert_array_equal(t.to_dense().numpy(), dense)
    np.testing.assert_array_equal(csr_to_coo_torch(hand_graph.pos_norm).to_dense().numpy(), dense)
    pg = to_torch(hand_graph)
    assert pg.clips_per_video == N_C and pg.n_users == 4 and pg.n_clips == 12
    assert pg.n_videos == 3
    np.testing.assert_array_equal(pg.pos.transpose.to_dense().numpy(), dense.T)
    np.testing.assert_array_equal(pg.neg.matrix.to_dense().numpy(), hand_graph.neg_norm.toarray())
    assert to_torch(hand_graph, with_negative=False).neg is None


def test_clip_ids_hand_written() -> None:
    expected = np.array([8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7])  # videos 2, 0, 1; N_c = 4
    got = clip_ids(np.array([2, 0, 1], dtype=np.int32), 4)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    t = clip_ids(torch.tensor([2, 0, 1]), 4)
    assert t.dtype == torch.int64
    assert torch.equal(t, torch.from_numpy(expected))
    np.testing.assert_array_equal(clip_ids(3, 2), [6, 7])  # a scalar is one video
    assert clip_ids(np.zeros(0, np.int64), 4).shape == (0,)


def _manifest_json() -> dict:
    """A graph manifest as build_shards writes it (layout 2): N_c = 4, 3 videos, 2 shards."""
    tables = ("users", "videos", "pos", "neg", "train", "valid", "test")
    return {
        "layout": 2, "n_clips": 4, "n_shards": 2, "positives": "full_watch",
        "n_users": 5, "n_videos": 3, "n_train": 9, "nnz_pos": 20, "nnz_neg": 4,
        "dropped_no_features": 1, "user_ids_file": "users-abc.parquet",
        "video_ids": ["a", "b", "c"],
        "shards": [{"users": 3, "videos": 2, "nnz_pos": 12, "nnz_neg": 1, "train": 5,
                    "valid": 1, "test": 1},
                   {"users": 2, "videos": 3, "nnz_pos": 8, "nnz_neg": 3, "train": 4,
                    "valid": 0, "test": 2}],
        "files": [{t: f"shard{k:04d}-{t}-x.parquet" for t in tables} for k in range(2)],
        "feature_mean": [0.5, -1.25], "feature_std": [2.0, 0.75],
        "fingerprint": "f" * 64,
    }


def test_graph_manifest_round_trip(tmp_path) -> None:
    raw = _manifest_json()
    manifest = GraphManifest.from_json(copy.deepcopy(raw), "test")
    assert manifest.n_users == 5 and manifest.video_ids == ["a", "b", "c"]
    assert manifest.shards[1] == ShardInfo(users=2, videos=3, nnz_pos=8, nnz_neg=3, train=4,
                                           valid=0, test=2)
    assert manifest.files[1]["neg"] == "shard0001-neg-x.parquet"
    assert manifest.feature_std == [2.0, 0.75]
    store = Store(str(tmp_path))
    manifest.write(store)
    assert store.read_json(manifest_path(4)) == raw  # the file format, key for key
    assert read_graph_manifest(store, 4) == manifest
    assert read_graph_manifest(store, 8) is None


_RERUN = "run the graph stage again (python -m jobs.graph ...)"


def _without(name: str):
    return lambda m: m.pop(name)


def _set(value, *path):
    def change(m):
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    return change


@pytest.mark.parametrize("change,problem", [
    (_without("n_train"), "field n_train is missing"),
    (_set("5", "n_users"), 'field n_users must be an integer >= 0, not "5"'),
    (_set(True, "n_videos"), "field n_videos must be an integer >= 0, not true"),
    (_set(-1, "nnz_pos"), "field nnz_pos must be an integer >= 0, not -1"),
    (_set(1.5, "shards", 1, "nnz_neg"), "field shards[1].nnz_neg must be an integer >= 0, "
                                        "not 1.5"),
    (lambda m: m["files"][0].pop("neg"), "field files[0].neg is missing"),
    (_set("x", "files", 1, "extra"), "field files[1].extra is not a table of a shard "
                                     "('users', 'videos', 'pos', 'neg', 'train', 'valid', "
                                     "'test')"),
    (_set(7, "video_ids", 2), "field video_ids[2] must be a string, not 7"),
    (_set({"a": 1}, "video_ids"), 'field video_ids must be a list, not {"a": 1}'),
    (_set(None, "feature_mean", 0), "field feature_mean[0] must be a number, not null"),
    (_set(3, "n_shards"), "field shards has 2 entries, field n_shards is 3"),
    (_set(["a"], "video_ids"), "field video_ids has 1 entries, field n_videos is 3"),
    (_set(8, "n_clips"), "field n_clips is 8, its directory is for N_c=4"),
    (_set(3, "layout"), "field layout is 3, this frame-dist reads layout 2"),
])
def test_graph_manifest_refuses_a_bad_field(tmp_path, change, problem) -> None:
    store = Store(str(tmp_path))
    raw = _manifest_json()
    change(raw)
    store.write_json(manifest_path(4), raw)
    expected = f"graph manifest {store.uri(manifest_path(4))}: {problem}: {_RERUN}"
    with pytest.raises(ManifestError) as error:
        read_graph_manifest(store, 4)
    assert str(error.value) == expected
    with pytest.raises(PartitionError) as error:  # training refuses it before any worker
        check_graph(store, 4, 1)
    assert str(error.value) == expected


@pytest.mark.parametrize("layout", [None, 1])
def test_graph_manifest_refuses_an_older_layout(tmp_path, layout) -> None:
    store = Store(str(tmp_path))
    raw = _manifest_json() | {"user_ids": ["u0", "u1"]}  # layout 1 listed the user ids
    if layout is None:
        raw.pop("layout")  # layout 1 had no field either
    else:
        raw["layout"] = layout
    store.write_json(manifest_path(4), raw)
    with pytest.raises(ManifestError) as error:
        read_graph_manifest(store, 4)
    assert str(error.value) == (
        f"the graph for N_c=4 ({store.uri(manifest_path(4))}) was built by an older frame-dist "
        f"(its user ids are not in Parquet files): {_RERUN}")


def test_graph_manifest_refuses_a_file_that_is_not_json(tmp_path) -> None:
    store = Store(str(tmp_path))
    store.write_text(manifest_path(4), '{"layout": 2,')
    with pytest.raises(ManifestError, match=r"graph manifest .*/graphs/nc=4/_manifest\.json is "
                                            r"not valid JSON \(.*\): run the graph stage again"):
        read_graph_manifest(store, 4)
    store.write_text(manifest_path(4), json.dumps(["a list"]))
    with pytest.raises(ManifestError) as error:
        read_graph_manifest(store, 4)
    assert str(error.value) == (f"graph manifest {store.uri(manifest_path(4))} is not a JSON "
                                f"object: {_RERUN}")


def test_user_mean_normalisation_averages_each_users_clips():
    """R~ = D_u^-1 R: every user row with edges sums to 1, whatever the clips' degrees."""
    from frame_dist.graph.clip_graph import normalise

    r = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]],
                               dtype=np.float32))
    mean = normalise(r, "user_mean").toarray()
    assert mean.tolist() == [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0.25] * 4]
    symmetric = normalise(r, "symmetric").toarray()
    assert symmetric[0, 0] == pytest.approx(1 / np.sqrt(2 * 3))  # d_u = 2, d_c = 3
    with pytest.raises(GraphError, match="normalisation='row' must be one of"):
        normalise(r, "row")
