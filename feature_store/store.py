"""The Parquet feature store: tables of part files, committed by a manifest written last.

Layout under a root (a local path or ``s3://bucket/prefix``)::

    <root>/tables/<name>/_manifest.json         committed state (written last, atomically)
    <root>/tables/<name>/config.yaml            resolved config of the last commit
    <root>/tables/<name>/parts/<uuid>.parquet   part files (visible only once listed)
    <root>/<anything else>                      stage-specific files (graphs, runs, scores)

Writers stage part files under unique names, then commit: the new manifest lists the committed
parts and is written in one atomic step (a rename on local disks, a single PUT on S3). Readers
look only at the manifest, so a writer killed midway leaves the table exactly as it was at its
last commit; orphaned part files are harmless and removed by :meth:`Table.vacuum`.

Credentials for S3 come from the standard AWS environment variables or profile and are never
written anywhere by the store.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"


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
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

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


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new content."""
    parent = posixpath.dirname(path)
    if _is_local(fs):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # one PUT: S3 objects appear whole or not at all
        with fs.open(path, "wb") as f:
            f.write(data)


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
        """The committed manifest, or None when nothing was ever committed."""
        path = posixpath.join(self.dir, MANIFEST)
        try:
            with self.store.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.store.uri('tables', self.name, MANIFEST)} is corrupt: {exc}"
                             ) from exc

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
    ) -> None:
        """Make ``parts`` visible: append them to (or, with ``replace``, swap) the committed set.

        ``metadata`` is merged into the manifest's metadata (``replace`` starts from empty).
        ``config`` (a :class:`frame_dist.config.Config`) is written beside the table as the
        resolved config of this commit. Only one writer may commit to a table at a time.
        """
        current = self.manifest()
        keep = current is not None and not replace
        merged = dict(current.get("metadata", {})) if keep else {}
        merged.update(metadata or {})
        manifest = {
            "table": self.name,
            "version": (current or {}).get("version", 0) + 1,
            "committed_at": time.time(),
            "parts": (current["parts"] if keep else []) + [p.__dict__ for p in parts],
            "metadata": merged,
        }
        if config is not None:
            write_atomic(self.store.fs, posixpath.join(self.dir, "config.yaml"),
                         config.to_yaml().encode())
        write_atomic(self.store.fs, posixpath.join(self.dir, MANIFEST),
                     json.dumps(manifest, indent=1, sort_keys=True).encode())

    def write(self, table: pa.Table, metadata: dict[str, Any] | None = None,
              config: Any | None = None) -> None:
        """Replace the whole table with ``table`` in one commit."""
        self.commit([self.write_part(table)], metadata, replace=True, config=config)

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
