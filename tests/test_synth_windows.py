"""Long scenes cut on the runtime's window grid (training/synth/windows.py): spans, per-window captions and
timelines, the question the runtime asks, and the written window clips."""

from __future__ import annotations

import json
import math

import av
import numpy as np
import pytest

from favor.config import WHOLE_EPS
from favor.prompt import CAPTION_PROMPT, stream_prompt
from training.eval.grounding import check_cues, objects_in_window
from training.synth import generate_windows, load_manifest, make_scene
from training.synth.render import render_video
from training.synth.scene import Event, Scene, Shape, Sound, Speech, Text
from training.synth.tasks import NOTHING_NEW, caption
from training.synth.windows import (
    LONG_OPTIONS,
    LONG_SECONDS,
    TASK,
    WINDOW_SECONDS,
    window_events,
    window_samples,
    window_spans,
)

# Mean |decoded - rendered| in 8-bit levels: H.264 at crf 18 costs ~2 (tests/test_demo_grounding.py); another
# window of the same scene differs far more, so 5 tells the right crop from a wrong one.
MAX_MEAN_PIXEL_ERROR = 5.0


def long_hand_scene() -> Scene:
    """12 s, windows [0, 5), [5, 10), [10, 12): a red circle 1-11 s (pulses with a chime at 6 s), an orange
    square 4.5-5.0 s (gone exactly at the second window's start), '7' printed at 5.0 s, 'seven' spoken at 7 s,
    nothing starting after 10 s but the circle leaving at 11 s."""
    circle = Shape("circle", "red", 1.0, 11.0, (20, 20, 60, 60), 40, 40, 0, 0, 15)
    square = Shape("square", "orange", 4.5, 5.0, (100, 20, 140, 60), 120, 40, 0, 0, 15)
    events = (Event(1.0, "appear", 0), Event(4.5, "appear", 1), Event(5.0, "disappear", 1),
              Event(5.0, "text", 0), Event(6.0, "sound", 0), Event(7.0, "speech", 0), Event(11.0, "disappear", 0))
    return Scene(
        clip_id="train-long-000000", split="train", seed=0, index=0, duration=12.0, num_frames=120, width=160,
        height=160, fps=10.0, sample_rate=16_000, channels=1, pan=0.5, background=(20, 20, 20),
        noise_level=0.0, noise_seed=0, shapes=(circle, square), texts=(Text("7", 5.0, 6.5, 130, 20, 3),),
        sounds=(Sound("chime", 6.0, 0.5, 0, None, 1.0, 0.5),), speech=(Speech("seven", 7.0, "en-us", 175, 0.7),),
        events=events)


def test_windows_follow_the_runtime_grid():
    assert WINDOW_SECONDS == 5.0  # 10 frames at 2 FPS (favor.config.TimingConfig)
    assert window_spans(long_hand_scene()) == [(0.0, 5.0), (5.0, 10.0), (10.0, 12.0)]


def test_window_captions_hold_the_events_that_start_inside():
    scene = long_hand_scene()
    assert caption(scene, 0.0, 5.0) == "A red circle appears, then an orange square appears."
    # the square leaves exactly at 5.0 s: its disappearance belongs to the second window
    assert caption(scene, 5.0, 10.0) == ("The orange square disappears, then the number seven is shown, then the "
                                         "red circle pulses with a chime, then the word seven is spoken.")
    assert caption(scene, 10.0, 12.0) == "The red circle disappears."
    assert caption(scene, 11.5, 12.0) == NOTHING_NEW
    assert caption(scene) == caption(scene, 0.0, 12.0)  # the whole clip, as before


def test_window_timelines_start_with_what_is_on_screen():
    scene = long_hand_scene()
    second = window_events(scene, 5.0, 10.0)
    # the circle is on screen from the window's first instant; the square leaves at that instant
    assert second[0] == {"t": 0.0, "kind": "appear", "what": "red circle"}
    assert [(e["t"], e["kind"], e["what"]) for e in second[1:]] == [
        (0.0, "disappear", "orange square"), (0.0, "text", "7"), (1.0, "sound", "chime"), (2.0, "speech", "seven")]
    assert second[3]["source"] == "red circle"
    assert objects_in_window(second, 0.0, 5.0) == {("red", "circle")}
    # an object appearing exactly at the window start is listed once, at its own event
    assert [e["what"] for e in window_events(scene, 4.5, 9.5) if e["kind"] == "appear"] == ["red circle",
                                                                                           "orange square"]


