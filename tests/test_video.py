"""Decoding: grid frame selection, seeking, resizing and error reasons on real video files."""

from __future__ import annotations

import av
import numpy as np
import pytest

from frame_dist.extract.video import (
    VideoDecodeError,
    decode_grid,
    grid_times,
    nearest_frame_indices,
    square_rgb,
)

STEP = 8  # grey level step between consecutive frames of the test videos


def frame_index(frames: np.ndarray) -> np.ndarray:
    """Recover frame k from its grey level k * STEP (codec round trip is within +-2)."""
    return np.rint(frames.reshape(len(frames), -1).mean(axis=1) / STEP).astype(int)


def test_grid_times_are_cell_centres():
    np.testing.assert_allclose(grid_times(2.0, 4), [0.25, 0.75, 1.25, 1.75])
    np.testing.assert_allclose(grid_times(3.0, 1), [1.5])


def test_nearest_frame_indices_ties_go_to_the_earlier_frame():
    times = np.array([0.0, 0.1, 0.15, 0.4])
    # 0.125 is equidistant from 0.1 and 0.15; -1 before the first; 9 after the last
    got = nearest_frame_indices(times, np.array([-1.0, 0.04, 0.06, 0.125, 0.3, 9.0]))
    assert got.tolist() == [0, 0, 1, 1, 3, 3]


@pytest.mark.parametrize("seek_min_frames,threads", [(0, 1), (1, 1), (0, 2)])
def test_constant_rate_selects_nearest_frames(make_video, seek_min_frames, threads):
    path = make_video("cfr.mp4", 30, fps=10)  # frames at 0.0, 0.1, ..., 2.9; D = 3.0
    d = decode_grid(str(path), 8, 32, seek_min_frames=seek_min_frames, threads=threads)
    # t_i = (i + 0.5) * 3 / 8 = 0.1875, 0.5625, ..., 2.8125 -> nearest frames by hand:
    expected = [2, 6, 9, 13, 17, 21, 24, 28]
    assert d.duration_s == pytest.approx(3.0)
    np.testing.assert_allclose(d.grid_times, (np.arange(8) + 0.5) * 0.375)
    np.testing.assert_allclose(d.frame_times, np.array(expected) * 0.1, atol=1e-9)
    assert frame_index(d.frames).tolist() == expected
    assert d.frames.shape == (8, 32, 32, 3) and d.frames.dtype == np.uint8


def test_short_video_repeats_nearest_frames(make_video):
    path = make_video("short.mp4", 3, fps=10)  # frames at 0.0, 0.1, 0.2; D = 0.3 < G frames
    d = decode_grid(str(path), 8, 32)
    # t_i = 0.01875, 0.05625, 0.09375, 0.13125, 0.16875, 0.20625, 0.24375, 0.28125
    assert frame_index(d.frames).tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert d.n_decoded == 3


def test_variable_frame_rate_uses_timestamps(make_video):
    pts = [0, 100, 150, 400, 410, 700, 1000, 1050, 1500, 1900]  # ms
    path = make_video("vfr.mp4", len(pts), pts_ms=pts)
    d = decode_grid(str(path), 8, 32)
    assert d.duration_s == pytest.approx(2.0)  # last frame + the muxer's last duration
    # t_i = 0.125 (tie 0.1 / 0.15 -> 0.1), 0.375, 0.625, 0.875, 1.125, 1.375, 1.625, 1.875
    expected = [1, 3, 5, 6, 7, 8, 8, 9]
    assert frame_index(d.frames).tolist() == expected
    np.testing.assert_allclose(d.frame_times, np.array(pts)[expected] / 1000, atol=1e-9)
    assert nearest_frame_indices(np.array(pts) / 1000, d.grid_times).tolist() == expected


def test_seeking_gives_the_same_frames_with_less_decoding(make_video):
    path = make_video("gop5.mp4", 100, fps=25, gop=5)  # keyframe every 0.2 s, D = 4 s
    seq = decode_grid(str(path), 10, 32, seek_min_frames=0)
    sek = decode_grid(str(path), 10, 32, seek_min_frames=3)
    np.testing.assert_array_equal(seq.frames, sek.frames)
    np.testing.assert_array_equal(seq.frame_times, sek.frame_times)
    # t_i = 0.2, 0.6, ..., 3.8 -> frames 5, 15, ..., 95
    assert frame_index(seq.frames).tolist() == [(5 + 10 * i) % 32 for i in range(10)]
    assert seq.n_seeks == 0 and seq.n_decoded == 97  # stops once the last grid time is served
    assert sek.n_seeks == 10 and sek.n_decoded <= 20  # <= 2 frames per seek from a keyframe


