"""Scene: the event timeline of one synthetic clip, as pure seeded data.

A Scene fully determines a clip: render.py turns it into pixels and samples, tasks.py into questions with
reference answers. Nothing here opens files or calls espeak-ng.

Notation:
    t        seconds from the clip start; event onsets lie on the file frame grid (multiples of 1 / fps)
    H, W     frame height / width in pixels
    cell     one of 2 x 2 regions of the upper frame; each shape moves inside its own cell (no occlusion)
    band     the lower strip of the frame where printed digits / words appear

Seeds: clip i of split s under seed S draws from ``SeedSequence(S, spawn_key=(SPLIT_CODES[s], i, stream))``,
so any worker can regenerate any clip alone, and train / heldout / demo clips come from disjoint streams
(the split code is part of every key: no train key can equal a heldout key, whatever the seeds).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np

from favor.config import WHOLE_EPS, TimingConfig, exact_div
from favor.validate import check_number

from .font import GAP, GLYPH_H, GLYPH_W

_TIMING = TimingConfig()

FILE_FPS = 10.0  # frames/s written to the mp4; the model later samples TimingConfig.video_fps (2 FPS) from it
VARIED_SAMPLE_RATE = 44_100  # Hz, CD rate: some clips use it (stereo) under varied_audio to exercise resampling
SPLIT_CODES = {"train": 0, "heldout": 1, "demo": 2}  # first spawn-key element: disjoint seed spaces

# Vocabulary: small and fixed so a 135M LLM can learn the answers.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (165, 60, 225),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SOUNDS = ("chime", "low tone", "high tone", "noise burst", "beep")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PRINTED_WORDS = ("cat", "dog", "sun", "stop", "go", "tree")
PRINTED = tuple(str(d) for d in range(10)) + PRINTED_WORDS  # digits are printed as numerals
SPOKEN_WORDS = DIGIT_WORDS + tuple(COLOURS)
VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb+m3")  # espeak-ng voice[+variant]
SPEEDS = (150, 175)  # espeak-ng words per minute; few values keep the phrase cache small
TEXT_COLOUR = (235, 235, 235)

# Timeline spacing (seconds). Every event owns a slot before the next may start, so audio never overlaps
# and each visual change is caught by at least one frame at the model's 2 FPS.
MODEL_FRAME_SECONDS = 1.0 / _TIMING.video_fps  # 0.5 s between frames the model sees
VISUAL_SLOT = 0.6  # s: > one model frame, so consecutive onsets land in different sampled frames
AUDIO_GAP = 0.2  # s of quiet after each sound / word
SOUND_SECONDS = (MODEL_FRAME_SECONDS, 0.8)  # a pulse lasting >= 0.5 s always spans a sampled frame
SPEECH_SLOT = 1.0  # s: every word of SPOKEN_WORDS in every voice fits (tested)
TEXT_SECONDS = (1.5, 2.5)  # printed text stays up for >= 3 model frames
LEAD, TAIL = 0.2, 0.3  # s of calm at the start / end of every clip
MIN_CLIP_SECONDS = LEAD + 2 * VISUAL_SLOT + SOUND_SECONDS[1] + AUDIO_GAP + SPEECH_SLOT + TAIL

TEXT_BAND = 0.25  # fraction of the frame height reserved for printed text
SHAPE_FILL = (0.25, 0.32)  # shape radius as a fraction of the smaller cell side
PULSE_SCALE = 1.3  # a sounding shape grows by this factor and gets a white outline
OUTLINE_PX = 2
MAX_SPEED = 12.0  # px/s inside a cell
MAX_SHAPES, MAX_SPEECH, MAX_TEXTS, MAX_DISAPPEAR = len(SHAPES), 4, 2, 2
TEXT_PROBABILITY = 0.7  # of a clip showing printed text, when it fits


@dataclass(frozen=True)
class SceneOptions:
    """Clip-level knobs (the ``**scene_opts`` of ``generate``)."""

    width: int = 160
    height: int = 160
    fps: float = FILE_FPS
    sample_rate: int = _TIMING.sample_rate  # 16 kHz, Whisper's rate
    min_seconds: float = 4.0
    max_seconds: float = 10.0
    varied_audio: bool = False  # about a third of clips at 44.1 kHz stereo

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64 or self.width % 2 or self.height % 2:
            raise ValueError(f"frame size ({self.width}x{self.height}) must be even and >= 64x64 (yuv420p)")
        if self.fps <= 0:
            raise ValueError(f"fps ({self.fps}) must be > 0")
        # whole audio samples per video frame, so both streams end together
        for rate in (self.sample_rate, VARIED_SAMPLE_RATE) if self.varied_audio else (self.sample_rate,):
            if abs(rate / self.fps - round(rate / self.fps)) > WHOLE_EPS:
                raise ValueError(f"sample rate ({rate} Hz) must be a whole multiple of fps ({self.fps})")
        if not MIN_CLIP_SECONDS <= self.min_seconds <= self.max_seconds:
            raise ValueError(f"clip length range ({self.min_seconds}, {self.max_seconds}) s must satisfy "
                             f"{MIN_CLIP_SECONDS:.1f} <= min <= max (time for the required events)")


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    start: float  # s, appears
    end: float  # s, disappears (clip duration if it stays)
    cell: tuple[int, int, int, int]  # x0, y0, x1, y1 bounds for the centre, px
    x0: float  # centre at t = start, px
    y0: float
    vx: float  # px/s; reflects off the cell bounds
    vy: float
    radius: float  # px

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Text:
    text: str  # "7" or "stop"
    start: float
    end: float
    top: int  # px
    left: int
    scale: int  # font pixel -> scale x scale frame pixels


@dataclass(frozen=True)
class Sound:
    kind: str  # one of SOUNDS
    start: float
    duration: float
    source: int | None  # index into Scene.shapes of the shape that pulses, or None
    distractor: int | None  # another shape guaranteed visible while it plays
    pitch: float  # multiplier around the kind's base frequency
    gain: float


@dataclass(frozen=True)
class Speech:
    word: str
    start: float
    voice: str
    speed: int  # words per minute
    gain: float


@dataclass(frozen=True)
class Event:
    t: float
    kind: str  # "appear" | "disappear" | "text" | "sound" | "speech"
    index: int  # into shapes (appear / disappear), texts, sounds or speech


@dataclass(frozen=True)
class Scene:
    clip_id: str
    split: str
    seed: int
    index: int
    duration: float  # s = num_frames / fps
    num_frames: int
    width: int
    height: int
    fps: float
    sample_rate: int
    channels: int
    pan: float  # left-right balance for stereo clips, 0.5 = centre
    background: tuple[int, int, int]
    noise_level: float  # background hiss amplitude
    noise_seed: int  # seeds the hiss and noise bursts in render.py
    shapes: tuple[Shape, ...]
    texts: tuple[Text, ...]
    sounds: tuple[Sound, ...]
    speech: tuple[Speech, ...]
    events: tuple[Event, ...]  # sorted by t

    @property
    def num_samples(self) -> int:  # whole samples: sample_rate is a multiple of fps
        return self.num_frames * exact_div(self.sample_rate, self.fps)

    def visible(self, t: float) -> list[int]:
        """Indices of shapes on screen at time t."""
        return [i for i, s in enumerate(self.shapes) if s.start <= t < s.end]

    def sounding(self, t: float) -> list[int]:
        """Indices of sounds playing at time t."""
        return [i for i, s in enumerate(self.sounds) if s.start <= t < s.start + s.duration]

    def event_label(self, e: Event) -> str:
        if e.kind in ("appear", "disappear"):
            return self.shapes[e.index].name
        if e.kind == "text":
            return self.texts[e.index].text
        if e.kind == "sound":
            return self.sounds[e.index].kind
        return self.speech[e.index].word

    def event_list(self) -> list[dict]:
        """Compact JSON-able timeline for manifest meta."""
        out = []
        for e in self.events:
            item = {"t": e.t, "kind": e.kind, "what": self.event_label(e)}
            if e.kind == "sound" and self.sounds[e.index].source is not None:
                item["source"] = self.shapes[self.sounds[e.index].source].name
            out.append(item)
        return out


# Independent RNG streams per clip: changing the tasks never changes a scene, and the av_matching partner
# (which depends on the run's clip count) never changes the other samples.
STREAM_SCENE, STREAM_TASKS, STREAM_PARTNER = 0, 1, 2
STREAM_LONG_SCENE = 3  # the long scenes cut into streamed windows (windows.py): no clip shares one
STREAM_DENSE = 4  # extra questions on written clips (dense.py), independent of the split's own draws


def clip_seed_key(seed: int, split: str, index: int) -> tuple[int, int, int]:
    """(seed, split code, clip index): the identity of a clip's random streams, recorded in the manifest."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split ({split!r}) must be one of {sorted(SPLIT_CODES)}")
    check_number("seed", seed, lo=0, integer=True)
    check_number("clip index", index, lo=0, integer=True)
    return seed, SPLIT_CODES[split], index


