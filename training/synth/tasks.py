"""Turn a Scene into task samples (manifest rows) with reference answers. Pure: no files, no espeak.

Seven tasks mirror the AVEB categories; every clip yields one sample of each:
    av_caption         video+audio -> "A red circle appears, then the red circle pulses with a chime."
    asr                audio       -> "seven red"
    sound_description  audio       -> "A chime, then a voice says seven."
    temporal_qa        video+audio -> "What appeared after the chime?" -> "red circle"
    av_matching        video + own or another clip's audio -> "yes" / "no"
    sound_source       video+audio -> "Which shape made the chime?" -> "red circle"
    spoken_qa          image + spoken question -> "What colour is the circle?" (heard) -> "red"

Answers come from a small fixed vocabulary (scene.py) so a 135M LLM can learn them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .scene import DIGIT_WORDS, SPEEDS, VOICES, Event, Scene

NOTHING_NEW = "Nothing new happens."

TASKS = ("av_caption", "asr", "sound_description", "temporal_qa", "av_matching", "sound_source", "spoken_qa")

PROMPTS = {
    "av_caption": ("Describe what you see and hear in this video.", "What happens in this clip?"),
    "asr": ("Transcribe the speech.", "What words are spoken?"),
    "sound_description": ("Describe the sounds you hear.", "What sounds are in this audio?"),
    "av_matching": ("Does the audio belong to this video? Answer yes or no.",
                    "Do the sound and the picture match? Answer yes or no."),
    "sound_source": ("Which shape made the {sound}?", "Which shape pulsed when the {sound} played?"),
    "spoken_qa": ("Answer the spoken question about the picture.",
                  "Listen to the question and answer it using the image."),
}


@dataclass(frozen=True)
class SpokenQuestion:
    """What the writer must produce for a spoken_qa sample: a still (frame index) and a spoken question."""

    text: str
    voice: str
    speed: int
    frame: int  # index into the clip's frames; written losslessly as PNG


@dataclass(frozen=True)
class ClipPaths:
    """Manifest-relative paths of one clip's files."""

    video: str  # the clip's mp4 (video + its own audio track)
    image: str  # PNG still for spoken_qa
    question: str  # spoken question audio for spoken_qa


# ------------------------------------------------------------------------------------------- phrases


def printed_phrase(text: str) -> str:
    """'7' -> 'the number seven', 'stop' -> 'the word stop'."""
    return f"the number {DIGIT_WORDS[int(text)]}" if text.isdigit() else f"the word {text}"


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _sound_np(kind: str) -> str:
    return _a(kind)


def _sentence(clauses: list[str]) -> str:
    s = ", then ".join(clauses)
    return s[:1].upper() + s[1:] + "."


def caption(scene: Scene, start: float = 0.0, end: float = math.inf) -> str:
    """The events with onsets in [start, end) s (all by default) in temporal order, as one sentence;
    NOTHING_NEW when there are none (a streamed window where nothing starts)."""
    clauses = []
    for e in (e for e in scene.events if start <= e.t < end):
        if e.kind == "appear":
            clauses.append(f"{_a(scene.shapes[e.index].name)} appears")
        elif e.kind == "disappear":
            clauses.append(f"the {scene.shapes[e.index].name} disappears")
        elif e.kind == "text":
            clauses.append(f"{printed_phrase(scene.texts[e.index].text)} is shown")
        elif e.kind == "sound":
            s = scene.sounds[e.index]
            if s.source is None:
                clauses.append(f"{_sound_np(s.kind)} sounds")
            else:
                clauses.append(f"the {scene.shapes[s.source].name} pulses with {_sound_np(s.kind)}")
        else:
            clauses.append(f"the word {scene.speech[e.index].word} is spoken")
    return _sentence(clauses) if clauses else NOTHING_NEW


def sound_description(scene: Scene) -> str:
    """The soundtrack alone, in order: sounds and who says what."""
    clauses = []
    for e in scene.events:
        if e.kind == "sound":
            clauses.append(_sound_np(scene.sounds[e.index].kind))
        elif e.kind == "speech":
            clauses.append(f"a voice says {scene.speech[e.index].word}")
    return _sentence(clauses)


def transcript(scene: Scene) -> str:
    return " ".join(scene.speech[e.index].word for e in scene.events if e.kind == "speech")


