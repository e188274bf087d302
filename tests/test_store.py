import json
import os

import pyarrow as pa
import pytest

from feature_store.store import Store, StoreError
from frame_dist.config import Config


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


def _rows(a, b):
    return pa.table({"x": pa.array(range(a, b), pa.int64())})


def test_staged_parts_are_invisible_until_commit(store):
    table = store.table("t")
    assert not table.exists()
    with pytest.raises(StoreError, match="table 't' has no committed data"):
        table.read()
    part = table.write_part(_rows(0, 3), {"ids": [0, 1, 2]})
    assert not table.exists()  # staged only
    table.commit([part], {"n": 3})
    assert table.read().column("x").to_pylist() == [0, 1, 2]
    assert table.parts()[0].meta == {"ids": [0, 1, 2]}
    assert table.metadata() == {"n": 3}


def test_commit_appends_replace_swaps_and_versions_count(store):
    table = store.table("t")
    table.commit([table.write_part(_rows(0, 2))])
    table.commit([table.write_part(_rows(2, 4))], {"k": 1})
    assert sorted(table.read().column("x").to_pylist()) == [0, 1, 2, 3]
    table.write(_rows(10, 11), {"fresh": True})
    assert table.read().column("x").to_pylist() == [10]
    assert table.metadata() == {"fresh": True}
    assert table.manifest()["version"] == 3


def test_killed_writer_leaves_last_commit_and_vacuum_cleans(store):
    table = store.table("t")
    table.commit([table.write_part(_rows(0, 2))])
    table.write_part(_rows(5, 9))  # a writer that died before committing
    assert table.read().column("x").to_pylist() == [0, 1]
    assert table.vacuum() == 1
    assert table.read().column("x").to_pylist() == [0, 1]
    assert len(os.listdir(os.path.join(table.dir, "parts"))) == 1


def test_manifest_write_is_atomic_and_corruption_is_reported(store):
    table = store.table("t")
    table.commit([table.write_part(_rows(0, 1))])
    leftovers = [f for f in os.listdir(table.dir) if ".tmp-" in f]
    assert leftovers == []
    with open(os.path.join(table.dir, "_manifest.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(StoreError, match="_manifest.json is corrupt"):
        table.read()


def test_commit_writes_resolved_config(store):
    cfg = Config()
    cfg.graph.n_clips = 8
    store.table("t").write(_rows(0, 1), config=cfg)
    text = open(os.path.join(store.table("t").dir, "config.yaml")).read()
    assert "n_clips: 8" in text


def test_empty_commit_reads_with_schema(store):
    schema = pa.schema([pa.field("x", pa.int64())])
    store.table("t").commit([])
    assert store.table("t").read(schema=schema).num_rows == 0


def test_unsupported_scheme_refused(tmp_path):
    with pytest.raises(StoreError, match="only local paths and s3:// URIs"):
        Store("gs://bucket/x")


def test_json_roundtrip(store):
    store.write_json("graphs/meta.json", {"a": 1})
    assert store.read_json("graphs/meta.json") == {"a": 1}
    assert json.loads(store.read_bytes("graphs/meta.json")) == {"a": 1}


def test_relative_root_is_resolved_once_and_survives_pickling(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    store = Store("rel/store")
    assert store.root == str(tmp_path / "rel/store")
    monkeypatch.chdir("/")  # a Ray worker's working directory differs from the driver's
    clone = pickle.loads(pickle.dumps(store))
    assert clone.root == store.root and clone.base == store.base
