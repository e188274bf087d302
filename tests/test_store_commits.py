"""Commits that cannot be lost: versioned manifests created if absent, on local disk and on an
S3-compatible server (moto on 127.0.0.1), with concurrent writer processes; manifests read back
are checked like any untrusted input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

from feature_store.store import KEEP_VERSIONS, Store, StoreError, create_exclusive

WRITER = textwrap.dedent("""
    import sys
    import pyarrow as pa
    from feature_store.store import Store
    root, endpoint, name, n = sys.argv[1], sys.argv[2] or None, sys.argv[3], int(sys.argv[4])
    table = Store(root, endpoint_url=endpoint).table("t")
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(n):
        part = table.write_part(pa.table({"x": [i]}), {"writer": name, "i": i})
        table.commit([part], {f"last_{name}": i})
""")


def _race(root: str, endpoint: str | None, n: int, writers: int = 2) -> None:
    """``writers`` processes each committing ``n`` one-row parts to table "t" at once."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, root, endpoint or "", f"w{k}",
                               str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env=env, text=True) for k in range(writers)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.wait(timeout=600) == 0


def _check_all_commits(store: Store, n: int, writers: int = 2) -> None:
    table = store.table("t")
    parts = table.parts()
    got = sorted((p.meta["writer"], p.meta["i"]) for p in parts)
    assert got == sorted((f"w{k}", i) for k in range(writers) for i in range(n))
    assert table.manifest()["version"] == writers * n
    assert table.metadata() == {f"last_w{k}": n - 1 for k in range(writers)}
    assert table.read().num_rows == writers * n


def test_two_writers_lose_no_commit_on_local_disk(tmp_path):
    root = str(tmp_path / "store")
    _race(root, None, 150)
    store = Store(root)
    _check_all_commits(store, 150)
    versions = os.listdir(os.path.join(store.table("t").dir, "_manifests"))
    assert len(versions) <= KEEP_VERSIONS + 2  # old versions are pruned
    assert not [f for f in os.listdir(store.table("t").dir) if ".tmp-" in f]


@pytest.mark.slow
def test_two_writers_lose_no_commit_on_s3(s3_server, aws_test_env):
    bucket = s3_server.bucket("commits")
    root = f"s3://{bucket}/store"
    # 60 rounds each (150 on local disk): every round the two writers race for the same
    # version; the in-process S3 server makes each commit ~10x slower than the disk
    _race(root, s3_server.endpoint_url, 60)
    _check_all_commits(Store(root, endpoint_url=s3_server.endpoint_url), 60)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive_creates_once(where, tmp_path, request):
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        store = Store(f"s3://{server.bucket('excl')}/s", endpoint_url=server.endpoint_url)
    else:
        store = Store(str(tmp_path / "s"))
    path = store.path("x/once.json")
    assert create_exclusive(store.fs, path, b"first") is True
    assert create_exclusive(store.fs, path, b"second") is False
    assert store.read_bytes("x/once.json") == b"first"  # the loser changed nothing


def test_a_store_written_before_versioned_manifests_reads_and_commits_on(tmp_path):
    store = Store(str(tmp_path / "s"))
    table = store.table("t")
    part = table.write_part(pa.table({"x": [1]}))
    os.makedirs(table.dir, exist_ok=True)
    with open(os.path.join(table.dir, "_manifest.json"), "w") as f:  # the old layout: one file
        json.dump({"table": "t", "version": 7, "committed_at": 0.0,
                   "parts": [part.__dict__], "metadata": {"a": 1}}, f)
    assert table.manifest()["version"] == 7 and table.metadata() == {"a": 1}
    table.commit([table.write_part(pa.table({"x": [2]}))], {"b": 2})
    assert table.manifest()["version"] == 8
    assert sorted(table.read().column("x").to_pylist()) == [1, 2]
    assert table.metadata() == {"a": 1, "b": 2}


def _plant(table, manifest: dict) -> None:
    os.makedirs(os.path.join(table.dir, "_manifests"), exist_ok=True)
    with open(os.path.join(table.dir, "_manifests", "000000000002.json"), "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("manifest, message", [
    ({"version": 2, "parts": [{"path": "../../../etc/passwd", "rows": 1, "meta": {}}]},
     "field 'parts[0].path' must name a file directly under parts/, got '../../../etc/passwd'"),
    ({"version": 2, "parts": [{"path": "parts/a.parquet", "rows": -1, "meta": {}}]},
     "field 'parts[0].rows' must be a non-negative integer, got -1"),
    ({"version": 2, "parts": [{"path": "parts/a.parquet", "rows": 1, "code": "x"}]},
     "field 'parts[0]' must be an object with path, rows and meta"),
    ({"version": 3, "parts": []}, "field 'version' is 3 in the file of version 2"),
    ({"version": 2, "parts": {}}, "field 'parts' must be a list, got dict"),
    ([1, 2], "field '(top level)' must be a JSON object, got list"),
])
def test_a_planted_manifest_is_refused_naming_file_and_field(tmp_path, manifest, message):
    store = Store(str(tmp_path / "s"))
    table = store.table("t")
    table.commit([table.write_part(pa.table({"x": [1]}))])
    _plant(table, manifest)
    with pytest.raises(StoreError) as err:
        table.read()
    assert message in str(err.value)
    assert "_manifests/000000000002.json" in str(err.value)
