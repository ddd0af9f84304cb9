"""The Python API: the one way every caller runs FAVOR (favor-rt run, the server, the stream hub).

    import favor
    model = favor.load()                                   # the demo model ($FAVOR_MODEL honoured)
    for cap in model.stream("/dev/video0", audio="hw:0"):  # live: yields each caption as it is produced
        print(f"{cap.start:.1f}-{cap.end:.1f} s: {cap.text}")
    captions = model.caption("clip.mp4")                   # list[Caption], offline (nothing dropped)
    answer = model.ask("clip.mp4", "What makes the sound?") # the whole clip as one prompt (favor-eval's way)

``load`` opens the backend once (a checkpoint is compiled through the bundle cache, runtime/bundle_cache.py);
``Engine.open`` opens a source and returns a ``Session`` (source, scheduler, captioner) whose
``captions()`` generator warms up (realtime) and runs the stream loop (runtime/stream.py). ``caption`` and
``stream`` are that, collected or yielded. Bad input raises ValueError with one line naming the input
or option. An Engine is single-threaded: one stream or question at a time (runtime/hub.py multiplexes).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from favor.prompt import CAPTION_PROMPT

DEFAULT_PROMPT = CAPTION_PROMPT
MODEL_ENV = "FAVOR_MODEL"
# Realtime warm-up captions: the first pays one-off costs (sessions, arenas), the second is the
# measurement; each costs about one caption, and they run while the first window is captured.
WARMUP_ROUNDS = 2
# A requested fps may exceed the source's stated average rate by this much (rounded NTSC rates,
# variable frame rate averages) before it counts as asking for frames the source does not have.
FPS_TOLERANCE = 1.01
DEFAULT_TIMEOUT_S = 10.0


def default_model_path() -> Path:
    """The embedded demo model: $FAVOR_MODEL if set, else favor/assets/demo/favor-demo.safetensors."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    import favor

    return Path(favor.__file__).parent / "assets" / "demo" / "favor-demo.safetensors"


def _same(name: str) -> str:
    return name


@dataclass
class StreamOptions:
    """How one stream is captioned (the keywords of Engine.caption / stream / open)."""
    prompt: str = DEFAULT_PROMPT
    realtime: bool = False
    max_new_tokens: int = 32
    context: int = 1  # previous captions carried in the prompt
    max_merge: int = 2  # windows one caption may cover when the device lags
    max_latency: float | None = None  # realtime bound, seconds (None: one window, adaptive)
    incremental: bool = True  # encode frames as they arrive
    timeout: float = DEFAULT_TIMEOUT_S  # seconds a stream, device or FIFO may stay silent
    warmup: bool = True  # realtime: measure the per-window cost before the first deadline

    @classmethod
    def from_kwargs(cls, **kwargs) -> StreamOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unexpected option(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**kwargs)


def check_prompt_fits(engine, o: StreamOptions, name: Callable[[str], str] = _same) -> None:
    """The LLM prompt at its longest (the question, ``context`` earlier captions at full length,
    ``max_merge`` windows of AV tokens, the answer) must fit the model's position table; checked
    before any allocation (a 100,000-character prompt would otherwise ask for gigabytes)."""
    from favor.prompt import inference_ids, stream_prompt

    cfg, tok = engine.cfg, engine.tokenizer

    def text_tokens(question: str) -> int:  # BOS + the text around the AV chunk, history included
        ids = inference_ids(tok, stream_prompt(question, [""] * o.context))
        return 1 + len(ids.pre) + len(ids.post)

    av = o.max_merge * cfg.queries_per_window
    answers = (o.context + 1) * o.max_new_tokens  # this caption and each earlier one at full length
    positions = cfg.llm.max_positions
    need = text_tokens(o.prompt) + av + answers
    if need > positions:
        # the question appears once per turn (context + 1 times); the rest of the budget is fixed
        room = (positions - av - answers - text_tokens("")) // (o.context + 1)
        advice = (f"shorten the prompt to at most ~{room} tokens" if room > 0
                  else f"lower {name('context')}, {name('max_new_tokens')} or {name('max_merge')}")
        raise ValueError(
            f"{name('prompt')} is too long: with {name('context')} {o.context}, {name('max_new_tokens')} "
            f"{o.max_new_tokens} and up to {o.max_merge} merged windows ({av} AV tokens) the LLM needs {need} "
            f"positions, the model has {positions}; {advice}")


