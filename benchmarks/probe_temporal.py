"""Where does temporal QA fail? Accuracy per template and by whether the answer needs an order inside one window.

Temporal QA on the synthetic world (issue 12: >= 70 %) stalled near 65 % over sessions 4-13. Every
temporal question is decided by the order of two scene events: "What appeared after the chime?" by the
chime and the first visual event after it, "Which came first, A or B?" by A and B, "What was the last
sound?" by the last two sounds. The causal Q-Former compresses each window of frames (demo: 10 frames =
5 s at 2 FPS) into N queries; two events in different windows are ordered by the windows' order in the
prompt, two in one window only by what the N queries keep of frame order. This splits each predictions
file's temporal-QA accuracy into the two cases, per template, and by the seconds between the events.

    python benchmarks/probe_temporal.py runs/eval_a/predictions.jsonl [more ...] \
        --manifest data/synth/heldout.jsonl
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Annotated

import typer

from favor.config import get_config
from training.eval.metrics import qa_correct
from training.manifest import read_jsonl

VISUAL = ("appear", "text")
# Seconds between the two deciding events, bucketed: under one model frame pair, about two, more.
GAP_EDGES = (1.0, 2.0)


def _named(events: list[dict], kinds: tuple[str, ...], what: str) -> int:
    """Index of the one event of ``kinds`` whose 'what' is ``what``."""
    hits = [i for i, e in enumerate(events) if e["kind"] in kinds and e["what"] == what]
    if len(hits) != 1:
        raise ValueError(f"{len(hits)} events named {what!r} of kinds {kinds}")
    return hits[0]


def _next(events: list[dict], i: int, kinds: tuple[str, ...]) -> int:
    return next(j for j in range(i + 1, len(events)) if events[j]["kind"] in kinds)


def deciding_events(template: str, question: str, events: list[dict]) -> tuple[dict, dict]:
    """The two events whose order decides the answer (training/synth/tasks.temporal_questions' templates)."""
    if template in ("visual_after_sound", "word_after_sound"):
        i = _named(events, ("sound",), re.fullmatch(r"What .* after the (.+)\?", question).group(1))
        return events[i], events[_next(events, i, VISUAL if template == "visual_after_sound" else ("speech",))]
    if template == "sound_after_visual":
        what = re.fullmatch(r"What sound played after the (.+) appeared\?", question).group(1)
        i = _named(events, ("appear",), what)
        return events[i], events[_next(events, i, ("sound",))]
    if template == "which_first":
        a, b = re.fullmatch(r"Which came first, the (.+) or the (.+)\?", question).groups()
        first, second = sorted(_named(events, ("appear", "sound"), w) for w in (a, b))
        return events[first], events[second]
    sounds = [e for e in events if e["kind"] == "sound"]
    if template == "first_sound":
        return sounds[0], sounds[1]
    if template == "last_sound":
        return sounds[-2], sounds[-1]
    raise ValueError(f"unknown temporal template {template!r}")


def _gap_bucket(seconds: float) -> str:
    lo = 0.0
    for hi in GAP_EDGES:
        if seconds < hi:
            return f"{lo:g}-{hi:g} s"
        lo = hi
    return f">= {lo:g} s"


def breakdown(records: list[dict], rows: dict[str, dict], window_seconds: float) -> dict[str, dict[str, list[int]]]:
    """{grouping: {group: [correct, n]}} over the temporal-QA records."""
    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in records:
        if r["task"] != "temporal_qa":
            continue
        row = rows[r["id"]]
        meta, question = row["meta"], row["conversation"][0]["value"]
        a, b = deciding_events(meta["template"], question, meta["events"])
        same = math.floor(a["t"] / window_seconds) == math.floor(b["t"] / window_seconds)
        ok = int(any(qa_correct(r["prediction"], ref) for ref in r.get("references") or [r["reference"]]))
        for grouping, group in (("all", "all"), ("window", "one window" if same else "two windows"),
                                ("template", meta["template"]), ("gap", _gap_bucket(b["t"] - a["t"])),
                                ("template x window", f"{meta['template']} / {'one' if same else 'two'}")):
            out[grouping][group][0] += ok
            out[grouping][group][1] += 1
    return out


def main(
    predictions: Annotated[list[Path], typer.Argument(help="predictions.jsonl files (favor-eval run -o DIR)")],
    manifest: Annotated[Path, typer.Option(help="the manifest they answered (its meta: template, events)")],
    preset: Annotated[str, typer.Option(help="config preset whose window length applies")] = "demo",
    frames_per_window: Annotated[int | None, typer.Option(
        min=1, help="the model's window (model.timing.frames_per_window) if not the preset's")] = None,
) -> None:
    timing = get_config(preset).timing
    frames = frames_per_window or timing.frames_per_window
    window_seconds = frames / timing.video_fps  # s = frames / FPS
    rows = {row["id"]: row for _, row in read_jsonl(manifest)}
    tables = [breakdown([r for _, r in read_jsonl(path)], rows, window_seconds) for path in predictions]
    print(f"temporal QA by deciding events ({window_seconds:g}-s windows: {frames} frames at {timing.video_fps:g} "
          f"FPS, preset {preset}); correct / n (%)")
    print("| grouping | group | " + " | ".join(p.parent.name for p in predictions) + " |")
    print("| --- | --- |" + " ---: |" * len(predictions))
    for grouping in ("all", "window", "gap", "template", "template x window"):
        for group in sorted({g for t in tables for g in t[grouping]}):
            cells = []
            for t in tables:
                ok, n = t[grouping].get(group, [0, 0])
                cells.append(f"{ok} / {n} ({100 * ok / n:.0f} %)" if n else "-")
            print(f"| {grouping} | {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    typer.run(main)
