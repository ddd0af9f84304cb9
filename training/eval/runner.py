"""Run a FAVOR model over a manifest and score every task by its rule.

    manifest -> ManifestDataset (no pairing) -> per sample engine.ask(question, video=, audio=, image=)
    (the Python API, runtime/api.py + runtime/clip.py: on any backend) -> predictions
    predictions -> score_predictions (TASK_RULES) -> {task: {metric, score, n, ...}}

One sample at a time, so its features are its own: the earlier batched path padded a batch's audio to its
longest and Whisper (audio.pad_to_30s off) attends over that padding, so a short recording's answer
depended on its batch neighbours (tests/test_eval_runner.py: identical to that path at batch 1).

Rules per task (appendix B; synthetic tasks take the rule of their AVEB counterpart):
    wer      asr, avsr                           WER %, lower is better
    caption  ac, ic, av_caption, sound_description   CIDEr (primary), BLEU-4, METEOR
    ocr      ocr                                 TextVQA 1/3 hits, %
    qa       vqa, temporal_qa, sound_source, spoken_qa, av_matching   word-by-word + yes/no rule, %
    exact    videoqa (multiple choice), isqa, avm    the paper: "the same measurement is taken for ISQA
                                                     and AVM" as for multiple-choice Video QA
    judge    avsd, avssd                         LLM judge when given; else avsd -> caption metrics,
                                                 avssd -> qa rule on the class name (stated in the result)

Grounding (grounding.py) rides along for av_caption, sound_description and asr when every record carries
its clip's scene events (``events``, from the synthetic manifest's meta): (colour, shape), sound-event,
spoken-word and printed-word precision / recall, micro-averaged over the split, under ``grounding``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from training.eval import grounding as G
from training.eval import metrics as M

TASK_RULES = {
    "asr": "wer", "avsr": "wer",
    "ac": "caption", "ic": "caption", "av_caption": "caption", "sound_description": "caption",
    "stream_caption": "caption",
    "ocr": "ocr",
    "vqa": "qa", "temporal_qa": "qa", "sound_source": "qa", "spoken_qa": "qa", "av_matching": "qa",
    "videoqa": "exact", "isqa": "exact", "avm": "exact",
    "avsd": "judge", "avssd": "judge",
}
JUDGE_FALLBACK = {"avsd": "caption", "avssd": "qa"}
# Greedy answer budget, in tokens: the synthetic world's longest captions run to ~70 SmolLM2 tokens (half of
# the held-out AV captions exceed 48), and a cut caption loses the objects it names last, so grounding
# recall would measure the budget rather than the model.
MAX_NEW_TOKENS = 96
LOWER_IS_BETTER = {"wer"}


def _references(record: dict) -> list[str]:
    refs = record.get("references") or [record["reference"]]
    return [r for r in refs if r]


def score_task(task: str, records: Sequence[dict], judge: Callable | None = None) -> dict:
    """Score one task's records ({prediction, reference, references?, question?}); see TASK_RULES."""
    if task not in TASK_RULES:
        raise ValueError(f"no scoring rule for task {task!r}; expected one of {sorted(TASK_RULES)}")
    if not records:
        raise ValueError(f"task {task!r}: no predictions to score")
    rule = TASK_RULES[task]
    hyps = [r["prediction"] for r in records]
    out: dict = {"rule": rule, "n": len(records)}
    if rule == "judge":
        if judge is not None:
            hits = [judge(task, r.get("question") or "", r["prediction"], _references(r)[0]) for r in records]
            return {**out, "metric": "judge_accuracy", "score": 100.0 * M.mean(hits)}
        rule = JUDGE_FALLBACK[task]
        out["rule"] = f"{rule} (no judge)"
    if rule == "wer":
        out |= {"metric": "wer", "score": 100.0 * M.wer(hyps, [_references(r)[0] for r in records])}
        return _with_grounding(task, records, out)
    if rule == "caption":
        caps = M.caption_scores(hyps, [_references(r) for r in records])
        return _with_grounding(task, records, {**out, "metric": "cider", "score": caps["cider"], **caps})
    if rule == "ocr":
        values = [M.ocr_score(r["prediction"], _references(r)) for r in records]
    elif rule == "qa":
        values = [any(M.qa_correct(r["prediction"], ref) for ref in _references(r)) for r in records]
    else:  # exact
        values = [any(M.exact_match(r["prediction"], ref) for ref in _references(r)) for r in records]
    return {**out, "metric": "accuracy", "score": 100.0 * M.mean([float(v) for v in values])}


def _with_grounding(task: str, records: Sequence[dict], out: dict) -> dict:
    """``out`` plus ``grounding`` when the task has a grounding rule and its records carry scene events."""
    if task not in G.TASK_KINDS or not any(r.get("events") for r in records):
        return out
    return {**out, "grounding": G.grounding_scores(task, records)}


def score_predictions(records: Sequence[dict], judge: Callable | None = None) -> dict[str, dict]:
    """{task: score_task(...)} over records grouped by their ``task``."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    return {task: score_task(task, rs, judge) for task, rs in sorted(by_task.items())}


# ---------------------------------------------------------------------------------------------- model


def as_engine(model):
    """``model`` as a runtime.api.Engine: an Engine as is; a FavorModel (a loaded checkpoint, the ablation's
    trained model) on the torch backend with its LoRA left unmerged, so the numbers are the model's own."""
    from runtime.api import Engine

    if isinstance(model, Engine):
        return model
    from runtime.backends import TorchBackend

    return Engine(TorchBackend(model, merge_lora=False))


