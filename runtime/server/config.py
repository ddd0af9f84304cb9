"""What ``favor-rt serve`` is configured with (the command's options, or a test's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Loopback by default: the server reads any file or device the given source names, so exposing it
# beyond this machine is a decision the user makes with --host.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_STREAMS = 8
MIB = 1 << 20
DEFAULT_MAX_UPLOAD_MB = 256  # an uploaded clip (multipart or a base64 data URL), in MiB
# SSE comment / WebSocket ping interval: keeps proxies from closing an idle caption stream.
HEARTBEAT_S = 15.0


@dataclass
class ServerConfig:
    model: Path | None = None  # None: the embedded demo model ($FAVOR_MODEL honoured)
    backend: str = "auto"
    url: str | None = None  # --backend triton: the Triton server (host:port or grpc://host:port)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_streams: int = DEFAULT_MAX_STREAMS
    max_latency: float | None = None  # seconds, window close -> caption, per live stream (None: one window, adaptive)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * MIB
    upload_dir: Path | None = None  # None: a temporary directory removed at shutdown
    default_max_tokens: int = 48  # chat completions without max_tokens (as model.ask)
    max_tokens_limit: int = 512  # a request asking for more is refused (400), not truncated silently
    heartbeat_s: float = HEARTBEAT_S
    verbose: bool = False

    @property
    def model_name(self) -> str:
        """The name /health, /v1/models and chat responses report: the checkpoint's stem."""
        return "favor-demo" if self.model is None else Path(self.model).stem
