"""Uploaded media written to the server's upload directory, never more than the size limit.

    await save_upload(UploadFile, dir, limit) -> Path       (multipart ``/v1/clips``)
    save_data_url("data:video/mp4;base64,...", dir, limit) -> Path   (chat content parts)

Over the limit is ``ApiError(413)`` and nothing is left behind. The file keeps a suffix PyAV can
sniff by (the upload's own, else one from the MIME type)."""

from __future__ import annotations

import base64
import binascii
import mimetypes
import os
import re
import uuid
from pathlib import Path

from runtime.server.errors import ApiError

CHUNK_BYTES = 1 << 20
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)
# a few MIME types mimetypes does not map on every system
_MIME_SUFFIX = {"audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/mpeg": ".mp3",
                "audio/mp3": ".mp3", "audio/flac": ".flac", "audio/ogg": ".ogg", "video/mp4": ".mp4",
                "video/webm": ".webm", "video/x-matroska": ".mkv", "video/quicktime": ".mov",
                "audio/mp4": ".m4a", "image/png": ".png", "image/jpeg": ".jpg"}


# A request body may carry an upload base64-encoded in JSON (4 characters per 3 bytes) plus the rest
# of the request (the question, multipart boundaries).
BASE64_RATIO = 4 / 3
BODY_OVERHEAD_BYTES = 64 * 1024


def body_limit(upload_limit: int) -> int:
    return int(upload_limit * BASE64_RATIO) + BODY_OVERHEAD_BYTES


class BodyLimit:
    """ASGI middleware: a request body above ``limit`` bytes is refused with 413 — at once when its
    Content-Length says so, else as soon as the bytes read pass the limit (chunked uploads), before
    they reach a parser or the disk."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", ())).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            from runtime.server.errors import error_response

            return await error_response(413, too_large(self.upload_limit).message)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # an HTTPException passes FastAPI's body parsing unchanged
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, too_large(self.upload_limit).message)
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"upload is larger than the server's limit of {limit / (1 << 20):g} MiB "
                         "(favor-rt serve --max-upload-mb)")


def _target(directory: Path, suffix: str) -> Path:
    return directory / f"{uuid.uuid4().hex}{suffix if _SUFFIX.match(suffix or '') else ''}"


async def save_upload(upload, directory: Path, limit: int) -> Path:
    """Copy a starlette UploadFile into ``directory`` chunk by chunk; 413 past ``limit`` bytes."""
    path = _target(directory, Path(upload.filename or "").suffix.lower())
    written = 0
    try:
        with open(path, "wb") as f:
            while chunk := await upload.read(CHUNK_BYTES):
                written += len(chunk)
                if written > limit:
                    raise too_large(limit)
                f.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if written == 0:
        path.unlink(missing_ok=True)
        raise ApiError(400, f"uploaded file {upload.filename or '(unnamed)'!r} is empty")
    return path


def mime_suffix(mime: str) -> str:
    mime = mime.lower()
    return _MIME_SUFFIX.get(mime) or mimetypes.guess_extension(mime) or ""


def save_data_url(url: str, directory: Path, limit: int, what: str) -> Path:
    """A base64 ``data:`` URL decoded into ``directory``; 400 naming ``what`` when it is not one."""
    m = _DATA_URL.match(url)
    if m is None or not m.group("b64"):
        raise ApiError(400, f"{what}: a data URL must be 'data:<mime>;base64,<data>'")
    payload = url[m.end():]
    if len(payload) * 3 // 4 > limit:  # base64 carries 3 bytes per 4 characters
        raise too_large(limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: the data URL's payload is not valid base64") from None
    return save_bytes(data, directory, mime_suffix(m.group("mime") or ""), what)


def save_base64(data: str, fmt: str, directory: Path, limit: int, what: str) -> Path:
    """OpenAI's ``input_audio`` (bare base64 plus a format such as 'wav' or 'mp3')."""
    if len(data) * 3 // 4 > limit:
        raise too_large(limit)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{what}: data is not valid base64") from None
    return save_bytes(raw, directory, "." + fmt.lower().lstrip("."), what)


def save_bytes(data: bytes, directory: Path, suffix: str, what: str) -> Path:
    if not data:
        raise ApiError(400, f"{what}: the media is empty")
    path = _target(directory, suffix)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path
