"""The extract stage on Ray Data: real videos, bad files, resume after a kill, S3, identity,
videos that changed since their commit, declared durations that disagree with the stream.

Every test that runs Ray Data (the session's ``ray_local``) is marked ``slow``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision

import jobs.extract
from feature_store.frames import (
    EncoderIdentityError,
    committed_sources,
    committed_video_ids,
    read_clip_features,
    read_frame_features,
)
from feature_store.store import Store
from frame_dist.config import Config, ConfigError, load_config
from frame_dist.extract.encoder import load_encoder
from frame_dist.extract.pipeline import (
    ExtractError,
    ExtractSummary,
    pack_arrays,
    run_extract,
    unpack_rows,
)
from frame_dist.extract.sources import LIST_MIN_OBJECTS, source_change, source_identities
from frame_dist.extract.video import decode_grid, grid_times

REPO = Path(__file__).resolve().parents[1]
G, SIZE = 8, 32
GOOD = ["cfr10", "cfr12", "gop25", "vfr", "short", "tall"]
BAD_REASONS = {
    "missing": "file not found",
    "empty": "empty file (0 bytes)",
    "text": "not a readable media file (Invalid data found when processing input)",
    "truncated": "not a readable media file (Invalid data found when processing input)",
    "cut": "truncated: frames end at 1.900 s of a 4.000 s video",
    "audio": "the file has no video stream (streams: audio)",
}
FP16_TOL = dict(rtol=2e-3, atol=2e-3)  # one float16 ulp: float32 sums may round either way


@dataclass
class Videos:
    uris: dict[str, str]  # video id -> local path

    def table(self, ids: list[str]) -> pa.Table:
        return pa.table({"video_id": ids, "uri": [self.uris[i] for i in ids],
                         "duration_s": pa.nulls(len(ids), pa.float64())})


@pytest.fixture(scope="module")
def videos(tmp_path_factory, video_writer, audio_writer) -> Videos:
    d = tmp_path_factory.mktemp("videos")
    uris = {
        "cfr10": video_writer(d / "cfr10.mp4", 20, fps=10, size=(64, 48)),
        "cfr12": video_writer(d / "cfr12.mp4", 30, fps=12, size=(80, 48)),
        "gop25": video_writer(d / "gop25.mp4", 50, fps=25, size=(96, 64), gop=5),
        "vfr": video_writer(d / "vfr.mp4", 6, pts_ms=[0, 90, 130, 700, 720, 1500]),
        "short": video_writer(d / "short.mp4", 3, fps=10, size=(64, 64)),
        "tall": video_writer(d / "tall.mp4", 24, fps=24, size=(48, 80), pattern=True),
    }
    uris["missing"] = d / "missing.mp4"
    (d / "empty.mp4").write_bytes(b"")
    uris["empty"] = d / "empty.mp4"
    (d / "text.mp4").write_text("not a video\n" * 40)
    uris["text"] = d / "text.mp4"
    data = video_writer(d / "whole.mp4", 20).read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    uris["truncated"] = d / "truncated.mp4"
    src = video_writer(d / "faststart.mp4", 40, faststart=True)
    with av.open(str(src)) as c:
        positions = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
    (d / "cut.mp4").write_bytes(src.read_bytes()[: positions[20]])
    uris["cut"] = d / "cut.mp4"
    uris["audio"] = audio_writer(d / "audio.m4a")
    return Videos({k: str(v) for k, v in uris.items()})


def make_config(root: str, **extract) -> Config:
    overrides = [f"store.root={root}", f"extract.grid_size={G}", f"extract.image_size={SIZE}",
                 "extract.weights=random", "extract.weights_seed=0", "extract.batch_size=16",
                 "extract.videos_per_commit=2", "extract.videos_per_decode_task=2"]
    overrides += [f"extract.{k}={v}" for k, v in extract.items()]
    return load_config(None, overrides)


@dataclass
class Run:
    cfg: Config
    store: Store
    summary: ExtractSummary


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, videos, ray_local) -> Run:
    """Good and bad videos extracted into a local store (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("local") / "store"
    cfg = make_config(str(root))
    store = Store.from_config(cfg.store)
    store.table("videos").write(videos.table(GOOD + list(BAD_REASONS)))
    return Run(cfg, store, run_extract(cfg, store))


def reference_features(videos: Videos, ids: list[str], cfg: Config) -> np.ndarray:
    """The same computation in one process: PyAV decode + the encoder, no Ray."""
    encoder = load_encoder(cfg.extract)
    return np.stack([encoder.encode(decode_grid(videos.uris[i], G, SIZE).frames, 64)
                     for i in ids])


# ----------------------------------------------------------------------- local store


@pytest.mark.slow
def test_good_videos_extracted_bad_ones_reported(local_run):
    s = local_run.summary
    assert (s.done, s.skipped, s.failed, s.frames) == (6, 0, 6, 6 * G)
    assert s.failures == BAD_REASONS
    errors = local_run.store.table("extract_errors").read().to_pylist()
    assert {r["input_id"]: r["reason"] for r in errors} == BAD_REASONS
    assert {r["stage"] for r in errors} == {"extract"}
    assert all(r["uri"].endswith(Path(r["uri"]).name) for r in errors)
    assert committed_video_ids(local_run.store) == set(GOOD)


@pytest.mark.slow
def test_parts_list_their_videos_and_precision(local_run):
    parts = local_run.store.table("frame_features").parts()
    assert sorted(v for p in parts for v in p.meta["video_ids"]) == sorted(GOOD)
    assert all(len(p.meta["video_ids"]) <= 2 for p in parts)  # videos_per_commit
    assert all(p.rows == G * len(p.meta["video_ids"]) for p in parts)
    assert {p.meta["precision"] for p in parts} == {"float32"}


@pytest.mark.slow
def test_features_match_a_single_process_reference(local_run, videos):
    ids, feats = read_frame_features(local_run.store)
    assert ids.tolist() == sorted(GOOD)
    assert feats.shape == (6, G, 2048) and feats.dtype == np.float16
    ref = reference_features(videos, ids.tolist(), local_run.cfg)
    np.testing.assert_allclose(feats.astype(np.float32), ref.astype(np.float32), **FP16_TOL)
    table = local_run.store.table("frame_features").read()
    rows = table.filter(pa.compute.equal(table.column("video_id"), "cfr12"))
    assert rows.column("grid_index").to_pylist() == list(range(G))
    np.testing.assert_allclose(rows.column("time_s").to_numpy(), grid_times(2.5, G))


@pytest.mark.slow
def test_clip_features_are_means_of_the_right_grid_frames(local_run):
    ids, frames = read_frame_features(local_run.store)
    f = frames.astype(np.float64)
    clips = read_clip_features(local_run.store, 4)
    assert clips.video_ids.tolist() == ids.tolist()
    assert clips.features.shape == (6 * 4, 2048)
    # video 1, clip 2 is the mean of grid frames 4 and 5 (G / N_c = 2 frames per clip)
    np.testing.assert_allclose(clips.features[1 * 4 + 2], (f[1, 4] + f[1, 5]) / 2, atol=1e-5)
    np.testing.assert_allclose(clips.features, f.reshape(6, 4, 2, 2048).mean(2).reshape(-1, 2048),
                               atol=1e-5)
    one = read_clip_features(local_run.store, 1, video_ids=["short"])
    np.testing.assert_allclose(one.features[0], f[ids.tolist().index("short")].mean(0),
                               atol=1e-5)


@pytest.mark.slow
def test_identity_mismatch_is_refused_before_any_work(local_run, capsys):
    cfg = make_config(local_run.cfg.store.root, weights_seed=1)
    with pytest.raises(EncoderIdentityError, match=r"weights: stored 'random\(seed=0, torch="
                                                   r".*this run 'random\(seed=1, torch="):
        run_extract(cfg, local_run.store)
    rc = jobs.extract.main([f"store.root={local_run.cfg.store.root}", f"extract.grid_size={G}",
                            "extract.image_size=64", "extract.weights=random"])
    assert rc == 2
    assert "image_size: stored 32, this run 64" in capsys.readouterr().err
    assert committed_video_ids(local_run.store) == set(GOOD)


# ----------------------------------------------------------------------- resume after a kill


@pytest.mark.slow
def test_killed_driver_resumes_and_state_dict_matches_a_clean_run(
        tmp_path, videos, local_run, ray_local, capsys):
    # weights: a state-dict file of the model weights=random, weights_seed=0 builds, so the
    # result must equal local_run's clean extraction
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    cfg = make_config(str(tmp_path / "store"), videos_per_commit=1, videos_per_decode_task=1,
                      batch_size=G, weights=str(tmp_path / "r50.pth"))
    store = Store.from_config(cfg.store)
    store.table("videos").write(videos.table(GOOD + ["missing"]))
    cfg.save(tmp_path / "config.yaml")
    env = dict(os.environ, FRAME_DIST_FAULT_KILL_AFTER_COMMITS="1",
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run([sys.executable, "-m", "jobs.extract", "--config",
                           str(tmp_path / "config.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "killing the driver after commit 1" in proc.stderr
    committed = committed_video_ids(store)
    assert 0 < len(committed) < len(GOOD)
    assert read_frame_features(store)[0].tolist() == sorted(committed)  # consistent, readable
    assert not store.table("extract_errors").exists()  # written only at the end of a run

    assert jobs.extract.main(["--config", str(tmp_path / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert (f"extract: {len(GOOD) - len(committed)} done, {len(committed)} skipped (already "
            "committed), 1 failed") in out
    assert store.table("frame_features").metadata()["encoder"]["weights"].startswith("sha256:")
    ids, feats = read_frame_features(store)
    clean_ids, clean = read_frame_features(local_run.store)
    assert ids.tolist() == clean_ids.tolist()
    np.testing.assert_allclose(feats.astype(np.float32), clean.astype(np.float32), **FP16_TOL)
    store.table("frame_features").vacuum()  # staged parts of the killed run, if any
    assert len(store.fs.ls(store.path("tables", "frame_features", "parts"))) == len(
        store.table("frame_features").parts())


# ----------------------------------------------------------------------- weights, S3, misc


@pytest.mark.slow
def test_s3_videos_and_store(s3_server, aws_test_env, videos, local_run):
    bucket = s3_server.bucket("extract")
    ids = ["cfr12", "vfr", "tall"]
    for vid in ids:
        s3_server.client.put_object(Bucket=bucket, Key=f"raw/{vid}.mp4",
                                    Body=Path(videos.uris[vid]).read_bytes())
    s3_server.client.put_object(Bucket=bucket, Key="raw/empty.mp4", Body=b"")
    uris = {vid: f"s3://{bucket}/raw/{vid}.mp4" for vid in ids}
    uris |= {"s3empty": f"s3://{bucket}/raw/empty.mp4", "s3missing": f"s3://{bucket}/raw/no.mp4"}
    cfg = make_config(f"s3://{bucket}/store")
    cfg.store.endpoint_url = s3_server.endpoint_url
    store = Store.from_config(cfg.store)
    store.table("videos").write(pa.table({"video_id": list(uris), "uri": list(uris.values()),
                                          "duration_s": pa.nulls(5, pa.float64())}))

    local = decode_grid(videos.uris["vfr"], G, SIZE)
    remote = decode_grid(uris["vfr"], G, SIZE, endpoint_url=s3_server.endpoint_url)
    np.testing.assert_array_equal(remote.frames, local.frames)

    s = run_extract(cfg, store)
    assert (s.done, s.failed) == (3, 2)
    assert s.failures == {"s3empty": "empty file (0 bytes)", "s3missing": "file not found"}
    reader = Store(f"s3://{bucket}/store", endpoint_url=s3_server.endpoint_url)
    clips = read_clip_features(reader, 2)
    local_clips = read_clip_features(local_run.store, 2, video_ids=clips.video_ids.tolist())
    np.testing.assert_allclose(clips.features, local_clips.features, **FP16_TOL)
    again = run_extract(cfg, store)  # skips what is committed, retries the failures
    assert (again.done, again.skipped, again.failed) == (0, 3, 2)
    errors = reader.table("extract_errors").read().to_pylist()
    assert sorted((r["input_id"], r["uri"]) for r in errors) == [
        ("s3empty", uris["s3empty"]), ("s3missing", uris["s3missing"])]
    # the rerun replaced extract_errors and deleted the part file of the first run
    error_parts = [k for k in s3_server.objects(bucket)
                   if k.startswith("store/tables/extract_errors/parts/")]
    assert error_parts == [f"store/tables/extract_errors/{p.path}"
                           for p in reader.table("extract_errors").parts()]

    # an object overwritten with another video under the same key: a new ETag, extracted again
    def head(key: str) -> tuple[int, str]:
        h = s3_server.client.head_object(Bucket=bucket, Key=key)
        return h["ContentLength"], h["ETag"]

    (size0, etag0) = head("raw/cfr12.mp4")
    s3_server.client.put_object(Bucket=bucket, Key="raw/cfr12.mp4",
                                Body=Path(videos.uris["gop25"]).read_bytes())
    (size1, etag1) = head("raw/cfr12.mp4")
    changed = run_extract(cfg, store)
    assert (changed.done, changed.skipped, changed.failed) == (1, 2, 2)
    assert changed.changed == {
        "cfr12": f"file changed: size {size0} -> {size1}, etag {etag0} -> {etag1}"}
    feats = read_frame_features(reader, ["cfr12"])[1]
    np.testing.assert_allclose(feats.astype(np.float32), read_frame_features(
        local_run.store, ["gop25"])[1].astype(np.float32), **FP16_TOL)

    written = s3_server.objects(bucket)
    assert any(k.startswith("store/tables/frame_features/parts/") for k in written)
    for key, body in written.items():
        for secret in (aws_test_env["AWS_ACCESS_KEY_ID"], aws_test_env["AWS_SECRET_ACCESS_KEY"]):
            assert secret.encode() not in body, f"credential written into s3://{bucket}/{key}"


# ----------------------------------------------------------------------- changed videos


def test_source_identities_and_changes(tmp_path, s3_server, aws_test_env, videos):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(Path(videos.uris["cfr10"]).read_bytes())
    b.write_bytes(Path(videos.uris["short"]).read_bytes())
    before = source_identities([str(a), str(b), str(tmp_path / "gone.mp4")])
    st = a.stat()
    assert before == [{"uri": str(a), "size": st.st_size, "mtime_ns": st.st_mtime_ns},
                      {"uri": str(b), "size": b.stat().st_size, "mtime_ns": b.stat().st_mtime_ns},
                      {"uri": str(tmp_path / "gone.mp4")}]  # unreadable now: no size
    assert source_change(before[0], before[0]) is None
    a.write_bytes(Path(videos.uris["gop25"]).read_bytes())  # same uri, other content
    now = source_identities([str(a)])[0]
    assert source_change(before[0], now) == (
        f"file changed: size {st.st_size} -> {a.stat().st_size}, mtime_ns {st.st_mtime_ns} -> "
        f"{a.stat().st_mtime_ns}")
    assert source_change(before[0], dict(before[1], uri="/x/b.mp4")) == (
        f"uri changed: {a} -> /x/b.mp4")
    assert source_change(None, now) is None  # committed without an identity: trusted by id
    a.unlink()  # deleted after extraction: nothing to re-extract from, the features stay
    assert source_change(before[0], source_identities([str(a)])[0]) is None

    # S3: one LIST for a prefix holding many of the videos, a HEAD per object otherwise
    bucket = s3_server.bucket("sources")
    many = [f"many/v{i}.mp4" for i in range(LIST_MIN_OBJECTS)]
    for i, key in enumerate([*many, "few/v.mp4"]):
        s3_server.client.put_object(Bucket=bucket, Key=key, Body=b"x" * (10 + i))
    keys = [*many, "few/v.mp4", "many/absent.mp4", "few/absent.mp4"]
    got = source_identities([f"s3://{bucket}/{k}" for k in keys], s3_server.endpoint_url)
    for key, ident in zip(keys, got):
        if "absent" in key:
            assert ident == {"uri": f"s3://{bucket}/{key}"}
            continue
        head = s3_server.client.head_object(Bucket=bucket, Key=key)
        assert ident == {"uri": f"s3://{bucket}/{key}", "size": head["ContentLength"],
                         "etag": head["ETag"]}
    s3_server.client.put_object(Bucket=bucket, Key="few/v.mp4", Body=b"y" * 18)
    new = source_identities([f"s3://{bucket}/few/v.mp4"], s3_server.endpoint_url)[0]
    assert source_change(got[LIST_MIN_OBJECTS], new) == (
        f"file changed: etag {got[LIST_MIN_OBJECTS]['etag']} -> {new['etag']}")


@pytest.mark.slow
def test_changed_videos_are_extracted_again_and_read_back(tmp_path, videos, local_run,
                                                          ray_local, capsys):
    cfg = make_config(str(tmp_path / "store"))
    store = Store.from_config(cfg.store)
    a = tmp_path / "a.mp4"
    a.write_bytes(Path(videos.uris["cfr10"]).read_bytes())
    uris = {"a": str(a), "b": videos.uris["cfr12"], "c": videos.uris["short"]}

    def write_videos() -> None:
        store.table("videos").write(pa.table({"video_id": list(uris), "uri": list(uris.values()),
                                              "duration_s": pa.nulls(3, pa.float64())}))

    write_videos()
    first = run_extract(cfg, store)
    assert (first.done, first.skipped, first.failed, first.changed) == (3, 0, 0, {})
    old = a.stat()
    a.write_bytes(Path(videos.uris["gop25"]).read_bytes())  # same id and uri, other content
    new = a.stat()
    uris["b"] = videos.uris["vfr"]  # same id, another file
    write_videos()
    capsys.readouterr()

    second = run_extract(cfg, store)
    why = {"a": f"file changed: size {old.st_size} -> {new.st_size}, mtime_ns "
                f"{old.st_mtime_ns} -> {new.st_mtime_ns}",
           "b": f"uri changed: {videos.uris['cfr12']} -> {videos.uris['vfr']}"}
    assert (second.done, second.skipped, second.failed) == (2, 1, 0)
    assert second.changed == why
    out = capsys.readouterr().out
    for vid in "ab":
        assert f"extract: {vid} changed since its commit ({why[vid]}): extracting it again" in out
    assert (f"; re-extracted 2 changed video(s): a ({why['a']}), b ({why['b']})"
            in second.line()) and second.line() in out
    # the readers take the new features; the old ones are never read again
    ids, feats = read_frame_features(store, ["a", "b", "c"])
    _, ref = read_frame_features(local_run.store, ["gop25", "vfr", "short"])
    np.testing.assert_allclose(feats.astype(np.float32), ref.astype(np.float32), **FP16_TOL)
    clips = read_clip_features(store, 2, ["a"])
    np.testing.assert_allclose(clips.features, read_clip_features(
        local_run.store, 2, ["gop25"]).features, **FP16_TOL)
    assert committed_sources(store)["a"] == {"uri": str(a), "size": new.st_size,
                                             "mtime_ns": new.st_mtime_ns}

    third = run_extract(cfg, store)  # nothing changed since
    assert (third.done, third.skipped, third.failed, third.changed) == (0, 3, 0, {})


@pytest.mark.slow
def test_declared_durations_far_from_the_stream_are_extract_errors(tmp_path, videos, ray_local):
    cfg = make_config(str(tmp_path / "store"))
    store = Store.from_config(cfg.store)
    declared = {"cfr10": 0.5, "cfr12": 6.0, "short": 0.35}  # streams: 2.0, 2.5, 0.3 s
    store.table("videos").write(pa.table({
        "video_id": list(declared), "uri": [videos.uris[v] for v in declared],
        "duration_s": list(declared.values())}))
    reasons = {
        "cfr10": "declared duration 0.5 s (duration_s of the videos table) is shorter than the "
                 "stream's 2.0 s",
        "cfr12": "declared duration 6.0 s (duration_s of the videos table) is beyond the "
                 "stream's 2.5 s",
    }
    errors = store.table("extract_errors")
    for run in range(2):  # the rerun retries the failures and replaces extract_errors
        s = run_extract(cfg, store)
        assert (s.done, s.skipped, s.failed) == (1 - run, run, 2)
        assert s.failures == reasons
        assert {r["input_id"]: (r["uri"], r["reason"]) for r in errors.read().to_pylist()} == {
            v: (videos.uris[v], reasons[v]) for v in reasons}
    assert committed_video_ids(store) == {"short"}  # within max(0.5 s, 5 %) of its 0.3 s
    parts = sorted(os.listdir(store.path("tables", "extract_errors", "parts")))
    assert [f"parts/{name}" for name in parts] == [p.path for p in errors.parts()]  # just one


@pytest.mark.slow
def test_every_video_failing_fails_the_job(tmp_path, videos, ray_local, capsys):
    cfg = make_config(str(tmp_path / "store"))
    Store.from_config(cfg.store).table("videos").write(videos.table(["missing", "empty"]))
    cfg.save(tmp_path / "config.yaml")
    assert jobs.extract.main(["--config", str(tmp_path / "config.yaml")]) == 1
    err = capsys.readouterr().err
    assert ("stage extract failed: ExtractError: all 2 videos failed; first: ('missing', "
            "'file not found')") in err


@pytest.mark.slow
def test_bad_videos_tables_and_devices(tmp_path, videos, ray_local):
    cfg = make_config(str(tmp_path / "store"))
    store = Store.from_config(cfg.store)
    with pytest.raises(ExtractError, match="table 'videos' has no committed data .*run the "
                                           "ingest stage first"):
        run_extract(cfg, store)
    store.table("videos").write(videos.table(["cfr10", "vfr", "cfr10", "vfr", "short"]))
    with pytest.raises(ExtractError, match=r"videos table has 2 duplicated video_id\(s\): "
                                           r"\['cfr10', 'vfr'\]"):
        run_extract(cfg, store)
    store.table("videos").write(videos.table(["cfr10"]))
    if not ray_local.cluster_resources().get("GPU"):
        with pytest.raises(ConfigError, match="extract.device='cuda' but the Ray cluster has no "
                                              "GPUs"):
            run_extract(make_config(str(tmp_path / "store"), device="cuda"), store)


def test_binary_columns_round_trip_zero_copy():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    b = np.full((2, 3, 4), 7, np.uint8)
    packed = pack_arrays([a, None, b, None])
    assert packed.to_pylist()[1] == b"" and len(packed) == 4
    rows, ok = unpack_rows(packed, (2, 3, 4), np.uint8, "frames")
    assert ok.tolist() == [True, False, True, False]
    np.testing.assert_array_equal(rows, np.stack([a, b]))
    rows, ok = unpack_rows(pa.chunked_array([packed.slice(2, 2)]), (2, 3, 4), np.uint8, "x")
    np.testing.assert_array_equal(rows, b[None])  # a sliced array keeps its offset
    f16 = np.linspace(-2, 2, 8, dtype=np.float16).reshape(2, 4)
    rows, _ = unpack_rows(pack_arrays([f16]), (2, 4), np.float16, "features")
    np.testing.assert_array_equal(rows[0], f16)
    assert unpack_rows(pack_arrays([None, None]), (2, 4), np.float16, "f")[0].shape == (0, 2, 4)
    assert unpack_rows(pa.chunked_array([], pa.large_binary()), (2,), np.uint8, "f")[0].size == 0
    with pytest.raises(ValueError, match=r"decoded frames: row 1 holds 5 bytes, expected 24 "
                                         r"\(shape \(2, 3, 4\)\)"):
        unpack_rows(pack_arrays([a, np.zeros(5, np.uint8)]), (2, 3, 4), np.uint8,
                    "decoded frames")
