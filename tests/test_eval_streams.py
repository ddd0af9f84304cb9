"""favor-eval streams: the demo clip test over held-out long clips (training/eval/streams.py)."""

from __future__ import annotations

import itertools
import json

import pytest
from typer.testing import CliRunner

from training.eval import streams as S
from training.eval.cli import app
from training.eval.grounding import objects_in_window


def test_scores_count_cues_and_clips(tmp_path, monkeypatch):
    """Hand-made cues over two held-out long clips: clip 0's cues name one object on screen each, clip 1's
    first cue names an object the clip never shows."""
    scenes = [S.long_clip(i, tmp_path)[0] for i in range(2)]
    present = [sorted(objects_in_window(s.event_list(), 0.0, s.duration)) for s in scenes]
    shown = {(c, s) for p in present for c, s in p}
    missing = next(f"{c} {s}" for c in ("red", "blue", "green", "white") for s in ("circle", "square", "triangle")
                   if (c, s) not in shown)

    def fake(backend, path, prompt, max_new_tokens, context):
        scene = scenes[0] if path.name == f"{scenes[0].clip_id}.mp4" else scenes[1]
        first = "A {} {} appears.".format(*present[0][0]) if scene is scenes[0] else f"A {missing} appears."
        return [{"start": 0.0, "end": scene.duration, "text": first},
                {"start": 0.0, "end": scene.duration, "text": "A chime sounds."}]

    monkeypatch.setattr(S, "stream_cues", fake)
    scores, records = S.score_streams(None, 2, tmp_path, "q", 32, 1, frame_period_s=0.5)
    assert (scores.clips, scores.cues, scores.objects_named) == (2, 4, 2)
    # events: clip 0's appearance is right; its chime is right only if clip 0 plays one (same for clip 1)
    chimes = [any(e["kind"] == "sound" and e["what"] == "chime" for e in s.event_list()) for s in scenes]
    assert scores.events_asserted == 4 and scores.event_precision == (1 + sum(chimes)) / 4
    assert scores.events_true == sum(len(s.event_list()) + sum("source" in e for e in s.event_list())
                                     for s in scenes)
    assert scores.cues_grounded == 3 / 4 and scores.clips_grounded == 1 / 2 and scores.object_precision == 1 / 2
    assert records[1]["cues"][0]["absent"] == [missing]


@pytest.mark.slow
def test_cli_streams_a_tiny_model(tiny_ckpt, tmp_path):
    out = tmp_path / "streams.json"
    res = CliRunner().invoke(app, ["streams", str(tiny_ckpt), "-n", "1", "--clip-dir", str(tmp_path / "clips"),
                                   "--max-new-tokens", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    cues = report["clips"][0]["cues"]
    clip = next((tmp_path / "clips").glob("heldout-long-000000.mp4"))
    assert clip.is_file() and report["scores"]["cues"] == len(cues) > 0
    # the cues tile the stream: each window starts where the last ended, from 0 to the clip's end
    assert cues[0]["start"] == 0.0 and all(a["end"] == b["start"] for a, b in itertools.pairwise(cues))
    assert "1 clips" in res.output and "events: precision" in res.output
    assert report["scores"]["events_true"] > 0  # the clip's scene events are the recall's denominator
