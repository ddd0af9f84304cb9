"""Long scenes cut on the runtime's window grid: stream_caption samples, asked as favor-rt asks.

favor-rt captions a stream one window at a time (the model's TimingConfig.window_seconds: 5 s by default,
2.5 s for the demo model; ``window_s`` below, `favor-train synth --windows --window-seconds`), asking CAPTION_PROMPT
with the caption of the window before as an earlier turn (favor.prompt.stream_prompt). The clip tasks never
show that: every clip starts empty and is captioned whole, so a mid-stream window -- objects already on
screen, a caption before it -- is unlike anything trained (the session-5 demo model names objects that
"appear" although they were there all along, and mixes up their colours and shapes there).

A long scene (2 windows to the demo clip's length) is rendered once and cut into windows; each window is
its own mp4 and one sample (pure functions here, the files in generate.py):

    question   stream_prompt(CAPTION_PROMPT, [the window before's reference caption])   (bare for the first)
    answer     tasks.caption of the events with onsets inside the window (NOTHING_NEW when none)
    meta       prompt and previous, the parts of the question (training rebuilds it, maybe with another
               context: training/pairing.py), and the window's own timeline: events shifted to the
               window's start; objects already on screen at the start appear at t = 0 (they are seen
               throughout); a sound already playing is left out (its onset lies before the window)
"""

from __future__ import annotations

import math

from favor.config import WHOLE_EPS, TimingConfig
from favor.prompt import CAPTION_PROMPT, stream_prompt

from .scene import Scene, SceneOptions
from .tasks import caption

TASK = "stream_caption"
WINDOW_SECONDS = TimingConfig().window_seconds  # 5 s: the runtime's window (10 frames at 2 FPS)
LONG_SECONDS = (2 * WINDOW_SECONDS, 20.0)  # s: at least two windows, at most the demo clip's length
LONG_OPTIONS = SceneOptions(min_seconds=LONG_SECONDS[0], max_seconds=LONG_SECONDS[1])  # otherwise the defaults


def window_spans(scene: Scene, window_s: float = WINDOW_SECONDS) -> list[tuple[float, float]]:
    """[start, end) s of each window the runtime would caption (``window_s``: the model's frames_per_window /
    video_fps, 2.5 s for the demo model); the last may be short, as at a stream's end."""
    n = math.ceil(scene.duration / window_s - WHOLE_EPS)
    return [(k * window_s, min((k + 1) * window_s, scene.duration)) for k in range(n)]


def window_events(scene: Scene, start: float, end: float) -> list[dict]:
    """The window's timeline in the manifest's event format (module docstring), times from its start."""
    on_screen = [scene.shapes[i].name for i in scene.visible(start) if scene.shapes[i].start < start]
    out = [{"t": 0.0, "kind": "appear", "what": name} for name in on_screen]
    return out + [{**e, "t": round(e["t"] - start, 6)} for e in scene.event_list() if start <= e["t"] < end]


def window_questions(captions: list[str]) -> list[str]:
    """Each window's question: the caption prompt, with the window before's caption as context."""
    return [stream_prompt(CAPTION_PROMPT, captions[k - 1:k]) for k in range(len(captions))]


def window_samples(scene: Scene, videos: list[str], window_s: float = WINDOW_SECONDS) -> list[dict]:
    """One stream_caption manifest row per window; ``videos``: each window's manifest-relative mp4."""
    spans = window_spans(scene, window_s)
    if len(videos) != len(spans):
        raise ValueError(f"{scene.clip_id}: {len(videos)} window files for {len(spans)} windows")
    answers = [caption(scene, start, end) for start, end in spans]
    rows = []
    for k, ((start, end), video, question) in enumerate(zip(spans, videos, window_questions(answers), strict=True)):
        rows.append({
            "id": f"{scene.clip_id}-w{k}-{TASK}", "task": TASK, "video": video, "audio": video, "image": None,
            "conversation": [{"from": "human", "value": question}, {"from": "gpt", "value": answers[k]}],
            "meta": {"seed": scene.seed, "split": scene.split, "clip": scene.index, "clip_id": scene.clip_id,
                     "window": k, "window_start": round(start, 6), "duration": round(end - start, 6),
                     "prompt": CAPTION_PROMPT, "previous": answers[k - 1:k],
                     "events": window_events(scene, start, end), "answer_type": "sentence"},
        })
    return rows
