"""Generate a synthetic split: scenes -> mp4 / PNG / WAV files + a JSONL manifest, in parallel workers.

Layout under ``out_dir``:
    {split}.jsonl                       the manifest (returned by ``generate``)
    {split}.json                        how it was made: seed, clip count, scene options, tool versions
    {split}/{split}-NNNNNN.mp4          clip: H.264 video at FILE_FPS + AAC audio
    {split}/{split}-NNNNNN_still.png    spoken_qa image (a lossless frame of the clip)
    {split}/{split}-NNNNNN_question.wav spoken_qa question (espeak-ng)

Every clip is a pure function of (seed, split, clip index, scene options) -- plus the run's clip count for the
av_matching partner -- so workers never coordinate and any clip can be regenerated alone.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import av

from favor.config import TimingConfig

from .manifest import write_manifest
from .render import render_audio, render_video
from .scene import STREAM_PARTNER, STREAM_TASKS, Scene, SceneOptions, clip_rng, make_scene
from .speech import SpeechBank
from .tasks import ClipPaths, build_samples, choose_partner
from .windows import LONG_SECONDS, WINDOW_SECONDS, window_samples, window_spans
from .write import h264_encoder, write_mp4, write_png, write_wav

GENERATE_SPLITS = ("train", "heldout")  # "demo" is make_demo_clip's own seed space
DEMO_SECONDS = 20.0

_BANKS: dict[str, SpeechBank] = {}  # one per process and cache dir: the in-memory phrase cache survives jobs


def _bank(cache_dir: str | None) -> SpeechBank:
    key = str(cache_dir)
    if key not in _BANKS:
        _BANKS[key] = SpeechBank(cache_dir)
    return _BANKS[key]


def clip_paths(split: str, index: int) -> ClipPaths:
    stem = f"{split}/{split}-{index:06d}"
    return ClipPaths(video=f"{stem}.mp4", image=f"{stem}_still.png", question=f"{stem}_question.wav")


def scene_options(**scene_opts) -> SceneOptions:
    """SceneOptions from keyword options, with one clear error for unknown names."""
    known = set(SceneOptions.__dataclass_fields__)
    unknown = sorted(set(scene_opts) - known)
    if unknown:
        raise ValueError(f"unknown scene options {unknown}; expected some of {sorted(known)}")
    return SceneOptions(**scene_opts)


@dataclass(frozen=True)
class ClipJob:
    out_dir: str
    seed: int
    split: str
    index: int
    num_clips: int
    options: SceneOptions
    speech_cache: str | None
    window_s: float = WINDOW_SECONDS  # long scenes only: the runtime window they are cut into


def clip_partner(scene: Scene, num_clips: int, options: SceneOptions) -> tuple[int, str] | None:
    """(clip index, manifest-relative mp4) of the clip whose audio makes ``scene``'s av_matching negative."""
    rng = clip_rng(scene.seed, scene.split, scene.index, STREAM_PARTNER)
    j = choose_partner(scene, rng, num_clips, lambda i: make_scene(scene.seed, scene.split, i, options))
    return None if j is None else (j, clip_paths(scene.split, j).video)


def make_clip(job: ClipJob) -> list[dict]:
    """Render, write and describe one clip; returns its manifest rows."""
    out = Path(job.out_dir)
    scene = make_scene(job.seed, job.split, job.index, job.options)
    paths = clip_paths(job.split, job.index)
    partner = clip_partner(scene, job.num_clips, job.options)
    samples, spoken = build_samples(scene, clip_rng(job.seed, job.split, job.index, STREAM_TASKS), paths, partner)

    bank = _bank(job.speech_cache)
    frames = render_video(scene)  # [T, H, W, 3]
    (out / paths.video).parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out / paths.video, frames, render_audio(scene, bank), scene.fps, scene.sample_rate)
    write_png(out / paths.image, frames[spoken.frame])
    question = bank.say(spoken.text, spoken.voice, spoken.speed, scene.sample_rate)
    write_wav(out / paths.question, question[None] * 0.7, scene.sample_rate)  # 0.7: headroom like clip speech
    return samples


def generate(out_dir: Path | str, num_clips: int, seed: int, split: str = "train", workers: int = 1, *,
             speech_cache: Path | str | None = None, progress: Callable[[int, int], None] | None = None,
             **scene_opts) -> Path:
    """Write ``num_clips`` clips of ``split`` and their manifest under ``out_dir``; returns the manifest path.

    ``scene_opts`` are SceneOptions fields (width, height, fps, sample_rate, min_seconds, max_seconds,
    varied_audio). ``speech_cache`` defaults to speech.default_cache_dir(). ``progress(done, total)`` is
    called after each clip.
    """
    return _generate(out_dir, num_clips, seed, split, workers, speech_cache, progress, scene_options(**scene_opts),
                     long=False)


