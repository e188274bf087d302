"""The graph stage's commit record: ``<store>/graphs/nc=<N_c>/_manifest.json`` (layout 2).

Written last by ``frame_dist.graph.shards.build_shards`` (one writer, :meth:`GraphManifest.write`)
and read by every stage after it (one reader, :meth:`GraphManifest.read`). The reader treats the
file as untrusted: anything missing, of the wrong type or inconsistent is refused with a
:class:`ManifestError` naming the file and the field, before a worker is started on it.

JSON format (layout 2, keys sorted on disk): the scalar fields of :class:`GraphManifest`,
``video_ids`` (N strings), ``shards`` (one :class:`ShardInfo` object per shard), ``files`` (one
{table: file name} object per shard), ``feature_mean`` / ``feature_std`` (D numbers each).
User ids are not in it (see ``frame_dist.graph.shards``).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from dataclasses import dataclass
from typing import Any, NoReturn

from feature_store.store import Store

LAYOUT = 2  # 2: user ids in Parquet (shard users files, the user id map), not in the manifest
SHARD_TABLES = ("users", "videos", "pos", "neg", "train", "valid", "test")  # files per shard
_RERUN = "run the graph stage again (python -m jobs.graph ...)"


class PartitionError(ValueError):
    """The graph cannot be built or a shard is missing / inconsistent."""


class ManifestError(PartitionError):
    """A graph manifest that cannot be used: unreadable, malformed or of an older layout."""


def graph_dir(n_clips: int) -> str:
    return f"graphs/nc={n_clips}"


def manifest_path(n_clips: int) -> str:
    return posixpath.join(graph_dir(n_clips), "_manifest.json")


@dataclass(frozen=True)
class ShardInfo:
    """Sizes of one user shard (what the planner and the scoring driver size themselves from)."""

    users: int  # M_s: users of the shard
    videos: int  # V_s: videos its users interacted with, in any split (its local videos)
    nnz_pos: int  # non-zeros of its rows of R~^p
    nnz_neg: int  # non-zeros of its rows of R~^n
    train: int  # its users' training interactions
    valid: int  # ... validation interactions
    test: int  # ... test interactions


@dataclass(frozen=True)
class GraphManifest:
    """One committed graph for one N_c (see ``frame_dist.graph.shards``)."""

    layout: int  # LAYOUT of the writer
    n_clips: int  # N_c: clips per video
    n_shards: int  # P: user shards (= len(shards) = len(files))
    positives: str  # graph.positives the graph was built with ("full_watch" | "watched_clips")
    n_users: int  # M: users of the graph (rows of the user id map)
    n_videos: int  # N: videos of the graph (the ones with frame features); C = N * N_c clips
    n_train: int  # training interactions (the global training order 0..n_train-1)
    nnz_pos: int  # non-zeros of R^p (whole graph)
    nnz_neg: int  # non-zeros of R^n (whole graph)
    dropped_no_features: int  # interactions left out: their videos have no frame features
    user_ids_file: str  # the user id map, a Parquet file in the graph directory
    video_ids: list[str]  # (N,) video id of global video index v (sorted)
    shards: list[ShardInfo]  # (P,) sizes of shard k
    files: list[dict[str, str]]  # (P,) {table of SHARD_TABLES: Parquet file name} of shard k
    feature_mean: list[float]  # (D,) per-dimension mean and standard deviation of the grid
    feature_std: list[float]  # frames, to standardise clip features (load_clip_features)
    fingerprint: str  # identity of the build: input versions and settings (graph_fingerprint)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the file (the only writer of the format)."""
        return dataclasses.asdict(self)

    def write(self, store: Store) -> None:
        """Commit: write ``_manifest.json`` atomically (after every file it lists)."""
        store.write_json(manifest_path(self.n_clips), self.to_json())

    @classmethod
    def read(cls, store: Store, n_clips: int) -> GraphManifest | None:
        """The committed manifest for ``n_clips``; None when there is none."""
        rel = manifest_path(n_clips)
        if not store.exists(rel):
            return None
        source = store.uri(rel)
        try:
            data = json.loads(store.read_bytes(rel))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"graph manifest {source} is not valid JSON ({exc}): "
                                f"{_RERUN}") from exc
        manifest = cls.from_json(data, source)
        if manifest.n_clips != n_clips:
            raise ManifestError(f"graph manifest {source}: field n_clips is "
                                f"{manifest.n_clips}, its directory is for N_c={n_clips}: "
                                f"{_RERUN}")
        return manifest

    @classmethod
    def from_json(cls, data: Any, source: str) -> GraphManifest:
        """Check and type the JSON object ``data`` read from ``source`` (named in errors)."""
        if not isinstance(data, dict):
            raise ManifestError(f"graph manifest {source} is not a JSON object: {_RERUN}")
        layout = data.get("layout")
        if layout is None or (_is_int(layout) and layout < LAYOUT):
            n_clips = data.get("n_clips")
            raise ManifestError(f"the graph for N_c={n_clips} ({source}) was built by an older "
                                "frame-dist (its user ids are not in Parquet files): " + _RERUN)
        f = _Fields(data, source)
        if f.integer("layout") != LAYOUT:
            raise ManifestError(f"graph manifest {source}: field layout is {layout}, this "
                                f"frame-dist reads layout {LAYOUT}: {_RERUN}")
        shards = [ShardInfo(**{name: item.integer(name) for name in _SHARD_FIELDS})
                  for item in f.objects("shards")]
        files = []
        for item in f.objects("files"):
            files.append({name: item.string(name) for name in SHARD_TABLES})
            extra = sorted(set(item.data) - set(SHARD_TABLES))
            if extra:
                item.fail(extra[0], f"is not a table of a shard {SHARD_TABLES}")
        manifest = cls(
            layout=LAYOUT, n_clips=f.integer("n_clips"), n_shards=f.integer("n_shards"),
            positives=f.string("positives"), n_users=f.integer("n_users"),
            n_videos=f.integer("n_videos"), n_train=f.integer("n_train"),
            nnz_pos=f.integer("nnz_pos"), nnz_neg=f.integer("nnz_neg"),
            dropped_no_features=f.integer("dropped_no_features"),
            user_ids_file=f.string("user_ids_file"), video_ids=f.strings("video_ids"),
            shards=shards, files=files, feature_mean=f.numbers("feature_mean"),
            feature_std=f.numbers("feature_std"), fingerprint=f.string("fingerprint"))
        # consistency of the counts with the lists (what readers index with them)
        for name, size in (("shards", len(shards)), ("files", len(files))):
            if size != manifest.n_shards:
                f.fail(name, f"has {size} entries, field n_shards is {manifest.n_shards}")
        if len(manifest.video_ids) != manifest.n_videos:
            f.fail("video_ids", f"has {len(manifest.video_ids)} entries, field n_videos is "
                                f"{manifest.n_videos}")
        if len(manifest.feature_std) != len(manifest.feature_mean):
            f.fail("feature_std", f"has {len(manifest.feature_std)} entries, field "
                                  f"feature_mean {len(manifest.feature_mean)}")
        return manifest