def clip_rng(seed: int, split: str, index: int, stream: int = STREAM_SCENE) -> np.random.Generator:
    """The RNG of one clip, from (seed, split, clip index, stream) alone."""
    seed, code, index = clip_seed_key(seed, split, index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code, index, stream)))


def make_scene(seed: int, split: str, index: int, options: SceneOptions | None = None, *,
               long: bool = False) -> Scene:
    """The scene of clip ``index`` of ``split`` under ``seed`` (deterministic); ``long``: of long scene
    ``index`` instead (its own random stream and clip id, so it never repeats a clip's draws)."""
    options = options or SceneOptions()
    if not long:
        return sample_scene(clip_rng(seed, split, index), options, split=split, seed=seed, index=index)
    scene = sample_scene(clip_rng(seed, split, index, STREAM_LONG_SCENE), options, split=split, seed=seed,
                         index=index)
    return dataclasses.replace(scene, clip_id=f"{split}-long-{index:06d}")


def _on_grid(t: float, fps: float) -> float:
    return round(math.floor(t * fps + WHOLE_EPS) / fps, 6)


def sample_scene(rng: np.random.Generator, options: SceneOptions, *, split: str, seed: int,
                 index: int) -> Scene:
    """One clip's scene from its RNG. The draws happen in a fixed order (golden-tested): every step
    below takes ``rng`` in turn, so reordering them would change every generated clip."""
    o = options
    num_frames = int(rng.integers(math.ceil(o.min_seconds * o.fps), math.floor(o.max_seconds * o.fps) + 1))
    duration = num_frames / o.fps
    varied = o.varied_audio and rng.random() < 1 / 3
    sample_rate, channels = (VARIED_SAMPLE_RATE, 2) if varied else (o.sample_rate, 1)
    counts, durations = _event_counts(rng, duration)
    content = _content(rng, counts)
    sound_specs = _sound_specs(rng, durations, counts["shape"])
    order = _topological_order(rng, _specs(rng, counts, sound_specs, content))
    when = _place_onsets(rng, order, duration, o.fps)
    shape_h = int(round(o.height * (1 - TEXT_BAND)))  # the text band lies below the shapes
    shapes = _shapes(rng, o, shape_h, content, when, duration)
    texts = _texts(rng, o, shape_h, content["printed"], when, duration)
    sounds = _sounds(rng, sound_specs, content["sound_kinds"])
    speech = _speech(rng, content["words"], when)
    events = tuple(Event(t=s["t"], kind=s["kind"], index=s["index"]) for s in order)
    assert all(a.t < b.t for a, b in itertools.pairwise(events)), events
    level = int(rng.integers(10, 50))
    tint = rng.integers(-8, 9, size=3)
    return Scene(
        clip_id=f"{split}-{index:06d}", split=split, seed=seed, index=index, duration=round(duration, 6),
        num_frames=num_frames, width=o.width, height=o.height, fps=o.fps, sample_rate=sample_rate,
        channels=channels, pan=round(float(rng.uniform(0.3, 0.7)), 3),
        background=tuple(int(np.clip(level + d, 0, 255)) for d in tint),
        noise_level=round(float(rng.uniform(0.002, 0.01)), 4), noise_seed=int(rng.integers(2**31)),
        shapes=tuple(shapes), texts=tuple(texts), sounds=tuple(sounds), speech=tuple(speech), events=events)


