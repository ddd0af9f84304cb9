"""``favor-rt``: live captions (``run``) and what this machine sustains (``bench``).

    favor-rt run camera.mp4 --srt camera.srt          # paced like a live camera (default)
    favor-rt run clip.mp4 --offline --jsonl out.jsonl # as fast as possible, nothing dropped
    favor-rt run 0 --max-latency 2                    # /dev/video0
    favor-rt run rtsp://host/stream --vtt live.vtt
    favor-rt bench --preset demo --fps 0.5,1,2,4 --window 2,5,10,20

Exit codes: 0 done; 1 the stream broke mid-way (captions so far are kept); 2 bad input or options;
130 interrupted (Ctrl-C; captions so far are kept).
"""

from __future__ import annotations

import os
import signal
import statistics
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from runtime.writers import WRITERS, CaptionWriter, timestamp

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="FAVOR-RT: real-time audio-visual captioning on edge devices.")
DEFAULT_PROMPT = "Describe what happens in the video and the audio."
EXIT_STREAM_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
MODEL_ENV = "FAVOR_MODEL"


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


def _status(caption, stats, latencies: list[float]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    text = caption.text if caption is not None else "(waiting for the first window)"
    table.add_row("caption", escape(text))
    if caption is not None:
        table.add_row("window", f"{timestamp(caption.start, '.')} -> {timestamp(caption.end, '.')}")
        table.add_row("latency", f"{caption.latency:.3f} s (p95 {_p(latencies, 95):.3f} s)")
    table.add_row("windows", f"{stats.captioned} captioned, {stats.dropped} dropped "
                             f"({stats.dropped_late} late, {stats.dropped_overflow} overflow), "
                             f"{stats.merged} merged")
    return table


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


@app.command()
def run(
    input: Annotated[str, typer.Argument(help="media file, camera (/dev/video0 or an index), "
                                              "rtsp/http/udp URL, or lavfi:<graph>")],
    model: Annotated[Path | None, typer.Option(help="FAVOR checkpoint (default: the demo model)")] = None,
    backend: Annotated[str, typer.Option(
        help="auto | torch | onnxruntime | tensorrt (a bundle with built engines, NVIDIA GPU)")] = "auto",
    fps: Annotated[float | None, typer.Option(help="frames sampled per second (default: the model's)")] = None,
    window: Annotated[int | None, typer.Option(help="frames per window (default: the model's)")] = None,
    prompt: Annotated[str, typer.Option(help="question asked about every window")] = DEFAULT_PROMPT,
    max_latency: Annotated[float | None, typer.Option(
        help="seconds from a window's end to its caption (default: one window); realtime only")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="caption length limit in tokens")] = 32,
    context: Annotated[int, typer.Option(help="previous captions carried in the prompt (0 = none)")] = 1,
    max_merge: Annotated[int, typer.Option(help="windows one caption may cover when the device lags")] = 2,
    realtime: Annotated[bool, typer.Option(
        "--realtime/--offline", help="pace files like a live camera, or run as fast as possible")] = True,
    incremental: Annotated[bool, typer.Option(help="encode frames as they arrive")] = True,
    srt: Annotated[Path | None, typer.Option(help="write SubRip captions here (flushed per caption)")] = None,
    vtt: Annotated[Path | None, typer.Option(help="write WebVTT captions here (flushed per caption)")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="write JSON lines here (flushed per caption)")] = None,
    live: Annotated[bool | None, typer.Option("--live/--no-live",
                                              help="live terminal view (default: on a terminal)")] = None,
    threads: Annotated[str | None, typer.Option(
        help="N for every stage, or stage=N,... (audio_encoder, visual_encoder, fusion, decoder); "
             "default: the bundle's tuned counts (torch: torch's default)")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse the checkpoint's compiled bundle "
                                        "from the bundle cache (--no-cache: export for this run only)")] = True,
    cache_dir: Annotated[Path | None, typer.Option(
        help="bundle cache directory (default: $FAVOR_CACHE or ~/.cache/favor/bundles)")] = None,
    autotune: Annotated[bool, typer.Option("--autotune/--no-autotune",
                                           help="time threads per stage when exporting a bundle")] = True,
) -> None:
    """Caption a stream window by window, printing and saving captions as they are produced."""
    from export.threads import parse_threads
    from runtime.backends import make_backend
    from runtime.bundle_cache import ExportView, Policy
    from runtime.scheduler import DeadlineScheduler
    from runtime.selection import describe
    from runtime.sources import MediaSource
    from runtime.stream import StreamingCaptioner

    # soft_wrap: one message = one line, whatever the terminal width (logs and tests grep them)
    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for name, value, lo in (("--max-new-tokens", max_new_tokens, 1), ("--max-merge", max_merge, 1),
                            ("--context", context, 0)):
        if value < lo:
            raise _fail(err, f"{name} ({value}) must be >= {lo}", EXIT_USAGE)
    for name, value in (("--fps", fps), ("--max-latency", max_latency)):
        if value is not None and value <= 0:
            raise _fail(err, f"{name} ({value}) must be > 0", EXIT_USAGE)
    if window is not None and window < 1:
        raise _fail(err, f"--window ({window}) must be >= 1 frame", EXIT_USAGE)
    try:
        thread_spec = parse_threads(threads)
    except ValueError as e:
        raise _fail(err, str(e), EXIT_USAGE) from None
    if "*" in thread_spec:
        import torch

        torch.set_num_threads(thread_spec["*"])
    model_path = model or default_model_path()
    if not model_path.exists():
        raise _fail(err, f"{model_path}: model not found (pass --model PATH or set ${MODEL_ENV})", EXIT_USAGE)

    export_view = ExportView(err)  # shown only if the checkpoint has to be exported (cold cache)
    try:
        engine = make_backend(backend, model_path, fps, window, threads=threads,
                              policy=Policy(cache_dir, cache, autotune, say=export_view))
        captioner = StreamingCaptioner(engine, prompt, max_new_tokens, context, incremental)
        source = MediaSource(input, engine.cfg.timing.sample_rate)
    except (ValueError, FileNotFoundError) as e:  # SourceError and MediaError are ValueErrors
        raise _fail(err, str(e), EXIT_USAGE) from None
    finally:
        export_view.close()

    timing = engine.cfg.timing
    bound = (max_latency or timing.window_seconds) if realtime else None
    scheduler = DeadlineScheduler(bound, max_merge)
    writers: list[CaptionWriter] = []
    try:
        for kind, path in (("srt", srt), ("vtt", vtt), ("jsonl", jsonl)):
            if path is not None:
                writers.append(WRITERS[kind](path))
    except (ValueError, OSError) as e:
        source.close()
        raise _fail(err, str(e), EXIT_USAGE) from None

    show_live = sys.stdout.isatty() if live is None else live
    latencies: list[float] = []
    state = {"caption": None}
    view = Live(_status(None, scheduler.stats, latencies), console=console, refresh_per_second=4,
                transient=True) if show_live else None

    def on_caption(cap) -> None:
        for w in writers:
            w.write(cap.start, cap.end, cap.text, cap.as_dict())
        latencies.append(cap.latency)
        state["caption"] = cap
        console.print(escape(f"[{timestamp(cap.start, '.')} --> {timestamp(cap.end, '.')}] {cap.text}"))
        if view is not None:
            view.update(_status(cap, scheduler.stats, latencies))

    mode = "realtime" if realtime else "offline"
    err.print(escape(f"favor-rt: {input} ({source.kind}, {mode}) | {describe(engine)} | "
                     f"{timing.video_fps:g} FPS, {timing.frames_per_window} frames/window "
                     f"({timing.window_seconds:g} s)" + (f", max latency {bound:g} s" if bound else "")))
    stop = threading.Event()
    # SIGTERM (service managers, `timeout`) ends the run like Ctrl-C: outputs stay complete.
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    report = None
    try:
        if realtime:
            captioner.warmup(scheduler)  # measures the per-window cost before the first deadline
        if view is not None:
            view.start()
        report = captioner.run(source, realtime, scheduler, on_caption, stop)
    except KeyboardInterrupt:
        interrupted = True
        stop.set()
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        if view is not None:
            view.stop()
        for w in writers:
            w.close()
        source.close()
    stats = scheduler.stats
    summary = (f"{stats.captions} captions over {stats.captioned} windows; dropped {stats.dropped} "
               f"({stats.dropped_late} late, {stats.dropped_overflow} overflow); merged {stats.merged}")
    if latencies:
        summary += (f"; latency p50 {_p(latencies, 50):.3f} s, p95 {_p(latencies, 95):.3f} s, "
                    f"max {max(latencies):.3f} s")
    if report is not None and report.skipped_packets:
        summary += f"; skipped {report.skipped_packets} corrupt packets"
    err.print(summary)
    if interrupted:
        err.print("interrupted: captions so far are saved")
        raise typer.Exit(EXIT_INTERRUPTED)
    if report is not None and report.error is not None:
        raise _fail(err, f"{report.error} (captions so far are saved)", EXIT_STREAM_ERROR)


