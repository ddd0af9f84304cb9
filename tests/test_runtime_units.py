"""Runtime pieces without a model: window assembly by timestamps, the deadline scheduler, writers."""

from __future__ import annotations

import threading

import av
import numpy as np
import pytest

from runtime.assembler import WindowAssembler
from runtime.scheduler import COST_MEMORY_S, COST_SAFETY, DeadlineScheduler
from runtime.sources import AudioChunk, Frame, Ring, source_kind
from runtime.writers import JsonlWriter, SrtWriter, VttWriter, parse_jsonl, parse_srt, parse_vtt

FPS, F, SR = 10.0, 3, 1000  # 0.1 s per frame slot, 0.3 s windows, 100 samples per slot


def frame(t: float, value: int) -> Frame:
    rgb = np.full((4, 6, 3), value, np.uint8)  # odd size on purpose
    # each frame lasts one 10 FPS source interval, as favor.media.frame_duration gives for such a source
    return Frame(t, av.VideoFrame.from_ndarray(rgb, format="rgb24"), 1.0 / FPS)


def chunk(t: float, n: int, value: float) -> AudioChunk:
    return AudioChunk(t, np.full(n, value, np.float32))


def assembler(video=True, audio=True, **kw):
    out, slots = [], []
    a = WindowAssembler(FPS, F, SR, video, audio, on_window=out.append, on_frame=slots.append, **kw)
    return a, out, slots


def test_frames_picked_by_pts_with_variable_frame_rate():
    a, out, slots = assembler(audio=False)
    for t, v in ((0.0, 10), (0.05, 20), (0.25, 30), (0.31, 40)):
        a.push(frame(t, v))
    assert len(out) == 1  # slot 2 (t = 0.2) is known once the 0.25 s frame arrived
    a.push(None)
    assert [w.num_frames for w in out] == [3, 2]
    # slot i shows the latest frame with pts <= i / fps; the tail runs to last pts + one slot
    assert [int(f[0, 0, 0]) for f in out[0].frames] == [10, 20, 20]
    assert [int(f[0, 0, 0]) for f in out[1].frames] == [30, 40]
    assert [s.index for s in slots] == [0, 1, 2, 3, 4]
    assert (out[1].start, out[1].end) == pytest.approx((0.3, 0.5))


def test_audio_placed_by_pts_gaps_zero_filled_and_early_audio_trimmed():
    a, out, _ = assembler(origin=0.0)  # the source declares stream time 0 at pts 0
    a.push(chunk(-0.05, 100, 1.0))  # before stream time 0: only [0, 50) samples survive
    a.push(frame(0.0, 1))
    a.push(chunk(0.05, 100, 2.0))  # samples [50, 150)
    a.push(chunk(0.2, 200, 3.0))  # a gap [150, 200), then [200, 400)
    for t in (0.1, 0.2, 0.3, 0.35):
        a.push(frame(t, 1))
    assert len(out) == 1
    w0 = out[0].audio
    assert w0.shape == (300,)
    assert (w0[:50] == 1).all() and (w0[50:150] == 2).all() and (w0[150:200] == 0).all()
    assert (w0[200:] == 3).all()
    a.push(None)
    w1 = out[1].audio  # slots 3, 4 (tail after the 0.35 s frame) -> samples [300, 500)
    assert w1.shape == (200,) and (w1[:100] == 3).all() and (w1[100:] == 0).all()


def test_window_waits_for_audio_then_closes_with_silence_after_grace():
    a, out, _ = assembler(audio_grace=0.5)
    a.push(frame(0.0, 1))
    a.push(chunk(0.0, 250, 1.0))
    for t in (0.1, 0.2, 0.3, 0.4):
        a.push(frame(t, 1))
    assert out == []  # all 3 slots known, audio only reaches 0.25 s of the 0.3 s window
    a.push(frame(0.9, 1))  # video now 0.6 s past the window's end: audio has stalled
    assert len(out) == 1 and (out[0].audio[250:] == 0).all() and (out[0].audio[:250] == 1).all()


def test_audio_only_and_video_only_streams():
    a, out, _ = assembler(video=False)
    a.push(chunk(5.0, 750, 0.5))  # stream time starts at the first audio pts, whatever the clock
    assert [w.index for w in out] == [0, 1]
    a.push(None)
    assert [w.num_frames for w in out] == [3, 3, 2] and out[2].audio.shape == (200,)
    assert all(w.frames is None for w in out)
    b, out_v, _ = assembler(audio=False)
    for k in range(7):
        b.push(frame(k * 0.1, k))
    b.push(None)
    assert [w.num_frames for w in out_v] == [3, 3, 1] and all(w.audio is None for w in out_v)


def test_resolution_change_midstream_rescaled_to_first_size():
    a, out, _ = assembler(audio=False)
    a.push(frame(0.0, 5))
    big = Frame(0.1, av.VideoFrame.from_ndarray(np.full((8, 12, 3), 9, np.uint8), format="rgb24"))
    a.push(big)
    a.push(None)
    assert out[0].frames.shape == (2, 4, 6, 3)


def test_source_kinds():
    assert source_kind("0") == "camera" and source_kind("/dev/video2") == "camera"
    assert source_kind("rtsp://cam/live") == "stream" and source_kind("udp://@:1234") == "stream"
    assert source_kind("lavfi:testsrc") == "lavfi" and source_kind("clip.mp4") == "file"


