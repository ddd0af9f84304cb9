"""``favor-rt serve``: the HTTP server on loopback by default (registered in runtime/cli.py).

    favor-rt serve                                   # the demo model on http://127.0.0.1:8000
    favor-rt serve --model ckpt.safetensors --port 9000 --max-streams 4
    favor-rt serve --host 0.0.0.0                    # reachable from other machines: a choice
    favor-rt serve --model bundles/demo --backend triton --url localhost:8000   # stages on a Triton server

Quiet by default (uvicorn's warnings and errors only); -v adds its access log and the libraries' logs.
The model loads in the background: /health answers 503 "loading" until it is ready.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from favor.cli_options import VerboseOption
from runtime.server.config import (
    DEFAULT_HOST,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_PORT,
    MIB,
    ServerConfig,
)

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # as favor-rt run
# Ctrl-C: open caption streams (SSE, WebSocket) never end by themselves; they are cut after this.
GRACEFUL_S = 5
MAX_PORT = 65535


def check(config: ServerConfig, backends: tuple[str, ...]) -> None:
    """Every option against its range, the model file present (ValueError naming the option)."""
    from favor.validate import check_number

    check_number("--port", config.port, 1, MAX_PORT, integer=True)
    check_number("--max-streams", config.max_streams, 1, None, integer=True)
    check_number("--max-upload-mb", config.max_upload_bytes / MIB, 0, None, lo_open=True)
    if config.max_latency is not None:
        check_number("--max-latency", config.max_latency, 0, None, lo_open=True)
    if config.backend not in backends:
        raise ValueError(f"--backend ({config.backend!r}) must be one of {', '.join(backends)}")
    if config.backend == "triton" and not config.url:
        raise ValueError("--backend triton needs --url (the Triton server, host:port or grpc://host:port)")
    if config.url is not None and config.backend != "triton":
        raise ValueError(f"--url is the Triton server of --backend triton, not of --backend {config.backend}")
    if config.model is not None and not Path(config.model).exists():
        raise ValueError(f"{config.model}: model not found (pass --model PATH or set $FAVOR_MODEL)")


def check_installed() -> None:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "python_multipart", "prometheus_client", "websockets")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"favor-rt serve needs {', '.join(missing)}: pip install 'favor-rt[serve]'")


def serve(
    model: Annotated[Path | None, typer.Option(help="FAVOR checkpoint or exported bundle "
                                                    "(default: the demo model)")] = None,
    backend: Annotated[str, typer.Option(help="auto | torch | onnxruntime | tensorrt | triton (a Triton "
                                              "server at --url serving favor-export --targets triton)")] = "auto",
    url: Annotated[str | None, typer.Option(help="--backend triton: the server, host:port (HTTP) or "
                                                 "grpc://host:port")] = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback by default: the server opens "
                                           "any path or device a client names)")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port")] = DEFAULT_PORT,
    max_streams: Annotated[int, typer.Option(help="streams served at once (more: HTTP 429)")] = DEFAULT_MAX_STREAMS,
    max_upload_mb: Annotated[float, typer.Option(help="largest uploaded clip in MiB (more: HTTP 413)")]
        = DEFAULT_MAX_UPLOAD_MB,
    max_latency: Annotated[float | None, typer.Option(
        help="seconds from a window's end to its caption, per live stream (default: one window, raised to "
             "the device's cost per window if slower)")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Serve many streams over HTTP: captions over SSE / WebSocket, an OpenAI-style chat endpoint,
    /health, /metrics and a web page at /."""
    from favor.quiet import quiet_libraries
    from runtime.backends import BACKENDS

    quiet_libraries(verbose)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if model is None:
        from runtime.cli import default_model_path

        model = default_model_path()
    config = ServerConfig(model=model, backend=backend, url=url, host=host, port=port, max_streams=max_streams,
                          max_upload_bytes=int(max_upload_mb * MIB), max_latency=max_latency, verbose=verbose)
    try:
        check(config, BACKENDS)
        check_installed()
    except ValueError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(EXIT_USAGE) from None
    run(config, err)


def run(config: ServerConfig, err: Console) -> None:
    import uvicorn

    from runtime.server.app import create_app

    app = create_app(config, console=err)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level="info" if config.verbose else "warning",
                                           access_log=config.verbose, lifespan="on",
                                           timeout_graceful_shutdown=GRACEFUL_S))
    err.print(escape(f"favor-rt serve: http://{config.host}:{config.port}/ (model {config.model_name}, "
                     f"backend {config.backend}, up to {config.max_streams} streams; loading the model...)"))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C / SIGINT once it has shut down cleanly
        err.print("favor-rt serve: stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
