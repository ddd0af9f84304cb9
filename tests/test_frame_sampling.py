"""One frame-sampling rule and one clock: offline decoding (favor.media.load_frames / load_audio, what
training and eval see) and the runtime's window assembler pick the same frames, including the tail after
a last frame that has no duration, and the same audio samples, also when the streams start apart."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest

from favor.media import FrameGrid, frame_duration, load_audio, load_frames, media_info, stream_origin
from runtime import assembler as assembler_mod
from runtime.assembler import WindowAssembler
from runtime.sources import AudioChunk, Frame, MediaSource
from runtime.synthclip import write_clip

SR = 16_000
PTS_MS = [0, 40, 200, 230, 600, 1010, 1500]  # variable frame rate, first frame at stream time 0
LEVELS = [10, 50, 90, 130, 170, 210, 250]  # one grey level per frame, to identify it


def _write(path, pts_ms: list[int]) -> None:
    """Grey frames at the given pts. In NUT, VFR video carries no frame durations and no average rate."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=1000)
        v.codec_context.time_base = Fraction(1, 1000)
        v.width, v.height, v.pix_fmt = 34, 22, "yuv420p"  # odd size on purpose
        v.options = {"bf": "0"}  # no B-frame delay: the first pts stays 0 in every container
        for pts, g in zip(pts_ms, LEVELS, strict=True):
            f = av.VideoFrame.from_ndarray(np.full((22, 34, 3), g, np.uint8), format="rgb24")
            f.pts, f.time_base = pts, Fraction(1, 1000)
            for p in v.encode(f):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)


def _runtime(path, fps: float, has_audio: bool) -> tuple[list, list]:
    """(windows, frame slots) of the runtime's assembler, fed from the runtime's own source."""
    windows, slots = [], []
    source = MediaSource(str(path), SR)
    a = WindowAssembler(fps, 3, SR, has_video=True, has_audio=has_audio, on_window=windows.append,
                        on_frame=slots.append, origin=source.origin)
    try:
        for item in source:
            a.push(item)
    finally:
        source.close()
    a.push(None)
    return windows, slots


def _runtime_frames(path, fps: float) -> np.ndarray:
    """The frames the runtime's assembler puts on the grid: [T, H, W, 3]."""
    _, slots = _runtime(path, fps, has_audio=False)
    assert [s.index for s in slots] == list(range(len(slots)))
    return np.stack([s.rgb for s in slots])


@pytest.mark.parametrize("ext", ["mkv", "nut"])  # mkv: frames carry durations; nut: none at all
@pytest.mark.parametrize("fps", [3.0, 10.0])
def test_offline_and_runtime_pick_the_same_frames(tmp_path, ext, fps):
    path = tmp_path / f"vfr.{ext}"
    _write(path, PTS_MS)
    offline, _ = load_frames(path, fps)
    runtime = _runtime_frames(path, fps)
    # Bit-identical: the same decoder output converted the same way, picked by the same rule.
    np.testing.assert_array_equal(runtime, offline.numpy())
    if ext == "nut":
        with av.open(str(path)) as c:  # the case under test: the last frame has no duration
            last = list(c.decode(video=0))[-1]
            assert not last.duration and not c.streams.video[0].average_rate
        # ... so the last frame (1.5 s) fills only the slots up to its own pts
        assert len(offline) == int(1.5 * fps + 1e-9) + 1


def _slots(durations_s: list[float], fps: float) -> int:
    grid = FrameGrid(fps)
    for k, d in enumerate(durations_s):
        grid.push(k / 30, d)
    grid.finish()
    return grid.next


def test_grid_tail_without_duration_uses_the_source_interval():
    # 10 s of a 30 FPS source sampled at 2 FPS; the last frame (pts 299/30 s) has no duration of its
    # own, so it lasts one source interval (favor.media.frame_duration): the clip ends at 10 s with 20
    # slots, as its audio does. One sampling interval (0.5 s, the old runtime rule) adds a 21st slot.
    bare = av.VideoFrame.from_ndarray(np.zeros((2, 2, 3), np.uint8), format="rgb24")
    assert not bare.duration
    last = frame_duration(bare, SimpleNamespace(average_rate=Fraction(30)))
    assert last == pytest.approx(1 / 30)
    assert frame_duration(bare, SimpleNamespace(average_rate=None)) == 0.0  # nothing known: 0
    assert _slots([1 / 30] * 299 + [last], 2.0) == 20
    assert _slots([1 / 30] * 299 + [0.0], 2.0) == 20  # no rate known: up to the last pts only
    assert _slots([1 / 30] * 299 + [1 / 2.0], 2.0) == 21  # why not the sampling interval


