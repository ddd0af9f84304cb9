"""``favor-rt run`` end to end on the tiny model: outputs parse back, awkward and broken inputs give
clear messages and the right exit codes, a lavfi source stands in for a camera, and SIGINT mid-run
leaves a valid SRT holding every caption printed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import sigint_at_default
from typer.testing import CliRunner

from favor.config import get_config
from runtime.cli import EXIT_INTERRUPTED, EXIT_USAGE, app
from runtime.synthclip import write_clip
from runtime.writers import parse_jsonl, parse_srt, parse_vtt

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 0.3  # tiny preset: 3 frames per window at 10 FPS


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    before = torch.get_num_threads()  # `run --threads 1` in-process sets it for the whole process
    yield
    torch.set_num_threads(before)


def cli(ckpt, *args):
    # torch: these tests are about the CLI, not the compiled path (tests/test_bundle_cache.py runs that)
    result = CliRunner().invoke(app, ["run", "--backend", "torch", *map(str, args), "--model", str(ckpt),
                                      "--no-live", "--threads", "1", "--max-new-tokens", "3"])
    return result


def test_offline_run_writes_outputs_that_parse_back(tiny_ckpt, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 1.5, sample_rate=22_050, channels=2)
    out = {k: tmp_path / f"out.{k}" for k in ("srt", "vtt", "jsonl")}
    r = cli(tiny_ckpt, clip, "--offline", "--srt", out["srt"], "--vtt", out["vtt"], "--jsonl", out["jsonl"])
    assert r.exit_code == 0, r.output
    srt, vtt, rows = parse_srt(out["srt"]), parse_vtt(out["vtt"]), parse_jsonl(out["jsonl"])
    # last frame at 1.48 s shows until 1.52 s: slots 0.0 .. 1.5 s = 16 slots, 3 per window -> 6
    assert len(srt) == len(vtt) == len(rows) == 6
    assert [(c.start, c.end) for c in srt] == [(c.start, c.end) for c in vtt]
    assert [c.start for c in srt[1:]] == [c.end for c in srt[:-1]]  # windows tile the stream
    assert srt[0].start == 0.0 and srt[-1].end == pytest.approx(1.6)
    assert [c.text for c in srt] == [r["text"] for r in rows]
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(printed) == len(srt)


@pytest.mark.parametrize("name, kwargs", [
    ("video_only.mp4", dict(audio=False)),
    ("audio_only_44k_5.1.wav", dict(video=False, sample_rate=44_100, channels=6)),
    ("vfr_22k_stereo.mkv", dict(vfr=True, sample_rate=22_050, channels=2)),
    ("odd_11k_5.1.mkv", dict(sample_rate=11_025, channels=6, fps=7.0)),
])
def test_awkward_inputs_are_captioned(tiny_ckpt, tmp_path, name, kwargs):
    clip = write_clip(tmp_path / name, 1.2, **kwargs)
    srt = tmp_path / "out.srt"
    r = cli(tiny_ckpt, clip, "--offline", "--srt", srt)
    assert r.exit_code == 0, r.output
    cues = parse_srt(srt)
    # 12 slots, plus a 13th when the last frame is still on screen at 1.2 s (container-dependent)
    assert len(cues) in (4, 5) and cues[-1].end == pytest.approx(1.2, abs=WINDOW_S)
    assert [c.start for c in cues[1:]] == [c.end for c in cues[:-1]]


def test_lavfi_source_stands_in_for_a_live_camera(tiny_ckpt, tmp_path):
    graph = ("lavfi:testsrc=size=64x48:rate=15:duration=1.2[out0];"
             "sine=frequency=440:sample_rate=44100:duration=1.2[out1]")
    srt = tmp_path / "cam.srt"
    r = cli(tiny_ckpt, graph, "--realtime", "--max-latency", "5", "--srt", srt)
    assert r.exit_code == 0, r.output
    cues = parse_srt(srt)
    assert len(cues) >= 3 and "lavfi" in r.stderr


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such file"),
    # seeded noise: os.urandom's bytes now and then probe as a subtitle-only stream (another, also clear error)
    (lambda p: (p.write_bytes(random.Random(0).randbytes(4096)), p)[1], "cannot open"),
    (lambda p: (p.write_text("just some words\n" * 50), p)[1], "cannot open"),
])
def test_unusable_inputs_fail_with_one_clear_line(tiny_ckpt, tmp_path, make, message):
    bad = make(tmp_path / "bad.mp4")
    r = cli(tiny_ckpt, bad, "--offline")
    assert r.exit_code == EXIT_USAGE
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "bad.mp4" in lines[0]


def test_missing_model_is_a_usage_error(tmp_path):
    clip = write_clip(tmp_path / "c.mp4", 0.5)
    r = CliRunner().invoke(app, ["run", str(clip), "--model", str(tmp_path / "none.safetensors")])
    assert r.exit_code == EXIT_USAGE and "model not found" in r.stderr


def test_truncated_mp4_without_index_is_rejected(tiny_ckpt, tmp_path):
    clip = write_clip(tmp_path / "t.mp4", 1.5)
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 2])  # the moov index sits at the end: nothing is playable
    r = cli(tiny_ckpt, clip, "--offline")
    assert r.exit_code == EXIT_USAGE and "t.mp4" in r.stderr


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_stream_keeps_every_caption(tiny_ckpt, tmp_path, damage):
    clip = write_clip(tmp_path / "d.mkv", 2.0, sample_rate=16_000)
    data = bytearray(clip.read_bytes())
    if damage == "truncate":
        data = data[: int(len(data) * 0.6)]
    else:  # garbage in the middle of the stream
        mid = len(data) // 2
        data[mid: mid + 2000] = os.urandom(2000)
    clip.write_bytes(bytes(data))
    srt = tmp_path / "d.srt"
    r = cli(tiny_ckpt, clip, "--offline", "--srt", srt)
    assert r.exit_code in (0, 1), r.output  # 1 only if the demuxer gives up, with a message
    cues = parse_srt(srt)
    assert len(cues) >= 2
    printed = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(printed) == len(cues)


def test_sigint_mid_run_leaves_a_valid_srt(tiny_ckpt, tmp_path):
    clip = write_clip(tmp_path / "long.mp4", 30.0, fps=10.0)  # paced: would run for 30 s
    srt = tmp_path / "live.srt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "runtime", "run", str(clip), "--model", str(tiny_ckpt), "--backend", "torch",
           "--realtime",
           "--max-latency", "10", "--no-live", "--threads", "1", "--max-new-tokens", "3", "--srt", str(srt)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_at_default)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if srt.exists() and srt.read_text().count(" --> ") >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    cues = parse_srt(srt)
    printed = [ln for ln in stdout.splitlines() if ln.startswith("[")]
    assert len(cues) >= 3 and len(cues) == len(printed)
    assert cues[-1].end < 30.0 and "interrupted" in stderr


def test_bench_writes_table_csv_and_plot(tmp_path):
    import csv

    r = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--fps", "2,10", "--window", "3",
                                 "--seconds", "1.5", "--max-windows", "2", "--max-new-tokens", "2",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "bench_tiny.csv")))
    assert [(row["fps"], row["frames_per_window"]) for row in rows] == [("2", "3"), ("10", "3")]
    infeasible, ok = rows
    assert "position table" in infeasible["note"]  # 3 frames x 25 tokens at 2 FPS > 64 positions
    assert int(ok["windows"]) == 2 and float(ok["latency_p50_s"]) > 0 and float(ok["throughput_x"]) > 0
    assert float(ok["llm_input_tokens"]) > get_config("tiny").qformer.num_queries
    assert (tmp_path / "bench_tiny.png").stat().st_size > 0
    assert "| torch | 10 | 3 |" in (tmp_path / "bench_tiny.md").read_text()


def test_source_lost_mid_stream_exits_1_with_captions_kept(tiny_ckpt, tmp_path, monkeypatch):
    from runtime import sources

    real_iter = sources.MediaSource.__iter__

    def dies_after_a_second(self):  # a camera unplugged mid-run: the read fails
        for item in real_iter(self):
            if item.t > 1.0:
                raise sources.SourceError(f"{self.spec}: camera lost mid-stream (Input/output error)")
            yield item

    monkeypatch.setattr(sources.MediaSource, "__iter__", dies_after_a_second)
    clip = write_clip(tmp_path / "cam.mp4", 3.0)
    srt = tmp_path / "cam.srt"
    r = cli(tiny_ckpt, clip, "--offline", "--srt", srt)
    assert r.exit_code == 1
    assert "camera lost mid-stream" in r.stderr and "captions so far are saved" in r.stderr
    cues = parse_srt(srt)
    assert len(cues) == 3 and cues[-1].end <= 1.0 + 1e-9  # the windows completed before the loss


@pytest.mark.parametrize("backend, message", [("tensorrt", "not available"), ("cuda", "must be one of")])
def test_unavailable_backends_are_one_line_errors(tiny_ckpt, tmp_path, backend, message):
    clip = write_clip(tmp_path / "c.mp4", 0.5)
    r = cli(tiny_ckpt, clip, "--offline", "--backend", backend)
    assert r.exit_code == EXIT_USAGE
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0]


def test_an_interrupt_while_a_caption_is_written_waits_for_the_caption():
    """Ctrl-C landing between the SRT write and the terminal print must not split a caption: the
    signal is held until every output has it, then ends the run."""
    from runtime.cli import Interrupts

    interrupts, reached, before = Interrupts(), [], signal.getsignal(signal.SIGINT)
    with interrupts.installed(), pytest.raises(KeyboardInterrupt):
        with interrupts.atomic():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, between bytecodes
            reached.append("printed")
    assert reached == ["printed"]
    assert signal.getsignal(signal.SIGINT) == before  # the caller's handler is back after the run
