"""``favor-rt``: live captions (``run``) and what this machine sustains (``bench``).

    favor-rt run camera.mp4 --srt camera.srt          # paced like a live camera (default)
    favor-rt run clip.mp4 --offline --jsonl out.jsonl # as fast as possible, nothing dropped
    favor-rt run 0 --max-latency 2                    # /dev/video0
    favor-rt run rtsp://host/stream --vtt live.vtt
    favor-rt bench --preset demo --fps 0.5,1,2,4 --window 2,5,10,20

Exit codes: 0 done; 1 the run broke mid-way (the source was lost, or an output could not be written;
captions so far are kept); 2 bad input or options (nothing was written); 3 no caption at all because
every window was dropped (the message says why and what to do); 130 interrupted (Ctrl-C or SIGTERM;
captions so far are kept).
"""

from __future__ import annotations

import io
import os
import signal
import statistics
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from favor.cli_options import CONTEXT, VerboseOption, VersionOption
from runtime.writers import STDOUT, WRITERS, CaptionWriter, OutputError, timestamp

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=CONTEXT, rich_markup_mode=None,
                  help="FAVOR-RT: real-time audio-visual captioning on edge devices.")
DEFAULT_PROMPT = "Describe what happens in the video and the audio."
EXIT_STREAM_ERROR, EXIT_USAGE, EXIT_NO_CAPTIONS, EXIT_INTERRUPTED = 1, 2, 3, 130
MODEL_ENV = "FAVOR_MODEL"
# A requested --fps may exceed the source's stated average rate by this much (rounded NTSC rates,
# variable frame rate averages) before it counts as asking for frames the source does not have.
FPS_TOLERANCE = 1.01
LIVE_REFRESH_HZ = 4  # the live view redraws this often, so drops show as they happen
# Realtime warm-up captions: the first pays one-off costs (sessions, arenas), the second is the
# measurement; each costs about one caption, and they run while the first window is captured.
WARMUP_ROUNDS = 2


class UsageError(ValueError):
    """Bad options or input, found before anything was written: exit 2."""