def test_long_gop_stops_seeking_after_landing_behind(make_video):
    path = make_video("gop_long.mp4", 30, fps=10)  # one keyframe (x264 default keyint 250)
    seq = decode_grid(str(path), 8, 32, seek_min_frames=0)
    sek = decode_grid(str(path), 8, 32, seek_min_frames=3)
    np.testing.assert_array_equal(seq.frames, sek.frames)
    # first seek (t_0 = 0.1875 is 1.9 frames ahead: none), then t_1 lands on frame 0: behind
    assert sek.n_seeks == 1


def test_resize_short_side_then_centre_crop(make_video):
    path = make_video("wide.mp4", 4, fps=10, size=(96, 64), step=0, pattern=True)
    d = decode_grid(str(path), 2, 32)
    with av.open(str(path)) as c:  # the full-size frame, as the codec returns it
        full = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(float)
    # 96x64 -> 48x32 (short side 32): 2x downscale, then the centre 32 of 48 columns (8..39).
    # The ramp rises 2.5 levels per source column, 5 per output column: a crop one column off
    # would miss by 5.
    half = full.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(d.frames[0].astype(float), half[:, 8:40], atol=3.0)
    tall = make_video("tall.mp4", 4, fps=10, size=(48, 80))
    assert decode_grid(str(tall), 2, 40).frames.shape == (2, 40, 40, 3)


def test_square_rgb_keeps_aspect_ratio():
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, 20:40] = 200  # the middle third is bright: the centre crop keeps exactly it
    frame = av.VideoFrame.from_ndarray(img, format="rgb24")
    out = square_rgb(frame, 10)
    assert out.shape == (10, 10, 3)
    assert out[:, 2:8].min() > 190


def test_odd_size_other_codec(make_video):
    path = make_video("odd.mkv", 12, fps=10, size=(35, 27), codec="ffv1")
    d = decode_grid(str(path), 4, 32)
    # D = 1.2, t_i = 0.15, 0.45, 0.75, 1.05 -> ties go to the earlier frame: 1, 4, 7, 10
    assert frame_index(d.frames).tolist() == [1, 4, 7, 10]
    assert d.frames.shape == (4, 32, 32, 3)


def _bad_file(kind, tmp_path, make_video, audio_writer):
    if kind == "missing":
        return tmp_path / "nope.mp4"
    if kind == "empty":
        (tmp_path / "empty.mp4").write_bytes(b"")
        return tmp_path / "empty.mp4"
    if kind == "text":
        (tmp_path / "notes.mp4").write_text("not a video\n" * 50)
        return tmp_path / "notes.mp4"
    if kind == "corrupt":
        rng = np.random.default_rng(0)
        (tmp_path / "noise.mp4").write_bytes(rng.integers(0, 256, 5000, np.uint8).tobytes())
        return tmp_path / "noise.mp4"
    if kind == "truncated_index":  # moov at the end: cut before it
        data = make_video("full.mp4", 20).read_bytes()
        (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
        return tmp_path / "cut.mp4"
    if kind == "truncated_mid_packet":  # faststart: index first, data cut inside a packet
        data = make_video("fs.mp4", 40, faststart=True).read_bytes()
        (tmp_path / "cut.mp4").write_bytes(data[: int(len(data) * 0.6)])
        return tmp_path / "cut.mp4"
    if kind == "truncated_clean":  # faststart, data cut exactly before packet 20
        src = make_video("fs.mp4", 40, faststart=True)
        with av.open(str(src)) as c:
            positions = [p.pos for p in c.demux(c.streams.video[0]) if p.size]
        (tmp_path / "cut.mp4").write_bytes(src.read_bytes()[: positions[20]])
        return tmp_path / "cut.mp4"
    if kind == "audio_only":
        return audio_writer(tmp_path / "sound.m4a")
    if kind == "directory":
        (tmp_path / "dir.mp4").mkdir()
        return tmp_path / "dir.mp4"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,reason", [
    ("missing", "file not found"),
    ("empty", "empty file (0 bytes)"),
    ("text", "not a readable media file (Invalid data found when processing input)"),
    ("corrupt", "not a readable media file (Invalid data found when processing input)"),
    ("truncated_index", "not a readable media file (Invalid data found when processing input)"),
    ("truncated_mid_packet", "corrupt or truncated stream: decoding failed after"),
    ("truncated_clean", "truncated: frames end at 1.900 s of a 4.000 s video"),
    ("audio_only", "the file has no video stream (streams: audio)"),
    ("directory", "is a directory, not a video file"),
])
def test_bad_files_raise_with_uri_and_reason(kind, reason, tmp_path, make_video, audio_writer):
    path = _bad_file(kind, tmp_path, make_video, audio_writer)
    with pytest.raises(VideoDecodeError) as info:
        decode_grid(str(path), 8, 32)
    assert info.value.uri == str(path)
    assert info.value.reason.startswith(reason)
    assert str(info.value).startswith(f"{path}: ")