def predict(model, manifest: str | Path, *, max_new_tokens: int = MAX_NEW_TOKENS, limit: int | None = None,
            tasks: Sequence[str] | None = None, skip_bad: bool = False,
            progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Greedy answers for every sample of ``manifest`` (first human turn as the question), each through
    the Python API: ``engine.ask(question=, video=, audio=, image=)`` with the sample's own media.

    ``model``: an Engine (favor.load(checkpoint, backend=...)) or a FavorModel (see as_engine). Samples
    go task by task, manifest order within a task. Returns one record per sample: id, task, question,
    prediction, reference (the gpt turn), references (``meta.references`` if present) and events
    (``meta.events``, for grounding). ``skip_bad``: samples whose media cannot be used are left out.
    """
    from training.collate import first_answer, first_question
    from training.data import DataOptions, ManifestDataset
    from training.pairing import PairingOptions, window_prompt

    engine = as_engine(model)
    data = ManifestDataset(manifest, engine.cfg, DataOptions(skip_bad=skip_bad, pairing=PairingOptions(enabled=False)))
    chosen = [e for e in data.entries if tasks is None or e.task in tasks]
    if limit is not None:
        chosen = chosen[:limit]
    chosen.sort(key=lambda e: e.task)  # stable: manifest order within a task
    records: list[dict] = []
    for done, e in enumerate(chosen, start=1):
        question, answer = first_question(e.conversation), first_answer(e.conversation)
        try:
            pred = engine.ask(question=question, video=e.video, audio=e.audio, image=e.image,
                              max_new_tokens=max_new_tokens, instruction=window_prompt(e))  # as served
        except ValueError as err:  # unreadable media (one line naming the file)
            if not skip_bad:
                raise ValueError(f"{e.where(data.manifest)}: {err} (set skip_bad: true to skip)") from None
        else:
            records.append({"id": e.id, "task": e.task, "question": e.meta.get("question") or question,
                            "prediction": pred, "reference": answer,
                            "references": e.meta.get("references") or [answer],
                            **({"events": e.meta["events"]} if e.meta.get("events") else {})})  # grounding
        if progress is not None:
            progress(done, len(chosen))
    return records


def write_results(out_dir: str | Path, records: Sequence[dict], scores: dict, info: dict | None = None) -> Path:
    """predictions.jsonl + scores.json under ``out_dir``; returns the scores path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    path = out / "scores.json"
    path.write_text(json.dumps({"info": info or {}, "scores": scores}, indent=2) + "\n")
    return path


def format_table(scores: dict[str, dict]) -> str:
    """A markdown table: task | metric | score | n."""
    lines = ["| task | metric | score | n |", "| --- | --- | ---: | ---: |"]
    for task, s in scores.items():
        arrow = "↓" if s["metric"] in LOWER_IS_BETTER else "↑"
        value = "nan" if math.isnan(s["score"]) else f"{s['score']:.1f}"
        lines.append(f"| {task} | {s['metric']} {arrow} ({s['rule']}) | {value} | {s['n']} |")
    return "\n".join(lines)


def format_grounding_table(scores: dict[str, dict]) -> str:
    """A markdown table of the tasks scored for grounding (fractions, micro-averaged); '' if none."""
    cols = [("object_precision", "obj P"), ("object_recall", "obj R"), ("sound_precision", "sound P"),
            ("sound_recall", "sound R"), ("word_accuracy", "word acc"), ("word_recall", "word R"),
            ("printed_precision", "printed P")]
    rows = [(task, s["grounding"]) for task, s in scores.items() if "grounding" in s]
    if not rows:
        return ""
    lines = ["grounding (fractions; micro-averaged over the split: sum of matches / sum of mentions)",
             "| task | " + " | ".join(c for _, c in cols) + " | n |", "| --- |" + " ---: |" * (len(cols) + 1)]
    for task, g in rows:
        cells = ["" if k not in g else "-" if g[k] is None else f"{g[k]:.2f}" for k, _ in cols]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {g['n']} |")
    return "\n".join(lines)


def read_predictions(path: str | Path, manifest: str | Path | None = None) -> list[dict]:
    """Records of a predictions.jsonl; ``manifest`` supplies the scene events (meta.events, by id) of records
    written without them (files from before grounding). ValueError naming the file on a bad line / id."""
    from training.manifest import read_jsonl

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions {path} does not exist")
    records = [r for _, r in read_jsonl(path)]
    for n, r in enumerate(records, start=1):
        if not {"task", "prediction", "reference"} <= set(r):
            raise ValueError(f"{path}: record {n} must have task, prediction and reference, has {sorted(r)}")
    if manifest is None:
        return records
    if not Path(manifest).is_file():
        raise ValueError(f"manifest {manifest} does not exist")
    events = {row.get("id"): (row.get("meta") or {}).get("events") for _, row in read_jsonl(Path(manifest))}
    for r in records:
        if not r.get("events") and r.get("task") in G.TASK_KINDS:
            if r.get("id") not in events:
                raise ValueError(f"{path}: prediction id {r.get('id')!r} is not in manifest {manifest}")
            if events[r["id"]]:
                r["events"] = events[r["id"]]
    return records
