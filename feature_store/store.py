"""The Parquet feature store: tables of part files, committed by versioned manifests.

Layout under a root (a local path or ``s3://bucket/prefix``)::

    <root>/tables/<name>/_manifests/<version>.json  one file per commit, created exactly once
    <root>/tables/<name>/_manifest.json         a copy of the latest commit (people, old readers)
    <root>/tables/<name>/config.yaml            resolved config of the last commit
    <root>/tables/<name>/parts/<uuid>.parquet   part files (visible only once listed)
    <root>/<anything else>                      stage-specific files (graphs, runs, scores)

Writers stage part files under unique names, then commit: the manifest of version v + 1 lists
the committed parts and is *created if absent* (a hard link of a finished temporary file on
local disks, a conditional PUT ``If-None-Match: *`` on S3), so of two writers that read version v
only one creates v + 1; the other re-reads and retries on top of it. No commit is lost, and none
is half-written. Readers take the newest version file; a writer killed midway leaves the table
as it was at its last commit; orphaned part files are harmless and removed by
:meth:`Table.vacuum`. Every manifest read back is checked (docs/architecture.md, "Concurrency").

Credentials for S3 come from the standard AWS environment variables or profile and are never
written anywhere by the store.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"  # a copy of the latest commit; readers trust _manifests/ first
VERSIONS = "_manifests"  # <version:012d>.json, one per commit, each created exactly once
KEEP_VERSIONS = 16  # older version files are deleted by the commit that makes them this old
COMMIT_ATTEMPTS = 64  # a commit that loses the race this often in a row fails loudly
PART_PATH = re.compile(r"parts/[A-Za-z0-9_-][A-Za-z0-9._-]*")  # no separators, no '..'


class StoreError(RuntimeError):
    """The store is unreachable, inconsistent, or asked for something it does not hold."""


def open_filesystem(
    root: str, endpoint_url: str | None = None, region: str | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem for ``root`` and the root path inside it."""
    if root.startswith("s3://"):
        import s3fs  # imported lazily: only S3 stores need it

        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            client_kwargs["region_name"] = region
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)
        return fs, root[len("s3://"):].rstrip("/")
    if "://" in root and not root.startswith("file://"):
        raise StoreError(f"store root {root!r}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(root.removeprefix("file://"))
    return fsspec.filesystem("file"), path


@dataclass
class Part:
    """One committed part file of a table, with free-form metadata (e.g. the video ids in it)."""

    path: str  # relative to the table directory
    rows: int
    meta: dict[str, Any] = field(default_factory=dict)


class Store:
    """A feature store root. Cheap to create; safe to pickle into Ray tasks (no open handles)."""

    def __init__(self, root: str, endpoint_url: str | None = None, region: str | None = None):
        # a local root is made absolute here, once: Ray workers (Train workers in particular)
        # run in other working directories than the driver that named the store
        self.root = root if "://" in root and not root.startswith("file://") else \
            os.path.abspath(root.removeprefix("file://"))
        self.endpoint_url = endpoint_url
        self.region = region
        self.fs, self.base = open_filesystem(root, endpoint_url, region)

    @classmethod
    def from_config(cls, store_cfg: Any) -> Store:
        return cls(store_cfg.root, store_cfg.endpoint_url, store_cfg.region)

    def __reduce__(self):  # rebuild the filesystem on the other side instead of pickling it
        return (Store, (self.root, self.endpoint_url, self.region))

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def uri(self, *parts: str) -> str:
        """A path a user can paste: s3://... for S3 stores, an absolute path otherwise."""
        p = self.path(*parts)
        return f"s3://{p}" if self.root.startswith("s3://") else p

    def table(self, name: str) -> Table:
        return Table(self, name)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        write_atomic(self.fs, self.path(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))  # one GET on S3

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes_atomic(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes_atomic(rel, text.encode())

    def list_dir(self, rel: str) -> list[str]:
        """Names of the entries directly under ``rel`` (sorted; empty when it does not exist)."""
        path = self.path(rel)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))


