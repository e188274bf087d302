"""Per-stage leases on a store: one job at a time runs a stage (ingest, extract, ...) on a store.

Layout: ``<root>/leases/<key>/<generation>.json``, one file per holder, each created if absent
(:func:`feature_store.store.create_exclusive`), so of two jobs that find generation g free
(released, or expired because its holder stopped renewing it) exactly one creates g + 1. The
holder renews its own file every ``ttl_s / 3`` seconds (a heartbeat thread) and marks it released
when the stage ends. A second job on the same key is refused at once with a message naming the
holder (owner, host, pid, command, last heartbeat, expiry). A killed holder stops renewing: its
lease expires ``ttl_s`` after its last heartbeat and the next job proceeds (at once when the
holder ran on the same host and its process is gone). A holder that finds a
later generation (it was paused for longer than ``ttl_s``) has lost the lease, and its stage
fails when the lease is checked or released. Expiry compares wall clocks: hosts sharing a store
need clocks within a few seconds of each other (NTP).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import sys
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from feature_store.store import Store, StoreError, create_exclusive, numbered_files, write_atomic

LEASE_TTL_S = float(os.environ.get("FRAME_DIST_LEASE_TTL_S", "60"))
KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
HOLD_ENV = "FRAME_DIST_FAULT_HOLD_LEASE_S"  # tests: sleep this long right after acquiring
KEEP_GENERATIONS = 4


class LeaseWarning(RuntimeWarning):
    """The lease could not be renewed (the store did not answer): for the person at the console
    (frame-dist's console shows it on its stderr, not in the stage's log)."""


class LeaseHeldError(StoreError):
    """Another live job holds the lease of this stage on this store."""


@dataclass
class LeaseRecord:
    """The content of one generation's file."""

    key: str
    generation: int
    owner: str  # unique per holder: host:pid:random
    host: str
    pid: int
    command: str
    acquired_at: float  # wall clock, seconds
    heartbeat_at: float
    ttl_s: float
    released: bool = False

    def expired(self, now: float) -> bool:
        return now > self.heartbeat_at + self.ttl_s

    def describe(self, now: float) -> str:
        return (f"{self.owner} (host {self.host}, pid {self.pid}, command {self.command!r}), "
                f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired_at))}, "
                f"last heartbeat {now - self.heartbeat_at:.0f} s ago, expires in "
                f"{max(0.0, self.heartbeat_at + self.ttl_s - now):.0f} s")


class StageLease:
    """``with StageLease(store, "ingest"):`` holds the stage's lease on ``store`` for the block."""

    def __init__(self, store: Store, key: str, ttl_s: float | None = None):
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"lease key {key!r}: letters, digits, '.', '_', '-' only")
        self.store = store
        self.key = key
        self.ttl_s = LEASE_TTL_S if ttl_s is None else ttl_s
        self.dir = store.path("leases", key)
        self.record: LeaseRecord | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- files
    def _file(self, generation: int) -> str:
        return posixpath.join(self.dir, f"{generation:012d}.json")

    def _generations(self) -> list[int]:
        return numbered_files(self.store.fs, self.dir)

    def _read(self, generation: int) -> LeaseRecord | None:
        path = self._file(generation)
        try:
            raw = self.store.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            record = LeaseRecord(**data)
            if record.generation != generation or not isinstance(record.heartbeat_at, float):
                raise ValueError("generation or heartbeat does not match its file")
        except (ValueError, TypeError) as exc:
            raise StoreError(f"lease file {self.store.uri('leases', self.key)}/"
                             f"{generation:012d}.json is corrupt ({exc}); delete it if no "
                             "job of this stage is running") from exc
        return record

    # ---------------------------------------------------------------- acquire / release
    def acquire(self) -> StageLease:
        """Take the lease or raise :class:`LeaseHeldError` naming the live holder."""
        for _ in range(8):
            generations = self._generations()
            latest = generations[-1] if generations else 0
            now = time.time()
            if latest:
                held = self._read(latest)
                if held is not None and not held.released and not held.expired(now) \
                        and not _dead_here(held):
                    raise LeaseHeldError(
                        f"stage {self.key!r} on store {self.store.root} is held by "
                        f"{held.describe(now)}. Wait for that job to finish (or, if it was "
                        f"killed, {self.ttl_s:.0f} s after its last heartbeat), or use another "
                        "store.root")
            owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            record = LeaseRecord(self.key, latest + 1, owner, socket.gethostname(), os.getpid(),
                                 " ".join(sys.argv)[:300], now, now, self.ttl_s)
            if create_exclusive(self.store.fs, self._file(latest + 1), _dump(record)):
                self.record = record
                self._prune(latest + 1)
                self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                                name=f"lease-{self.key}")
                self._thread.start()
                hold = float(os.environ.get(HOLD_ENV, "0") or 0)
                if hold > 0:
                    time.sleep(hold)
                return self
            # another job took generation latest + 1 first: look again
        raise LeaseHeldError(f"stage {self.key!r} on store {self.store.root}: other jobs keep "
                             "taking the lease; try again")

    def _prune(self, current: int) -> None:
        for old in self._generations():
            if old <= current - KEEP_GENERATIONS:
                try:
                    self.store.fs.rm(self._file(old))
                except FileNotFoundError:
                    pass

    def _renew(self) -> None:
        assert self.record is not None
        if self._generations()[-1:] != [self.record.generation]:
            newer = self._generations()[-1]
            try:
                holder = self._read(newer)
                who = holder.owner if holder else "another job"
            except StoreError:
                who = "another job"
            self.lost = (f"the lease of stage {self.key!r} on {self.store.root} was taken over "
                         f"by {who} (generation {newer}): "
                         f"this job stopped renewing it for more than {self.ttl_s:.0f} s")
            return
        self.record.heartbeat_at = time.time()
        write_atomic(self.store.fs, self._file(self.record.generation), _dump(self.record))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - an unreachable store: keep trying
                warnings.warn(f"lease {self.key}: heartbeat failed ({exc}); retrying",
                              LeaseWarning, stacklevel=1)
            if self.lost:
                return

    def check(self) -> None:
        """Raise when the lease was lost (another job took it over)."""
        if self.lost:
            raise StoreError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.record is not None and not self.lost:
            self.record.released = True
            self.record.heartbeat_at = time.time()
            write_atomic(self.store.fs, self._file(self.record.generation), _dump(self.record))
        self.check()

    def __enter__(self) -> StageLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _dead_here(record: LeaseRecord) -> bool:
    """Whether the holder ran on this host and its process is gone (killed): no need to wait."""
    if record.host != socket.gethostname() or record.pid == os.getpid():
        return False
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _dump(record: LeaseRecord) -> bytes:
    return json.dumps(asdict(record), indent=1, sort_keys=True).encode()
