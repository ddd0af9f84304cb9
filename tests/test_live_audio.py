"""Live audio beside live video (issue 13 part 1): two inputs on one clock.

lavfi graphs stand in for a camera and a microphone (their frames and samples carry known onsets), ALSA's
``null`` PCM for a microphone device where this PyAV build has libavdevice's alsa input."""

from __future__ import annotations

import time

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from runtime.assembler import WindowAssembler
from runtime.cli import EXIT_USAGE, app
from runtime.merged_source import END_AUDIO_WAIT_S, WALL_CLOCK_TOLERANCE_S, MergedSource
from runtime.sources import AudioChunk, Frame, MediaSource, open_source
from runtime.synthclip import write_clip

FPS, F, SR = 20.0, 4, 16_000
SECONDS = 2.2
ONSETS = [0.5, 1.5]  # white frames and a loud tone start together, every second from 0.5 s
# lavfi: the frame is white and the tone on during [k + 0.5, k + 1) s; 0.5 and 1.5 are exact binary
# fractions and multiples of the 20 FPS slot (50 ms), so a perfect alignment is an exact one.
VIDEO = (f"lavfi:color=c=black:s=32x24:r={FPS:g}:d={SECONDS},format=gray,"
         "geq=lum='255*gte(mod(T\\,1.0)\\,0.5)'")
AUDIO = f"lavfi:aevalsrc='0.5*gte(mod(t\\,1.0)\\,0.5)':s={SR}:d={SECONDS}"
# Alignment tolerance: 1 ms. On one clock the onsets coincide up to float rounding of wall-clock
# seconds (~2.4e-7 s at 1.8e9 s) and one audio sample (62.5 us); an input left on its own clock, or
# started on a different anchor, is off by its start-up time or by seconds.
ALIGN_TOL_S = 1e-3


def _assemble(source) -> tuple[list, float | None]:
    windows = []
    asm = WindowAssembler(FPS, F, SR, True, True, on_window=windows.append, origin=source.origin)
    for item in source:
        asm.push(item)
    asm.push(None)
    return windows, asm.t0


def _onsets(windows) -> tuple[list[float], list[float]]:
    frames = np.concatenate([w.frames for w in windows if w.frames is not None])  # [n, H, W, 3]
    bright = frames.mean(axis=(1, 2, 3))
    video = [i / FPS for i in range(1, len(bright)) if bright[i] > 128 >= bright[i - 1]]
    audio = np.concatenate([w.audio for w in windows])
    loud = np.flatnonzero(np.abs(audio) > 0.25)
    starts = [k for j, k in enumerate(loud) if j == 0 or k - loud[j - 1] > 0.1 * SR]
    return video, [k / SR for k in starts]


def test_lavfi_camera_and_microphone_align_on_the_wall_clock():
    before = time.time()
    source = MergedSource(VIDEO, AUDIO, SR, realtime=True)
    assert source.live and source.origin is None  # readers pace themselves; assembler takes the origin
    try:
        windows, t0 = _assemble(source)
    finally:
        source.close()
    # one clock, the wall clock: stream time 0 is when capture started
    assert before <= t0 <= time.time()
    video, audio = _onsets(windows)
    assert video == pytest.approx(ONSETS, abs=ALIGN_TOL_S)
    assert audio == pytest.approx(ONSETS, abs=ALIGN_TOL_S)
    assert source.dropped == 0


def _split(clip, video_path, audio_path) -> None:
    """Remux ``clip``'s video and audio streams into two files (same packets, same timestamps)."""
    for kind, path in (("video", video_path), ("audio", audio_path)):
        with av.open(str(clip)) as src, av.open(str(path), "w") as dst:
            stream = getattr(src.streams, kind)[0]
            out = dst.add_stream_from_template(stream)
            for packet in src.demux(stream):
                if packet.dts is None:
                    continue
                packet.stream = out
                dst.mux(packet)


def test_offline_merge_of_two_files_equals_the_single_file(tmp_path):
    """Offline, video from one file and sound from another give exactly the items of the file holding
    both (same timestamps, same samples): the ordered merge adds nothing and loses nothing."""
    clip = write_clip(tmp_path / "both.mkv", 1.3, fps=10.0, sample_rate=22_050, channels=2)
    _split(clip, tmp_path / "v.mkv", tmp_path / "a.mkv")
    single = list(MediaSource(str(clip), SR))
    merged_source = open_source(str(tmp_path / "v.mkv"), SR, audio=str(tmp_path / "a.mkv"), realtime=False)
    assert isinstance(merged_source, MergedSource) and not merged_source.live and merged_source.origin == 0.0
    merged = list(merged_source)
    key = lambda x: (x.t, isinstance(x, AudioChunk))  # noqa: E731
    assert [x.t for x in merged] == sorted(x.t for x in merged)  # one timeline, in time order
    frames = lambda xs: [(x.t, x.frame.pts) for x in xs if isinstance(x, Frame)]  # noqa: E731
    audio = lambda xs: np.concatenate([x.samples for x in sorted(xs, key=key) if isinstance(x, AudioChunk)])  # noqa: E731
    assert frames(merged) == frames(single)
    np.testing.assert_array_equal(audio(merged), audio(single))