# Seconds of timeline each kind of visual / speech event owns (sounds own their length + AUDIO_GAP).
_SLOT = {"shape": VISUAL_SLOT, "text": VISUAL_SLOT, "disappear": VISUAL_SLOT, "speech": SPEECH_SLOT}


def _sound_len(rng: np.random.Generator) -> float:
    return round(float(rng.uniform(*SOUND_SECONDS)), 3)


def _event_counts(rng: np.random.Generator, duration: float) -> tuple[dict[str, int], dict[str, list[float]]]:
    """Step 1, event counts: the required four, then random extras while they fit a random fill level.

    Returns counts per kind and the sound durations (s) of sourced and plain sounds."""
    counts = {"shape": 2, "source": 1, "plain": 0, "speech": 1, "text": 0, "disappear": 0}
    durations = {"source": [_sound_len(rng)], "plain": []}

    def used() -> float:
        fixed = sum(_SLOT[k] * counts[k] for k in _SLOT)
        return fixed + sum(d + AUDIO_GAP for k in ("source", "plain") for d in durations[k])

    if rng.random() < TEXT_PROBABILITY and used() + VISUAL_SLOT <= duration - LEAD - TAIL:
        counts["text"] = 1  # printed text is favoured: the uniform fill below alone shows it in ~40% of clips
    budget = (duration - LEAD - TAIL) * rng.uniform(0.6, 1.0)
    too_big: set[str] = set()  # kinds that no longer fit; cheaper kinds may still
    while options_left := [k for k in _kinds_below_limit(counts) if k not in too_big]:
        k = options_left[rng.integers(len(options_left))]
        extra = _sound_len(rng) if k in ("source", "plain") else None
        cost = (extra + AUDIO_GAP) if extra is not None else _SLOT[k]
        if used() + cost > budget:
            too_big.add(k)
            continue
        counts[k] += 1
        if extra is not None:
            durations[k].append(extra)
    return counts, durations


