"""Grounding: does a caption name what is on screen and in the soundtrack, or only what is plausible?

CIDEr-D rewards the synthetic world's sentence shapes ("a ... appears, then ..."), which a model learns
long before it learns to look and listen. These scores check the *content words* of an answer against
the clip's scene ground truth (manifest ``meta.events``: appear / disappear / sound / speech / text with
times; vocabulary from training/synth/scene.py).

    parse_caption(text) -> Mentions            what a caption names
    scene_truth(events) -> Truth               what the clip holds
    score_record(task, prediction, events) -> Counts    one answer's matches and mentions
    grounding_scores(task, records) -> dict    micro-averaged over a split (favor-eval adds it to scores)
    objects_in_window(events, start, end), check_cues(cues, scene)    the windowed variant (runtime cues)

Tokens: the answer is normalised as every AVEB rule is (metrics.normalise: lower case, punctuation to
spaces), then scanned left to right. One token = one word.

Rules (in the order they are applied; a token used by a word mention is not reused by later rules):

1. Spoken and printed word mentions. ``X`` is one token; a *marker* is "word" or "number" right before it.
   X counts if it has a marker or is in the world's word list (SPOKEN_WORDS, PRINTED words, digit words,
   numerals): "a voice says something" names no word, "a voice says the word banana" names "banana".
   - passive: ``[marker] X [is|was|are|were|gets|being] V``. V in {spoken, said, heard, pronounced}
     makes a spoken mention ("the word four is spoken", "four is heard"); V in {shown, written, printed,
     displayed, appears, appear} a printed one ("the number five is shown", "the word stop appears").
   - active: ``says|say|said|speaks|utters [the] [marker] X``: a spoken mention ("a voice says four").
   A spoken X given as a numeral becomes its word ("4" -> "four"); a printed X given as a digit word becomes
   its numeral ("five" -> "5"), since the screen prints digits as numerals (scene.PRINTED).
   Not recognised: lists ("the words four and seven are spoken" names only "seven"), a word with no verb
   (a caption cut off after "the word four").
2. Objects: a colour (COLOURS) immediately followed by a shape (SHAPES), singular or plural: "a red
   circle", "the red circle pulses", "two red circles" all name (red, circle). "the circle is red", a
   bare "circle" or "red" name no object.
3. Sound events: a kind from SOUNDS, its last word singular or plural: "a chime", "the chime", "beeps",
   "a noise burst", "low tones". A bare "tone", "noise" or "burst" names no sound (ambiguous), nor does
   "bell" (not in the world).

Counting, per answer:
- Objects, sounds and printed words are sets: naming the red circle three times ("a red circle appears,
  then the red circle pulses, then the red circle disappears") names one object once. Precision =
  |named & true| / |named|, recall = |named & true| / |true|. Truth: every object that appears in the
  clip, every sound kind played, every text printed. Times and order are not checked (the windowed variant
  below checks objects against time).
- Spoken words are a sequence, in the order named; the clip's reference is its speech events in time
  order. Word accuracy = 1 - (S + D + I) / N (1 - WER, jiwer's alignment; below 0 when the answer
  inserts more words than the clip has), recall = H / N, precision = H / (H + S + I).
- ASR answers are transcripts: every word of the answer is a spoken-word mention (rule 1 is not applied),
  so on asr, word accuracy = 1 - the WER rule's score / 100.

Which counts each task reports (what its input can ground): av_caption and stream_caption (one streamed
window; its timeline lists the objects already on screen as appearing at its start) all four; sound_description
(audio only) sounds and spoken words; asr spoken words.

Over a split the scores are **micro-averaged**: sum of matches / sum of mentions over every answer (an
answer naming nothing adds nothing to precision's denominator). A score whose denominator is 0 is None.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from training.eval.metrics import words
from training.synth.scene import COLOURS, DIGIT_WORDS, PRINTED, SHAPES, SOUNDS, SPOKEN_WORDS

MARKERS = frozenset({"word", "number"})
AUXILIARIES = frozenset({"is", "was", "are", "were", "gets", "being"})
SPOKEN_VERBS = frozenset({"spoken", "said", "heard", "pronounced"})
SHOWN_VERBS = frozenset({"shown", "written", "printed", "displayed", "appears", "appear"})
SAY_VERBS = frozenset({"says", "say", "said", "speaks", "utters"})
NUMERALS = tuple(str(d) for d in range(len(DIGIT_WORDS)))
WORLD_WORDS = frozenset(SPOKEN_WORDS) | frozenset(PRINTED) | frozenset(DIGIT_WORDS)
SOUND_WORDS = tuple(tuple(kind.split()) for kind in SOUNDS)  # ("low", "tone"), ("chime",), ...

# Which counts a task's input can ground (see the module docstring).
TASK_KINDS = {
    "av_caption": ("objects", "sounds", "spoken", "printed"),
    "stream_caption": ("objects", "sounds", "spoken", "printed"),  # a window: truth = what it shows / plays
    "sound_description": ("sounds", "spoken"),
    "asr": ("spoken",),
}
AVERAGING = "micro: sum of matches / sum of mentions over the split"


@dataclass(frozen=True)
class Mentions:
    """What one answer names."""

    objects: tuple[tuple[str, str], ...]  # (colour, shape), distinct, first-mention order
    sounds: tuple[str, ...]  # sound kinds, distinct
    spoken: tuple[str, ...]  # spoken words in the order named (repeats kept)
    printed: tuple[str, ...]  # printed words / numerals, distinct


@dataclass(frozen=True)
class Truth:
    """What one clip holds, from its events."""

    objects: frozenset[tuple[str, str]]
    sounds: frozenset[str]
    spoken: tuple[str, ...]  # in time order
    printed: frozenset[str]


class Tally:
    """A dataclass of int counters that ``+=`` sums field by field (a split's counts from its answers')."""

    def __iadd__(self, other):
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class Counts(Tally):
    """Matches and mentions of one answer (or, summed, of a split)."""

    object_hits: int = 0
    objects_named: int = 0
    objects_true: int = 0
    sound_hits: int = 0
    sounds_named: int = 0
    sounds_true: int = 0
    word_hits: int = 0  # H of the alignment
    word_errors: int = 0  # S + D + I
    words_named: int = 0  # H + S + I
    words_true: int = 0  # N
    printed_hits: int = 0
    printed_named: int = 0


# --------------------------------------------------------------------------------------------- parsing


def _singular(token: str, nouns: Iterable[str]) -> str | None:
    """``token`` as one of ``nouns`` if it is that noun or its plural (+s), else None."""
    for noun in nouns:
        if token in (noun, noun + "s"):
            return noun
    return None


def _spoken_form(x: str) -> str:
    return DIGIT_WORDS[int(x)] if x in NUMERALS else x


def _printed_form(x: str) -> str:
    return str(DIGIT_WORDS.index(x)) if x in DIGIT_WORDS else x


def _word_at(w: list[str], j: int) -> bool:
    """Does token j count as a named word: marked by 'word' / 'number', or from the world's list?"""
    return 0 <= j < len(w) and (w[j] in WORLD_WORDS or w[j] in NUMERALS or (j > 0 and w[j - 1] in MARKERS))