_SHARD_FIELDS = tuple(field.name for field in dataclasses.fields(ShardInfo))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Typed access to the fields of one JSON object; errors name the file and the field."""

    def __init__(self, data: dict[str, Any], source: str, where: str = "") -> None:
        self.data, self.source, self.where = data, source, where

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ManifestError(f"graph manifest {self.source}: field {self.where}{name} {problem}: "
                            f"{_RERUN}")

    def _get(self, name: str) -> Any:
        if name not in self.data:
            self.fail(name, "is missing")
        return self.data[name]

    def _wrong(self, name: str, value: Any, kind: str) -> NoReturn:
        self.fail(name, f"must be {kind}, not {_short(value)}")  # the JSON text says the type

    def integer(self, name: str) -> int:
        value = self._get(name)
        if not _is_int(value) or value < 0:
            self._wrong(name, value, "an integer >= 0")
        return value

    def string(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            self._wrong(name, value, "a string")
        return value

    def _list(self, name: str) -> list[Any]:
        value = self._get(name)
        if not isinstance(value, list):
            self._wrong(name, value, "a list")
        return value

    def strings(self, name: str) -> list[str]:
        values = self._list(name)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                self._wrong(f"{name}[{i}]", value, "a string")
        return values

    def numbers(self, name: str) -> list[float]:
        values = self._list(name)
        for i, value in enumerate(values):
            if not isinstance(value, int | float) or isinstance(value, bool):
                self._wrong(f"{name}[{i}]", value, "a number")
        return [float(v) for v in values]

    def objects(self, name: str) -> list[_Fields]:
        values = self._list(name)
        for i, value in enumerate(values):
            if not isinstance(value, dict):
                self._wrong(f"{name}[{i}]", value, "an object")
        return [_Fields(v, self.source, f"{self.where}{name}[{i}].")
                for i, v in enumerate(values)]


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
