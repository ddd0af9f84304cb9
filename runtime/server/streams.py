"""Stream routes: add / list / show / remove streams, upload a clip, and push each stream's events.

    POST   /v1/streams               {"source", "audio"?, "prompt"?, "name"?, "realtime"?} -> 201 {"id", ...}
    GET    /v1/streams               -> {"streams": [...]}
    GET    /v1/streams/{id}          -> the stream's row
    DELETE /v1/streams/{id}          -> {"id", "removed": true}
    POST   /v1/clips                 multipart: file, prompt?, name?, realtime? (default offline) -> 201
    GET    /v1/streams/{id}/events   Server-Sent Events: ``event: caption|token|end`` + ``data: <json>``
    WS     /v1/streams/{id}/ws       one JSON text message per event; closed after ``end``

Events are the hub's dicts unchanged (runtime/hub.py). Each subscriber has its own subscription, so a
client that goes away closes only its own; the stream and other clients carry on."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from runtime.server.errors import ApiError
from runtime.server.uploads import save_upload, too_large

router = APIRouter()
MAX_SOURCE_CHARS = 4096
MAX_PROMPT_CHARS = 2000
MAX_NAME_CHARS = 200
# Multipart overhead allowed above the file limit in Content-Length (boundaries, small fields).
FORM_OVERHEAD_BYTES = 64 * 1024
WS_NO_SUCH_STREAM = 4404  # application close code (4000-4999): the stream id is unknown


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1, max_length=MAX_SOURCE_CHARS,
                        description="media path on the server, camera (/dev/video0 or an index), "
                                    "rtsp/http/udp/... URL, or lavfi:<graph>")
    audio: str | None = Field(None, max_length=MAX_SOURCE_CHARS,
                              description="a second input for sound: ALSA hw:0, pulse:NAME, a path or URL")
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    realtime: bool = Field(True, description="pace files like a live camera (false: as fast as possible, "
                                             "nothing dropped)")


def _state(request: Request):
    return request.app.state.server


def _active(hub) -> int:
    return sum(1 for s in hub.streams() if s.get("state") == "running")


def _add(state, source: str, **kw) -> str:
    """hub.add under the server's lock: 429 when full, 422 naming the problem for a bad source. The
    count is checked here (the hub's own "full" is a plain ValueError, like a bad source's), and the
    lock keeps it true until hub.add returns: only this server adds streams to its hub."""
    hub = state.hub
    with state.add_lock:
        if _active(hub) >= state.config.max_streams:
            raise ApiError(429, f"too many streams: the server runs at most {state.config.max_streams} "
                                "(remove one, or start it with --max-streams)")
        try:
            return hub.add(source, **kw)
        except ValueError as e:
            raise ApiError(422, str(e)) from None


def stream_row(hub, sid: str) -> dict:
    for row in hub.streams():
        if row.get("id") == sid:
            return row
    raise ApiError(404, f"no such stream: {sid}")


@router.post("/v1/streams", status_code=201)
async def add_stream(body: StreamRequest, request: Request):
    state = _state(request)
    kw = {k: v for k, v in body.model_dump().items() if k != "source" and v is not None}
    sid = await run_in_threadpool(_add, state, body.source, **kw)
    return JSONResponse(_created(state.hub, sid), status_code=201, headers={"Location": f"/v1/streams/{sid}"})


def _created(hub, sid: str) -> dict:
    try:
        return {"id": sid, **stream_row(hub, sid)}
    except ApiError:  # an offline clip may already be over and gone from the list
        return {"id": sid}


@router.get("/v1/streams")
async def list_streams(request: Request):
    return {"streams": _state(request).hub.streams()}


@router.get("/v1/streams/{sid}")
async def show_stream(sid: str, request: Request):
    return stream_row(_state(request).hub, sid)


@router.delete("/v1/streams/{sid}")
async def remove_stream(sid: str, request: Request):
    hub = _state(request).hub
    try:
        await run_in_threadpool(hub.remove, sid)
    except KeyError:
        raise ApiError(404, f"no such stream: {sid}") from None
    return {"id": sid, "removed": True}


@router.post("/v1/clips", status_code=201)
async def upload_clip(request: Request):
    """A clip uploaded as multipart field ``file``: a stream over the file, offline by default."""
    state = _state(request)
    limit = state.config.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + FORM_OVERHEAD_BYTES:
        raise too_large(limit)  # refused before a byte of the body is read
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "POST /v1/clips takes multipart/form-data with the clip in field 'file'")
    _ = state.hub  # 503 while loading, before the upload is stored
    async with request.form(max_files=1, max_fields=8) as form:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart field 'file' (the clip) is missing")
        fields = _clip_fields(form)
        path = await save_upload(upload, state.upload_dir, limit)
    try:
        sid = await run_in_threadpool(_add, state, str(path), **fields)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    _remove_when_over(state.hub, sid, path)
    return JSONResponse(_created(state.hub, sid), status_code=201, headers={"Location": f"/v1/streams/{sid}"})


def _clip_fields(form) -> dict:
    fields: dict = {"realtime": False}
    for key in ("prompt", "name"):
        value = form.get(key)
        if isinstance(value, str) and value.strip():
            limit = MAX_PROMPT_CHARS if key == "prompt" else MAX_NAME_CHARS
            if len(value) > limit:
                raise ApiError(422, f"{key}: at most {limit} characters")
            fields[key] = value
    realtime = form.get("realtime")
    if isinstance(realtime, str) and realtime:
        if realtime.lower() not in ("true", "false", "1", "0"):
            raise ApiError(422, f"realtime: {realtime!r} is not true or false")
        fields["realtime"] = realtime.lower() in ("true", "1")
    return fields


def _remove_when_over(hub, sid: str, path: Path) -> None:
    """Delete the uploaded file once its stream has ended (or been removed)."""
    try:
        sub = hub.subscribe(sid)
    except KeyError:
        path.unlink(missing_ok=True)
        return

    def wait() -> None:
        try:
            for event in sub:
                if event.get("type") == "end":
                    break
        finally:
            sub.close()
            path.unlink(missing_ok=True)

    threading.Thread(target=wait, name=f"favor-serve-upload-{sid}", daemon=True).start()


# -- events ----------------------------------------------------------------------------------------
def subscribe(hub, sid: str):
    try:
        return hub.subscribe(sid)
    except KeyError:
        raise ApiError(404, f"no such stream: {sid}") from None


def sse_message(event: dict, seq: int) -> str:
    kind = event.get("type", "message")
    return f"id: {seq}\nevent: {kind}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def _events(sub, heartbeat_s: float):
    """(event or None on a heartbeat) until the end event; the subscription is closed whatever happens."""
    try:
        while True:
            event = await sub.get_async(timeout=heartbeat_s)
            yield event
            if event is not None and event.get("type") == "end":
                return
    finally:
        sub.close()


@router.get("/v1/streams/{sid}/events")
async def stream_events(sid: str, request: Request):
    state = _state(request)
    sub = subscribe(state.hub, sid)

    async def body():
        seq = 0
        async for event in _events(sub, state.config.heartbeat_s):
            if event is None:
                yield ": keep-alive\n\n"
                continue
            seq += 1
            yield sse_message(event, seq)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.websocket("/v1/streams/{sid}/ws")
async def stream_ws(websocket: WebSocket, sid: str):
    state = websocket.app.state.server
    await websocket.accept()
    try:
        sub = subscribe(state.hub, sid)
    except ApiError as e:
        await websocket.send_json({"type": "error", "error": e.message})
        await websocket.close(code=WS_NO_SUCH_STREAM if e.status == 404 else 1011)
        return
    # The client sends nothing: reading is how its going away is noticed while no event is due.
    sender = asyncio.create_task(_send_events(websocket, sub, state.config.heartbeat_s))
    gone = asyncio.create_task(_until_disconnect(websocket))
    try:
        await asyncio.wait({sender, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, gone):
            task.cancel()
        try:
            await asyncio.gather(sender, gone, return_exceptions=True)
        finally:  # the server cancelling this handler mid-cleanup (shutdown) must not leak the subscription
            sub.close()


async def _send_events(websocket: WebSocket, sub, heartbeat_s: float) -> None:
    try:
        async for event in _events(sub, heartbeat_s):
            if event is not None:
                await websocket.send_text(json.dumps(event, separators=(",", ":")))
        await websocket.close(code=1000)
    except (WebSocketDisconnect, RuntimeError):  # RuntimeError: sending after the peer closed
        pass


async def _until_disconnect(websocket: WebSocket) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message.get("type") == "websocket.disconnect":
                return
    except (WebSocketDisconnect, RuntimeError):
        return
