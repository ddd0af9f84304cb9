"""The server's one engine and hub, loaded in the background so ``/health`` answers at once.

    loading -> ready   (favor.load, then StreamHub over the engine)
    loading -> error   (the model could not be loaded: every model route answers 503 with the reason)
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from runtime.server.config import ServerConfig
from runtime.server.errors import ApiError

LOADING, READY, FAILED = "loading", "ready", "error"


def load_hub(config: ServerConfig, say=None):
    """(hub, backend description): the engine through the Python API, then a StreamHub over it.
    ``say``: receives a first-run export's progress (runtime.bundle_cache.ExportView)."""
    import favor
    from runtime.hub import StreamHub

    # max_batch: a checkpoint's bundle gets a batch axis as wide as the hub, so the audio encoder and
    # fusion of every stream due at once run as one call (an exported bundle keeps its own axis)
    engine = favor.load(config.model, backend=config.backend, url=config.url, verbose=config.verbose, say=say,
                        max_batch=config.max_streams)
    return StreamHub(engine, max_streams=config.max_streams, max_latency=config.max_latency), backend_name(engine)


def backend_name(engine) -> str:
    """'onnxruntime (CPU; threads ...)' for a runtime backend; the engine's own name otherwise."""
    from runtime.selection import describe

    backend = getattr(engine, "backend", engine)
    try:
        return describe(backend)
    except AttributeError:
        return type(backend).__name__


class ServerState:
    """Holds the hub once loaded; ``hub`` raises 503 until then. ``owns_hub``: close it at shutdown
    (a hub handed in by a test is the test's)."""

    def __init__(self, config: ServerConfig, hub=None, backend: str | None = None, console=None):
        self.config = config
        self.console = console  # a rich Console for the export's progress and the ready line (the command's)
        self._hub, self.backend = hub, backend
        self.owns_hub = hub is None
        self.status = READY if hub is not None else LOADING
        self.error: str | None = None
        self._loader: threading.Thread | None = None
        self._own_upload_dir = config.upload_dir is None
        self.upload_dir = Path(config.upload_dir or tempfile.mkdtemp(prefix="favor-serve-"))
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        # one add at a time: the stream count checked before hub.add stays true until it returns
        self.add_lock = threading.Lock()

    def start(self) -> None:
        if self.status == LOADING and self._loader is None:
            self._loader = threading.Thread(target=self._load, name="favor-serve-load", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        from rich.markup import escape

        view = None
        if self.console is not None:
            from runtime.bundle_cache import ExportView

            view = ExportView(self.console)  # prints only when the checkpoint is not compiled yet
        try:
            self._hub, self.backend = load_hub(self.config, say=view)
            self.status = READY
        except Exception as e:  # any failure is reported on /health and by every model route
            self.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            self.status = FAILED
        finally:
            if view is not None:
                view.close()
        if self.console is not None:
            self.console.print(escape(f"favor-rt serve: ready ({self.backend})" if self.status == READY
                                      else f"error: the model failed to load: {self.error}"), highlight=False)

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.status == READY

    @property
    def hub(self):
        if self.status == READY:
            return self._hub
        if self.status == FAILED:
            raise ApiError(503, f"the model failed to load: {self.error}")
        raise ApiError(503, "the model is still loading: retry when /health says ready")

    def close(self) -> None:
        if self._hub is not None and self.owns_hub:
            self._hub.close()
        if self._own_upload_dir:
            shutil.rmtree(self.upload_dir, ignore_errors=True)