def check_fps_against_source(fps: float | None, source, name: Callable[[str], str] = _same) -> None:
    """An explicit fps above the source's frame rate would caption repeated frames (and a window
    far shorter than intended): refused, naming the source's rate. The model's default rate is
    kept on slower sources (an image or a slide show is repeated by design)."""
    rate = source.frame_rate
    if fps is not None and rate and fps > rate * FPS_TOLERANCE:
        raise ValueError(f"{name('fps')} ({fps:g}) is above {source.spec}'s frame rate ({rate:g} FPS): every "
                         f"sampled frame would repeat; use {name('fps')} {rate:g} or less")


class Session:
    """One opened stream: its source, scheduler and captioner. ``captions()`` runs it (once)."""

    def __init__(self, engine: Engine, source, opts: StreamOptions):
        from runtime.scheduler import DeadlineScheduler
        from runtime.stream import StreamingCaptioner

        self.engine, self.source, self.options = engine, source, opts
        timing = engine.cfg.timing
        self.bound = (opts.max_latency or timing.window_seconds) if opts.realtime else None
        # The default bound (one window) adapts to a slow device; a bound the caller gave is kept.
        self.scheduler = DeadlineScheduler(self.bound, opts.max_merge, adaptive=opts.max_latency is None)
        self.captioner = StreamingCaptioner(engine.backend, opts.prompt, opts.max_new_tokens, opts.context,
                                            opts.incremental)
        self.report = None  # runtime.stream.StreamReport, once captions() has run to the end

    def captions(self, stop: threading.Event | None = None, on_token: Callable[[int], None] | None = None
                 ) -> Iterator:
        """Yields each Caption as it is produced until the source ends, ``stop`` is set or the generator
        is closed. A source that broke mid-stream ends it too: ``report.error`` holds why."""
        o = self.options
        self.captioner.on_token = on_token
        warmup = None
        if o.realtime and o.warmup:  # while the first window is being captured
            def warmup():
                self.captioner.warmup(self.scheduler, rounds=WARMUP_ROUNDS)
        self.report = yield from self.captioner.iterate(self.source, o.realtime, self.scheduler, stop,
                                                         before_first=warmup)

    def close(self) -> None:
        self.source.close()


class Engine:
    """A loaded model: ``caption`` / ``stream`` a source window by window, ``ask`` about a whole clip."""

    def __init__(self, backend, path: Path | None = None, fps: float | None = None):
        self.backend, self.path, self.fps = backend, path, fps
        self.cfg, self.tokenizer = backend.cfg, backend.tokenizer

    def __repr__(self) -> str:
        from runtime.selection import describe

        return f"Engine({self.path}, {describe(self.backend)})"

    def open(self, source: str, *, audio: str | None = None, name: Callable[[str], str] = _same,
             **options) -> Session:
        """Open ``source`` (with ``audio`` as its sound, if given) for captioning. ``name`` spells an
        option in messages (the CLI passes its flag names)."""
        from runtime.sources import open_source

        o = StreamOptions.from_kwargs(**options)
        if not isinstance(source, str | os.PathLike):
            raise ValueError(f"source must be a path, URL, device or lavfi:<graph>, got {type(source).__name__}")
        check_prompt_fits(self, o, name)
        src = open_source(os.fspath(source), self.cfg.timing.sample_rate, audio=audio, realtime=o.realtime,
                          timeout=o.timeout)
        try:
            check_fps_against_source(self.fps, src, name)
            return Session(self, src, o)
        except BaseException:
            src.close()
            raise

    def stream(self, source: str, *, audio: str | None = None, realtime: bool = True,
               stop: threading.Event | None = None, **options) -> Iterator:
        """Captions of ``source`` as they are produced (live: paced, latest wins, deadline-bounded).
        Break out of the loop (or close the iterator) to stop; a source that breaks raises its
        SourceError after the captions made so far."""
        session = self.open(source, audio=audio, realtime=realtime, **options)  # bad input raises here
        return _yield_then_raise(session, stop)

    def caption(self, source: str, *, audio: str | None = None, realtime: bool = False, **options) -> list:
        """Every caption of ``source`` (offline by default: as fast as possible, nothing dropped)."""
        return list(self.stream(source, audio=audio, realtime=realtime, **options))

    def ask(self, source: str | os.PathLike | None = None, question: str | None = None, *,
            video: str | os.PathLike | None = None, audio: str | os.PathLike | None = None,
            image: str | os.PathLike | None = None, max_new_tokens: int = 48,
            instruction: str | None = None) -> str:
        """The answer to ``question`` about the whole clip (up to cfg.timing.max_frames) as one prompt.

        ``source``: a video with its own sound. Or separate inputs, as an eval sample has them:
        ``video`` (frames only) or ``image`` (a still), and/or ``audio`` (a recording, or a file's audio
        track); ``source`` with ``audio`` takes the source's frames with that sound. ``instruction``: what
        the visual encoder is told when it should not be the question (runtime.clip.ask_clip).
        ``ask(image="still.png", audio="question.wav", question="...")``. ValueError (one line) for a
        missing question, unreadable media or an impossible combination (video and image; source and
        video/image)."""
        from runtime.clip import ask_clip

        if question is None:
            raise ValueError("ask needs a question")
        return ask_clip(self.backend, source, question, video=video, audio=audio, image=image,
                        max_new_tokens=max_new_tokens, instruction=instruction)


