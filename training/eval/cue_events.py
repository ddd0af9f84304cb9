"""Do a stream's cues say what happened? Event precision and recall of live captions against the scene.

grounding.check_cues asks only whether each object a cue names is on screen, so a cue saying "the purple
square disappears" while the square stays, or silence about the three shapes that appeared, passes it.
This scores the events a cue asserts, in the world's own caption grammar (training/synth/tasks.caption):

=========================================  ======================================================
clause                                     asserted events
=========================================  ======================================================
"a red circle appears"                     ("appear", "red circle")
"the red circle disappears"                ("disappear", "red circle")
"the red circle pulses with a chime"       ("pulse", "red circle") and ("sound", "chime")
"a chime sounds"                           ("sound", "chime")
"the word four is spoken"                  ("speech", "four")
"the number 5 is shown"                    ("text", "5")
=========================================  ======================================================

A cue's clauses are split at commas, full stops and "then"; within a clause, objects come from
grounding.parse_caption and take the clause's verb (appears / disappears / pulses). Each cue asserts a
set: saying one event twice is one assertion.

Truth: the scene's events (sound events with a source shape also pulse it). Time: a cue covers its window
[start, end) widened by ``tolerance_s`` on both sides, by default one frame period at the model's frame rate.
Frames are sampled every 1 / fps s, so an object appearing 0.2 s before a window ends is first seen in the
next window's first frame, and a spoken word of ~0.5 s straddles the cut; the tolerance lets either
neighbour claim it without crediting events from further away.

- precision = asserted events that happened (same kind and what) inside the cue's covered span / asserted
- recall = scene events asserted by some cue whose covered span holds them / scene events

Micro-averaged over every cue of every clip, and per kind.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from training.eval.grounding import Tally, parse_caption
from training.eval.metrics import words

KINDS = ("appear", "disappear", "pulse", "sound", "speech", "text")
OBJECT_VERBS = {"appears": "appear", "appear": "appear", "disappears": "disappear", "disappear": "disappear",
                "pulses": "pulse", "pulse": "pulse"}
CLAUSE_BREAK = re.compile(r"[,.;!?]|\bthen\b", re.IGNORECASE)

Event = tuple[str, str]  # (kind, what): ("appear", "red circle"), ("speech", "four"), ...


def asserted_events(text: str) -> frozenset[Event]:
    """The events one cue asserts (the table of the module docstring)."""
    out: set[Event] = set()
    for clause in CLAUSE_BREAK.split(text):
        m = parse_caption(clause)
        verbs = [OBJECT_VERBS[w] for w in words(clause) if w in OBJECT_VERBS]
        if verbs and m.objects:  # a clause has one verb in this grammar; its objects take it
            out |= {(verbs[0], f"{colour} {shape}") for colour, shape in m.objects}
        out |= {("sound", s) for s in m.sounds}
        out |= {("speech", w) for w in m.spoken}
        out |= {("text", w) for w in m.printed}
    return frozenset(out)


def scene_events(events: Sequence[dict]) -> list[tuple[float, Event]]:
    """(time s, event) of a scene's event list (manifest meta.events / Scene.event_list())."""
    out = []
    for e in events:
        if e["kind"] not in KINDS:
            raise ValueError(f"scene event {e!r}: kind must be one of {KINDS}")
        out.append((float(e["t"]), (e["kind"], e["what"])))
        if e["kind"] == "sound" and e.get("source"):
            out.append((float(e["t"]), ("pulse", e["source"])))
    return out


@dataclass
class KindCounts(Tally):
    """One event kind's counts: assertions (and how many happened), scene events (and how many recalled)."""

    asserted: int = 0
    right: int = 0
    true: int = 0
    recalled: int = 0


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass
class EventCounts:
    """KindCounts per event kind, summable over cues and clips."""

    by_kind: dict[str, KindCounts] = field(default_factory=lambda: {k: KindCounts() for k in KINDS})

    def __iadd__(self, other: EventCounts) -> EventCounts:
        for k in KINDS:
            self.by_kind[k] += other.by_kind[k]
        return self

    def scores(self) -> dict:
        """precision / recall overall and per kind (None where nothing was asserted / happened)."""
        total = KindCounts()
        for c in self.by_kind.values():
            total += c
        return {"event_precision": _ratio(total.right, total.asserted),
                "event_recall": _ratio(total.recalled, total.true),
                "events_asserted": total.asserted, "events_true": total.true,
                "per_kind": {k: {"precision": _ratio(c.right, c.asserted), "recall": _ratio(c.recalled, c.true),
                                 "asserted": c.asserted, "true": c.true} for k, c in self.by_kind.items()}}


def score_cues(cues: Iterable[tuple[float, float, str]], events: Sequence[dict],
               tolerance_s: float) -> EventCounts:
    """Counts of one clip's cues ((start s, end s, text) each) against its scene events."""
    truth = scene_events(events)
    spans = [(start - tolerance_s, end + tolerance_s, asserted_events(text)) for start, end, text in cues]
    c = EventCounts()
    for lo, hi, asserted in spans:
        near = {ev for t, ev in truth if lo <= t < hi}
        for ev in asserted:
            c.by_kind[ev[0]].asserted += 1
            c.by_kind[ev[0]].right += ev in near
    for t, ev in truth:
        c.by_kind[ev[0]].true += 1
        c.by_kind[ev[0]].recalled += any(lo <= t < hi and ev in asserted for lo, hi, asserted in spans)
    return c
