"""training/eval/grounding.py: hand-made answers with known grounding scores, the windowed check, and the
favor-eval integration (score_predictions, the tables, `favor-eval score` on a predictions file)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from training.eval import grounding as G
from training.eval.cli import app
from training.eval.runner import format_grounding_table, read_predictions, score_predictions
from training.synth.scene import make_scene
from training.synth.tasks import caption, sound_description, transcript


def ev(t, kind, what, **extra):
    return {"t": t, "kind": kind, "what": what, **extra}


# One clip's events, as a synthetic manifest's meta.events holds them.
EVENTS = [ev(0.2, "appear", "red circle"), ev(0.9, "speech", "four"), ev(1.5, "appear", "green triangle"),
          ev(2.0, "sound", "chime", source="red circle"), ev(2.8, "text", "5"), ev(3.4, "speech", "seven"),
          ev(4.0, "disappear", "red circle"), ev(4.6, "sound", "noise burst"), ev(5.2, "sound", "low tone"),
          ev(6.0, "speech", "red"), ev(6.8, "text", "stop")]


# ------------------------------------------------------------------------------------------- parsing


def test_parse_reads_the_reference_phrasings():
    m = G.parse_caption("A red circle appears, then an orange square appears, then the red circle pulses with a "
                        "chime, then the number seven is shown, then the word seven is spoken, then the orange "
                        "square disappears, then a noise burst sounds.")
    assert m == G.Mentions(objects=(("red", "circle"), ("orange", "square")), sounds=("chime", "noise burst"),
                           spoken=("seven",), printed=("7",))
    assert G.parse_caption("A chime, then a voice says seven, then a voice says the number 4.") == G.Mentions(
        objects=(), sounds=("chime",), spoken=("seven", "four"), printed=())


def test_parse_plurals_references_and_unknown_words():
    m = G.parse_caption("Two red circles appear, then the red circle pulses, then a pink hexagon and a red "
                        "moon appear, then beeps and low tones, then a tone, a noise and a bell.")
    assert m.objects == (("red", "circle"),)  # plural and "the" reference name one object; unknown nouns none
    assert m.sounds == ("beep", "low tone")  # bare "tone" / "noise" / "bell" are not sound events
    # A colour that is a spoken or printed word is not an object's colour.
    m = G.parse_caption("The word red is spoken, then a voice says blue, then the word green appears.")
    assert (m.objects, m.spoken, m.printed) == ((), ("red", "blue"), ("green",))
    # "says" with an unmarked unknown word names nothing; with a marker it names that (wrong) word.
    assert G.parse_caption("a voice says something").spoken == ()
    assert G.parse_caption("a voice says the word banana").spoken == ("banana",)
    assert G.parse_caption("").objects == G.parse_caption("").sounds == ()


# ------------------------------------------------------------------------------------- one answer's counts


def _scores(task, prediction, events=EVENTS):
    return G.summarise(task, G.score_record(task, prediction, events))


def test_object_precision_and_recall():
    # named: red circle (true), blue square (false); the red circle's three mentions count once
    s = _scores("av_caption", "A red circle appears, then the red circle pulses with a chime, then a blue "
                              "square appears, then the red circle disappears.")
    assert (s["object_precision"], s["object_recall"]) == (0.5, 0.5)
    assert (s["objects_named"], s["objects_true"]) == (2, 2)
    s = _scores("av_caption", "A green triangle appears, then a red circle appears.")
    assert (s["object_precision"], s["object_recall"]) == (1.0, 1.0)


def test_sound_precision_and_recall():
    # named: chime (true), beep (false, named twice), noise burst (true); true: chime, noise burst, low tone
    s = _scores("sound_description", "A chime, then a beep, then a beep, then a noise burst, then a bell.")
    assert s["sound_precision"] == pytest.approx(2 / 3) and s["sound_recall"] == pytest.approx(2 / 3)
    assert "object_precision" not in s and "printed_precision" not in s  # audio-only task


def test_empty_answer_names_nothing():
    s = _scores("av_caption", "")
    assert s["object_precision"] is s["sound_precision"] is s["printed_precision"] is None  # nothing named
    assert (s["object_recall"], s["sound_recall"], s["word_recall"]) == (0.0, 0.0, 0.0)
    assert s["word_accuracy"] == 0.0 and s["word_precision"] is None  # 3 deletions of 3 words


def test_spoken_word_accuracy():
    # truth in time order: four seven red. Named: four seven blue red -> H 3, I 1.
    s = _scores("sound_description", "A voice says four, then the word seven is spoken, then a voice says blue, "
                                     "then a voice says red.")
    assert s["word_accuracy"] == pytest.approx(2 / 3) and s["word_recall"] == 1.0
    assert s["word_precision"] == pytest.approx(3 / 4) and (s["words_named"], s["words_true"]) == (4, 3)
    s = _scores("sound_description", "A voice says seven, then a voice says four.")  # one word, wrong order
    assert s["word_accuracy"] == pytest.approx(1 / 3)  # best alignment: delete four, seven hit, sub red->four
    # ASR: the whole answer is the transcript, its accuracy is 1 - the WER rule's score
    s = _scores("asr", "Four, seven.")
    assert (s["word_accuracy"], s["word_recall"], s["word_precision"]) == (pytest.approx(2 / 3),
                                                                           pytest.approx(2 / 3), 1.0)
    assert _scores("asr", "four seven red red red red red")["word_accuracy"] == pytest.approx(-1 / 3)  # 4 ins.


def test_printed_precision():
    s = _scores("av_caption", "The number five is shown, then the word stop is shown, then the word cat appears, "
                              "then the number five is shown.")
    assert s["printed_precision"] == pytest.approx(2 / 3) and s["printed_named"] == 3


def test_bad_events_and_tasks_are_value_errors():
    with pytest.raises(ValueError, match="must be an object with t, kind and what"):
        G.score_record("av_caption", "a red circle", [{"t": 0.0, "kind": "appear"}])
    with pytest.raises(ValueError, match="no grounding rule for task 'temporal_qa'"):
        G.score_record("temporal_qa", "red circle", EVENTS)


def test_references_are_fully_grounded_and_another_clips_caption_is_not():
    scenes = [make_scene(0, "heldout", i) for i in range(40)]
    for task, text in (("av_caption", caption), ("sound_description", sound_description), ("asr", transcript)):
        own = G.grounding_scores(task, [{"prediction": text(s), "events": s.event_list()} for s in scenes])
        assert all(v == 1.0 for k, v in own.items() if k.endswith(("precision", "recall", "accuracy"))), own
    # The plausible caption: fluent and in the world's language, about the wrong clip.
    swapped = G.grounding_scores("av_caption", [{"prediction": caption(scenes[i - 1]), "events": s.event_list()}
                                                for i, s in enumerate(scenes)])
    assert swapped["object_precision"] < 0.3 and swapped["word_accuracy"] < 0.3  # chance: ~3 of 28 objects


def test_split_scores_are_micro_averaged():
    records = [{"prediction": "A red circle appears.", "events": EVENTS},  # 1 of 1 named objects true
               {"prediction": "A red circle, a blue square and a white diamond.", "events": EVENTS}]  # 1 of 3
    s = G.grounding_scores("av_caption", records)
    assert s["object_precision"] == 0.5 and s["n"] == 2  # (1 + 1) / (1 + 3); a macro mean would be 2/3
    assert s["averaging"].startswith("micro")
    with pytest.raises(ValueError, match="prediction 'x' has no scene events"):
        G.grounding_scores("av_caption", [{"id": "x", "prediction": "a red circle"}])


# ---------------------------------------------------------------------------------------------- windowed


WINDOW_EVENTS = [ev(1.0, "appear", "red circle"), ev(4.0, "appear", "green triangle"),
                 ev(4.0 + 1e-9, "speech", "two"), ev(4.5, "disappear", "red circle"), ev(5.0, "appear", "blue square")]


@pytest.mark.parametrize("start, end, visible", [
    (0.0, 1.0, set()),  # appearing at the window's end: not yet on screen
    (0.0, 1.01, {("red", "circle")}),
    (4.5, 5.0, {("green", "triangle")}),  # the circle left at the start, the square arrives at the end
    (4.49, 5.0, {("red", "circle"), ("green", "triangle")}),
    (5.0, 10.0, {("green", "triangle"), ("blue", "square")}),  # no disappear event: stays to the end
])
def test_objects_in_window(start, end, visible):
    assert G.objects_in_window(WINDOW_EVENTS, start, end) == visible


def test_check_cues_names_absent_objects():
    cues = [{"start": 0.0, "end": 5.0, "text": "A red circle appears, then a green triangle appears."},
            {"start": 5.0, "end": 10.0, "text": "The red circle pulses, then a blue square appears, then a beep."},
            {"start": 10.0, "end": 12.0, "text": "A chime sounds."}]
    checks = G.check_cues(cues, WINDOW_EVENTS)
    assert [c.absent for c in checks] == [(), (("red", "circle"),), ()]
    assert [c.grounded for c in checks] == [True, False, True]
    assert checks[1].named == (("red", "circle"), ("blue", "square"))
    with pytest.raises(ValueError, match=r"window end \(1.0\) must be >= start \(2.0\)"):
        G.objects_in_window(WINDOW_EVENTS, 2.0, 1.0)


def test_check_cues_takes_a_scene():
    scene = make_scene(0, "heldout", 0)
    first = scene.shapes[0]
    inside = {"start": first.start, "end": first.end, "text": f"The {first.name} pulses."}
    before = {"start": 0.0, "end": first.start, "text": f"A {first.name} appears."}
    assert [c.grounded for c in G.check_cues([inside, before], scene)] == [True, False]


# ------------------------------------------------------------------------------------------ integration


def _fake_records(with_events=True):
    extra = {"events": EVENTS} if with_events else {}
    return [
        {"id": "c-av_caption", "task": "av_caption", "prediction": "A red circle appears, then a blue square "
         "appears, then a chime sounds.", "reference": "A red circle appears, then a chime sounds.", **extra},
        {"id": "c-sound_description", "task": "sound_description", "prediction": "A beep, then a voice says four.",
         "reference": "A chime, then a voice says four.", **extra},
        {"id": "c-asr", "task": "asr", "prediction": "four seven", "reference": "four seven red", **extra},
        {"id": "c-temporal_qa", "task": "temporal_qa", "prediction": "red circle", "reference": "red circle",
         **extra},
    ]


def test_score_predictions_adds_grounding_next_to_the_rule():
    scores = score_predictions(_fake_records())
    g = scores["av_caption"]["grounding"]
    assert scores["av_caption"]["metric"] == "cider"
    assert (g["object_precision"], g["object_recall"], g["sound_precision"]) == (0.5, 0.5, 1.0)
    assert scores["sound_description"]["grounding"]["sound_precision"] == 0.0
    assert scores["asr"]["grounding"]["word_accuracy"] == pytest.approx(1 - scores["asr"]["score"] / 100)
    assert "grounding" not in scores["temporal_qa"]
    table = format_grounding_table(scores)
    assert "micro-averaged" in table and "| av_caption | 0.50 | 0.50 | 1.00 | 0.33 |" in table
    assert "| asr |  |  |  |  | 0.67 | 0.67 |  | 1 |" in table
    plain = score_predictions(_fake_records(with_events=False))  # real AVEB sets carry no scene events
    assert all("grounding" not in s for s in plain.values()) and format_grounding_table(plain) == ""


def test_favor_eval_score_on_a_predictions_file_without_events(tmp_path):
    preds = tmp_path / "predictions.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in _fake_records(with_events=False)))
    manifest = tmp_path / "heldout.jsonl"
    manifest.write_text("".join(json.dumps({"id": r["id"], "task": r["task"], "meta": {"events": EVENTS}}) + "\n"
                                for r in _fake_records()))
    assert read_predictions(preds, manifest)[0]["events"] == EVENTS
    out = tmp_path / "scores.json"
    res = CliRunner().invoke(app, ["score", str(preds), "--manifest", str(manifest), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| av_caption | 0.50 | 0.50 |" in res.output
    assert json.loads(out.read_text())["scores"]["av_caption"]["grounding"]["object_precision"] == 0.5
    manifest.write_text(json.dumps({"id": "other", "task": "asr", "meta": {}}) + "\n")
    res = CliRunner().invoke(app, ["score", str(preds), "--manifest", str(manifest)])
    assert res.exit_code == 2 and "prediction id 'c-av_caption' is not in manifest" in res.output