def _local_temp(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> str:
    """``data`` written and synced to a temporary file beside ``path`` (local disks)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def numbered_files(fs: fsspec.AbstractFileSystem, directory: str) -> list[int]:
    """The numbers n of the files ``<n:012d>.json`` directly in ``directory``, ascending (empty
    when it does not exist): manifest versions and lease generations."""
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        base = posixpath.basename(name.rstrip("/"))
        if re.fullmatch(r"[0-9]{12}\.json", base):
            out.append(int(base[:12]))
    return sorted(out)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content."""
    if _is_local(fs):
        os.replace(_local_temp(fs, path, data), path)
    else:  # one PUT: S3 objects appear whole or not at all
        with fs.open(path, "wb") as f:
            f.write(data)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; False when it already existed.

    Readers never see a partial file: locally a finished temporary file is hard-linked into
    place (``link`` fails on an existing name); on S3 one PUT with ``If-None-Match: *``.
    """
    if _is_local(fs):
        tmp = _local_temp(fs, path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    try:
        with fs.open(path, "xb") as f:  # s3fs: a conditional PUT (If-None-Match: *)
            f.write(data)
    except FileExistsError:
        return False
    except OSError as exc:  # a 412 that the S3 server did not label with its condition
        if exc.errno == errno.EINVAL and "precondition" in str(exc).lower():
            return False
        raise
    return True


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class Table:
    """A named Parquet table in a store: staged part files plus a manifest of committed ones."""

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.dir = store.path("tables", name)

    # ---------------------------------------------------------------- state
    def manifest(self) -> dict[str, Any] | None:
        """The latest committed manifest (checked), or None when nothing was ever committed."""
        for _ in range(3):  # a version file pruned between listing and reading: list again
            try:
                return self._latest()[1]
            except FileNotFoundError:
                continue
        return self._latest()[1]

    def _latest(self) -> tuple[int, dict[str, Any] | None]:
        copy = self._read_manifest(MANIFEST)  # older stores have only this file
        best = copy["version"] if copy is not None else 0
        versions = self._versions()
        if versions and versions[-1] > best:
            newest = self._read_manifest(posixpath.join(VERSIONS, _version_name(versions[-1])),
                                         versions[-1])
            if newest is None:
                raise FileNotFoundError(versions[-1])
            return versions[-1], newest
        return best, copy

    def _versions(self) -> list[int]:
        """Committed version numbers present under _manifests/, ascending."""
        return numbered_files(self.store.fs, posixpath.join(self.dir, VERSIONS))

    def _read_manifest(self, rel: str, version: int | None = None) -> dict[str, Any] | None:
        path = posixpath.join(self.dir, rel)
        uri = self.store.uri("tables", self.name, rel)
        try:  # one GET (s3fs's file objects add If-Match, which fails while a writer replaces it)
            raw = self.store.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{uri} is corrupt: {exc}") from exc
        _check_manifest(manifest, uri, version)
        return manifest

    def exists(self) -> bool:
        return self.manifest() is not None

    def parts(self) -> list[Part]:
        m = self.manifest()
        return [Part(**p) for p in m["parts"]] if m else []

    def metadata(self) -> dict[str, Any]:
        m = self.manifest()
        return dict(m.get("metadata", {})) if m else {}

    # ---------------------------------------------------------------- writing
    def write_part(self, table: pa.Table, meta: dict[str, Any] | None = None) -> Part:
        """Stage one part file (not visible to readers until :meth:`commit`)."""
        rel = f"parts/{uuid.uuid4().hex}.parquet"
        path = posixpath.join(self.dir, rel)
        self.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        pq.write_table(table, path, filesystem=self.store.fs, compression="zstd")
        return Part(rel, table.num_rows, dict(meta or {}))

    def commit(
        self,
        parts: Sequence[Part],
        metadata: dict[str, Any] | None = None,
        *,
        replace: bool = False,
        config: Any | None = None,
    ) -> list[Part]:
        """Make ``parts`` visible: append them to (or, with ``replace``, swap) the committed set.

        ``metadata`` is merged into the manifest's metadata (``replace`` starts from empty).
        ``config`` (a :class:`frame_dist.config.Config`) is written beside the table as the
        resolved config of this commit. Concurrent writers never lose a commit: each one is
        a new manifest version created if absent, retried on top of a version another writer
        made first. Returns the parts of the version this commit replaced that it no longer
        lists (``replace`` only; each dropped part is returned to exactly one committer).
        """
        for attempt in range(COMMIT_ATTEMPTS):
            version, current = self._latest()
            keep = current is not None and not replace
            merged = dict(current.get("metadata", {})) if keep else {}
            merged.update(metadata or {})
            manifest = {
                "table": self.name,
                "version": version + 1,
                "committed_at": time.time(),
                "parts": (current["parts"] if keep else []) + [p.__dict__ for p in parts],
                "metadata": merged,
            }
            data = json.dumps(manifest, indent=1, sort_keys=True).encode()
            if create_exclusive(self.store.fs, posixpath.join(
                    self.dir, VERSIONS, _version_name(version + 1)), data):
                break
            # another writer committed version + 1 first: build on top of it
            time.sleep(random.uniform(0.0, min(0.5, 0.01 * 2 ** attempt)))
        else:
            raise StoreError(
                f"commit to table {self.name!r} in {self.store.uri('tables', self.name)} lost "
                f"the race to other writers {COMMIT_ATTEMPTS} times in a row; nothing of this "
                "commit is visible (its staged parts are orphans). Is another job writing it?")
        if config is not None:
            write_atomic(self.store.fs, posixpath.join(self.dir, "config.yaml"),
                         config.to_yaml().encode())
        # the copy for people and older readers; it may lag behind under concurrent commits
        write_atomic(self.store.fs, posixpath.join(self.dir, MANIFEST), data)
        for old in self._versions():
            if old <= version + 1 - KEEP_VERSIONS:
                try:
                    self.store.fs.rm(posixpath.join(self.dir, VERSIONS, _version_name(old)))
                except FileNotFoundError:  # another writer pruned it
                    pass
        listed = {p.path for p in parts}
        return [Part(**p) for p in (current["parts"] if replace and current else [])
                if p["path"] not in listed]

    def write(self, table: pa.Table, metadata: dict[str, Any] | None = None,
              config: Any | None = None, *, reclaim: bool = False) -> None:
        """Replace the whole table with ``table`` in one commit.

        ``reclaim``: then delete the part files of the replaced version (a reader still holding
        that version fails; use it where no job reads the table while it is written).
        """
        dropped = self.commit([self.write_part(table)], metadata, replace=True, config=config)
        if reclaim:
            self.delete_parts(dropped)

    def delete_parts(self, parts: Sequence[Part]) -> None:
        """Delete the files of ``parts`` (ones a commit dropped; absent files are fine)."""
        for part in parts:
            try:
                self.store.fs.rm(posixpath.join(self.dir, part.path))
            except FileNotFoundError:
                pass

    def vacuum(self) -> int:
        """Delete part files that no manifest lists (left by killed writers); return the count."""
        listed = {p.path for p in self.parts()}
        parts_dir = posixpath.join(self.dir, "parts")
        if not self.store.fs.exists(parts_dir):
            return 0
        removed = 0
        for path in self.store.fs.ls(parts_dir, detail=False):
            if f"parts/{posixpath.basename(path)}" not in listed:
                self.store.fs.rm(path)
                removed += 1
        return removed

    # ---------------------------------------------------------------- reading
    def part_paths(self) -> list[str]:
        return [posixpath.join(self.dir, p.path) for p in self.parts()]

    def read(self, columns: Iterable[str] | None = None, schema: pa.Schema | None = None
             ) -> pa.Table:
        """All committed rows. Raises StoreError when the table was never committed."""
        paths = self.part_paths()
        if not paths and not self.exists():
            raise StoreError(f"table {self.name!r} has no committed data in "
                             f"{self.store.uri('tables', self.name)}")
        cols = list(columns) if columns is not None else None
        tables = [pq.read_table(p, columns=cols, filesystem=self.store.fs) for p in paths]
        if not tables:
            if schema is None:
                raise StoreError(f"table {self.name!r} is committed but empty")
            return schema.empty_table() if cols is None else schema.empty_table().select(cols)
        return pa.concat_tables(tables, promote_options="default")


def _version_name(version: int) -> str:
    return f"{version:012d}.json"


def _check_manifest(manifest: Any, uri: str, version: int | None) -> None:
    """Refuse a manifest that is not what a commit writes, naming the file and the field."""
    def bad(field: str, why: str) -> StoreError:
        return StoreError(f"{uri}: field {field!r} {why}; the file was not written by a "
                          "frame-dist commit (restore it, or delete the table to rebuild it)")

    if not isinstance(manifest, dict):
        raise bad("(top level)", f"must be a JSON object, got {type(manifest).__name__}")
    v = manifest.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise bad("version", f"must be a positive integer, got {v!r}")
    if version is not None and v != version:
        raise bad("version", f"is {v} in the file of version {version}")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise bad("metadata", "must be an object")
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise bad("parts", f"must be a list, got {type(parts).__name__}")
    for i, part in enumerate(parts):
        where = f"parts[{i}]"
        if not isinstance(part, dict) or set(part) - {"path", "rows", "meta"}:
            raise bad(where, "must be an object with path, rows and meta")
        path = part.get("path")
        if not isinstance(path, str) or not PART_PATH.fullmatch(path):
            raise bad(f"{where}.path", f"must name a file directly under parts/, got {path!r}")
        rows = part.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise bad(f"{where}.rows", f"must be a non-negative integer, got {rows!r}")
        if not isinstance(part.get("meta", {}), dict):
            raise bad(f"{where}.meta", "must be an object")