@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="preset with random weights (unless --model)")] = "demo",
    model: Annotated[Path | None, typer.Option(help="a FAVOR checkpoint instead of a preset")] = None,
    backends: Annotated[str, typer.Option(help="comma-separated backends to compare")] = "torch",
    fps: str = typer.Option("0.5,1,2,4", help="comma-separated FPS values"),
    window: str = typer.Option("2,5,10,20", help="comma-separated frames-per-window values"),
    clip: Annotated[Path | None, typer.Option(help="media file (default: a generated clip)")] = None,
    seconds: Annotated[float, typer.Option(help="length of the generated clip")] = 20.0,
    max_new_tokens: Annotated[int, typer.Option(help="max tokens decoded per caption")] = 16,
    out: Annotated[Path, typer.Option(help="directory for the .md, .csv and .png")] = Path("benchmarks/out"),
    max_windows: Annotated[int | None, typer.Option(help="stop each cell after this many windows")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")] = None,
) -> None:
    """Sweep FPS x window x backend; report latency percentiles, throughput and stage times."""
    from runtime import bench as bench_mod

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if threads is not None:
        if threads < 1:
            raise _fail(err, f"--threads ({threads}) must be >= 1", EXIT_USAGE)
        import torch

        torch.set_num_threads(threads)
    try:
        fps_values = [float(x) for x in fps.split(",") if x]
        window_values = [int(x) for x in window.split(",") if x]
    except ValueError:
        raise _fail(err, f"--fps ({fps!r}) and --window ({window!r}) must be comma-separated numbers",
                    EXIT_USAGE) from None
    try:
        bench_mod.main(preset=preset, model=model, backends=[b for b in backends.split(",") if b],
                       fps_values=fps_values, window_values=window_values, clip=clip, seconds=seconds,
                       max_new_tokens=max_new_tokens, out=out, max_windows=max_windows, console=err)
    except ValueError as e:
        raise _fail(err, str(e), EXIT_USAGE) from None