def test_ring_latest_wins_and_backpressure():
    cond, stop = threading.Condition(), threading.Event()
    r = Ring(2, cond, block=False)
    for i in range(5):
        r.put(i, stop)
    assert r.items == [3, 4] and r.dropped == [0, 1, 2] and r.high_water == 2
    b = Ring(1, cond, block=True)
    b.put("a", stop)
    stop.set()  # a blocked producer gives up when asked to stop (evicting, never growing)
    b.put("b", stop)
    assert b.items == ["b"]


# -- scheduler ------------------------------------------------------------------------------------


def window(index: int, closed_at: float):
    from runtime.assembler import Window

    return Window(index, index * 0.3, (index + 1) * 0.3, index * F, F, None, None, closed_at)


def test_scheduler_drops_windows_that_cannot_make_the_deadline():
    s = DeadlineScheduler(max_latency=1.0)
    now = 100.0
    s.observe(0.1, 0.2, 1, now=now)  # cost(1) = 1.15 x 0.3 s
    late, ok = window(0, now - 0.9), window(1, now - 0.1)
    drop, take = s.plan([late, ok], now)
    assert drop == [late] and take == [ok]
    assert s.cost(1, now) == pytest.approx(COST_SAFETY * 0.3)


def test_scheduler_forgets_old_outliers_and_falls_back_to_the_baseline():
    s = DeadlineScheduler(max_latency=1.0)
    s.calibrate(0.05, 0.1)
    s.observe(5.0, 5.0, 1, now=0.0)  # a stall: every window would look infeasible
    assert s.cost(1, 1.0) == pytest.approx(COST_SAFETY * 10.0)
    later = COST_MEMORY_S + 1.0
    assert s.cost(1, later) == pytest.approx(COST_SAFETY * 0.15)
    assert s.plan([window(0, later)], later) == ([], [window(0, later)])


def test_scheduler_merges_only_when_lagging():
    s = DeadlineScheduler(max_latency=0.5, max_merge=2)
    now = 100.0
    s.observe(0.05, 0.2, 1, now=now)  # cost(1) = 0.2875 s < a 0.3 s window; cost(2) = 0.345 s
    w0, w1 = window(0, now - 0.1), window(1, now)
    drop, take = s.plan([w0, w1], now)  # one by one w1 would finish at +0.575 > its +0.5 deadline
    assert drop == [] and take == [w0, w1]
    relaxed = DeadlineScheduler(max_latency=2.0, max_merge=2)
    relaxed.observe(0.05, 0.2, 1, now=now)
    assert relaxed.plan([w0, w1], now) == ([], [w0])  # keeping up: no merge, captions match offline
    slow = DeadlineScheduler(max_latency=2.0, max_merge=3)
    slow.observe(0.05, 0.5, 1, now=now)  # one caption (0.63 s) outlasts a 0.3 s window: merge
    assert slow.plan([w0, w1], now) == ([], [w0, w1])


def test_scheduler_offline_never_drops_and_counts():
    s = DeadlineScheduler(max_latency=None)
    s.observe(10.0, 10.0, 1, now=0.0)
    ws = [window(i, 0.0) for i in range(3)]
    assert s.plan(ws, 1e9) == ([], ws[:1])
    latency = s.record_caption(ws[:2], 5.0)
    s.record_drops(ws[2:], overflow=True)
    assert latency == 5.0 and s.stats.as_dict()["merged"] == 1 and s.stats.dropped_overflow == 1
    with pytest.raises(ValueError, match="max_latency"):
        DeadlineScheduler(max_latency=0)


# -- writers --------------------------------------------------------------------------------------


def test_srt_vtt_jsonl_round_trip(tmp_path):
    cues = [(0.0, 2.5, "a red circle"), (2.5, 3661.001, "two lines\nsecond --> line"), (3661.001, 3662, "")]
    paths = {k: tmp_path / f"c.{k}" for k in ("srt", "vtt", "jsonl")}
    writers = [SrtWriter(paths["srt"]), VttWriter(paths["vtt"]), JsonlWriter(paths["jsonl"])]
    for start, end, text in cues:
        for w in writers:
            w.write(start, end, text, {"latency": 0.1})
    # files are complete after every write, before close (flushed and fsynced per caption)
    for parse, p in ((parse_srt, paths["srt"]), (parse_vtt, paths["vtt"])):
        got = parse(p)
        assert [(c.start, c.end) for c in got] == [(s, e) for s, e, _ in cues]
        assert got[0].text == "a red circle" and got[1].text == "two lines\nsecond -> line"
        assert got[2].text == "..."  # an empty caption still makes a valid cue
    rows = parse_jsonl(paths["jsonl"])
    assert [r["text"] for r in rows] == [t for *_, t in cues] and rows[0]["latency"] == 0.1
    for w in writers:
        w.close()


def test_parsers_reject_truncated_and_malformed(tmp_path):
    p = tmp_path / "x.srt"
    w = SrtWriter(p)
    w.write(0, 1, "hello")
    w.close()
    p.write_text(p.read_text()[:-3])
    with pytest.raises(ValueError, match="x.srt"):
        parse_srt(p)
    p.write_text("1\n00:00:01,000 --> 00:00:00,500\nbackwards\n\n")
    with pytest.raises(ValueError, match="before it starts"):
        parse_srt(p)
    v = tmp_path / "x.vtt"
    v.write_text("00:00:00.000 --> 00:00:01.000\nno header\n\n")
    with pytest.raises(ValueError, match="WEBVTT"):
        parse_vtt(v)