def test_grid_drops_out_of_order_frames_and_fills_before_the_first():
    grid = FrameGrid(10.0, start=0.0)
    assert grid.push(0.25, 0.1) == 3  # slots 0.0, 0.1, 0.2 precede the first frame: they show it
    assert grid.push(0.25, 0.1) is None and grid.push(0.1, 0.1) is None  # duplicate, out of order
    assert grid.push(0.3, 0.1) == 0  # slot 0.3 is on this frame's pts: it shows this frame, later
    assert grid.finish() == 1 and grid.time(grid.next) == pytest.approx(0.4)


@pytest.mark.parametrize("rate,channels", [(22_050, 2), (SR, 1)])  # resampled + down-mixed, and as is
def test_offline_and_runtime_see_the_same_audio_and_frames(tmp_path, rate, channels):
    path = write_clip(tmp_path / "c.mp4", 2.3, fps=25.0, sample_rate=rate, channels=channels)
    windows, _ = _runtime(path, 2.0, has_audio=True)
    runtime_audio = np.concatenate([w.audio for w in windows])  # [samples], zero-padded to whole windows
    offline_audio = load_audio(path, SR).numpy()
    n = len(offline_audio)
    assert len(runtime_audio) >= n
    # Bit-identical: the same down-mix/resample graph, chunks placed by their pts on the same clock.
    np.testing.assert_array_equal(runtime_audio[:n], offline_audio)
    assert not runtime_audio[n:].any()
    offline_frames, _ = load_frames(path, 2.0)
    np.testing.assert_array_equal(np.concatenate([w.frames for w in windows]), offline_frames.numpy())


# -- one origin: streams that start apart ----------------------------------------------------------
AUDIO_RATE = 22_050  # resampled to SR on both paths
AUDIO_FRAME = 1024  # AAC's frame size
VIDEO_MS = 40  # 25 FPS source