def test_questions_carry_the_previous_reference_caption():
    scene = long_hand_scene()
    rows = window_samples(scene, ["w0.mp4", "w1.mp4", "w2.mp4"])
    answers = [r["conversation"][1]["value"] for r in rows]
    assert rows[0]["conversation"][0]["value"] == CAPTION_PROMPT
    for k in (1, 2):
        assert rows[k]["conversation"][0]["value"] == stream_prompt(CAPTION_PROMPT, [answers[k - 1]])
        assert answers[k - 1] in rows[k]["conversation"][0]["value"]
    for row in rows:  # ... and its parts, from which training rebuilds it (training/pairing.py)
        meta = row["meta"]
        assert stream_prompt(meta["prompt"], meta["previous"]) == row["conversation"][0]["value"]
    assert [r["meta"]["previous"] for r in rows] == [[], answers[:1], answers[1:2]]
    assert [r["meta"]["duration"] for r in rows] == [5.0, 5.0, 2.0]
    assert {r["task"] for r in rows} == {TASK} and rows[2]["video"] == rows[2]["audio"] == "w2.mp4"
    with pytest.raises(ValueError, match="2 window files for 3 windows"):
        window_samples(scene, ["w0.mp4", "w1.mp4"])


def test_the_runtime_asks_the_same_question():
    """The stream's prompt with one caption of context is the training question (favor.prompt, written once)."""
    from favor.config import get_config
    from runtime.stream import StreamingCaptioner

    class Backend:  # only what the captioner's constructor and llm_prompt touch
        cfg = get_config("demo")

        def set_instruction(self, prompt):
            self.instruction = prompt

    cap = StreamingCaptioner(Backend(), CAPTION_PROMPT, 32, 1)
    assert cap.llm_prompt() == CAPTION_PROMPT
    cap.history = ["A red circle appears."]
    assert cap.llm_prompt() == stream_prompt(CAPTION_PROMPT, ["A red circle appears."])


def test_long_scenes_have_their_own_seed_stream():
    clip, long = make_scene(0, "train", 3, LONG_OPTIONS), make_scene(0, "train", 3, LONG_OPTIONS, long=True)
    assert long.clip_id == "train-long-000003" and clip.clip_id == "train-000003"
    assert long.events != clip.events and LONG_SECONDS[0] <= long.duration <= LONG_SECONDS[1]


def test_generated_windows_are_the_long_render_cut(tmp_path):
    manifest = generate_windows(tmp_path, 2, 0, "heldout", speech_cache=tmp_path / "speech")
    rows = load_manifest(manifest)  # validates schema and files
    assert manifest.name == "heldout_windows.jsonl"
    for index in (0, 1):
        scene = make_scene(0, "heldout", index, LONG_OPTIONS, long=True)
        mine = [r for r in rows if r["meta"]["clip"] == index]
        assert [r["meta"]["window"] for r in mine] == list(range(len(window_spans(scene))))
        frames = render_video(scene)  # [T, H, W, 3]
        for r, (start, end) in zip(mine, window_spans(scene), strict=True):
            with av.open(str(tmp_path / r["video"])) as c:
                decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
            crop = frames[round(start * scene.fps):round(end * scene.fps)]
            assert decoded.shape == crop.shape
            assert np.abs(decoded.astype(np.int16) - crop.astype(np.int16)).mean() < MAX_MEAN_PIXEL_ERROR
            # every object named by the reference is on screen in the window (what the demo clip test asks)
            cue = {"start": 0.0, "end": end - start, "text": r["conversation"][1]["value"]}
            assert check_cues([cue], r["meta"]["events"])[0].grounded


def test_windows_of_the_demo_models_length(tmp_path):
    """2.5-s windows (the demo model's 5 frames at 2 FPS): the same long scene, twice as many cuts, each
    window's reference holding exactly the events with onsets inside it."""
    manifest = generate_windows(tmp_path, 1, 0, "heldout", speech_cache=tmp_path / "speech", window_seconds=2.5)
    rows = load_manifest(manifest)
    scene = make_scene(0, "heldout", 0, LONG_OPTIONS, long=True)
    spans = window_spans(scene, 2.5)
    assert len(rows) == len(spans) == math.ceil(scene.duration / 2.5 - WHOLE_EPS)
    assert [r["meta"]["window_start"] for r in rows] == [a for a, _ in spans]
    assert all(r["conversation"][1]["value"] == caption(scene, a, b) for r, (a, b) in zip(rows, spans, strict=True))
    assert json.loads((tmp_path / "heldout_windows.json").read_text())["window_seconds"] == 2.5
    with pytest.raises(ValueError, match="whole number of model frames"):
        generate_windows(tmp_path, 1, 0, "heldout", speech_cache=tmp_path / "speech", window_seconds=1.2)


def test_cli_window_seconds_needs_windows(tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    res = CliRunner().invoke(app, ["synth", str(tmp_path), "-n", "1", "--window-seconds", "2.5"])
    assert res.exit_code != 0 and "needs --windows" in res.output
