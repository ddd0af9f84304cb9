"""Spoken words and questions from espeak-ng, cached per phrase in memory and on disk.

espeak-ng is the slow part of generation (~15 ms a call), but the vocabulary is a few dozen phrases, so each
(phrase, voice, speed) is synthesised once per machine: the raw 16-bit PCM at espeak's native rate is stored
as .npy under the cache directory (atomic rename, so parallel workers may share it), then resampled to the
clip rate with PyAV's swresample.

Notation:
    n  samples at the requested rate; waveforms are float32 mono in [-1, 1], silence trimmed
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np

ESPEAK = "espeak-ng"
TRIM_THRESHOLD = 0.02  # of the peak: espeak pads words with near-silence we do not want in a timed slot
TRIM_PAD_SECONDS = 0.02  # keep a little room so onsets are not clipped


def default_cache_dir() -> Path:
    """$FAVOR_SPEECH_CACHE, else $XDG_CACHE_HOME/favor-rt/speech, else ~/.cache/favor-rt/speech."""
    if os.environ.get("FAVOR_SPEECH_CACHE"):
        return Path(os.environ["FAVOR_SPEECH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "favor-rt" / "speech"


def _espeak_version() -> str:
    if shutil.which(ESPEAK) is None:
        raise RuntimeError(f"{ESPEAK} not found on PATH; install it (apt-get install espeak-ng / make sysdeps)")
    return subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def _parse_wav(raw: bytes) -> tuple[np.ndarray, int]:
    """espeak-ng --stdout writes a streaming WAV whose size fields are bogus: read fmt, take all after 'data'."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError(f"{ESPEAK} did not return a WAV stream (got {raw[:12]!r})")
    fmt = raw.find(b"fmt ")
    channels = int.from_bytes(raw[fmt + 10:fmt + 12], "little")
    rate = int.from_bytes(raw[fmt + 12:fmt + 16], "little")
    bits = int.from_bytes(raw[fmt + 22:fmt + 24], "little")
    if channels != 1 or bits != 16:
        raise ValueError(f"expected 16-bit mono from {ESPEAK}, got {channels} channels at {bits} bits")
    data = raw.find(b"data")
    body = raw[data + 8:]
    return np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2"), rate


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """float32 mono [n] from src_rate to dst_rate via swresample (deterministic)."""
    if src_rate == dst_rate:
        return x.astype(np.float32, copy=True)
    frame = av.AudioFrame.from_ndarray(x.astype(np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = src_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst_rate)
    out = resampler.resample(frame) + resampler.resample(None)  # None flushes the filter tail
    return np.concatenate([f.to_ndarray().reshape(-1) for f in out]).astype(np.float32)


def _trim(x: np.ndarray, rate: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(x) > TRIM_THRESHOLD * max(float(np.abs(x).max()), 1e-9))
    if loud.size == 0:
        return x[:0]
    pad = int(TRIM_PAD_SECONDS * rate)
    return x[max(0, loud[0] - pad): loud[-1] + 1 + pad]


class SpeechBank:
    """``say(text, voice, speed, rate)`` -> float32 [n] mono waveform, cached per phrase."""

    def __init__(self, cache_dir: Path | str | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.version = _espeak_version()
        self._native: dict[tuple[str, str, int], tuple[np.ndarray, int]] = {}
        self._resampled: dict[tuple[str, str, int, int], np.ndarray] = {}
        self.espeak_calls = 0

    def _key_path(self, text: str, voice: str, speed: int) -> Path:
        # The espeak version is part of the key: a different espeak gives different audio.
        digest = hashlib.sha1(f"{self.version}|{voice}|{speed}|{text}".encode()).hexdigest()[:20]
        return self.cache_dir / f"{digest}.npy"

    def native(self, text: str, voice: str, speed: int) -> tuple[np.ndarray, int]:
        """Raw espeak-ng output (int16 [n], rate), from memory, disk, or a fresh call."""
        key = (text, voice, speed)
        if key in self._native:
            return self._native[key]
        path = self._key_path(text, voice, speed)
        if path.exists():
            stored = np.load(path)
            pcm, rate = stored[1:].astype(np.int16), int(stored[0])
        else:
            proc = subprocess.run([ESPEAK, "--stdout", "-v", voice, "-s", str(speed), text],
                                  capture_output=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{ESPEAK} failed for {text!r} (voice {voice}): {proc.stderr.decode()}")
            self.espeak_calls += 1
            pcm, rate = _parse_wav(proc.stdout)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # int32 row: [rate, pcm...]; written to a temp file then renamed so readers never see half a file
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, np.concatenate([[rate], pcm.astype(np.int32)]).astype(np.int32))
            os.replace(tmp, path)
        self._native[key] = (pcm, rate)
        return pcm, rate

    def say(self, text: str, voice: str, speed: int, rate: int) -> np.ndarray:
        """float32 [n] at ``rate``, silence trimmed, peak-normalised to 1."""
        key = (text, voice, speed, rate)
        if key not in self._resampled:
            pcm, native_rate = self.native(text, voice, speed)
            x = _trim(pcm.astype(np.float32) / 32768.0, native_rate)
            x = resample(x, native_rate, rate)
            peak = float(np.abs(x).max()) if x.size else 0.0
            if peak == 0.0:
                raise RuntimeError(f"{ESPEAK} produced silence for {text!r} (voice {voice})")
            self._resampled[key] = (x / peak).astype(np.float32)
        return self._resampled[key]