def _kinds_below_limit(counts: dict[str, int]) -> list[str]:
    """Event kinds a clip may still add one more of (in a fixed order: the draw indexes this list)."""
    limits = {"shape": MAX_SHAPES, "speech": MAX_SPEECH, "text": MAX_TEXTS}
    kinds = [k for k, lim in limits.items() if counts[k] < lim]
    if counts["source"] + counts["plain"] < len(SOUNDS):
        kinds += ["source", "plain"]
    if counts["disappear"] < min(MAX_DISAPPEAR, counts["shape"] - 1):
        kinds.append("disappear")
    return kinds


def _content(rng: np.random.Generator, counts: dict[str, int]) -> dict[str, list[str]]:
    """Step 2: distinct colours, shape types, sound kinds and words within a clip, so every answer is
    unambiguous ("the circle", "the chime")."""
    n_shapes = counts["shape"]
    return {
        "colours": [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n_shapes]],
        "kinds": [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_shapes]],
        "sound_kinds": [SOUNDS[i] for i in rng.permutation(len(SOUNDS))[:counts["source"] + counts["plain"]]],
        "words": [SPOKEN_WORDS[i] for i in rng.permutation(len(SPOKEN_WORDS))[:counts["speech"]]],
        "printed": [PRINTED[i] for i in rng.permutation(len(PRINTED))[:counts["text"]]],
    }


def _sound_specs(rng: np.random.Generator, durations: dict[str, list[float]], n_shapes: int) -> list[dict]:
    """Step 3a: sourced sounds (a pulsing shape and a distractor, both on screen) then plain ones."""
    specs = []
    for j, d in enumerate(durations["source"]):
        src, dis = (int(v) for v in rng.choice(n_shapes, size=2, replace=False))
        specs.append({"kind": "sound", "index": j, "slot": d + AUDIO_GAP, "duration": d,
                      "source": src, "distractor": dis, "needs": {("appear", src), ("appear", dis)}})
    for j, d in enumerate(durations["plain"]):
        specs.append({"kind": "sound", "index": len(durations["source"]) + j, "slot": d + AUDIO_GAP,
                      "duration": d, "source": None, "distractor": None, "needs": set()})
    return specs


def _specs(rng: np.random.Generator, counts: dict[str, int], sound_specs: list[dict],
           content: dict[str, list[str]]) -> list[dict]:
    """Step 3b: every event with its prerequisites ("needs": events that must come before it)."""
    n_shapes = counts["shape"]
    specs: list[dict] = [{"kind": "appear", "index": i, "slot": VISUAL_SLOT, "needs": set()}
                         for i in range(n_shapes)]
    specs += sound_specs
    for i in rng.permutation(n_shapes)[:counts["disappear"]]:
        i = int(i)
        needs = {("appear", i)} | {("sound", s["index"]) for s in sound_specs
                                   if i in (s["source"], s["distractor"])}
        specs.append({"kind": "disappear", "index": i, "slot": VISUAL_SLOT, "needs": needs})
    specs += [{"kind": "speech", "index": j, "slot": SPEECH_SLOT, "needs": set()}
              for j in range(len(content["words"]))]
    specs += [{"kind": "text", "index": j, "slot": VISUAL_SLOT, "needs": {("text", j - 1)} if j else set()}
              for j in range(len(content["printed"]))]
    return specs


def _topological_order(rng: np.random.Generator, specs: list[dict]) -> list[dict]:
    """Step 3c: a random order in which every event follows its prerequisites."""
    order: list[dict] = []
    done: set[tuple[str, int]] = set()
    pending = list(specs)
    while pending:
        ready = [s for s in pending if s["needs"] <= done]
        pick = ready[int(rng.integers(len(ready)))]
        pending.remove(pick)
        order.append(pick)
        done.add((pick["kind"], pick["index"]))
    return order


