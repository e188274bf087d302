"""Decoding videos into frames on a uniform time grid (stage [extract], first half).

Grid. A video of duration D is sampled at the G grid times

    t_i = (i + 0.5) * D / G,   i = 0 .. G-1                                  (grid)

i.e. the centres of G equal time cells. A clip of the paper (N_c equal-duration segments, eq. 1)
then owns exactly the G / N_c consecutive grid cells inside it, whatever N_c divides G, so clip
features for any such N_c are means of stored grid frames and never need a second decode. For
each t_i we take the decoded frame whose presentation time (pts * time_base, relative to the
stream start) is **nearest** to t_i; ties go to the earlier frame. Times, never frame indices,
are used, so variable-frame-rate videos are sampled correctly; a video with fewer frames than G
repeats its nearest frames.

Duration. D is the video stream's duration from the container, else the container's duration,
else the end of the last demuxed packet. A ``duration_s`` declared by the videos table is checked
against D: more than max(0.5 s, 5 %) of D apart, the video is refused naming both durations
(a wrong declaration would otherwise stretch or squeeze the grid). It is used as D only for a
stream whose packets carry no timestamps and whose file declares no duration (nothing to check
it against).

Decoding. Frames are decoded in presentation order; only the selected ones are converted to RGB
(one swscale call that also resizes). When the next grid time lies at least ``seek_min_frames``
frame intervals ahead of the decoder, we seek to the keyframe at or before it and decode forward
from there; otherwise we keep decoding sequentially. A seek that lands behind the decoder (the
keyframe interval is longer than the grid step) switches seeking off for the rest of the video,
so a long GOP costs at most one wasted seek; a seek that lands after its target (unreliable
index) restarts sequential decoding from the start, so the result never depends on the mode.

Resizing. Short side to ``image_size`` (bilinear, aspect ratio kept), then a centre crop of
``image_size`` x ``image_size``: the ImageNet evaluation transform without the 0.875 crop ratio,
so no pixel is stretched. Output is uint8 RGB of shape (G, S, S, 3).

Errors. Every failure raises :class:`VideoDecodeError` carrying the uri and a reason: file not
found, empty file, not a readable media file (corrupt, truncated before the index, not a video),
no video stream, an empty video stream, a declared duration that disagrees with the stream's, a
decoding error, no decodable frame, or frames ending well before the duration (truncated stream).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import av
import numpy as np

TIE_EPS_S = 1e-9  # two frames this close in distance to a grid time count as a tie (earlier wins)
# a declared duration_s may differ from the stream's by max(0.5 s, 5 %): rounded CSV values and
# container/stream differences (an audio tail, the last frame's duration) stay accepted
DURATION_TOLERANCE_S = 0.5
DURATION_TOLERANCE_FRACTION = 0.05


class VideoDecodeError(RuntimeError):
    """A video could not be decoded; ``uri`` and ``reason`` say which and why."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):  # keep (uri, reason) across Ray's pickling
        return (VideoDecodeError, (self.uri, self.reason))


@dataclass
class DecodedVideo:
    """Frames of one video on the uniform grid."""

    frames: np.ndarray  # (G, S, S, 3) uint8 RGB
    grid_times: np.ndarray  # (G,) float64, t_i = (i + 0.5) * D / G, seconds from the start
    frame_times: np.ndarray  # (G,) float64, presentation time of the frame chosen for t_i
    duration_s: float  # D
    n_decoded: int  # frames decoded (a measure of work; seeking lowers it)
    n_seeks: int  # keyframe seeks performed


def grid_times(duration_s: float, grid_size: int) -> np.ndarray:
    """The G grid times t_i = (i + 0.5) * D / G (seconds), shape (G,)."""
    return (np.arange(grid_size, dtype=np.float64) + 0.5) * (duration_s / grid_size)