def generate_windows(out_dir: Path | str, num_clips: int, seed: int, split: str = "train", workers: int = 1, *,
                     speech_cache: Path | str | None = None, progress: Callable[[int, int], None] | None = None,
                     window_seconds: float = WINDOW_SECONDS, **scene_opts) -> Path:
    """Write ``num_clips`` long scenes of ``split``, cut into the runtime's windows of ``window_seconds``
    (training.synth.windows), under OUT_DIR/{split}_windows/ with the manifest OUT_DIR/{split}_windows.jsonl
    (task stream_caption); returns the manifest path. Scene lengths default to windows.LONG_SECONDS;
    ``scene_opts`` as generate's. A window must hold whole model frames (2 FPS): 0.5-s steps."""
    if not (isinstance(window_seconds, int | float) and window_seconds > 0
            and float(window_seconds * TimingConfig().video_fps).is_integer()):
        raise ValueError(f"window_seconds ({window_seconds!r}) must be a positive whole number of model frames "
                         f"(a multiple of {1 / TimingConfig().video_fps} s)")
    options = scene_options(**{"min_seconds": LONG_SECONDS[0], "max_seconds": LONG_SECONDS[1], **scene_opts})
    return _generate(out_dir, num_clips, seed, split, workers, speech_cache, progress, options, long=True,
                     window_s=float(window_seconds))


def _generate(out_dir: Path | str, num_clips: int, seed: int, split: str, workers: int,
              speech_cache: Path | str | None, progress: Callable[[int, int], None] | None, options: SceneOptions,
              *, long: bool, window_s: float = WINDOW_SECONDS) -> Path:
    """Clips (``long`` False: make_clip, OUT/{split}.jsonl) or long scenes cut into windows (make_long_clip,
    OUT/{split}_windows.jsonl), in worker processes when workers > 1; also writes the run's .json record."""
    if split not in GENERATE_SPLITS:
        raise ValueError(f"split ({split!r}) must be one of {list(GENERATE_SPLITS)}")
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ValueError(f"num_clips ({num_clips!r}) must be an int >= 1")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers ({workers!r}) must be an int >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if speech_cache is None else str(speech_cache)
    bank = _bank(cache)  # fail early (before spawning) if espeak-ng is missing
    make_scene(seed, split, 0, options, long=long)  # validates seed and split before any worker starts
    jobs = [ClipJob(str(out), seed, split, i, num_clips, options, cache, window_s) for i in range(num_clips)]
    make, name = (make_long_clip, f"{split}_windows") if long else (make_clip, split)

    start = time.perf_counter()
    rows: list[dict] = []
    if workers == 1:
        results = map(make, jobs)
        pool = None
    else:
        # spawn, not fork: the caller may hold torch / OpenMP threads that a fork would copy half-alive
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(make, jobs, chunksize=max(1, min(16, num_clips // (4 * workers))))
    try:
        for done, samples in enumerate(results, start=1):  # map keeps clip order: a stable manifest
            rows.extend(samples)
            if progress is not None:
                progress(done, num_clips)
    finally:
        if pool is not None:
            pool.shutdown()
    elapsed = time.perf_counter() - start

    manifest = write_manifest(out / f"{name}.jsonl", rows)
    info = {"seed": seed, "split": split, "num_clips": num_clips, "num_samples": len(rows),
            "scene_options": asdict(options), "espeak": bank.version, "pyav": av.__version__,
            "video_encoder": h264_encoder(), "workers": workers, "seconds": round(elapsed, 3)}
    if long:
        info["window_seconds"] = window_s
    (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    return manifest


def make_long_clip(job: ClipJob) -> list[dict]:
    """Render long scene ``job.index`` once, write each runtime window as its own mp4; its manifest rows."""
    out = Path(job.out_dir)
    scene = make_scene(job.seed, job.split, job.index, job.options, long=True)
    frames, audio = render_video(scene), render_audio(scene, _bank(job.speech_cache))  # [T, H, W, 3], [C, N]
    videos = []
    for k, (start, end) in enumerate(window_spans(scene, job.window_s)):
        video = f"{job.split}_windows/{scene.clip_id}-w{k}.mp4"
        (out / video).parent.mkdir(parents=True, exist_ok=True)
        f0, f1 = round(start * scene.fps), round(end * scene.fps)  # window edges lie on the file frame grid
        a0, a1 = round(start * scene.sample_rate), round(end * scene.sample_rate)
        write_mp4(out / video, frames[f0:f1], audio[:, a0:a1], scene.fps, scene.sample_rate)
        videos.append(video)
    return window_samples(scene, videos, job.window_s)


def make_demo_clip(path: Path | str, seed: int = 0, *, speech_cache: Path | str | None = None) -> Scene:
    """Write one ~20 s clip with many events to ``path`` (mp4) from the held-out 'demo' seed space.

    Returns its Scene (``tasks.caption(scene)`` is the reference caption).
    """
    options = SceneOptions(min_seconds=DEMO_SECONDS, max_seconds=DEMO_SECONDS)
    scene = make_scene(seed, "demo", 0, options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, render_video(scene), render_audio(scene, _bank(None if speech_cache is None else
                                                                     str(speech_cache))),
              scene.fps, scene.sample_rate)
    return scene
