"""One frame-sampling rule: offline decoding (favor.media.load_frames / load_audio, what training and
eval see) and the runtime's window assembler pick the same frames, including the tail after a last frame
that has no duration, and the same audio samples."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import pytest

from favor.media import FrameGrid, frame_duration, load_audio, load_frames
from runtime.assembler import WindowAssembler
from runtime.sources import MediaSource
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
    a = WindowAssembler(fps, 3, SR, has_video=True, has_audio=has_audio, on_window=windows.append,
                        on_frame=slots.append)
    source = MediaSource(str(path), SR)
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
