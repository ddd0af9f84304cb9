"""Stream grounding: the demo clip test (tests/test_demo_grounding.py) on many held-out long clips.

`favor-eval streams MODEL` writes held-out long scenes (training/synth/windows.py's seed stream, never
trained on: the heldout split) as whole mp4 clips, captions each through favor-rt's own stream loop
(runtime.stream.StreamingCaptioner: one window at a time, the model's previous caption as context, its
default prompt and token budget, offline pacing so nothing is dropped), and checks every cue against the
objects its window shows (grounding.check_cues). The teacher-forced `favor-eval run` on
heldout_windows.jsonl gives each window the reference caption before it; this gives it the model's own,
as a user sees it.

Reported: cues grounded (every object named is on screen), clips whose cues are all grounded (what the
demo clip test asks of one clip), object precision over all cues, and whether the cues say what happened:
event precision and recall (cue_events.py: appearances, disappearances, pulses, sounds, words spoken and
shown, each within its cue's window give or take one frame period).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from training.eval.cue_events import EventCounts, score_cues
from training.eval.grounding import check_cues
from training.synth.scene import make_scene
from training.synth.windows import LONG_OPTIONS


@dataclass(frozen=True)
class StreamScores:
    clips: int
    cues: int
    cues_grounded: float  # share of cues naming only objects on screen in their window
    clips_grounded: float  # share of clips all of whose cues are grounded
    objects_named: int
    object_precision: float | None  # named objects on screen / named objects, over all cues (None: none named)
    event_precision: float | None  # asserted events that happened in the cue's window (cue_events.py)
    event_recall: float | None  # scene events some cue of their window asserts
    events_asserted: int
    events_true: int
    per_kind: dict  # kind -> {precision, recall, asserted, true}

    def to_dict(self) -> dict:
        return asdict(self)


def long_clip(index: int, clip_dir: Path, seed: int = 0):
    """Held-out long scene ``index`` and its whole mp4 under ``clip_dir`` (written once)."""
    from favor.fileio import atomic_write
    from training.synth.render import render_audio, render_video
    from training.synth.speech import SpeechBank
    from training.synth.write import write_mp4

    scene = make_scene(seed, "heldout", index, LONG_OPTIONS, long=True)
    path = clip_dir / f"{scene.clip_id}.mp4"
    if not path.is_file():  # atomic: an interrupted run never leaves a half clip to be reused
        frames, audio = render_video(scene), render_audio(scene, SpeechBank())
        atomic_write(path, lambda tmp: write_mp4(tmp, frames, audio, scene.fps, scene.sample_rate))
    return scene, path


def stream_cues(backend, path: Path, prompt: str, max_new_tokens: int, context: int) -> list:
    """favor-rt run PATH --offline's captions, through the runtime's stream loop."""
    from runtime.scheduler import DeadlineScheduler
    from runtime.sources import MediaSource
    from runtime.stream import StreamingCaptioner

    cap = StreamingCaptioner(backend, prompt, max_new_tokens, context, incremental=True)
    out: list = []
    report = cap.run(MediaSource(str(path), backend.cfg.timing.sample_rate), False, DeadlineScheduler(None, 1),
                     out.append)
    if report.error is not None:
        raise report.error
    return out


def score_streams(backend, num_clips: int, clip_dir: Path, prompt: str, max_new_tokens: int, context: int,
                  progress: Callable[[int, int], None] | None = None, frame_period_s: float | None = None
                  ) -> tuple[StreamScores, list[dict]]:
    """Scores over the first ``num_clips`` held-out long clips, and one record per clip (its cues).
    ``frame_period_s``: the event tolerance (cue_events.py); default one frame at the model's rate."""
    records, cues, grounded_cues, grounded_clips, named, absent = [], 0, 0, 0, 0, 0
    events = EventCounts()
    tolerance_s = frame_period_s if frame_period_s is not None else 1 / backend.cfg.timing.video_fps
    for i in range(num_clips):
        scene, path = long_clip(i, clip_dir)
        checks = check_cues(stream_cues(backend, path, prompt, max_new_tokens, context), scene)
        events += score_cues([(c.start, c.end, c.text) for c in checks], scene.event_list(), tolerance_s)
        cues += len(checks)
        grounded_cues += sum(c.grounded for c in checks)
        grounded_clips += all(c.grounded for c in checks)
        named += sum(len(c.named) for c in checks)
        absent += sum(len(c.absent) for c in checks)
        records.append({"clip": scene.clip_id, "events": scene.event_list(),
                        "cues": [{"start": c.start, "end": c.end, "text": c.text,
                                  "absent": [" ".join(o) for o in c.absent]} for c in checks]})
        if progress is not None:
            progress(i + 1, num_clips)
    ev = events.scores()
    scores = StreamScores(num_clips, cues, grounded_cues / max(cues, 1), grounded_clips / num_clips, named,
                          (named - absent) / named if named else None, ev["event_precision"],
                          ev["event_recall"], ev["events_asserted"], ev["events_true"], ev["per_kind"])
    return scores, records
