"""benchmarks/probe_temporal.py: the events that decide each temporal question, and the window split."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from benchmarks.probe_temporal import breakdown, deciding_events, main
from training.synth.scene import SceneOptions, make_scene
from training.synth.tasks import printed_phrase, temporal_questions


def _answer_of(template: str, a: dict, b: dict) -> str:
    """What the template's answer names, from its two deciding events (a before b)."""
    return {"visual_after_sound": printed_phrase(b["what"]) if b["kind"] == "text" else b["what"],
            "word_after_sound": b["what"], "sound_after_visual": b["what"], "last_sound": b["what"],
            "first_sound": a["what"], "which_first": f"the {a['what']}"}[template]


def test_deciding_events_give_every_generated_answer():
    """On generated scenes, every (question, answer) of every template is decided by two events in time
    order, and the answer names the one the template says (the later for 'after' / 'last', else the earlier)."""
    seen = set()
    for index in range(25):
        scene = make_scene(3, "heldout", index, SceneOptions())
        events = scene.event_list()
        for template, pairs in temporal_questions(scene).items():
            for question, answer in pairs:
                a, b = deciding_events(template, question, events)
                assert a["t"] < b["t"], (question, a, b)
                assert answer.endswith(_answer_of(template, a, b)), (question, answer, a, b)
                seen.add(template)
    assert seen == {"visual_after_sound", "word_after_sound", "sound_after_visual", "which_first",
                    "first_sound", "last_sound"}


def test_unknown_template_and_unnamed_event_are_errors():
    events = [{"t": 0.5, "kind": "sound", "what": "chime"}, {"t": 1.5, "kind": "appear", "what": "red circle"}]
    with pytest.raises(ValueError, match="unknown temporal template"):
        deciding_events("colour_of", "What colour?", events)
    with pytest.raises(ValueError, match="0 events named 'beep'"):
        deciding_events("visual_after_sound", "What appeared after the beep?", events)


def _row(i: int, t_sound: float, t_shape: float) -> dict:
    return {"id": f"c{i}", "conversation": [{"value": "What appeared after the chime?"}],
            "meta": {"template": "visual_after_sound",
                     "events": [{"t": t_sound, "kind": "sound", "what": "chime"},
                                {"t": t_shape, "kind": "appear", "what": "red circle"}]}}


def test_breakdown_splits_by_window_and_gap():
    """Three hand-made questions with 5-s windows: two decided inside one window (one right), one across
    windows (right); the gaps 0.8, 1.5 and 2.5 s land in three buckets."""
    rows = {r["id"]: r for r in (_row(0, 1.0, 1.8), _row(1, 2.0, 3.5), _row(2, 4.0, 6.5))}
    records = [{"id": "c0", "task": "temporal_qa", "prediction": "the red circle", "reference": "red circle"},
               {"id": "c1", "task": "temporal_qa", "prediction": "the number two", "reference": "red circle"},
               {"id": "c2", "task": "temporal_qa", "prediction": "red circle", "reference": "red circle"},
               {"id": "c2", "task": "av_matching", "prediction": "yes", "reference": "yes"}]
    out = breakdown(records, rows, window_seconds=5.0)
    assert out["all"]["all"] == [2, 3]
    assert out["window"]["one window"] == [1, 2] and out["window"]["two windows"] == [1, 1]
    assert out["gap"] == {"0-1 s": [1, 1], "1-2 s": [0, 1], ">= 2 s": [1, 1]}


def test_cli_prints_a_table(tmp_path):
    manifest, preds = tmp_path / "heldout.jsonl", tmp_path / "run" / "predictions.jsonl"
    preds.parent.mkdir()
    manifest.write_text(json.dumps(_row(0, 1.0, 6.0)) + "\n")
    preds.write_text(json.dumps({"id": "c0", "task": "temporal_qa", "prediction": "a red circle",
                                 "reference": "red circle"}) + "\n")
    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, [str(preds), "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    assert "| window | two windows | 1 / 1 (100 %) |" in result.output
    # events at 1.0 and 6.0 s share one 10-s window (20 frames at 2 FPS)
    result = CliRunner().invoke(app, [str(preds), "--manifest", str(manifest), "--frames-per-window", "20"])
    assert result.exit_code == 0, result.output
    assert "(10-s windows" in result.output and "| window | one window | 1 / 1 (100 %) |" in result.output