def audio_signature(scene: Scene) -> tuple[str, ...]:
    """What can be heard, in order (sound kinds and words): two clips with equal signatures sound alike."""
    return tuple(scene.event_label(e) for e in scene.events if e.kind in ("sound", "speech"))


# ------------------------------------------------------------------------------------- temporal QA


def _visual_answer(scene: Scene, e: Event) -> str:
    return scene.shapes[e.index].name if e.kind == "appear" else printed_phrase(scene.texts[e.index].text)


def _the(scene: Scene, e: Event) -> str:
    """How a question refers to an event: 'the red circle', 'the chime'."""
    return f"the {scene.shapes[e.index].name}" if e.kind == "appear" else f"the {scene.sounds[e.index].kind}"


def temporal_questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every valid (question, answer) per template; all answers follow from the event order alone."""
    ev = scene.events
    after = {i: ev[i + 1:] for i in range(len(ev))}
    out: dict[str, list[tuple[str, str]]] = {k: [] for k in
                                             ("visual_after_sound", "sound_after_visual", "word_after_sound",
                                              "which_first", "first_sound", "last_sound")}
    for i, e in enumerate(ev):
        if e.kind == "sound":
            kind = scene.sounds[e.index].kind
            nxt = [x for x in after[i] if x.kind in ("appear", "text")]
            if nxt:
                out["visual_after_sound"].append((f"What appeared after the {kind}?", _visual_answer(scene, nxt[0])))
            said = [x for x in after[i] if x.kind == "speech"]
            if said:
                out["word_after_sound"].append((f"What word was spoken after the {kind}?",
                                                scene.speech[said[0].index].word))
        if e.kind == "appear":
            heard = [x for x in after[i] if x.kind == "sound"]
            if heard:
                out["sound_after_visual"].append((f"What sound played after the {scene.shapes[e.index].name} "
                                                  f"appeared?", _sound_np(scene.sounds[heard[0].index].kind)))
    pair_events = [e for e in ev if e.kind in ("appear", "sound")]
    for a in range(len(pair_events)):
        for b in range(a + 1, len(pair_events)):
            first, second = _the(scene, pair_events[a]), _the(scene, pair_events[b])
            out["which_first"].append((f"Which came first, {first} or {second}?", first))
            out["which_first"].append((f"Which came first, {second} or {first}?", first))
    sounds = [e for e in ev if e.kind == "sound"]
    if len(sounds) >= 2:
        out["first_sound"].append(("What was the first sound?", _sound_np(scene.sounds[sounds[0].index].kind)))
        out["last_sound"].append(("What was the last sound?", _sound_np(scene.sounds[sounds[-1].index].kind)))
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------------------------- spoken QA


def _calm_frames(scene: Scene) -> list[int]:
    """Frames with shapes on screen and none pulsing (a pulse adds a white outline to a still)."""
    shown = [k for k in range(scene.num_frames) if scene.visible(k / scene.fps)]
    calm = [k for k in shown
            if not any(scene.sounds[j].source is not None for j in scene.sounding(k / scene.fps))]
    return calm or shown  # every scene has shapes on screen (two are required)


def spoken_questions(scene: Scene, frame: int) -> dict[str, list[tuple[str, str]]]:
    """Every valid (question, answer) per template about the still ``frame``."""
    t = frame / scene.fps
    shown = [scene.shapes[i] for i in scene.visible(t)]
    out = {
        "colour_of": [(f"What colour is the {s.shape}?", s.colour) for s in shown],
        "shape_of": [(f"Which shape is {s.colour}?", s.shape) for s in shown],
        "count": [("How many shapes are there?", DIGIT_WORDS[len(shown)])],
        "printed": [],
    }
    for text in scene.texts:
        if text.start <= t < text.end:
            what = "number" if text.text.isdigit() else "word"
            answer = DIGIT_WORDS[int(text.text)] if text.text.isdigit() else text.text
            out["printed"].append((f"What {what} is written?", answer))
    return {k: v for k, v in out.items() if v}


# ------------------------------------------------------------------------------------------ samples


def _pick(rng: np.random.Generator, options: dict[str, list[tuple[str, str]]]) -> tuple[str, str, str]:
    """A template uniformly (so rare templates are not drowned out), then one of its instances."""
    template = sorted(options)[int(rng.integers(len(options)))]
    question, answer = options[template][int(rng.integers(len(options[template])))]
    return template, question, answer


def make_sample(scene: Scene, task: str, question: str, answer: str, answer_type: str, /, *,
                id_suffix: str = "", video: str | None = None, audio: str | None = None, image: str | None = None,
                **meta) -> dict:
    """One manifest row: a one-turn conversation about ``scene``; ``meta`` adds task fields to the scene's."""
    assert answer, (task, scene.clip_id)
    base_meta = {"seed": scene.seed, "split": scene.split, "clip": scene.index, "clip_id": scene.clip_id,
                 "duration": scene.duration, "events": scene.event_list()}
    return {"id": f"{scene.clip_id}-{task}{id_suffix}", "task": task, "video": video, "audio": audio,
            "image": image,
            "conversation": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "meta": {**base_meta, "answer_type": answer_type, **meta}}


