"""Render a Scene into video frames and an audio waveform (numpy only; no files).

Notation:
    T   video frames (scene.num_frames), frame k shows time k / fps
    H, W frame height / width
    C   audio channels (1, or 2 for varied-audio clips), N samples (scene.num_samples)
"""

from __future__ import annotations

import math

import numpy as np

from .font import draw_text
from .scene import COLOURS, OUTLINE_PX, PULSE_SCALE, TEXT_COLOUR, Scene, Shape
from .speech import SpeechBank

SQRT3 = math.sqrt(3.0)
OUTLINE_COLOUR = (255, 255, 255)
ATTACK_SECONDS, RELEASE_SECONDS = 0.01, 0.05  # click-free edges on every synthetic sound

# Base frequencies (Hz) per sound kind; the scene's pitch jitter multiplies them.
CHIME_HZ = 880.0
CHIME_PARTIALS = ((1.0, 1.0), (2.76, 0.5), (5.40, 0.25))  # (ratio, amplitude): bell-like, inharmonic
CHIME_DECAY_SECONDS = 0.25
LOW_TONE_HZ = 220.0
HIGH_TONE_HZ = 1320.0
BEEP_HZ = 880.0
BEEP_GATE_HZ = 4.0  # "beep-beep": square wave switched on and off four times a second


# ---------------------------------------------------------------------------------------------- video


def _reflect(p: float, lo: float, hi: float) -> float:
    """Bounce p back into [lo, hi] (a triangle wave), so motion is a pure function of time."""
    span = hi - lo
    if span <= 0:
        return lo
    u = (p - lo) % (2 * span)
    return lo + (2 * span - u if u > span else u)


def shape_centre(s: Shape, t: float) -> tuple[float, float]:
    dt = t - s.start
    x0, y0, x1, y1 = s.cell
    return _reflect(s.x0 + s.vx * dt, x0, x1), _reflect(s.y0 + s.vy * dt, y0, y1)


def shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Ink mask of a shape of radius r, given pixel offsets dx, dy from its centre."""
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r * 0.8  # about the circle's area
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if kind == "triangle":  # pointing up, inscribed in the circle of radius r
        return (dy <= r / 2) & (dy >= SQRT3 * np.abs(dx) - r)
    raise ValueError(f"unknown shape kind {kind!r}")


def _draw_shape(frame: np.ndarray, s: Shape, t: float, pulsing: bool) -> None:
    h, w = frame.shape[:2]
    cx, cy = shape_centre(s, t)
    r = s.radius * (PULSE_SCALE if pulsing else 1.0)
    reach = int(math.ceil(r * 1.2 + OUTLINE_PX)) + 1  # bounding box of the largest mask (diamond 1.1 r)
    y0, y1 = max(0, int(cy) - reach), min(h, int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(w, int(cx) + reach + 1)
    # dy: [h', 1], dx: [1, w'] offsets of pixel centres from the shape centre
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    box = frame[y0:y1, x0:x1]
    if pulsing:
        box[shape_mask(s.shape, dx, dy, r + OUTLINE_PX)] = OUTLINE_COLOUR
    box[shape_mask(s.shape, dx, dy, r)] = COLOURS[s.colour]


def render_frame(scene: Scene, k: int) -> np.ndarray:
    """Frame k: [H, W, 3] uint8 at time k / fps."""
    t = k / scene.fps
    frame = np.empty((scene.height, scene.width, 3), dtype=np.uint8)
    frame[:] = scene.background
    pulsing = {scene.sounds[i].source for i in scene.sounding(t)}
    for i in scene.visible(t):
        _draw_shape(frame, scene.shapes[i], t, i in pulsing)
    for text in scene.texts:
        if text.start <= t < text.end:
            draw_text(frame, text.text, text.top, text.left, text.scale, TEXT_COLOUR)
    return frame


def render_video(scene: Scene) -> np.ndarray:
    """All frames: [T, H, W, 3] uint8."""
    return np.stack([render_frame(scene, k) for k in range(scene.num_frames)])


# ---------------------------------------------------------------------------------------------- audio


def _envelope(n: int, rate: int) -> np.ndarray:
    env = np.ones(n, dtype=np.float32)
    a, r = min(n, int(ATTACK_SECONDS * rate)), min(n, int(RELEASE_SECONDS * rate))
    env[:a] *= np.linspace(0, 1, a, endpoint=False, dtype=np.float32)
    if r:
        env[n - r:] *= np.linspace(1, 0, r, dtype=np.float32)
    return env


def synth_sound(kind: str, duration: float, pitch: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic sound, float32 [n], peak 1."""
    n = int(round(duration * rate))
    t = np.arange(n, dtype=np.float64) / rate
    if kind == "chime":
        x = sum(a * np.sin(2 * np.pi * CHIME_HZ * pitch * ratio * t) for ratio, a in CHIME_PARTIALS)
        x = x * np.exp(-t / CHIME_DECAY_SECONDS)
    elif kind == "low tone":
        x = np.sin(2 * np.pi * LOW_TONE_HZ * pitch * t)
    elif kind == "high tone":
        x = np.sin(2 * np.pi * HIGH_TONE_HZ * pitch * t)
    elif kind == "beep":
        gate = np.sin(2 * np.pi * BEEP_GATE_HZ * t) >= 0
        x = np.sign(np.sin(2 * np.pi * BEEP_HZ * pitch * t)) * 0.6 * gate
    elif kind == "noise burst":
        x = rng.standard_normal(n)
    else:
        raise ValueError(f"unknown sound kind {kind!r}")
    x = x.astype(np.float32) * _envelope(n, rate)
    return x / max(float(np.abs(x).max()), 1e-9)


def render_audio(scene: Scene, speech: SpeechBank) -> np.ndarray:
    """The soundtrack: [C, N] float32 in [-1, 1] at scene.sample_rate."""
    rate, n = scene.sample_rate, scene.num_samples
    hiss = np.random.default_rng([scene.noise_seed, 0])
    mono = (hiss.standard_normal(n) * scene.noise_level).astype(np.float32)

    def mix(x: np.ndarray, start: float) -> None:
        i = int(round(start * rate))
        x = x[: max(0, n - i)]
        mono[i:i + len(x)] += x

    for j, s in enumerate(scene.sounds):
        rng = np.random.default_rng([scene.noise_seed, j + 1])  # its own stream: order-independent
        mix(synth_sound(s.kind, s.duration, s.pitch, rate, rng) * s.gain, s.start)
    for sp in scene.speech:
        mix(speech.say(sp.word, sp.voice, sp.speed, rate) * sp.gain, sp.start)
    np.clip(mono, -1.0, 1.0, out=mono)
    if scene.channels == 1:
        return mono[None]
    # constant-power pan: [2, N]
    theta = scene.pan * np.pi / 2
    stereo = np.stack([mono * np.cos(theta), mono * np.sin(theta)]) * np.sqrt(2)
    return np.clip(stereo, -1.0, 1.0).astype(np.float32)