def load(path: str | os.PathLike | None = None, *, backend: str = "auto", fps: float | None = None,
         window: int | None = None, threads: str | int | None = None, cache: bool = True,
         cache_dir: str | os.PathLike | None = None, autotune: bool = True, say=None,
         verbose: bool = False, url: str | None = None, max_batch: int = 1) -> Engine:
    """A model ready to caption: a checkpoint (compiled once into the bundle cache unless ``cache`` is
    False), an exported bundle, or None for the demo model. ``backend``: auto | torch | onnxruntime |
    tensorrt | triton (the stages on the Triton server at ``url``, runtime/triton_backend.py).
    ``fps`` / ``window`` override the checkpoint's timing (a bundle's is fixed). ``say`` receives export
    progress (runtime.bundle_cache.ExportView). Library warnings and progress bars are silenced unless
    ``verbose`` (favor.quiet); ``threads=N`` also sets torch's thread count. ``max_batch`` > 1: a
    checkpoint's bundle is exported with a batch axis that wide (a StreamHub batches the audio encoder
    and fusion of that many streams in one call; the bundle cache keys on it).
    ValueError (one line) for a missing model, an unknown backend or bad threads."""
    from favor.quiet import quiet_libraries

    quiet_libraries(verbose)  # before the heavy imports: their switches are read when they load
    from export.threads import parse_threads
    from runtime.backends import make_backend
    from runtime.bundle_cache import Policy

    every_stage = parse_threads(None if threads is None else str(threads)).get("*")
    if every_stage is not None:  # threads=N: torch's pool too (media preprocessing, the torch backend)
        import torch

        torch.set_num_threads(every_stage)
    model = Path(path) if path is not None else default_model_path()
    if not model.exists():
        raise ValueError(f"{model}: model not found (pass a checkpoint or bundle path, or set ${MODEL_ENV})")
    from export.options import ExportOptions

    options = None if max_batch == 1 else ExportOptions(max_batch=max_batch)  # ValueError below 1
    policy = Policy(None if cache_dir is None else Path(cache_dir), cache, autotune, options=options, say=say,
                    verbose=verbose)
    engine = make_backend(backend, model, fps, window, threads=threads, policy=policy, url=url)
    return Engine(engine, model, fps)


def _yield_then_raise(session: Session, stop: threading.Event | None) -> Iterator:
    yield from session.captions(stop)
    if session.report is not None and session.report.error is not None:
        raise session.report.error


_default: dict[tuple, Engine] = {}


def _engine(model) -> Engine:
    """``model`` as an Engine: an Engine as is, else a path (None: the demo model) loaded once."""
    if isinstance(model, Engine):
        return model
    key = (os.fspath(model) if model is not None else None,)
    if key not in _default:
        _default[key] = load(model)
    return _default[key]


def caption(source: str, model=None, **options) -> list:
    """favor.caption: ``load(model).caption(source, **options)``, the model loaded once per path."""
    return _engine(model).caption(source, **options)


def stream(source: str, model=None, **options) -> Iterator:
    """favor.stream: ``load(model).stream(source, **options)``."""
    return _engine(model).stream(source, **options)


def ask(source: str | None = None, question: str | None = None, model=None, **options) -> str:
    """favor.ask: ``load(model).ask(source, question, **options)`` (options: video, audio, image,
    max_new_tokens)."""
    return _engine(model).ask(source, question, **options)
