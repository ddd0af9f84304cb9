"""Train/serve audio context on the trained demo model: held-out scores both ways (issue 11, item 4).

Training and favor-eval run Whisper once over the whole clip (up to 30 s); the streaming runtime
(favor-rt, runtime/stream.py) runs it on each 5-s window's audio alone, because a live stream has no
future audio. Everything else is identical here: same samples, same visual tokens, same greedy
decoding, same scoring rules (training/eval/runner.py).

    whole      audio tokens = Whisper(log-mel of the clip's first 30 s)            (training, favor-eval)
    windowed   audio tokens = concat over 5-s windows of Whisper(log-mel of that window)   (favor-rt)

    favor-train synth data/synth_tss --split heldout --num-clips 20 --workers 2
    nice -n 10 python benchmarks/bench_train_serve_audio.py data/synth_tss/heldout.jsonl --per-task 5 \
        --max-new-tokens 32 --out benchmarks/results/train_serve_audio

Writes predictions and scores per mode, a feature-level comparison (relative L2 of the audio tokens
the Q-Former reads) and prints a Markdown table. CPU-heavy (2 greedy answers per sample, ~5-9 CPU-s
each on 2 shared cores): --per-task 5 (35 samples) is ~10 CPU-minutes on the demo model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, git_commit, machine, markdown_table
from favor import media

DEMO = REPO / "favor" / "assets" / "demo" / "favor-demo.safetensors"


def windowed_audio_tokens(model, audio: torch.Tensor) -> torch.Tensor:
    """The runtime's audio path: each 5-s window's samples -> log-mel -> Whisper -> audio_proj."""
    t = model.cfg.timing
    step = round(t.window_seconds * t.sample_rate)  # samples per window
    parts = []
    for a in range(0, audio.shape[0], step):
        chunk = audio[a:a + step]
        if chunk.shape[0] <= t.n_fft // 2:  # as runtime/stream.py: the centred STFT needs > half a window
            chunk = torch.nn.functional.pad(chunk, (0, t.n_fft // 2 + 1 - chunk.shape[0]))
        mel = media.log_mel_spectrogram(chunk, model.cfg.audio.n_mels, t)
        parts.append(model.encode_audio(mel[None])[0])  # [Ta_w, Da]
    return torch.cat(parts)[None]  # [1, Ta, Da]


def clip_audio(path: Path, cfg) -> torch.Tensor:
    """The clip's audio as training decodes it: 16 kHz mono, first 30 s."""
    t = cfg.timing
    return media.load_audio(path, t.sample_rate)[: t.whisper_chunk_seconds * t.sample_rate]


@torch.inference_mode()
def evaluate(model, manifest: Path, max_new_tokens: int, per_task: int | None) -> tuple[dict, dict]:
    """(records per mode, feature stats): both modes on the same batch, one sample at a time."""
    from favor.generation import generate, get_settings
    from favor.model import av_inputs
    from training.collate import Collator
    from training.data import DataOptions, ManifestDataset
    from training.pairing import PairingOptions

    cfg = model.cfg
    data = ManifestDataset(manifest, cfg, DataOptions(pairing=PairingOptions(enabled=False)))
    collate = Collator(cfg, model.tokenizer, model.instruction_tokenizer)
    settings = get_settings("greedy", max_new_tokens=max_new_tokens)
    chosen, seen = [], {}
    for i in sorted(range(len(data.entries)), key=lambda i: (data.entries[i].task, i)):
        task = data.entries[i].task
        if per_task is None or seen.get(task, 0) < per_task:  # the first N clips of every task
            chosen.append(i)
            seen[task] = seen.get(task, 0) + 1
    records: dict[str, list] = {"whole": [], "windowed": []}
    diffs = []
    encode_audio = model.encode_audio
    for i in chosen:
        batch = collate([data[i]])
        audio_path = data.plan(i).audio
        modes = {"whole": None}
        if audio_path is not None and batch.get("mel") is not None:
            whole = encode_audio(batch["mel"])
            win = windowed_audio_tokens(model, clip_audio(audio_path, cfg))
            n = min(whole.shape[1], win.shape[1])
            diffs.append(((win[:, :n] - whole[:, :n]).norm() / whole[:, :n].norm()).item())
            modes["windowed"] = win
        for mode in records:
            tokens = modes.get(mode, modes["whole"])
            if tokens is not None:  # the runtime's tokens stand in for what encode_av would compute
                model.encode_audio = lambda mel, tokens=tokens: tokens
            try:
                av = model.encode_av(**av_inputs(batch))
            finally:
                model.__dict__.pop("encode_audio", None)
            pred = generate(model, av, batch["questions"], settings)[0]
            entry = data.entries[i]
            records[mode].append({"id": entry.id, "task": entry.task,
                                  "question": entry.meta.get("question") or batch["questions"][0],
                                  "prediction": pred, "reference": batch["answers"][0],
                                  "references": entry.meta.get("references") or [batch["answers"][0]]})
    d = sorted(diffs)
    stats = {"samples_with_audio": len(d), "rel_l2_median": d[len(d) // 2] if d else math.nan,
             "rel_l2_max": d[-1] if d else math.nan, "rel_l2_mean": sum(d) / len(d) if d else math.nan}
    return records, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("manifest", type=Path, help="held-out manifest (favor-train synth ... --split heldout)")
    ap.add_argument("--checkpoint", type=Path, default=DEMO)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_serve_audio")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--per-task", type=int, default=None, help="first N samples of every task")
    args = ap.parse_args()
    from favor.checkpoint import load_model
    from training.eval.runner import score_predictions, write_results

    torch.set_num_threads(2)
    model = load_model(args.checkpoint).eval()
    start = time.perf_counter()
    records, stats = evaluate(model, args.manifest, args.max_new_tokens, args.per_task)
    info = {"checkpoint": str(args.checkpoint), "manifest": str(args.manifest), "commit": git_commit(),
            "machine": machine(), "seconds": round(time.perf_counter() - start, 1), "audio_tokens": stats}
    scores = {}
    for mode, recs in records.items():
        scores[mode] = score_predictions(recs)
        write_results(args.out / mode, recs, scores[mode], info)
    (args.out / "summary.json").write_text(json.dumps({"info": info, "scores": scores}, indent=2) + "\n")
    rows = [[task, s["metric"], s["n"], f"{s['score']:.1f}", f"{scores['windowed'][task]['score']:.1f}"]
            for task, s in scores["whole"].items()]
    print(f"audio tokens, windowed vs whole: relative L2 median {stats['rel_l2_median']:.3f}, "
          f"max {stats['rel_l2_max']:.3f} over {stats['samples_with_audio']} samples")
    print(markdown_table(["task", "metric", "n", "whole clip (training)", "per 5-s window (runtime)"], rows))


if __name__ == "__main__":
    main()