def default_model_path() -> Path:
    """The embedded demo model: $FAVOR_MODEL if set, else favor/assets/demo/favor-demo.safetensors."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV])
    import favor

    return Path(favor.__file__).parent / "assets" / "demo" / "favor-demo.safetensors"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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
    if not o.model.exists():
        raise UsageError(f"{o.model}: model not found (pass --model PATH or set ${MODEL_ENV})")


def check_outputs(o: RunOptions) -> None:
    """Refuse, before anything is opened, an output that is the input, the model (a file the run
    reads), or another output: the run would overwrite what it reads, or interleave two formats."""
    from favor.validate import same_file

    reads = [("the input", Path(o.input))] if Path(o.input).exists() else []
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


def check_fps_against_source(fps: float | None, source) -> None:
    """An explicit --fps above the source's frame rate would caption repeated frames (and a window
    far shorter than intended): refused, naming the source's rate. The model's default rate is
    kept on slower sources (an image or a slide show is repeated by design)."""
    rate = source.frame_rate
    if fps is not None and rate and fps > rate * FPS_TOLERANCE:
        raise UsageError(f"--fps ({fps:g}) is above {source.spec}'s frame rate ({rate:g} FPS): every sampled "
                         f"frame would repeat; use --fps {rate:g} or less")


def check_prompt_fits(engine, o: RunOptions) -> None:
    """The LLM prompt at its longest (the question, ``context`` earlier captions at full length,
    ``max_merge`` windows of AV tokens, the answer) must fit the model's position table; checked
    before any allocation (a 100,000-character prompt would otherwise ask for gigabytes)."""
    from favor.prompt import chat_prompt, inference_ids

    cfg, tok = engine.cfg, engine.tokenizer

    def text_tokens(question: str) -> int:  # BOS + the text around the AV chunk, history included
        ids = inference_ids(tok, chat_prompt(question, [(question, "")] * o.context))
        return 1 + len(ids.pre) + len(ids.post)

    av = o.max_merge * cfg.queries_per_window
    answers = (o.context + 1) * o.max_new_tokens  # this caption and each earlier one at full length
    positions = cfg.llm.max_positions
    need = text_tokens(o.prompt) + av + answers
    if need > positions:
        # the question appears once per turn (context + 1 times); the rest of the budget is fixed
        room = (positions - av - answers - text_tokens("")) // (o.context + 1)
        advice = (f"shorten the prompt to at most ~{room} tokens" if room > 0
                  else "lower --context, --max-new-tokens or --max-merge")
        raise UsageError(
            f"--prompt is too long: with --context {o.context}, --max-new-tokens {o.max_new_tokens} and up to "
            f"{o.max_merge} merged windows ({av} AV tokens) the LLM needs {need} positions, the model has "
            f"{positions}; {advice}")


# -- opening ---------------------------------------------------------------------------------------
def open_engine(o: RunOptions):
    """(backend, captioner, source), every one checked; UsageError if any cannot be had."""
    from runtime.backends import make_backend
    from runtime.bundle_cache import ExportView, Policy
    from runtime.sources import MediaSource
    from runtime.stream import StreamingCaptioner

    # the export's progress, shown only when the checkpoint is not in the bundle cache yet
    export_view = ExportView(Console(stderr=True, highlight=False, soft_wrap=True))
    try:
        engine = make_backend(o.backend, o.model, o.fps, o.window, threads=o.threads,
                              policy=Policy(o.cache_dir, o.cache, o.autotune, say=export_view, verbose=o.verbose))
        export_view.close()
        check_prompt_fits(engine, o)
        source = MediaSource(o.input, engine.cfg.timing.sample_rate, timeout=o.timeout)
    except (ValueError, FileNotFoundError) as e:  # SourceError and MediaError are ValueErrors
        message = str(e)
        if o.fps is not None and message.startswith("video_fps"):  # the config's check of --fps
            message = "--fps" + message[len("video_fps"):]
        raise UsageError(message) from None
    finally:
        export_view.close()  # Ctrl-C during an export too: the terminal is left clean
    try:
        check_fps_against_source(o.fps, source)
        captioner = StreamingCaptioner(engine, o.prompt, o.max_new_tokens, o.context, o.incremental)
    except ValueError as e:
        source.close()
        raise UsageError(str(e)) from None
    return engine, captioner, source


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

    return (f"favor-rt: {o.input} ({source.kind}, {mode}) | {describe(engine)} | {t.video_fps:g} FPS, "
            f"{t.frames_per_window} frames/window ({t.window_seconds:g} s)"
            + (f", max latency {bound:g} s" if bound else ""))


def _summary(scheduler, latencies: list[float], report) -> str:
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


def stream(o: RunOptions, captioner, source, scheduler, writers, term: Terminal) -> Outcome:
    """Warm up, then caption until the source ends, an output fails, or Ctrl-C / SIGTERM."""
    outcome = Outcome()

    def on_caption(cap) -> None:
        for w in writers:
            w.write(cap.start, cap.end, cap.text, cap.as_dict())
        term.caption(cap)

    stop = threading.Event()
    previous_sigterm = None  # SIGTERM (service managers, `timeout`) ends the run like Ctrl-C
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if term.view is not None:
            captioner.on_token = term.status.on_token  # the live view shows captions growing
            term.view.start()
        # realtime: the warm-up measures the per-window cost before the first deadline, while the
        # first window is being captured (so it adds nothing to the time to the first caption)
        warmup = (lambda: captioner.warmup(scheduler, rounds=WARMUP_ROUNDS)) if o.realtime else None
        outcome.report = captioner.run(source, o.realtime, scheduler, on_caption, stop, before_first=warmup)
    except KeyboardInterrupt:
        outcome.interrupted = True
        stop.set()
    except OutputError as e:
        outcome.output_error = e
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if term.view is not None:
            term.view.stop()
        for w in writers:
            w.close()
        source.close()
    return outcome


def finish(outcome: Outcome, scheduler, term: Terminal) -> None:
    """Summary line, then the exit code: nothing that failed may look like success."""
    term.err.print(escape(_summary(scheduler, term.status.latencies, outcome.report)))
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
    from runtime.scheduler import DeadlineScheduler

    check_options(o)
    check_outputs(o)
    from export.threads import parse_threads

    every_stage = parse_threads(o.threads).get("*")
    if every_stage is not None:  # --threads N: torch's pool too (media preprocessing, the torch backend)
        import torch

        torch.set_num_threads(every_stage)
    engine, captioner, source = open_engine(o)
    timing = engine.cfg.timing
    bound = (o.max_latency or timing.window_seconds) if o.realtime else None
    # The default bound (one window) adapts to a slow device; a bound the user gave is kept.
    scheduler = DeadlineScheduler(bound, o.max_merge, adaptive=o.max_latency is None)
    try:
        writers = open_writers(o)
    except UsageError:
        source.close()
        raise
    term = Terminal(live, any(map(is_stdout, o.outputs.values())), scheduler, engine.tokenizer)
    term.err.print(escape(_header(o, engine, source, bound)))
    finish(stream(o, captioner, source, scheduler, writers, term), scheduler, term)


@app.command(context_settings=CONTEXT)
def run(
    input: Annotated[str, typer.Argument(help="media file, FIFO, camera (/dev/video0 or an index), "
                                              "rtsp/http/udp URL, or lavfi:<graph>")],
    model: Annotated[Path | None, typer.Option(help="FAVOR checkpoint or exported bundle "
                                                    "(default: the demo model)")] = None,
    backend: Annotated[str, typer.Option(
        help="auto | torch | onnxruntime | tensorrt (a bundle with built engines, NVIDIA GPU)")] = "auto",
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
                   cache=cache, cache_dir=cache_dir, autotune=autotune, verbose=verbose)
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
    verbose: VerboseOption = False,
) -> None:
    """Sweep FPS x window x backend; report latency percentiles, throughput and stage times."""
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
    except ValueError as e:
        raise _fail(err, f"{e} (--fps and --window take comma-separated numbers)", EXIT_USAGE) from None
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        bench_mod.main(preset=preset, model=model, backends=[b for b in backends.split(",") if b],
                       fps_values=fps_values, window_values=window_values, clip=clip, seconds=seconds,
                       max_new_tokens=max_new_tokens, out=out, max_windows=max_windows, console=err,
                       threads=threads)
    except ValueError as e:
        raise _fail(err, str(e), EXIT_USAGE) from None


# `favor-rt serve` lives in runtime/server/command.py (FastAPI is imported only when it runs)
from runtime.server.command import serve  # noqa: E402

app.command(context_settings=CONTEXT)(serve)
