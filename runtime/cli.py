"""``favor-rt``: live captions (``run``) and what this machine sustains (``bench``).

    favor-rt run camera.mp4 --srt camera.srt          # paced like a live camera (default)
    favor-rt run clip.mp4 --offline --jsonl out.jsonl # as fast as possible, nothing dropped
    favor-rt run 0 --max-latency 2                    # /dev/video0
    favor-rt run rtsp://host/stream --vtt live.vtt
    favor-rt run /dev/video0 --audio hw:0             # camera + ALSA microphone on one clock
    favor-rt bench --preset demo --fps 0.5,1,2,4 --window 2,5,10,20

Exit codes: 0 done; 1 the run broke mid-way (the source was lost, or an output could not be written;
captions so far are kept); 2 bad input or options (nothing was written); 3 no caption at all because
every window was dropped (the message says why and what to do); 130 interrupted (Ctrl-C or SIGTERM;
captions so far are kept).

``run`` is a client of the Python API (runtime/api.py: favor.load -> Engine.open -> Session.captions);
this module keeps what is the terminal's: options, writers, the live view, signals and exit codes.
"""

from __future__ import annotations

import io
import os
import signal
import statistics
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from favor.cli_options import CONTEXT, VerboseOption, VersionOption
from runtime.api import DEFAULT_PROMPT, MODEL_ENV, WARMUP_ROUNDS, default_model_path
from runtime.writers import STDOUT, WRITERS, CaptionWriter, OutputError, timestamp

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT, rich_markup_mode=None,
                  help="FAVOR-RT: real-time audio-visual captioning on edge devices.")
EXIT_STREAM_ERROR, EXIT_USAGE, EXIT_NO_CAPTIONS, EXIT_INTERRUPTED = 1, 2, 3, 130
LIVE_REFRESH_HZ = 4  # the live view redraws this often, so drops show as they happen
__all__ = ["DEFAULT_PROMPT", "MODEL_ENV", "WARMUP_ROUNDS", "app", "default_model_path"]


class UsageError(ValueError):
    """Bad options or input, found before anything was written: exit 2."""


class Interrupts:
    """Ctrl-C and SIGTERM end the run, but never halfway through emitting a caption: a caption reaches
    every output (files and terminal) or none. A signal that lands while one is being written is held
    and raised right after it (signal handlers run between bytecodes, so without this the SRT could
    hold a cue the terminal never printed)."""

    def __init__(self) -> None:
        self.emitting = False
        self.pending = False

    def handler(self, signum, frame) -> None:
        if self.emitting:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def atomic(self):
        self.emitting = True
        try:
            yield
        finally:
            self.emitting = False
        if self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        """Route SIGINT and SIGTERM (service managers, `timeout`) here for the run (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _fail(console: Console, message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@app.callback()
def main(version: VersionOption = False) -> None:
    """FAVOR-RT: real-time audio-visual captioning on edge devices."""


# -- options ---------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    input: str
    model: Path
    backend: str
    fps: float | None
    window: int | None
    prompt: str
    max_latency: float | None
    max_new_tokens: int
    context: int
    max_merge: int
    realtime: bool
    incremental: bool
    outputs: dict[str, str] = field(default_factory=dict)  # kind -> path ('-' = standard output)
    threads: str | None = None  # N, or stage=N,... (export/threads.py parse_threads)
    timeout: float = 10.0
    cache: bool = True  # the checkpoint's compiled bundle from the bundle cache (runtime/bundle_cache.py)
    cache_dir: Path | None = None
    autotune: bool = True
    verbose: bool = False
    audio: str | None = None  # a second input for the sound (--audio)
    url: str | None = None  # --backend triton: the Triton server (runtime/triton_backend.py)


def flag(name: str) -> str:
    """An API keyword as this CLI's option (max_new_tokens -> --max-new-tokens), for messages."""
    return "--" + name.replace("_", "-")


