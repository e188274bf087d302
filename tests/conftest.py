"""Shared fixtures: local Ray, an S3-compatible server on 127.0.0.1, real test videos.

- ``aws_test_env`` (session): dummy AWS credentials and region in the environment, set before
  Ray starts so that Ray workers inherit them (S3 clients refuse to send unsigned requests).
- ``one_torch_thread`` (module): torch limited to one thread while a module of tiny-tensor tests
  runs.
- ``ray_local`` (session): one local Ray instance (2 CPUs, no dashboard, 127.0.0.1) for the whole
  run, shut down at the end. Tests that need Ray request it.
- ``s3_server`` (session): moto's S3 server on 127.0.0.1 (free port); ``s3_server.bucket()``
  creates a fresh bucket.
- ``video_writer`` / ``audio_writer`` (session): the writers themselves, for module fixtures.
- ``make_video``: writes a real H.264 mp4 whose frame k is a solid grey of level
  ``(k * step) % 256`` (decoded frames reveal their index), with optional per-frame timestamps
  (variable frame rate), keyframe interval and faststart layout.
- ``tiny_ingest`` / ``tiny_world`` / ``score_world`` / ``score_reference`` (session): the tiny
  synthetic worlds of tests/worlds.py, built once per run. They are shared: a module that writes
  to one works on a copy (``worlds.copy_store``, ``worlds.fresh_copy``).
"""

from __future__ import annotations

import fractions
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "frame-dist-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "frame-dist-test-secret-4f1c9e",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[dict[str, str]]:
    saved = {k: os.environ.get(k) for k in (*DUMMY_AWS, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.update(DUMMY_AWS)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    yield dict(DUMMY_AWS)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: extra OpenMP threads only add barrier waits on a shared 2-core box.

    Use per module with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local(aws_test_env) -> Iterator[object]:
    """A local Ray instance for the session (never a cluster found on this machine)."""
    import ray

    saved = os.environ.pop("RAY_ADDRESS", None)
    from frame_dist.ray_runtime import use_local_ray_env

    if ray.is_initialized():
        ray.shutdown()
    use_local_ray_env()  # Ray Train polls its workers every 0.25 s, not 2 s
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=512 * 2**20, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved


@dataclass
class S3Server:
    endpoint_url: str
    client: object  # boto3 S3 client bound to the server

    def bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of ``bucket`` (key -> bytes)."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = self.client.get_object(Bucket=bucket,
                                                         Key=obj["Key"])["Body"].read()
        return out


@pytest.fixture(scope="session")
def s3_server(aws_test_env) -> Iterator[S3Server]:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=DUMMY_AWS["AWS_DEFAULT_REGION"])
    yield S3Server(endpoint, client)
    server.stop()


def write_video(path: str | Path, n_frames: int, *, fps: int = 10, size: tuple[int, int] = (64, 48),
                step: int = 8, pts_ms: Sequence[int] | None = None, gop: int | None = None,
                faststart: bool = False, codec: str = "libx264", pattern: bool = False) -> Path:
    """Write a real video whose frame k is grey level (k * step) % 256; returns the path.

    ``size`` is (width, height). ``pts_ms`` gives every frame's timestamp in milliseconds
    (variable frame rate). ``gop`` fixes the keyframe interval. ``pattern`` adds a horizontal
    gradient so that resizing and cropping are visible.
    """
    import av

    path = Path(path)
    w, h = size
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        stream = c.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "yuv444p"
        options = {"crf": "0", "preset": "ultrafast"} if codec == "libx264" else {}
        if gop:
            options.update(g=str(gop), keyint_min=str(gop), sc_threshold="0")
        stream.codec_context.options = options
        if pts_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        ramp = np.linspace(0, 240, w).round().astype(np.int16)[None, :, None] if pattern else 0
        for k in range(n_frames):
            img = np.full((h, w, 3), (k * step) % 256, np.uint8)
            if pattern:
                img = np.clip(img + ramp, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[k]), fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


def write_audio_only(path: str | Path) -> Path:
    """Write a short AAC file with no video stream (a media file extraction must reject)."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as c:
        stream = c.add_stream("aac", rate=16000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="session")
def video_writer() -> Callable[..., Path]:
    """:func:`write_video` itself, for session- or module-scoped fixtures."""
    return write_video


@pytest.fixture(scope="session")
def audio_writer() -> Callable[..., Path]:
    """:func:`write_audio_only`, for tests that need a media file without video."""
    return write_audio_only


@pytest.fixture
def make_video(tmp_path) -> Callable[..., Path]:
    """``make_video(name, n_frames, **kw)`` writes ``tmp_path/name`` with :func:`write_video`."""

    def make(name: str, n_frames: int, **kw) -> Path:
        return write_video(tmp_path / name, n_frames, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_ingest(tmp_path_factory) -> tuple:
    """(cfg, store, overrides): the world of ``worlds.TINY_WORLD`` generated and ingested."""
    from worlds import ingest_world

    return ingest_world(tmp_path_factory.mktemp("tiny-ingest"))


@pytest.fixture(scope="session")
def tiny_world(tiny_ingest, tmp_path_factory) -> tuple:
    """(cfg, store, overrides): ``tiny_ingest`` + topic frame features + the graph (N_c = 4, 2
    shards), as every stage after extraction reads it. No run is trained in it."""
    from worlds import copy_store, write_topic_features

    from frame_dist.graph.shards import build_shards

    _, ingested, overrides = tiny_ingest
    cfg, store, overrides = copy_store(ingested, overrides,
                                       tmp_path_factory.mktemp("tiny-world") / "store")
    write_topic_features(store)
    build_shards(cfg, store)
    return cfg, store, overrides


@pytest.fixture(scope="session")
def score_world(tiny_ingest, tmp_path_factory) -> tuple:
    """(cfg, store, overrides, no_features): the score tests' world (tests/test_score.py).

    ``tiny_ingest`` with two cold users (``worlds.COLD``: only test rows), a ``worlds.GHOST``
    who watched only ``no_features`` (a video without frame features, so absent from the
    graph), and a FRAME trained by the single-process trainer, saved as ``runs/tiny/model.pt``
    by the training stage's writer. tests/test_score.py commits its scores table here.
    """
    from worlds import (
        SCORE_SETTINGS,
        copy_store,
        edit_interactions,
        train_and_save,
        write_topic_features,
    )

    from frame_dist.graph.shards import build_shards

    _, ingested, overrides = tiny_ingest
    cfg, store, overrides = copy_store(ingested, overrides,
                                       tmp_path_factory.mktemp("score") / "store",
                                       *SCORE_SETTINGS)
    no_features = sorted(store.table("videos").read()["video_id"].to_pylist())[-1]
    edit_interactions(store, no_features)
    write_topic_features(store, skip=no_features)
    build_shards(cfg, store)
    train_and_save(cfg, store)
    return cfg, store, overrides, no_features


@pytest.fixture(scope="session")
def score_reference(score_world) -> tuple:
    """``worlds.score_reference`` of ``score_world``: every pair's forward score, seen pairs."""
    from worlds import score_reference

    return score_reference(score_world)
