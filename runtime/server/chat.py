"""``POST /v1/chat/completions`` (OpenAI-compatible; the accepted parts are in runtime/server/openai.py)
and ``GET /v1/models``. The answer is the hub's ``ask``: the whole clip as one prompt, decoded on the
hub's worker between stream batches (one engine, one worker)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from runtime.server import openai
from runtime.server.errors import ApiError

router = APIRouter()
_DONE = "data: [DONE]\n\n"


def _state(request: Request):
    return request.app.state.server


def _ask(hub, q: openai.Question, on_token=None) -> tuple[str, int]:
    """(answer, tokens decided); 422 for an unusable source. ``on_token(piece)``: each token's text, on
    the hub's worker thread."""
    count = 0

    def counted(piece: str) -> None:
        nonlocal count
        count += 1
        if on_token is not None:
            on_token(piece)

    try:
        return hub.ask(q.source, q.text, max_new_tokens=q.max_tokens, on_token=counted), count
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    finally:
        if q.temporary is not None:
            q.temporary.unlink(missing_ok=True)


def _finish_reason(tokens: int, q: openai.Question) -> str:
    return "length" if tokens >= q.max_tokens else "stop"


class Pieces:
    """The token pieces sent so far; the answer's text starts without the tokenizer's leading space,
    so the first piece is sent without it and the pieces add up to the answer."""

    def __init__(self):
        self.text = ""

    def __call__(self, piece: str) -> str:
        piece = piece if self.text else piece.lstrip()
        self.text += piece
        return piece


@router.get("/v1/models")
async def models(request: Request):
    state = _state(request)
    return {"object": "list", "data": [{"id": state.config.model_name, "object": "model", "created": 0,
                                        "owned_by": "favor-rt"}]}


@router.post("/v1/chat/completions")
async def chat_completions(body: openai.ChatRequest, request: Request):
    metrics, t0 = request.app.state.metrics, time.perf_counter()
    try:
        response = await _complete(body, _state(request), lambda: metrics.chat_seconds.observe(
            time.perf_counter() - t0))
    except ApiError as e:
        metrics.chat_requests.labels(str(e.status)).inc()
        raise
    metrics.chat_requests.labels("200").inc()
    return response


async def _complete(body: openai.ChatRequest, state, done):
    hub = state.hub  # 503 while loading
    cfg = state.config
    q = openai.parse_request(body, state.upload_dir, cfg.max_upload_bytes, cfg.default_max_tokens,
                             cfg.max_tokens_limit)
    cid, model = openai.completion_id(), cfg.model_name
    if not body.stream:
        answer, tokens = await asyncio.to_thread(_ask, hub, q)
        done()
        return openai.completion(cid, model, answer, _finish_reason(tokens, q))
    return await _stream(hub, q, cid, model, done)


async def _stream(hub, q: openai.Question, cid: str, model: str, done) -> StreamingResponse:
    """SSE ``chat.completion.chunk``s: the role, one chunk per token (and any rest of the answer the
    pieces did not cover), the finish reason, ``[DONE]``. Headers are sent only once the first
    token or the answer exists, so a source that cannot be opened is still a 4xx."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(kind: str, value) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    pieces = Pieces()

    def run() -> None:
        try:
            put("done", _ask(hub, q, on_token=lambda piece: put("token", pieces(piece))))
        except BaseException as e:  # handed to the response: a 4xx before the first byte, else an error chunk
            put("error", e)

    worker = loop.run_in_executor(None, run)
    first = await queue.get()
    if first[0] == "error":
        await worker
        raise first[1]
    created = int(time.time())

    def data(obj: dict) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def body():
        yield data(openai.chunk(cid, model, created, {"role": "assistant", "content": ""}))
        kind, value = first
        while True:
            if kind == "token":
                if value:
                    yield data(openai.chunk(cid, model, created, {"content": value}))
            elif kind == "done":
                answer, tokens = value
                # the pieces' text is a prefix of the answer: send what they did not cover
                rest = answer[len(pieces.text):] if answer.startswith(pieces.text) else ""
                if rest:
                    yield data(openai.chunk(cid, model, created, {"content": rest}))
                yield data(openai.chunk(cid, model, created, {}, _finish_reason(tokens, q)))
                break
            else:
                message = value.message if isinstance(value, ApiError) else f"{type(value).__name__}: {value}"
                yield data({"error": {"message": message, "type": "server_error"}})
                break
            kind, value = await queue.get()
        done()
        yield _DONE

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