def _alsa_null_available() -> str | None:
    """Why the ALSA null PCM cannot stand in for a microphone here, or None if it can."""
    if "alsa" not in av.formats_available:
        return "this PyAV build has no libavdevice alsa input"
    try:
        MediaSource("alsa:null", SR).close()
    except ValueError as e:
        return f"ALSA null PCM does not open here: {e}"
    return None


def test_alsa_null_device_stands_in_for_a_microphone():
    why = _alsa_null_available()
    if why:
        pytest.skip(reason=f"PyAV cannot open ALSA's null device as a stand-in microphone: {why}")
    seconds = 0.6
    video = f"lavfi:testsrc=size=32x24:rate={FPS:g}:duration={seconds}"
    t_start = time.monotonic()
    source = open_source(video, SR, audio="alsa:null", realtime=True)
    assert isinstance(source, MergedSource) and source.audio_kind == "alsa"
    seen: list = []
    try:
        for item in source:
            seen.append(item)
    finally:
        source.close()
    elapsed = time.monotonic() - t_start
    # the stream ends with its video (a microphone never ends), after at most the wait for last audio
    assert seconds * 0.8 <= elapsed <= seconds + END_AUDIO_WAIT_S + 2.0
    chunks = [x for x in seen if isinstance(x, AudioChunk)]
    frames = [x for x in seen if isinstance(x, Frame)]
    assert chunks and len(frames) >= round(seconds * FPS) - 1
    now = time.time()
    # the device stamps wall-clock capture times; the paced lavfi video was mapped onto that clock
    assert all(abs(x.t - now) < WALL_CLOCK_TOLERANCE_S for x in chunks + frames)
    assert min(x.t for x in chunks) < max(x.t for x in frames)  # they overlap in time


def test_cli_captions_camera_with_microphone_null(tiny_ckpt, tmp_path):
    why = _alsa_null_available()
    if why:
        pytest.skip(reason=f"PyAV cannot open ALSA's null device as a stand-in microphone: {why}")
    srt = tmp_path / "cam.srt"
    r = CliRunner().invoke(app, ["run", "--backend", "torch", "lavfi:testsrc=size=32x24:rate=10:duration=0.9",
                                 "--audio", "alsa:null", "--model", str(tiny_ckpt), "--no-live", "--threads", "1",
                                 "--max-new-tokens", "2", "--realtime", "--max-latency", "5", "--srt", str(srt)])
    assert r.exit_code == 0, r.output
    assert "+ audio alsa:null (alsa)" in r.output
    assert srt.read_text().count(" --> ") >= 2


@pytest.mark.parametrize("audio, expected", [
    ("hw:97", "hw:97: cannot open as alsa input"),
    ("/nonexistent/mic.wav", "/nonexistent/mic.wav: no such file"),
    ("pulse:", "pulse:"),
])
def test_bad_audio_input_exits_2_with_one_line(tiny_ckpt, tmp_path, audio, expected):
    if audio.startswith("hw:") and "alsa" not in av.formats_available:
        pytest.skip("this PyAV build has no libavdevice alsa input")
    clip = write_clip(tmp_path / "v.mp4", 0.5, audio=False)
    r = CliRunner().invoke(app, ["run", "--backend", "torch", str(clip), "--audio", audio, "--model", str(tiny_ckpt),
                                 "--no-live", "--offline", "--timeout", "2"])
    assert r.exit_code == EXIT_USAGE, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], r.output
    assert "Traceback" not in r.output


def test_audio_input_without_sound_is_refused(tiny_ckpt, tmp_path):
    clip = write_clip(tmp_path / "v.mp4", 0.5, audio=False)
    r = CliRunner().invoke(app, ["run", "--backend", "torch", str(clip), "--audio", str(clip), "--model",
                                 str(tiny_ckpt), "--no-live", "--offline"])
    assert r.exit_code == EXIT_USAGE and "no audio stream" in r.output, r.output


def test_gstreamer_pipeline_source():
    cv2 = pytest.importorskip("cv2", reason="OpenCV is not installed: the gst: path is unverified here")
    if "GStreamer:                   YES" not in cv2.getBuildInformation():
        pytest.skip("OpenCV is built without GStreamer: the gst: path is unverified here")
    source = open_source("gst:videotestsrc num-buffers=6 ! video/x-raw,width=32,height=24 ! videoconvert ! "
                         "appsink", SR)
    frames = list(source)
    source.close()
    assert len(frames) == 6 and frames[0].rgb().shape == (24, 32, 3)
    assert [f.t for f in frames] == sorted(f.t for f in frames)
