"""training/eval/cue_events.py: event precision and recall of stream cues, on hand-made cues with known answers."""

from __future__ import annotations

import pytest

from training.eval.cue_events import asserted_events, scene_events, score_cues
from training.synth.scene import SceneOptions, make_scene
from training.synth.tasks import caption

FRAME_S = 0.5  # one frame period at 2 FPS: the tolerance favor-eval streams uses for the demo model

EVENTS = [  # one 5-s stretch of a scene: what the cues below are scored against
    {"t": 0.7, "kind": "speech", "what": "eight"},
    {"t": 1.9, "kind": "appear", "what": "purple square"},
    {"t": 2.3, "kind": "sound", "what": "chime", "source": "purple square"},  # also pulses the square
    {"t": 3.0, "kind": "text", "what": "5"},
    {"t": 4.1, "kind": "disappear", "what": "purple square"},
]


def test_each_clause_of_the_grammar_asserts_its_event():
    text = ("A red circle appears, then the blue square disappears, then the green triangle pulses with a "
            "low tone, then a beep sounds, then the word four is spoken, then the number 5 is shown.")
    assert asserted_events(text) == {("appear", "red circle"), ("disappear", "blue square"),
                                     ("pulse", "green triangle"), ("sound", "low tone"), ("sound", "beep"),
                                     ("speech", "four"), ("text", "5")}


def test_a_repeated_clause_is_one_assertion_and_nothing_new_asserts_nothing():
    assert asserted_events("The word eight is spoken, then the word eight is spoken.") == {("speech", "eight")}
    assert asserted_events("Nothing new happens.") == frozenset()
    # an object with no event verb ("is on screen") asserts no event, a printed word that "appears" is text
    assert asserted_events("The red circle is on screen, then the word go appears.") == {("text", "go")}


def test_a_sound_with_a_source_is_also_a_pulse():
    assert scene_events(EVENTS[2:3]) == [(2.3, ("sound", "chime")), (2.3, ("pulse", "purple square"))]
    with pytest.raises(ValueError, match="kind"):
        scene_events([{"t": 0.0, "kind": "explode", "what": "red circle"}])


def test_precision_and_recall_of_two_cues():
    cues = [(0.0, 2.5, "The word eight is spoken, then a purple square appears, then the purple square "
                       "disappears."),  # right, right, wrong (it disappears at 4.1: not within 2.5 + 0.5)
            (2.5, 5.0, "The purple square pulses with a beep.")]  # the pulse at 2.3 is within 0.5 s; beep wrong
    s = score_cues(cues, EVENTS, FRAME_S).scores()
    assert (s["events_asserted"], s["events_true"]) == (5, 6)
    assert s["event_precision"] == pytest.approx(3 / 5)  # eight, appear, pulse
    assert s["event_recall"] == pytest.approx(3 / 6)  # eight, appear, pulse; missed: chime, 5, disappear
    kinds = s["per_kind"]
    assert kinds["disappear"] == {"precision": 0.0, "recall": 0.0, "asserted": 1, "true": 1}
    assert kinds["sound"]["precision"] == 0.0 and kinds["text"]["precision"] is None


def test_the_tolerance_is_what_lets_a_neighbour_claim_an_event():
    cue = [(2.5, 5.0, "The purple square pulses with a chime.")]  # the pulse is at 2.3 s
    assert score_cues(cue, EVENTS, FRAME_S).scores()["event_precision"] == 1.0
    assert score_cues(cue, EVENTS, 0.0).scores()["event_precision"] == 0.0


def test_the_reference_captions_of_a_scene_score_perfectly():
    """The world's own caption of each window (tasks.caption) is every event of that window, nothing else."""
    scene = make_scene(3, "heldout", 7, SceneOptions(min_seconds=12.0, max_seconds=12.0))
    spans = [(k * 2.5, min((k + 1) * 2.5, scene.duration)) for k in range(5)]
    cues = [(a, b, caption(scene, a, b)) for a, b in spans]
    s = score_cues(cues, scene.event_list(), 0.0).scores()
    assert s["events_true"] > 0 and s["event_precision"] == 1.0 and s["event_recall"] == 1.0
