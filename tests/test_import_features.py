"""jobs.import_features: precomputed frame / clip features (.npy + ids, Parquet) into the store.

The tiny world (``tiny_ingest``, copied per test) gets random features of F = 12 in place of
extraction; graph + the single-process trainer run on them; every bad input is refused naming the
file and the video; extract does nothing on an imported store and never mixes the two kinds.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from worlds import GRID, copy_store, single_process_training, write_topic_features

from feature_store.frames import (
    EncoderIdentityError,
    read_clip_features,
    read_frame_features,
    stored_identity,
)
from frame_dist.config import load_config
from frame_dist.extract.encoder import encoder_identity
from frame_dist.extract.imported import ImportFeaturesError, run_import
from frame_dist.extract.pipeline import NO_URI, ExtractError, run_extract
from frame_dist.graph.shards import build_shards, load_clip_features, load_shards
from frame_dist.ingest.interactions import IngestError, run_ingest
from jobs import import_features as job

pytestmark = pytest.mark.usefixtures("one_torch_thread")
F = 12


@pytest.fixture
def world(tiny_ingest, tmp_path):
    """A copy of the tiny world's store, its video ids and random features (V, G, F)."""
    _, ingested, overrides = tiny_ingest
    cfg, store, overrides = copy_store(ingested, overrides, tmp_path / "store")
    ids = store.table("videos").read()["video_id"].to_pylist()
    feats = np.random.default_rng(3).normal(size=(len(ids), GRID, F)).astype(np.float32)
    return cfg, store, overrides, ids, feats


def _npy(tmp_path: Path, ids: list[str], feats: np.ndarray) -> list[str]:
    np.save(tmp_path / "f.npy", feats)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    return [f"extract.import_path={tmp_path}/f.npy", f"extract.import_ids={tmp_path}/ids.txt",
            "extract.import_name=toy"]


def _parquet(path: Path, ids: list, rows: list) -> str:
    pq.write_table(pa.table({"video_id": ids, "feature": rows}), path)
    return str(path)


def test_npy_import_then_graph_and_train(world, tmp_path):
    cfg, store, overrides, ids, feats = world
    order = np.random.default_rng(0).permutation(len(ids))  # any row order
    extra = _npy(tmp_path, [ids[i] for i in order], feats[order])
    assert job.main([*overrides, *extra]) == 0
    assert stored_identity(store) == {"arch": "external", "weights": "external:toy",
                                      "grid_size": GRID, "dim": F, "kind": "frames"}
    got_ids, got = read_frame_features(store, ids)
    np.testing.assert_array_equal(got, feats.astype(np.float16))
    clips = read_clip_features(store, 4, ids).features.reshape(len(ids), 4, F)
    expected = feats.astype(np.float16).astype(np.float32).reshape(len(ids), 4, 2, F).mean(2)
    np.testing.assert_allclose(clips, expected, atol=1e-5)

    cfg = load_config(None, [*overrides, *extra])
    summary = run_extract(cfg, store)  # nothing to extract: no Ray, no encoder
    assert (summary.done, summary.skipped, summary.failed) == (0, len(ids), 0)
    assert store.table("extract_errors").read().num_rows == 0

    build_shards(cfg, store)
    shard, manifest = load_shards(store, cfg.graph.n_clips, [0, 1])
    assert load_clip_features(store, manifest, shard.video_ids).shape == (
        len(shard.video_ids) * cfg.graph.n_clips, F)
    result = single_process_training(cfg, store)
    assert np.isfinite(result.history[-1]["loss"])
    assert result.history[-1]["valid"]["n"] > 0


@pytest.mark.parametrize("nested", [False, True])
def test_parquet_clip_import(world, tmp_path, nested):
    _, store, overrides, ids, feats = world
    clips = feats[:, :4]  # (V, N_c = 4, F) clip features
    rows = [c.tolist() if nested else c.reshape(-1).tolist() for c in clips]
    path = _parquet(tmp_path / "clips.parquet", ids, rows)
    assert job.main([*overrides, f"extract.import_path={path}", "extract.import_name=c4",
                     "extract.import_kind=clips", "extract.grid_size=4"]) == 0
    assert stored_identity(store)["kind"] == "clips"
    got = read_clip_features(store, 4, ids).features.reshape(len(ids), 4, F)
    np.testing.assert_array_equal(got, clips.astype(np.float16).astype(np.float32))


