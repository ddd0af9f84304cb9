"""``create_app``: the FastAPI application of ``favor-rt serve``.

    GET  /                 the web page (static/index.html: streams, live captions over SSE)
    GET  /health           {"status": "ready" | "loading" | "error", "model", "backend", "streams", ...}
                           200 when ready, 503 otherwise (load balancers read the status code)
    GET  /metrics          Prometheus text format (runtime/server/metrics.py)
    /v1/streams, /v1/clips, events    runtime/server/streams.py
    /v1/chat/completions, /v1/models  runtime/server/chat.py
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.server import chat, errors, streams
from runtime.server.config import ServerConfig
from runtime.server.metrics import Metrics
from runtime.server.state import READY, ServerState
from runtime.server.uploads import BodyLimit, body_limit

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(config: ServerConfig | None = None, *, hub=None, backend: str | None = None,
               console=None) -> FastAPI:
    """The server over ``config``. ``hub``: an already running StreamHub (tests; left open at shutdown);
    without one the model is loaded in the background when the app starts (``/health`` says loading).
    ``console``: where the command shows the export's progress and the ready line."""
    config = config or ServerConfig()
    state = ServerState(config, hub=hub, backend=backend, console=console)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start()
        try:
            yield
        finally:
            state.close()

    from favor import __version__

    app = FastAPI(title="FAVOR-RT", version=__version__, lifespan=lifespan,
                  summary="live audio-visual captions for many streams, and questions about clips")
    app.state.server = state
    app.state.metrics = Metrics(state)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=body_limit(config.max_upload_bytes), upload_limit=config.max_upload_bytes)
    app.include_router(streams.router)
    app.include_router(chat.router)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health(request: Request):
        body = {"status": state.status, "model": config.model_name, "backend": state.backend,
                "max_streams": config.max_streams}
        if state.status == READY:
            body["streams"] = sum(1 for s in state.hub.streams() if s.get("state") == "running")
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=200 if state.status == READY else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