def pick_prompt(rng: np.random.Generator, task: str, **fields) -> str:
    options = PROMPTS[task]
    return options[int(rng.integers(len(options)))].format(**fields)


def choose_partner(scene: Scene, rng: np.random.Generator, num_clips: int,
                   scene_of: Callable[[int], Scene]) -> int | None:
    """Another clip of the same run whose soundtrack differs in content, for a swapped-audio negative."""
    mine = audio_signature(scene)
    for j in rng.permutation(num_clips):
        j = int(j)
        if j != scene.index and audio_signature(scene_of(j)) != mine:
            return j
    return None


def build_samples(scene: Scene, rng: np.random.Generator, paths: ClipPaths,
                  partner: tuple[int, str] | None) -> tuple[list[dict], SpokenQuestion]:
    """The seven samples of one clip, plus the spoken question the writer must render.

    ``partner`` is (clip index, manifest-relative mp4) of another clip whose audio makes a negative for
    av_matching; with None (a one-clip run) the matching sample is a positive.
    """
    def sample(task: str, question: str, answer: str, answer_type: str, /, **fields) -> dict:
        return make_sample(scene, task, question, answer, answer_type, **fields)

    def prompt(task: str, **fields) -> str:
        return pick_prompt(rng, task, **fields)

    v = paths.video
    out = [
        sample("av_caption", prompt("av_caption"), caption(scene), "sentence", video=v, audio=v),
        sample("asr", prompt("asr"), transcript(scene), "transcript", audio=v),
        sample("sound_description", prompt("sound_description"), sound_description(scene), "sentence", audio=v),
    ]
    template, question, answer = _pick(rng, temporal_questions(scene))
    out.append(sample("temporal_qa", question, answer, "phrase", video=v, audio=v, template=template))

    negative = partner is not None and bool(rng.random() < 0.5)
    audio = partner[1] if negative else v
    out.append(sample("av_matching", prompt("av_matching"), "no" if negative else "yes", "yes_no", video=v,
                      audio=audio, audio_clip=partner[0] if negative else scene.index, matched=not negative))

    sourced = [s for s in scene.sounds if s.source is not None]
    s = sourced[int(rng.integers(len(sourced)))]
    out.append(sample("sound_source", prompt("sound_source", sound=s.kind), scene.shapes[s.source].name,
                      "phrase", video=v, audio=v, sound=s.kind))

    # Template first (uniformly among those some still supports), then a still and an instance: printed-text
    # questions would be rare if the still were picked first.
    by_template: dict[str, list[tuple[str, str, int]]] = {}
    for k in _calm_frames(scene):
        for name, pairs in spoken_questions(scene, k).items():
            by_template.setdefault(name, []).extend((q, a, k) for q, a in pairs)
    template = sorted(by_template)[int(rng.integers(len(by_template)))]
    question, answer, frame = by_template[template][int(rng.integers(len(by_template[template])))]
    spoken = SpokenQuestion(text=question, voice=VOICES[int(rng.integers(len(VOICES)))],
                            speed=SPEEDS[int(rng.integers(len(SPEEDS)))], frame=frame)
    out.append(sample("spoken_qa", prompt("spoken_qa"), answer, "word", audio=paths.question, image=paths.image,
                      question=question, template=template, frame_time=round(frame / scene.fps, 6),
                      voice=spoken.voice))
    assert [o["task"] for o in out] == list(TASKS)
    return out, spoken