def _place_onsets(rng: np.random.Generator, order: list[dict], duration: float,
                  fps: float) -> dict[tuple[str, int], float]:
    """Step 4: spread the free time randomly between events, then snap onsets to the frame grid.

    Sets each spec's "t" and returns {(kind, index): onset s}."""
    free = duration - LEAD - TAIL - sum(s["slot"] for s in order)
    assert free >= -1e-9, (free, duration)
    gaps = rng.dirichlet(np.ones(len(order))) * max(free, 0.0)
    t = LEAD
    for s, gap in zip(order, gaps, strict=True):
        t += float(gap)
        s["t"] = _on_grid(t, fps)
        t += s["slot"]
    return {(s["kind"], s["index"]): s["t"] for s in order}


def _shapes(rng: np.random.Generator, o: SceneOptions, shape_h: int, content: dict[str, list[str]],
            when: dict[tuple[str, int], float], duration: float) -> list[Shape]:
    """Step 5: geometry, 2 x 2 cells above the text band (``shape_h`` px tall), one shape per cell."""
    cell_w, cell_h = o.width / 2, shape_h / 2
    cells = rng.permutation(4)
    shapes = []
    for i, (kind, colour) in enumerate(zip(content["kinds"], content["colours"], strict=True)):
        cx, cy = divmod(int(cells[i]), 2)
        radius = float(rng.uniform(*SHAPE_FILL)) * min(cell_w, cell_h)
        margin = radius * PULSE_SCALE + OUTLINE_PX  # a pulsing shape still stays inside its cell
        lo_x, hi_x = _span(cx * cell_w + margin, (cx + 1) * cell_w - margin)
        lo_y, hi_y = _span(cy * cell_h + margin, (cy + 1) * cell_h - margin)
        speed, angle = rng.uniform(0, MAX_SPEED), rng.uniform(0, 2 * math.pi)
        shapes.append(Shape(
            shape=kind, colour=colour, start=when[("appear", i)],
            end=when.get(("disappear", i), duration),
            cell=(round(lo_x, 3), round(lo_y, 3), round(hi_x, 3), round(hi_y, 3)),
            x0=round(float(rng.uniform(lo_x, hi_x)), 3), y0=round(float(rng.uniform(lo_y, hi_y)), 3),
            vx=round(float(speed * math.cos(angle)), 3), vy=round(float(speed * math.sin(angle)), 3),
            radius=round(radius, 3)))
    return shapes


def _span(lo: float, hi: float) -> tuple[float, float]:
    """The range a shape's centre may take in one axis; a cell too small for it pins it to the middle."""
    return (lo, hi) if lo < hi else ((lo + hi) / 2,) * 2


def _texts(rng: np.random.Generator, o: SceneOptions, band_top: int, printed: list[str],
           when: dict[tuple[str, int], float], duration: float) -> list[Text]:
    """Printed words, centred vertically in the band below ``band_top`` px; each replaces the last."""
    band_h = o.height - band_top
    texts = []
    for j, word in enumerate(printed):
        units = len(word) * (GLYPH_W + GAP) - GAP
        scale = max(1, min(int(band_h * 0.8) // GLYPH_H, int(o.width * 0.9) // units))
        tw, th = units * scale, GLYPH_H * scale
        start = when[("text", j)]
        end = min(start + float(rng.uniform(*TEXT_SECONDS)), duration)
        if j + 1 < len(printed):  # the next text replaces this one
            end = min(end, when[("text", j + 1)])
        texts.append(Text(text=word, start=start, end=round(end, 6), top=band_top + (band_h - th) // 2,
                          left=int(rng.integers(0, o.width - tw + 1)), scale=scale))
    return texts


def _sounds(rng: np.random.Generator, sound_specs: list[dict], sound_kinds: list[str]) -> list[Sound]:
    return [Sound(kind=sound_kinds[s["index"]], start=s["t"], duration=s["duration"],
                  source=s["source"], distractor=s["distractor"],
                  pitch=round(float(rng.uniform(0.97, 1.03)), 4),
                  gain=round(float(rng.uniform(0.35, 0.6)), 3))
            for s in sorted(sound_specs, key=lambda s: s["index"])]


def _speech(rng: np.random.Generator, words: list[str], when: dict[tuple[str, int], float]) -> list[Speech]:
    return [Speech(word=w, start=when[("speech", j)], voice=VOICES[int(rng.integers(len(VOICES)))],
                   speed=SPEEDS[int(rng.integers(len(SPEEDS)))], gain=round(float(rng.uniform(0.5, 0.8)), 3))
            for j, w in enumerate(words)]