def check_options(o: RunOptions) -> None:
    """Every number the user typed, against its range (UsageError naming the option)."""
    from favor.validate import check_number

    checks = [("--max-new-tokens", o.max_new_tokens, 1, None, True, False),
              ("--max-merge", o.max_merge, 1, None, True, False),
              ("--context", o.context, 0, None, True, False),
              ("--fps", o.fps, 0, None, False, True), ("--max-latency", o.max_latency, 0, None, False, True),
              ("--window", o.window, 1, None, True, False), ("--timeout", o.timeout, 0, None, False, True)]
    try:
        for name, value, lo, hi, integer, lo_open in checks:
            if value is not None:
                check_number(name, value, lo, hi, integer=integer, lo_open=lo_open)
        from export.threads import parse_threads

        parse_threads(o.threads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if o.url is not None and o.backend != "triton":
        raise UsageError(f"--url is the Triton server of --backend triton, not of --backend {o.backend}")
    if not o.model.exists():
        raise UsageError(f"{o.model}: model not found (pass --model PATH or set ${MODEL_ENV})")


def check_outputs(o: RunOptions) -> None:
    """Refuse, before anything is opened, an output that is the input, the model (a file the run
    reads), or another output: the run would overwrite what it reads, or interleave two formats."""
    from favor.validate import same_file

    reads = [(what, Path(p)) for what, p in (("the input", o.input), ("the --audio input", o.audio))
             if p is not None and Path(p).exists()]
    reads.append(("the model", o.model))
    seen: list[tuple[str, str]] = []
    for kind, path in o.outputs.items():
        flag = f"--{kind}"
        for other_flag, other in seen:
            if path == other == STDOUT or (path != STDOUT and path != os.devnull and same_file(path, other)):
                raise UsageError(f"{flag} and {other_flag} both write to {path}: give each output its own file")
        if path != STDOUT:
            for what, read in reads:
                inside_model = read.is_dir() and Path(path).resolve().is_relative_to(read.resolve())
                if same_file(path, read) or inside_model:
                    raise UsageError(f"{flag} {path} is {what}, which the run reads: choose another file")
        seen.append((flag, path))


# -- opening ---------------------------------------------------------------------------------------
def open_engine(o: RunOptions):
    """favor.load with the options' model, backend and timing; UsageError if it cannot be had."""
    from runtime import api
    from runtime.bundle_cache import ExportView

    # the export's progress, shown only when the checkpoint is not in the bundle cache yet
    export_view = ExportView(Console(stderr=True, highlight=False, soft_wrap=True))
    try:
        return api.load(o.model, backend=o.backend, fps=o.fps, window=o.window, threads=o.threads,
                        cache=o.cache, cache_dir=o.cache_dir, autotune=o.autotune, say=export_view,
                        verbose=o.verbose, url=o.url)
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        if o.fps is not None and message.startswith("video_fps"):  # the config's check of --fps
            message = "--fps" + message[len("video_fps"):]
        raise UsageError(message) from None
    finally:
        export_view.close()  # Ctrl-C during an export too: the terminal is left clean


def open_session(engine, o: RunOptions):
    """engine.open(input, audio=...) with the run's options: prompt length, source(s), --fps against the
    source, all checked (UsageError naming the option or input)."""
    try:
        return engine.open(o.input, audio=o.audio, name=flag, prompt=o.prompt, realtime=o.realtime,
                           max_new_tokens=o.max_new_tokens, context=o.context, max_merge=o.max_merge,
                           max_latency=o.max_latency, incremental=o.incremental, timeout=o.timeout)
    except (ValueError, FileNotFoundError) as e:  # SourceError and MediaError are ValueErrors
        raise UsageError(str(e)) from None


def is_stdout(path: str) -> bool:
    """``-``, or a path naming the file standard output already is (``/dev/stdout``, a pipe's
    /proc/self/fd/1): captions then go to stderr, so the output is not interleaved with them."""
    if path == STDOUT:
        return True
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def open_writers(o: RunOptions) -> list[CaptionWriter]:
    writers: list[CaptionWriter] = []
    try:
        for kind, path in o.outputs.items():
            writers.append(WRITERS[kind](path))
    except OutputError as e:
        for w in writers:
            w.close()
        raise UsageError(str(e)) from None
    return writers


# -- the terminal ----------------------------------------------------------------------------------
class LiveStatus:
    """The live view: rebuilt at every refresh from the scheduler's counters, so drops show as they
    happen, not only when the next caption arrives."""

    def __init__(self, scheduler, tokenizer=None):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.caption = None
        self.latencies: list[float] = []
        self.tokens: list[int] = []  # the caption being decoded, token by token

    def on_token(self, token: int) -> None:  # the worker thread; __rich__ reads a copy
        self.tokens.append(token)

    def finished(self, cap) -> None:
        self.latencies.append(cap.latency)
        self.caption, self.tokens = cap, []

    def _text(self) -> str:
        tokens = list(self.tokens)
        if tokens and self.tokenizer is not None:
            return self.tokenizer.decode(tokens, skip_special_tokens=True).strip() + " ..."
        return self.caption.text if self.caption is not None else "(waiting for the first window)"

    def __rich__(self) -> Table:
        stats, cap = self.scheduler.stats, self.caption
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("caption", escape(self._text()))
        if cap is not None:
            table.add_row("window", f"{timestamp(cap.start, '.')} -> {timestamp(cap.end, '.')}")
            table.add_row("latency", f"{cap.latency:.3f} s (p95 {_p(self.latencies, 95):.3f} s)")
        table.add_row("windows", f"{stats.captioned} captioned, {stats.dropped} dropped "
                                 f"({stats.dropped_late} late, {stats.dropped_overflow} overflow), "
                                 f"{stats.merged} merged")
        if self.scheduler.max_latency is not None:
            table.add_row("bound", f"{self.scheduler.max_latency:.2f} s; cost ~{self.scheduler.cost(1):.2f} s/window")
        return table


class Terminal:
    """Where captions and messages go: captions on stdout (stderr when an output is ``-``), the
    header, summary and errors on stderr; optionally the live view."""

    def __init__(self, live: bool | None, stdout_taken: bool, scheduler, tokenizer=None):
        # soft_wrap: one message = one line, whatever the terminal width (logs and tests grep them)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.out = self.err if stdout_taken else Console(highlight=False, soft_wrap=True)
        show = (self.out.is_terminal if live is None else live) and not stdout_taken
        self.status = LiveStatus(scheduler, tokenizer)
        self.view = Live(self.status, console=self.out, refresh_per_second=LIVE_REFRESH_HZ,
                         transient=True) if show else None

    def caption(self, cap) -> None:
        self.status.finished(cap)
        self.out.print(escape(f"[{timestamp(cap.start, '.')} --> {timestamp(cap.end, '.')}] {cap.text}"))


def _header(o: RunOptions, engine, source, bound: float | None) -> str:
    t = engine.cfg.timing
    mode = "realtime" if o.realtime else "offline"
    from runtime.selection import describe

    sound = ""
    if o.audio is not None:
        sound = f" + audio {o.audio} ({source.audio_kind}"
        sound += ", replacing the input's own sound track)" if source.ignored_audio else ")"
    return (f"favor-rt: {o.input} ({source.kind}, {mode}){sound} | {describe(engine.backend)} | "
            f"{t.video_fps:g} FPS, {t.frames_per_window} frames/window ({t.window_seconds:g} s)"
            + (f", max latency {bound:g} s" if bound else ""))


def _summary(scheduler, latencies: list[float], report, source=None) -> str:
    stats = scheduler.stats
    text = (f"{stats.captions} captions over {stats.captioned} windows; dropped {stats.dropped} "
            f"({stats.dropped_late} late, {stats.dropped_overflow} overflow); merged {stats.merged}")
    if latencies:
        text += (f"; latency p50 {_p(latencies, 50):.3f} s, p95 {_p(latencies, 95):.3f} s, "
                 f"max {max(latencies):.3f} s")
    if stats.raised_bound is not None:
        text += f"; latency bound raised to {stats.raised_bound:.2f} s (this device's cost per window)"
    if report is not None and report.skipped_packets:
        text += f"; skipped {report.skipped_packets} corrupt packets"
    if getattr(source, "dropped", 0):  # two inputs merged (--audio): media the capture thread lost
        text += f"; dropped {source.dropped} media items at capture (the capture thread fell behind)"
    return text


def nothing_captioned(scheduler) -> str:
    """Why a run produced no caption although windows arrived, and what to do about it."""
    stats = scheduler.stats
    return (f"no captions: all {stats.dropped} windows were dropped ({stats.dropped_late} late, "
            f"{stats.dropped_overflow} overflow): the latency bound is {scheduler.max_latency:.2f} s but a "
            f"window costs ~{scheduler.cost(1):.2f} s here; raise --max-latency, run --offline, or use a "
            "compiled path (the default: --backend auto, not torch)")


# -- running ---------------------------------------------------------------------------------------
@dataclass
class Outcome:
    report: object | None = None
    interrupted: bool = False
    output_error: OutputError | None = None


def stream(session, writers, term: Terminal) -> Outcome:
    """Caption (the session warms up first when realtime) until the source ends, an output fails, or
    Ctrl-C / SIGTERM."""
    outcome = Outcome()
    interrupts = Interrupts()

    def on_caption(cap) -> None:
        with interrupts.atomic():
            for w in writers:
                w.write(cap.start, cap.end, cap.text, cap.as_dict())
            term.caption(cap)

    stop = threading.Event()
    captions = None
    with interrupts.installed():
        try:
            on_token = None
            if term.view is not None:
                on_token = term.status.on_token  # the live view shows captions growing
                term.view.start()
            # realtime: the warm-up measures the per-window cost before the first deadline, while the
            # first window is being captured (so it adds nothing to the time to the first caption)
            captions = session.captions(stop, on_token=on_token)
            for cap in captions:
                on_caption(cap)
            outcome.report = session.report
        except KeyboardInterrupt:
            outcome.interrupted = True
            stop.set()
        except OutputError as e:
            outcome.output_error = e
        finally:
            if term.view is not None:
                term.view.stop()
            if captions is not None:
                captions.close()  # an output failed mid-run: capture stopped and joined
            for w in writers:
                w.close()
            session.close()
    return outcome


def finish(outcome: Outcome, scheduler, term: Terminal, source=None) -> None:
    """Summary line, then the exit code: nothing that failed may look like success."""
    term.err.print(escape(_summary(scheduler, term.status.latencies, outcome.report, source)))
    if outcome.interrupted:
        term.err.print("interrupted: captions so far are saved")
        raise typer.Exit(EXIT_INTERRUPTED)
    if outcome.output_error is not None:
        raise _fail(term.err, str(outcome.output_error), EXIT_STREAM_ERROR)
    report = outcome.report
    if report is not None and report.error is not None:
        raise _fail(term.err, f"{report.error} (captions so far are saved)", EXIT_STREAM_ERROR)
    if scheduler.stats.captions == 0 and scheduler.stats.dropped > 0:
        raise _fail(term.err, nothing_captioned(scheduler), EXIT_NO_CAPTIONS)


def _run(o: RunOptions, live: bool | None) -> None:
    check_options(o)
    check_outputs(o)
    engine = open_engine(o)  # --threads N sets torch's pool too (favor.load)
    session = open_session(engine, o)
    try:
        writers = open_writers(o)
    except UsageError:
        session.close()
        raise
    scheduler = session.scheduler
    term = Terminal(live, any(map(is_stdout, o.outputs.values())), scheduler, engine.tokenizer)
    term.err.print(escape(_header(o, engine, session.source, session.bound)))
    finish(stream(session, writers, term), scheduler, term, session.source)


INPUT_HELP = ("media file, FIFO, camera (/dev/video0 or an index), rtsp/http/udp URL, microphone (hw:0, "
              "alsa:NAME, pulse:NAME), gst:<GStreamer pipeline> or lavfi:<graph>")
AUDIO_HELP = ("the sound from a second input, on the video's clock: ALSA hw:0 / plughw:1,0 / alsa:NAME, "
              "PulseAudio pulse:NAME, or any media path, URL or lavfi:<graph> (replaces the input's own "
              "sound track)")


@app.command(context_settings=CONTEXT)
def run(
    input: Annotated[str, typer.Argument(help=INPUT_HELP)],
    audio: Annotated[str | None, typer.Option(help=AUDIO_HELP)] = None,
    model: Annotated[Path | None, typer.Option(help="FAVOR checkpoint or exported bundle "
                                                    "(default: the demo model)")] = None,
    backend: Annotated[str, typer.Option(
        help="auto | torch | onnxruntime | tensorrt (a bundle with built engines, NVIDIA GPU) | triton "
             "(a Triton server at --url serving favor-export --targets triton)")] = "auto",
    url: Annotated[str | None, typer.Option(help="--backend triton: the server, host:port (HTTP) or "
                                                 "grpc://host:port")] = None,
    fps: Annotated[float | None, typer.Option(help="frames sampled per second (default: the model's); "
                                                   "at most the source's rate")] = None,
    window: Annotated[int | None, typer.Option(help="frames per window (default: the model's)")] = None,
    prompt: Annotated[str, typer.Option(help="question asked about every window")] = DEFAULT_PROMPT,
    max_latency: Annotated[float | None, typer.Option(
        help="seconds from a window's end to its caption (default: one window, raised to the "
             "device's cost per window if slower); realtime only")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="caption length limit in tokens")] = 32,
    context: Annotated[int, typer.Option(help="previous captions carried in the prompt (0 = none)")] = 1,
    max_merge: Annotated[int, typer.Option(help="windows one caption may cover when the device lags")] = 2,
    realtime: Annotated[bool, typer.Option(
        "--realtime/--offline", help="pace files like a live camera, or run as fast as possible")] = True,
    incremental: Annotated[bool, typer.Option(help="encode frames as they arrive")] = True,
    srt: Annotated[str | None, typer.Option(help="write SubRip captions here ('-' = stdout)")] = None,
    vtt: Annotated[str | None, typer.Option(help="write WebVTT captions here ('-' = stdout)")] = None,
    jsonl: Annotated[str | None, typer.Option(help="write JSON lines here ('-' = stdout)")] = None,
    live: Annotated[bool | None, typer.Option("--live/--no-live",
                                              help="live terminal view (default: on a terminal)")] = None,
    threads: Annotated[str | None, typer.Option(
        help="N for every stage, or stage=N,... (audio_encoder, visual_encoder, fusion, decoder); "
             "default: the bundle's tuned counts (torch: torch's default)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds a stream, camera or FIFO may stay silent, "
                                                "opening or mid-stream")] = 10.0,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="run a checkpoint from its compiled bundle "
                                        "in the bundle cache (--no-cache: export for this run only)")] = True,
    cache_dir: Annotated[Path | None, typer.Option(
        help="bundle cache directory (default: $FAVOR_BUNDLE_CACHE, else $FAVOR_CACHE/bundles, "
             "else ~/.cache/favor/bundles)")] = None,
    autotune: Annotated[bool, typer.Option("--autotune/--no-autotune",
                                           help="time threads per stage when exporting a bundle")] = True,
    verbose: VerboseOption = False,
) -> None:
    """Caption a stream window by window, printing and saving captions as they are produced."""
    from favor.quiet import quiet_libraries

    quiet_libraries(verbose)
    outputs = {k: p for k, p in (("srt", srt), ("vtt", vtt), ("jsonl", jsonl)) if p is not None}
    o = RunOptions(input, model or default_model_path(), backend, fps, window, prompt, max_latency,
                   max_new_tokens, context, max_merge, realtime, incremental, outputs, threads, timeout,
                   cache=cache, cache_dir=cache_dir, autotune=autotune, verbose=verbose, audio=audio, url=url)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        _run(o, live)
    except UsageError as e:
        raise _fail(err, str(e), EXIT_USAGE) from None
    except KeyboardInterrupt:  # before the stream started (a slow open, model loading)
        err.print("interrupted before the first window: nothing was written")
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command(context_settings=CONTEXT)
def bench(
    preset: Annotated[str, typer.Option(help="preset with random weights (unless --model)")] = "demo",
    model: Annotated[Path | None, typer.Option(help="a FAVOR checkpoint instead of a preset")] = None,
    backends: Annotated[str, typer.Option(help="comma-separated backends, run round-robin "
                                               "(with --model: torch,auto = eager vs compiled)")] = "torch",
    fps: Annotated[str, typer.Option(help="comma-separated FPS values")] = "0.5,1,2,4",
    window: Annotated[str, typer.Option(help="comma-separated frames-per-window values")] = "2,5,10,20",
    clip: Annotated[Path | None, typer.Option(help="media file (default: a generated clip)")] = None,
    seconds: Annotated[float, typer.Option(help="length of the generated clip")] = 20.0,
    max_new_tokens: Annotated[int, typer.Option(help="max tokens decoded per caption")] = 16,
    out: Annotated[Path, typer.Option(help="directory for the .md, .csv and .png")] = Path("benchmarks/out"),
    max_windows: Annotated[int | None, typer.Option(help="stop each cell after this many windows")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")] = None,
    streams: Annotated[str | None, typer.Option(
        help="comma-separated live stream counts (e.g. 1,2,4,8): each cell runs that many paced streams "
             "through one StreamHub (batched) instead of the per-window sweep")] = None,
    max_latency: Annotated[float | None, typer.Option(
        help="--streams: the latency bound in seconds (default: one window; never raised)")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Sweep FPS x window x backend; report latency percentiles, throughput and stage times
    (--streams: streams sustained through one StreamHub)."""
    from favor.quiet import quiet_libraries
    from favor.validate import check_number
    from runtime import bench as bench_mod

    quiet_libraries(verbose)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        fps_values = [check_number("--fps", float(x), 0, None, lo_open=True) for x in fps.split(",") if x]
        window_values = [int(check_number("--window", int(x), 1, None, integer=True))
                         for x in window.split(",") if x]
        for name, value in (("--threads", threads), ("--max-windows", max_windows)):
            if value is not None:
                check_number(name, value, 1, None, integer=True)
        check_number("--seconds", seconds, 0, None, lo_open=True)
        stream_counts = [int(check_number("--streams", int(x), 1, None, integer=True))
                         for x in (streams or "").split(",") if x]
        if max_latency is not None:
            check_number("--max-latency", max_latency, 0, None, lo_open=True)
    except ValueError as e:
        raise _fail(err, f"{e} (--fps, --window and --streams take comma-separated numbers)", EXIT_USAGE) from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        bench_mod.main(preset=preset, model=model, backends=[b for b in backends.split(",") if b],
                       fps_values=fps_values, window_values=window_values, clip=clip, seconds=seconds,
                       max_new_tokens=max_new_tokens, out=out, max_windows=max_windows, console=err,
                       threads=threads, streams=stream_counts or None, max_latency=max_latency)
    except ValueError as e:
        raise _fail(err, str(e), EXIT_USAGE) from None


# `favor-rt serve` lives in runtime/server/command.py (FastAPI is imported only when it runs)
from runtime.server.command import serve  # noqa: E402

app.command(context_settings=CONTEXT)(serve)
