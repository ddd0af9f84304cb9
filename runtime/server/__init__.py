"""``favor-rt serve``: many live streams over HTTP on one engine (runtime.hub.StreamHub).

    create_app(ServerConfig(...)) -> FastAPI        the whole server (tests drive it with TestClient)

| file | what |
|---|---|
| `config.py` | `ServerConfig`: bind address, limits (streams, upload bytes), model and backend |
| `state.py` | `ServerState`: loads the engine and the hub in the background (``/health`` says loading / ready) |
| `errors.py` | `ApiError` and the handlers that make every 4xx/5xx one line of JSON: ``{"error": "..."}`` |
| `streams.py` | ``/v1/streams`` (add, list, show, remove), ``/v1/clips`` (upload), SSE and WebSocket events |
| `uploads.py` | bounded writes of uploaded bytes (multipart, base64 data URLs) into the server's upload directory |
| `openai.py` | OpenAI chat request parsing (accepted content parts) and response / chunk shapes |
| `chat.py` | ``POST /v1/chat/completions``, ``GET /v1/models`` |
| `metrics.py` | Prometheus ``/metrics`` from ``hub.metrics()`` at scrape time |
| `app.py` | ``create_app``: routes, ``/health``, the web page at ``/`` (``static/index.html``) |
| `command.py` | the ``serve`` command (registered in runtime/cli.py) |
"""

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):  # lazy: `favor-rt run` registers `serve` without importing FastAPI
    if name == "create_app":
        from runtime.server.app import create_app

        return create_app
    if name == "ServerConfig":
        from runtime.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(name)