def _bad_cases(tmp_path: Path, ids: list[str], feats: np.ndarray) -> list[tuple]:
    """(overrides, exact message) of every bad input."""
    nan, big = feats.copy(), feats.copy()
    nan[2, 3, 5] = np.nan
    big[1, 0, 7] = 1e5
    cases = []

    def npy_case(array, id_list, message):
        path, id_path = tmp_path / f"f{len(cases)}.npy", tmp_path / f"ids{len(cases)}.txt"
        np.save(path, array)
        id_path.write_text("\n".join(id_list) + "\n")
        cases.append(([f"extract.import_path={path}", f"extract.import_ids={id_path}"],
                      message.format(f=path, ids=id_path)))

    npy_case(feats.reshape(len(ids), -1), ids,
             f"{{f}}: array of shape {(len(ids), GRID * F)} and dtype float32; expected numbers "
             "of shape (V, G, F): videos, grid frames (or clips), feature dim")
    npy_case(feats, ids[:-1], f"{{f}}: {len(ids)} videos (array {feats.shape}) but {{ids}} "
             f"lists {len(ids) - 1} ids")
    npy_case(nan, ids, f"{{f}}: video {ids[2]!r}: NaN or infinite value at grid index 3, dim 5")
    npy_case(big, ids, f"{{f}}: video {ids[1]!r}: value 100000 at grid index 0, dim 7 exceeds "
             "the float16 range (|x| <= 65504) the store keeps: scale the features")
    npy_case(feats, [*ids[:-1], "nope"], "{f}: 1 video id(s) not in the videos table (ingest "
             "them first): ['nope']")
    npy_case(feats, [*ids[:-1], ids[0]], f"{{f}}: duplicate video id(s) [{ids[0]!r}]")
    npy_case(feats[:, :4], ids, "{f}: 4 grid frames per video but extract.grid_size=8: set "
             "extract.grid_size=4")
    rows = [f.reshape(-1).tolist() for f in feats]
    rows[4] = rows[4][:-F]
    path = _parquet(tmp_path / "short.parquet", ids, rows)
    cases.append(([f"extract.import_path={path}"],
                  f"{path}: video {ids[4]!r}: feature is not {GRID} x {F} floats like the first "
                  "video's (1 video(s) differ)"))
    rows = [f.tolist() for f in feats]
    rows[6] = None
    path = _parquet(tmp_path / "null.parquet", ids, rows)
    cases.append(([f"extract.import_path={path}"],
                  f"{path}: video {ids[6]!r}: feature is null (1 video(s))"))
    rows = [f.tolist() for f in feats]
    rows[3] = rows[3][:-1]
    path = _parquet(tmp_path / "nested.parquet", ids, rows)
    cases.append(([f"extract.import_path={path}"],
                  f"{path}: video {ids[3]!r}: feature is not {GRID} lists of {F} floats like the "
                  "first video's (1 video(s) differ)"))
    return cases


def test_bad_inputs_named(world, tmp_path):
    _, store, overrides, ids, feats = world
    cases = _bad_cases(tmp_path, ids, feats)
    assert len(cases) == 10
    for extra, message in cases:
        cfg = load_config(None, [*overrides, *extra, "extract.import_name=toy"])
        with pytest.raises(ImportFeaturesError, match=f"^{re.escape(message)}$"):
            run_import(cfg, store)
        assert stored_identity(store) is None  # nothing committed
    assert job.main([*overrides, *cases[0][0], "extract.import_name=toy"]) == 1


def test_mixing_refused(world, tiny_ingest, tmp_path):
    cfg, store, overrides, ids, feats = world
    write_topic_features(store, identity=encoder_identity(cfg.extract))  # "extracted"
    extra = _npy(tmp_path, ids, feats)
    with pytest.raises(EncoderIdentityError, match="holds extracted features .* this run's are "
                       r"imported \(external:toy\): imported and extracted features are never "
                       "mixed in one table"):
        run_import(load_config(None, [*overrides, *extra]), store)
    assert job.main([*overrides, *extra]) == 2  # a refused configuration

    _, fresh, overrides2 = copy_store(tiny_ingest[1], tiny_ingest[2], tmp_path / "fresh")
    extra = _npy(tmp_path, ids[1:], feats[1:])  # the first video (it has a uri) is left out
    cfg2 = load_config(None, [*overrides2, *extra])
    run_import(cfg2, fresh)
    with pytest.raises(EncoderIdentityError, match=re.escape(
            f"holds imported features (external:toy), but 1 video(s) of the videos table have a "
            f"uri and no features: [{ids[0]!r}]. Imported and extracted features are never "
            "mixed in one table")):
        run_extract(cfg2, fresh)


def test_videos_without_uri(world, tmp_path):
    cfg, store, overrides, ids, feats = world
    videos = store.table("videos").read()
    no_uri = tmp_path / "videos.csv"
    pacsv.write_csv(videos.drop_columns(["uri"]), no_uri)  # no uri column at all
    inter = str(Path(cfg.world.out_dir) / "interactions.csv")  # the world's source
    with pytest.raises(IngestError, match="lacks column 'uri'"):
        run_ingest(load_config(None, overrides), store, inter, str(no_uri))
    extra = _npy(tmp_path, ids[1:], feats[1:])  # ids[0] has neither a uri nor features
    cfg = load_config(None, [*overrides, *extra, f"ingest.videos={no_uri}",
                             f"ingest.interactions={inter}"])
    run_ingest(cfg, store)
    assert set(store.table("videos").read()["uri"].to_pylist()) == {""}
    with pytest.raises(ExtractError, match="all 10 videos failed"):
        run_extract(cfg, store)  # nothing imported yet: no video can be extracted
    run_import(cfg, store)
    summary = run_extract(cfg, store)
    assert (summary.done, summary.skipped, summary.failures) == (0, len(ids) - 1,
                                                                {ids[0]: NO_URI})
    errors = store.table("extract_errors").read().to_pylist()
    assert [(e["input_id"], e["reason"]) for e in errors] == [(ids[0], NO_URI)]
    build = build_shards(cfg, store)
    assert build.manifest.n_videos == len(ids) - 1