def _word_mentions(w: list[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Rule 1: (position, word) of spoken and of printed mentions."""
    spoken, printed = [], []
    for i, tok in enumerate(w):
        verb_passive = tok in SPOKEN_VERBS or tok in SHOWN_VERBS
        j = i - 1 - (i > 0 and w[i - 1] in AUXILIARIES)  # the subject X, before an optional auxiliary
        if verb_passive and _word_at(w, j) and w[j] not in AUXILIARIES:
            (spoken if tok in SPOKEN_VERBS else printed).append((j, w[j]))
            continue
        if tok in SAY_VERBS:
            j = i + 1 + (i + 1 < len(w) and w[i + 1] == "the")
            j += j < len(w) and w[j] in MARKERS
            if _word_at(w, j):
                spoken.append((j, w[j]))
    return spoken, printed


def parse_caption(text: str) -> Mentions:
    """The objects, sounds, spoken and printed words ``text`` names (rules 1-3 of the module docstring)."""
    w = words(text)
    spoken, printed = _word_mentions(w)
    used = {j for j, _ in spoken} | {j for j, _ in printed}
    objects: dict[tuple[str, str], None] = {}  # dicts keep first-mention order
    sounds: dict[str, None] = {}
    for i in range(len(w)):
        if i in used:
            continue
        nxt = w[i + 1] if i + 1 < len(w) and i + 1 not in used else ""
        shape = _singular(nxt, SHAPES)
        if w[i] in COLOURS and shape is not None:
            objects[(w[i], shape)] = None
        for kind_words, kind in zip(SOUND_WORDS, SOUNDS, strict=True):
            head, last = kind_words[:-1], kind_words[-1]
            start = i - len(head)
            if start >= 0 and tuple(w[start:i]) == head and not used & set(range(start, i)) \
                    and _singular(w[i], (last,)) is not None:
                sounds[kind] = None
    return Mentions(objects=tuple(objects), sounds=tuple(sounds),
                    spoken=tuple(_spoken_form(x) for _, x in sorted(spoken)),
                    printed=tuple(dict.fromkeys(_printed_form(x) for _, x in sorted(printed))))


# ----------------------------------------------------------------------------------------------- truth


def _object(name: str) -> tuple[str, str]:
    colour, shape = name.split(" ", 1)
    return colour, shape


def _check_events(events: Sequence[dict], where: str) -> None:
    for e in events:
        if not isinstance(e, dict) or not {"t", "kind", "what"} <= set(e):
            raise ValueError(f"{where}: scene event {e!r} must be an object with t, kind and what "
                             f"(the synthetic manifest's meta.events)")


def scene_truth(events: Sequence[dict]) -> Truth:
    """Objects that appear, sound kinds, spoken words (time order) and printed texts of one clip."""
    _check_events(events, "scene_truth")
    ordered = sorted(events, key=lambda e: e["t"])
    return Truth(objects=frozenset(_object(e["what"]) for e in ordered if e["kind"] == "appear"),
                 sounds=frozenset(e["what"] for e in ordered if e["kind"] == "sound"),
                 spoken=tuple(e["what"] for e in ordered if e["kind"] == "speech"),
                 printed=frozenset(e["what"] for e in ordered if e["kind"] == "text"))


# ----------------------------------------------------------------------------------------------- scoring


def _word_counts(named: Sequence[str], true: Sequence[str]) -> tuple[int, int]:
    """(hits, errors S + D + I) of jiwer's word alignment of ``named`` against ``true``."""
    import jiwer

    if not named and not true:
        return 0, 0
    out = jiwer.process_words(" ".join(true), " ".join(named))
    return out.hits, out.substitutions + out.deletions + out.insertions


def score_record(task: str, prediction: str, events: Sequence[dict]) -> Counts:
    """One answer's matches and mentions for the kinds ``task`` reports (TASK_KINDS)."""
    if task not in TASK_KINDS:
        raise ValueError(f"no grounding rule for task {task!r}; expected one of {sorted(TASK_KINDS)}")
    kinds, truth = TASK_KINDS[task], scene_truth(events)
    named = parse_caption(prediction)
    spoken = tuple(words(prediction)) if task == "asr" else named.spoken  # an ASR answer is a transcript
    c = Counts()
    if "objects" in kinds:
        c.object_hits, c.objects_named = len(truth.objects & set(named.objects)), len(named.objects)
        c.objects_true = len(truth.objects)
    if "sounds" in kinds:
        c.sound_hits, c.sounds_named = len(truth.sounds & set(named.sounds)), len(named.sounds)
        c.sounds_true = len(truth.sounds)
    if "spoken" in kinds:
        c.word_hits, c.word_errors = _word_counts(spoken, truth.spoken)
        c.words_named, c.words_true = len(spoken), len(truth.spoken)  # named = H + S + I, true = H + S + D
    if "printed" in kinds:
        c.printed_hits, c.printed_named = len(truth.printed & set(named.printed)), len(named.printed)
    return c


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarise(task: str, c: Counts) -> dict:
    """The scores of summed counts (fractions in [0, 1]; word accuracy may be < 0; None: nothing to score)."""
    kinds = TASK_KINDS[task]
    out: dict = {"averaging": AVERAGING}
    if "objects" in kinds:
        out |= {"object_precision": _ratio(c.object_hits, c.objects_named),
                "object_recall": _ratio(c.object_hits, c.objects_true),
                "objects_named": c.objects_named, "objects_true": c.objects_true}
    if "sounds" in kinds:
        out |= {"sound_precision": _ratio(c.sound_hits, c.sounds_named),
                "sound_recall": _ratio(c.sound_hits, c.sounds_true),
                "sounds_named": c.sounds_named, "sounds_true": c.sounds_true}
    if "spoken" in kinds:
        acc = _ratio(c.words_true - c.word_errors, c.words_true)
        out |= {"word_accuracy": acc, "word_recall": _ratio(c.word_hits, c.words_true),
                "word_precision": _ratio(c.word_hits, c.words_named),
                "words_named": c.words_named, "words_true": c.words_true}
    if "printed" in kinds:
        out |= {"printed_precision": _ratio(c.printed_hits, c.printed_named), "printed_named": c.printed_named}
    return out


def grounding_scores(task: str, records: Sequence[dict]) -> dict:
    """Micro-averaged grounding of ``records`` ({prediction, events}) of one task; see the docstring."""
    total = Counts()
    for r in records:
        if not r.get("events"):
            raise ValueError(f"task {task!r}: prediction {r.get('id', '?')!r} has no scene events "
                             f"(meta.events of a synthetic manifest); grounding needs them for every answer")
        total += score_record(task, r["prediction"], r["events"])
    return {"n": len(records), **summarise(task, total)}


# ------------------------------------------------------------------------------------ windowed (runtime)


def objects_in_window(events: Sequence[dict], start: float, end: float) -> frozenset[tuple[str, str]]:
    """(colour, shape) objects visible at some time in [start, end) s: appeared before ``end`` and not
    disappeared by ``start`` (an object leaving exactly at ``start`` is gone; one arriving at ``end`` is
    not yet there: the scene shows a shape on [appear, disappear), scene.Scene.visible)."""
    if end < start:
        raise ValueError(f"window end ({end}) must be >= start ({start})")
    _check_events(events, "objects_in_window")
    appear = {e["what"]: e["t"] for e in events if e["kind"] == "appear"}
    gone = {e["what"]: e["t"] for e in events if e["kind"] == "disappear"}
    return frozenset(_object(name) for name, t in appear.items()
                     if t < end and gone.get(name, float("inf")) > start)


@dataclass(frozen=True)
class CueCheck:
    """One cue against its window: the objects it names and those of them not on screen then."""

    index: int
    start: float
    end: float
    text: str
    named: tuple[tuple[str, str], ...]
    absent: tuple[tuple[str, str], ...]

    @property
    def grounded(self) -> bool:
        return not self.absent


def _field(cue, name: str):
    return cue[name] if isinstance(cue, dict) else getattr(cue, name)


def check_cues(cues: Iterable, scene) -> list[CueCheck]:
    """Each cue (runtime Caption, or a dict with start / end / text) against the objects visible in its
    window. ``scene``: a training.synth Scene or its event list (manifest meta.events)."""
    events = scene.event_list() if hasattr(scene, "event_list") else scene
    out = []
    for i, cue in enumerate(cues):
        start, end, text = float(_field(cue, "start")), float(_field(cue, "end")), str(_field(cue, "text"))
        present = objects_in_window(events, start, end)
        named = parse_caption(text).objects
        out.append(CueCheck(index=i, start=start, end=end, text=text, named=named,
                            absent=tuple(o for o in named if o not in present)))
    return out