def nearest_frame_indices(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame nearest to each target time (ties: the earlier frame).

    ``frame_times`` must be sorted ascending. This is the rule the streaming decoder applies;
    exposed for tests and for callers that already hold all frame times.
    """
    frame_times = np.asarray(frame_times, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    if frame_times.size == 0:
        raise ValueError("nearest_frame_indices: no frames")
    after = np.searchsorted(frame_times, targets, side="left").clip(0, frame_times.size - 1)
    before = (after - 1).clip(0, None)
    d_after = np.abs(frame_times[after] - targets)
    d_before = np.abs(targets - frame_times[before])
    return np.where(d_before <= d_after + TIE_EPS_S, before, after)


def square_rgb(frame: av.VideoFrame, size: int) -> np.ndarray:
    """Short side to ``size`` (bilinear), centre crop ``size`` x ``size``; uint8 (S, S, 3)."""
    w, h = frame.width, frame.height
    if w <= h:
        new_w, new_h = size, max(size, round(h * size / w))
    else:
        new_w, new_h = max(size, round(w * size / h)), size
    img = frame.to_ndarray(width=new_w, height=new_h, format="rgb24", interpolation="BILINEAR")
    y0, x0 = (new_h - size) // 2, (new_w - size) // 2
    return img[y0:y0 + size, x0:x0 + size]


class _Held:
    """A decoded frame kept until we know whether a grid time is nearest to it."""

    __slots__ = ("time", "frame", "_rgb")

    def __init__(self, time: float, frame: av.VideoFrame):
        self.time = time
        self.frame = frame
        self._rgb: np.ndarray | None = None

    def rgb(self, size: int) -> np.ndarray:
        if self._rgb is None:  # convert each selected frame once, however often it is picked
            self._rgb = square_rgb(self.frame, size)
        return self._rgb


def open_source(uri: str, endpoint_url: str | None = None, region: str | None = None) -> Any:
    """What ``av.open`` reads: a local path, or an fsspec file object for ``s3://`` uris.

    Missing and empty files are reported here, before FFmpeg sees them.
    """
    if uri.startswith("s3://"):
        from feature_store.store import open_filesystem

        fs, path = open_filesystem(uri, endpoint_url, region)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise VideoDecodeError(uri, "file not found") from None
        except OSError as exc:
            raise VideoDecodeError(uri, f"cannot read: {exc}") from exc
        if not size:
            raise VideoDecodeError(uri, "empty file (0 bytes)")
        return fs.open(path, "rb")
    if "://" in uri and not uri.startswith("file://"):
        raise VideoDecodeError(uri, "unsupported uri scheme (local paths and s3:// only)")
    path = uri.removeprefix("file://")
    if not os.path.exists(path):
        raise VideoDecodeError(uri, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(uri, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(uri, "empty file (0 bytes)")
    return path


def decode_grid(
    uri: str,
    grid_size: int,
    image_size: int,
    *,
    duration_s: float | None = None,
    threads: int = 1,
    seek_min_frames: int = 48,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> DecodedVideo:
    """Decode the frames of ``uri`` nearest to the G grid times (see the module docstring).

    Args:
        uri: local path or ``s3://bucket/key``.
        grid_size: G, number of grid times.
        image_size: S, side of the square output frames.
        duration_s: the videos table's duration: checked against the stream's (refused
            beyond max(0.5 s, 5 %)); D itself only for a stream without timestamps.
        threads: decoder threads (FFmpeg frame/slice threading when > 1).
        seek_min_frames: seek when the next grid time is at least this many frame intervals
            ahead of the decoder; 0 disables seeking.
        endpoint_url, region: S3 endpoint override and region (the store's options).

    Returns:
        :class:`DecodedVideo` with frames of shape (G, S, S, 3) uint8.

    Raises:
        VideoDecodeError: with the uri and the reason.
    """
    source = open_source(uri, endpoint_url, region)
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        _close(source)
        raise VideoDecodeError(uri, f"not a readable media file ({_ffmpeg_reason(exc)})") from exc
    try:
        return _decode_open(container, uri, grid_size, image_size, duration_s, threads,
                            seek_min_frames)
    except av.error.FFmpegError as exc:  # anything FFmpeg refuses after opening
        raise VideoDecodeError(uri, f"decoding failed ({_ffmpeg_reason(exc)})") from exc
    finally:
        container.close()
        _close(source)


def _close(source: Any) -> None:
    if hasattr(source, "close"):
        source.close()


def _ffmpeg_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _decode_open(container: Any, uri: str, grid_size: int, image_size: int,
                 duration_hint: float | None, threads: int, seek_min_frames: int
                 ) -> DecodedVideo:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoDecodeError(uri, "the file has no video stream (streams: "
                                    f"{', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.codec_context.thread_count = max(1, threads)
    if threads > 1:
        stream.thread_type = "AUTO"
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0

    duration = _stream_duration(container, stream, uri, start, duration_hint)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    interval = 1.0 / float(rate) if rate else duration / max(1, stream.frames or grid_size)

    rel = grid_times(duration, grid_size)
    targets = start + rel
    frames = np.empty((grid_size, image_size, image_size, 3), np.uint8)
    chosen = np.empty(grid_size, np.float64)

    j = 0  # next grid time to assign
    prev: _Held | None = None  # last decoded frame, not yet known to be useless
    position = -math.inf  # presentation time of the last decoded frame
    seeking = seek_min_frames > 0
    n_decoded = n_seeks = 0
    landed_check = False  # the next frame is the first after a seek
    sought = -1  # last grid index we sought for: at most one seek per grid time
    it = container.decode(stream)

    def assign(held: _Held) -> None:
        frames[j] = held.rgb(image_size)
        chosen[j] = held.time - start

    while j < grid_size:
        ahead = targets[j] - max(position, start)
        if seeking and sought < j and ahead >= seek_min_frames * interval:
            sought = j
            try:
                container.seek(math.floor(targets[j] / tb), stream=stream, backward=True,
                               any_frame=False)
            except av.error.FFmpegError:  # no usable index: keep decoding sequentially
                seeking = False
            else:
                it = container.decode(stream)
                n_seeks += 1
                landed_check = True
                prev = None
        try:
            frame = next(it)
        except StopIteration:
            break
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(uri, f"corrupt or truncated stream: decoding failed after "
                                        f"{n_decoded} frames ({_ffmpeg_reason(exc)})") from exc
        n_decoded += 1
        t = float(frame.time) if frame.pts is not None else max(position, start) + interval
        if landed_check:
            landed_check = False
            if t > targets[j] + TIE_EPS_S:  # index pointed past the target: be exact instead
                seeking = False
                container.seek(0, stream=stream, backward=True, any_frame=False)
                it = container.decode(stream)
                position = -math.inf
                continue
            if t <= position:  # keyframe not ahead of us: the GOP is longer than the gap
                seeking = False
        position = t
        held = _Held(t, frame)
        while j < grid_size and targets[j] <= t:
            # the nearest of all frames is the last one before targets[j] or this one
            if prev is not None and targets[j] - prev.time <= t - targets[j] + TIE_EPS_S:
                assign(prev)
            else:
                assign(held)
            j += 1
        prev = held

    if j < grid_size:  # grid times after the last frame take the last frame
        if prev is None:
            raise VideoDecodeError(uri, f"no decodable video frame: the decoder returned none "
                                        f"from a {duration:.3f} s stream")
        last_rel = prev.time - start
        if rel[-1] - last_rel > max(2 * interval, 0.05 * duration):
            raise VideoDecodeError(uri, f"truncated: frames end at {last_rel:.3f} s of a "
                                        f"{duration:.3f} s video")
        while j < grid_size:
            assign(prev)
            j += 1
    return DecodedVideo(frames, rel, chosen, float(duration), n_decoded, n_seeks)


def duration_mismatch(declared_s: float, stream_s: float) -> str | None:
    """Why a declared duration disagrees with the stream's (beyond max(0.5 s, 5 %)), or None."""
    tolerance = max(DURATION_TOLERANCE_S, DURATION_TOLERANCE_FRACTION * stream_s)
    if abs(declared_s - stream_s) <= tolerance:
        return None
    relation = "beyond" if declared_s > stream_s else "shorter than"
    return (f"declared duration {declared_s:.1f} s (duration_s of the videos table) is "
            f"{relation} the stream's {stream_s:.1f} s")


def _stream_duration(container: Any, stream: Any, uri: str, start: float,
                     hint: float | None) -> float:
    """D (see the module docstring); the declared ``hint`` is checked against it."""
    declared = hint if hint is not None and hint > 0 and math.isfinite(hint) else None
    duration = _declared_duration(container, stream)
    if duration is None:
        if stream.start_time is None and declared is not None:
            # no timestamps (a raw elementary stream): demuxing finds no end and cannot be
            # rewound, so the declaration is all there is
            return float(declared)
        duration = _demuxed_end(container, stream, uri) - start
    if declared is not None:
        mismatch = duration_mismatch(declared, duration)
        if mismatch:
            raise VideoDecodeError(uri, mismatch)
    if not duration > 0:
        raise VideoDecodeError(uri, f"the video stream's duration is {duration:.3f} s")
    return duration


def _declared_duration(container: Any, stream: Any) -> float | None:
    """The duration the file declares: its video stream's, else the container's."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _demuxed_end(container: Any, stream: Any, uri: str) -> float:
    """End of the last packet (pts + duration) in seconds, then rewind to the start."""
    end = -math.inf
    n_packets = 0
    try:
        for packet in container.demux(stream):
            n_packets += packet.size > 0  # the demuxer ends with an empty flush packet
            if packet.pts is not None:
                end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    except av.error.FFmpegError as exc:
        raise VideoDecodeError(uri, f"demuxing failed ({_ffmpeg_reason(exc)})") from exc
    if not n_packets:
        raise VideoDecodeError(uri, "no video packets: the video stream is empty")
    if not math.isfinite(end):
        raise VideoDecodeError(uri, "the video packets carry no timestamps and the file "
                                    "declares no duration (give duration_s in the videos table)")
    container.seek(0, stream=stream, backward=True, any_frame=False)
    return end