def remux(src, dst, **options) -> str:
    """Copy the video packets of ``src`` into ``dst`` (``live="1"`` for an mkv that declares no
    duration, as streaming recorders write them)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", options=options) as out:
        ist = inp.streams.video[0]
        ost = out.add_stream_from_template(ist)
        for packet in inp.demux(ist):
            if packet.dts is not None:  # not the demuxer's final flush packet
                packet.stream = ost
                out.mux(packet)
    return str(dst)


def write_empty_video_stream(path) -> str:
    """An mkv (no declared duration) with a video stream but only audio packets."""
    with av.open(str(path), "w", options={"live": "1"}) as c:
        video = c.add_stream("libx264", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = c.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in audio.encode(frame):
                c.mux(packet)
        for packet in audio.encode():
            c.mux(packet)
    return str(path)


@pytest.mark.parametrize("live", [False, True], ids=["mp4", "mkv-without-duration"])
@pytest.mark.parametrize("declared,reason", [
    (12.0, "declared duration 12.0 s (duration_s of the videos table) is beyond the "
           "stream's 4.0 s"),
    (2.0, "declared duration 2.0 s (duration_s of the videos table) is shorter than the "
          "stream's 4.0 s"),
    (3.4, "declared duration 3.4 s (duration_s of the videos table) is shorter than the "
          "stream's 4.0 s"),  # 0.6 s off: beyond max(0.5 s, 5 %)
])
def test_declared_duration_far_from_the_stream_is_refused(make_video, tmp_path, live,
                                                          declared, reason):
    path = str(make_video("four.mp4", 40, fps=10))  # D = 4.0 s
    if live:  # the file declares no duration: the stream's is its last packet's end
        path = remux(path, tmp_path / "four.mkv", live="1")
        with av.open(path) as c:
            assert c.duration is None and c.streams.video[0].duration is None
    with pytest.raises(VideoDecodeError) as info:
        decode_grid(path, 8, 32, duration_s=declared)
    assert info.value.reason == reason


@pytest.mark.parametrize("live", [False, True], ids=["mp4", "mkv-without-duration"])
def test_declared_duration_within_tolerance_keeps_the_stream_s(make_video, tmp_path, live):
    path = str(make_video("four.mp4", 40, fps=10))
    if live:
        path = remux(path, tmp_path / "four.mkv", live="1")
    reference = decode_grid(path, 8, 32)
    for declared in (3.6, 4.4):  # within max(0.5 s, 5 % of 4 s)
        d = decode_grid(path, 8, 32, duration_s=declared)
        assert d.duration_s == pytest.approx(4.0)  # the grid stays the stream's
        np.testing.assert_array_equal(d.frames, reference.frames)


def test_empty_video_stream_and_missing_timestamps_are_named(tmp_path, make_video):
    empty = write_empty_video_stream(tmp_path / "empty.mkv")
    with pytest.raises(VideoDecodeError) as info:
        decode_grid(empty, 8, 32)
    assert info.value.reason == "no video packets: the video stream is empty"
    raw = make_video("raw.h264", 20, fps=10)  # an elementary stream: no timestamps at all
    with pytest.raises(VideoDecodeError) as info:
        decode_grid(str(raw), 8, 32)
    assert info.value.reason == ("the video packets carry no timestamps and the file declares "
                                 "no duration (give duration_s in the videos table)")
    # then the declaration is D (FFmpeg assumes 25 frames/s for such a stream: 20 -> 0.8 s)
    assert decode_grid(str(raw), 4, 32, duration_s=0.8).duration_s == 0.8


def test_unsupported_scheme():
    with pytest.raises(VideoDecodeError, match="unsupported uri scheme"):
        decode_grid("http://example.com/v.mp4", 8, 32)


def test_decode_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(VideoDecodeError("s3://b/v.mp4", "file not found")))
    assert (err.uri, err.reason, str(err)) == ("s3://b/v.mp4", "file not found",
                                               "s3://b/v.mp4: file not found")
