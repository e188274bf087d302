"""Per-stage leases (feature_store/lease.py): one job per stage and store, on local disk and on
an S3-compatible server; a killed holder's lease expires; concurrent ingest jobs never mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from feature_store.lease import HOLD_ENV, LeaseHeldError, LeaseRecord, StageLease, _dump
from feature_store.store import Store, StoreError, create_exclusive


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        return Store(f"s3://{server.bucket('lease')}/s", endpoint_url=server.endpoint_url)
    return Store(str(tmp_path / "s"))


def test_second_holder_is_refused_naming_the_first_then_proceeds_after_release(store):
    first = StageLease(store, "ingest").acquire()
    with pytest.raises(LeaseHeldError) as err:
        StageLease(store, "ingest").acquire()
    msg = str(err.value)
    assert f"stage 'ingest' on store {store.root} is held by {first.record.owner}" in msg
    assert f"pid {os.getpid()}" in msg and "last heartbeat 0 s ago, expires in 60 s" in msg
    with StageLease(store, "extract"):  # another stage is another lease
        pass
    first.release()
    second = StageLease(store, "ingest").acquire()
    assert second.record.generation == 2
    second.release()


def test_heartbeat_keeps_a_live_holder_past_its_ttl(tmp_path):
    store = Store(str(tmp_path / "s"))
    with StageLease(store, "train-x", ttl_s=0.6):
        time.sleep(1.5)  # 2.5 ttl: only the heartbeat keeps it
        with pytest.raises(LeaseHeldError):
            StageLease(store, "train-x", ttl_s=0.6).acquire()


HOLDER = textwrap.dedent("""
    import sys, time
    from feature_store.lease import StageLease
    from feature_store.store import Store
    lease = StageLease(Store(sys.argv[1]), "ingest", ttl_s=1.0).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_holders_lease_is_taken_by_the_next_job(tmp_path):
    root = str(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeldError, match=f"pid {proc.pid}"):
            StageLease(Store(root), "ingest").acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no release, no more heartbeats
        proc.wait()
    # same host, process gone: taken at once (another host's waits for expiry, test below)
    lease = StageLease(Store(root), "ingest").acquire()
    assert lease.record.generation == 2
    lease.release()


@pytest.mark.parametrize("age, taken", [(0.0, False), (2.0, True)])
def test_another_hosts_lease_is_taken_only_once_expired(tmp_path, age, taken):
    store = Store(str(tmp_path / "s"))
    beat = time.time() - age
    record = LeaseRecord("extract", 1, "elsewhere:7:abc", "elsewhere", 7, "python -m jobs.extract",
                         beat - 5, beat, 1.0)
    assert create_exclusive(store.fs, StageLease(store, "extract")._file(1), _dump(record))
    if taken:
        with StageLease(store, "extract") as lease:
            assert lease.record.generation == 2
    else:
        with pytest.raises(LeaseHeldError, match="held by elsewhere:7:abc .host elsewhere, pid 7"):
            StageLease(store, "extract").acquire()


def test_a_holder_that_was_taken_over_fails_at_release(tmp_path):
    store = Store(str(tmp_path / "s"))
    lease = StageLease(store, "score", ttl_s=0.3).acquire()
    # a job that saw the lease expired (this one paused longer than its ttl) took generation 2
    assert create_exclusive(store.fs, lease._file(2), b"{}")
    time.sleep(0.5)  # the heartbeat notices
    with pytest.raises(StoreError, match="the lease of stage 'score' .* was taken over"):
        lease.release()


def _ingest_inputs(tmp_path, tag: str, users: int) -> list[str]:
    videos = tmp_path / f"videos_{tag}.csv"
    pd.DataFrame({"video_id": [f"{tag}{v}" for v in range(3)],
                  "uri": [f"/v/{tag}{v}.mp4" for v in range(3)],
                  "duration_s": [10.0] * 3}).to_csv(videos, index=False)
    inter = tmp_path / f"inter_{tag}.csv"
    rows = [(f"{tag}u{u}", f"{tag}{v}", 5.0 * (v + 1), 10.0, u * 10 + v)
            for u in range(users) for v in range(3)]
    pd.DataFrame(rows, columns=["user_id", "video_id", "play_time_s", "duration_s",
                                "timestamp"]).to_csv(inter, index=False)
    return [f"ingest.videos={videos}", f"ingest.interactions={inter}"]


def test_two_concurrent_ingests_one_refused_never_a_mixed_store(tmp_path, capsys):
    from jobs import ingest as ingest_job

    root = f"store.root={tmp_path}/store"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), **{HOLD_ENV: "4"})
    first = subprocess.Popen([sys.executable, "-m", "jobs.ingest", root,
                              *_ingest_inputs(tmp_path, "a", 4)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lease_dir = tmp_path / "store" / "leases" / "ingest"
    deadline = time.time() + 120
    while not (lease_dir.exists() and any(lease_dir.iterdir())):
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    assert ingest_job.main([root, *_ingest_inputs(tmp_path, "b", 5)]) == 1  # while a holds it
    err = capsys.readouterr().err
    assert "stage ingest failed: LeaseHeldError: stage 'ingest' on store" in err
    assert f"pid {first.pid}" in err and "jobs/ingest.py" in err
    assert first.wait(timeout=120) == 0, first.stdout.read()
    store = Store(f"{tmp_path}/store")

    def data() -> tuple[set, set]:
        return (set(store.table("interactions").read().column("user_id").to_pylist()),
                set(store.table("videos").read().column("video_id").to_pylist()))

    assert data() == ({f"au{u}" for u in range(4)}, {"a0", "a1", "a2"})  # a's, whole
    assert ingest_job.main([root, *_ingest_inputs(tmp_path, "b", 5)]) == 0  # released: b runs
    assert data() == ({f"bu{u}" for u in range(5)}, {"b0", "b1", "b2"})
