"""The OpenAI chat-completions shapes the server speaks: a request's media and question, and the
``chat.completion`` / ``chat.completion.chunk`` objects sent back.

Accepted content parts (a message's ``content`` is a string or a list of these):

    {"type": "text", "text": "..."}                                    the question
    {"type": "video_url", "video_url": {"url": "..."}}                 a video (its own audio track is heard)
    {"type": "audio_url", "audio_url": {"url": "..."}}                 an audio file
    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}   OpenAI's audio part

A ``url`` is a media file's path on the server, a ``file://`` URL, or a base64
``data:<mime>;base64,...`` URL (stored for the request, then deleted); remote URLs (http(s), rtsp,
...) are refused, not fetched. ``input_audio`` formats: wav, mp3, flac, ogg, m4a, aac, webm.

Exactly one media part per request, in any user message; the question is the text of the last
message, which must be the user's. System / developer messages and earlier turns are not fed to
the model (it answers one question about one clip, as ``favor.ask`` does). Decoding is greedy:
``temperature``, ``top_p`` and other sampling fields are accepted and ignored; ``n`` must be 1.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from runtime.server.errors import ApiError
from runtime.server.uploads import save_base64, save_data_url

MEDIA_PARTS = ("video_url", "audio_url", "input_audio")
ACCEPTED_PARTS = ("text",) + MEDIA_PARTS
ROLES = ("system", "developer", "user", "assistant")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "aac", "webm")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send many optional fields
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = 1


@dataclass
class Question:
    source: str  # what hub.ask opens
    text: str
    max_tokens: int
    temporary: Path | None = None  # a decoded data URL, deleted after the answer


def _parts(message: ChatMessage, index: int) -> list[dict]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [{"type": "text", "text": message.content}]
    for part in message.content:
        kind = part.get("type")
        if kind not in ACCEPTED_PARTS:
            raise ApiError(400, f"messages[{index}]: content part type {kind!r} is not accepted "
                                f"(accepted: {', '.join(ACCEPTED_PARTS)})")
    return message.content


def _url(part: dict, where: str) -> str:
    kind = part["type"]
    body = part.get(kind)
    url = body.get("url") if isinstance(body, dict) else body if isinstance(body, str) else None
    if not isinstance(url, str) or not url:
        raise ApiError(400, f"{where}: {kind} needs {{\"url\": \"...\"}}")
    return url


def _media(part: dict, where: str, upload_dir: Path, limit: int) -> tuple[str, Path | None]:
    """(source for the hub, temporary file or None) for one media part."""
    if part["type"] == "input_audio":
        body = part.get("input_audio")
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise ApiError(400, f"{where}: input_audio needs {{\"data\": \"<base64>\", \"format\": \"wav\"}}")
        fmt = str(body.get("format", "wav")).lower()
        if fmt not in AUDIO_FORMATS:
            raise ApiError(400, f"{where}: input_audio format {fmt!r} is not one of {', '.join(AUDIO_FORMATS)}")
        path = save_base64(body["data"], fmt, upload_dir, limit, where)
        return str(path), path
    url = _url(part, where)
    if url.startswith("data:"):
        path = save_data_url(url, upload_dir, limit, where)
        return str(path), path
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(400, f"{where}: file:// URL names another host ({parsed.netloc})")
        return unquote(parsed.path), None
    if "://" in url:
        raise ApiError(400, f"{where}: remote URLs are not fetched ({url.split('://', 1)[0]}://); send the "
                            "media as a base64 data URL or give a path on the server")
    return url, None


def _question(messages: list[ChatMessage]) -> str:
    last = messages[-1]
    if last.role != "user":
        raise ApiError(400, f"messages[{len(messages) - 1}]: the last message must be the user's question "
                            f"(role is {last.role!r})")
    text = " ".join(p.get("text", "").strip() for p in _parts(last, len(messages) - 1) if p["type"] == "text")
    if not text.strip():
        raise ApiError(400, f"messages[{len(messages) - 1}]: the user's message has no text question")
    return text.strip()


def parse_request(req: ChatRequest, upload_dir: Path, limit: int, default_tokens: int, max_tokens: int) -> Question:
    """The one media part and the question, or ApiError(400) naming what is wrong."""
    if req.n != 1:
        raise ApiError(400, f"n ({req.n}) must be 1: decoding is greedy, one answer per request")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}]: role {m.role!r} is not one of {', '.join(ROLES)}")
    tokens = req.max_completion_tokens or req.max_tokens or default_tokens
    if tokens > max_tokens:
        raise ApiError(400, f"max_tokens ({tokens}) is above this server's limit ({max_tokens})")
    text = _question(req.messages)
    media = [(i, p) for i, m in enumerate(req.messages) if m.role == "user"
             for p in _parts(m, i) if p["type"] in MEDIA_PARTS]
    if len(media) != 1:
        raise ApiError(400, f"a request needs exactly one video or audio part (found {len(media)}; accepted: "
                            f"{', '.join(MEDIA_PARTS)}); a video's own audio track is heard with it")
    i, part = media[0]
    source, temporary = _media(part, f"messages[{i}] {part['type']}", upload_dir, limit)
    return Question(source, text, tokens, temporary)


# -- responses -------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, answer: str, finish_reason: str) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "logprobs": None, "finish_reason": finish_reason}]}


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