def _write_apart(path, video_ms: int, audio_ms: int, codec: str, acodec: str) -> None:
    """1.6 s of video (a new grey level per frame) starting at ``video_ms`` and 1.4 s of a stereo tone
    starting at ``audio_ms``. libx264 uses B-frames by default: the decoder's reorder delay as well."""
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=25)
        v.width, v.height, v.pix_fmt = 34, 22, "yuv420p"  # odd size on purpose
        a = c.add_stream(acodec, rate=AUDIO_RATE, layout="stereo")
        for i in range(40):
            f = av.VideoFrame.from_ndarray(np.full((22, 34, 3), 6 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = video_ms + VIDEO_MS * i, Fraction(1, 1000)
            for p in v.encode(f):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        for k in range(30):
            n = np.arange(k * AUDIO_FRAME, (k + 1) * AUDIO_FRAME)
            x = (0.3 * np.cos(n / 10)).astype(np.float32)  # cos: loud from the first sample
            f = av.AudioFrame.from_ndarray(np.stack([x, 0.5 * x]), format="fltp", layout="stereo")
            f.sample_rate, f.time_base = AUDIO_RATE, Fraction(1, AUDIO_RATE)
            f.pts = round(audio_ms / 1000 * AUDIO_RATE) + k * AUDIO_FRAME
            for p in a.encode(f):
                c.mux(p)
        for p in a.encode(None):
            c.mux(p)


@pytest.mark.parametrize("ext,codec,acodec", [("mkv", "mpeg4", "pcm_s16le"), ("mp4", "libx264", "aac")])
@pytest.mark.parametrize("video_ms,audio_ms", [(300, 0), (0, 450)])  # video later / audio later
def test_streams_starting_apart_share_one_origin(tmp_path, ext, codec, acodec, video_ms, audio_ms):
    if codec not in av.codecs_available:
        pytest.skip(f"{codec} encoder not in this PyAV build")
    path = tmp_path / f"apart.{ext}"
    _write_apart(path, video_ms, audio_ms, codec, acodec)
    info = media_info(path)
    origin = stream_origin(info.video_start, info.audio_start)
    # the containers really start the streams apart (mp4's AAC edit list moves audio by its priming)
    assert abs((info.video_start - info.audio_start) - (video_ms - audio_ms) / 1000) < 0.06
    assert origin == min(info.video_start, info.audio_start)
    fps = 10.0
    windows, _ = _runtime(path, fps, has_audio=True)
    offline_audio = load_audio(path, SR).numpy()
    offline_frames, times = load_frames(path, fps)
    # Bit-identical, frame per slot and sample for sample: same decoders, same clock, same placement.
    runtime_frames = [w.frames for w in windows if w.frames is not None]  # None: past the video's end
    np.testing.assert_array_equal(np.concatenate(runtime_frames), offline_frames.numpy())
    runtime_audio = np.concatenate([w.audio for w in windows])  # zero-padded to whole windows
    n = len(offline_audio)
    assert len(runtime_audio) >= n and not runtime_audio[n:].any()
    np.testing.assert_array_equal(runtime_audio[:n], offline_audio)
    # ... and the later stream keeps its offset on that clock (what the old runtime rule lost).
    lead = round((info.audio_start - origin) * SR)  # samples of silence before the audio
    assert not offline_audio[:lead].any() and np.abs(offline_audio[lead: lead + SR // 10]).max() > 0.1
    late = info.video_start - origin  # seconds before the first frame
    held = int(late * fps - 1e-9) + 1  # slots at or before the first frame's pts show it
    assert times[0] == pytest.approx(late) and (times[:held] == times[0]).all() and times[held] > times[0]
    if video_ms > audio_ms:
        assert held >= 3 and lead == 0
    else:
        assert held == 1 and lead > 0.4 * SR


def test_origin_is_the_earlier_start():
    assert stream_origin(0.32, 0.0) == 0.0 and stream_origin(0.08, 0.0336) == 0.0336
    assert stream_origin(None, 1.4) == 1.4 and stream_origin(2.0, None) == 2.0  # one stream
    assert stream_origin(None, None) is None


def test_assembler_without_declared_origin_takes_the_earlier_first_timestamp():
    # No declared starts (origin=None): the assembler waits for each stream's first timestamp and
    # applies the same rule, so audio 0.25 s before the first frame is kept, not cut.
    windows = []
    a = WindowAssembler(10.0, 3, 100, has_video=True, has_audio=True, on_window=windows.append)
    a.push(AudioChunk(5.0, np.ones(50, np.float32)))  # stream time 0 = 5.0 s on the source clock
    assert a.t0 is None  # the video has not shown its start yet
    rgb = av.VideoFrame.from_ndarray(np.full((4, 6, 3), 7, np.uint8), format="rgb24")
    a.push(Frame(5.25, rgb, 0.1))
    assert a.t0 == 5.0
    a.push(None)
    w = windows[0]
    assert w.audio.shape == (30,) and (w.audio == 1).all()  # samples [0, 30) of the 50 placed at 0
    assert w.frames.shape == (3, 4, 6, 3) and (w.frames == 7).all()  # slots 0.0-0.2 show the first frame
    assert sum(x.num_frames for x in windows) == 5  # to 0.5 s: the audio's end and the frame's end (0.35)


def test_audio_before_a_silent_video_stream_is_bounded():
    # The source declares its starts, but the video never delivers: windows cannot close, so the
    # audio kept meanwhile is capped (oldest dropped); at the end the audio alone is captioned.
    sr, fps = 100, 10.0
    cap = round(assembler_mod.MAX_AUDIO_BEFORE_VIDEO_S * sr)
    windows = []
    a = WindowAssembler(fps, 3, sr, has_video=True, has_audio=True, on_window=windows.append, origin=0.0)
    a.push(AudioChunk(0.0, np.ones(cap + 250, np.float32)))
    assert a.buf.size == cap and a.audio_base == 250 and windows == []
    a.push(None)
    audio = np.concatenate([w.audio for w in windows])
    assert all(w.frames is None for w in windows)
    assert not audio[:250].any() and (audio[250: cap + 250] == 1).all()
