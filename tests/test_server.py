"""``favor-rt serve`` on the tiny model: streams over real loopback HTTP (uvicorn in a thread) and
through FastAPI's TestClient. Eight concurrent offline clips lose no caption; a client that goes away
mid-stream hurts no other; a source that dies ends with an end event; every malformed request is a 4xx
with one line of JSON; chat completions (plain and streamed) answer what runtime.clip answers;
/metrics parses with prometheus_client's own parser."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import sigint_at_default
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from runtime.server import ServerConfig, create_app
from runtime.server.live import running
from runtime.synthclip import write_clip

CLIP_S = 1.5  # tiny preset: 10 FPS, 3 frames per window -> 16 slots -> 6 windows (tests/test_runtime_cli.py)
CLIP_WINDOWS = 6
MAX_NEW_TOKENS = 3
STREAMS = 8
# Bounds on a loaded 2-core machine: the tiny model captions a window in tens of ms; these only stop a
# hung server from hanging the suite.
HTTP_TIMEOUT_S = 60.0
EIGHT_STREAMS_BUDGET_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()  # the hub's worker shares the machine with 8 capture threads
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hub(tiny_ckpt):
    from runtime.backends import make_backend
    from runtime.hub import StreamHub

    with StreamHub(make_backend("torch", tiny_ckpt), max_streams=STREAMS, max_new_tokens=MAX_NEW_TOKENS) as h:
        yield h


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return [write_clip(d / f"clip{i}.mp4", CLIP_S, seed=i) for i in range(STREAMS)]


def make_app(tiny_ckpt, hub, upload_dir: Path, **kw):
    cfg = ServerConfig(model=tiny_ckpt, backend="torch", upload_dir=upload_dir, heartbeat_s=0.5, **kw)
    return create_app(cfg, hub=hub, backend="torch")


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    return tmp_path_factory.mktemp("uploads")


@pytest.fixture(scope="module")
def client(tiny_ckpt, hub, uploads):
    with TestClient(make_app(tiny_ckpt, hub, uploads, max_streams=STREAMS)) as c:
        yield c


@pytest.fixture(scope="module")
def live(tiny_ckpt, hub, uploads):
    with running(make_app(tiny_ckpt, hub, uploads, max_streams=STREAMS)) as url:
        yield url


def sse(lines) -> list[dict]:
    """Events of an SSE body (``event:`` / ``data:`` lines), until the stream's end event."""
    events, kind = [], None
    for line in lines:
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            event = json.loads(line.split(":", 1)[1])
            assert event["type"] == kind
            events.append(event)
            if kind == "end":
                break
    return events


def captions(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "caption"]


def follow(base: str, sid: str) -> list[dict]:
    with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as h, h.stream("GET", f"/v1/streams/{sid}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse(r.iter_lines())


def assert_one_line_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and "\n" not in body["error"], body
    for w in words:
        assert w in body["error"], body


def wait_for(predicate, timeout: float = HTTP_TIMEOUT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- streams ---------------------------------------------------------------------------------------
def test_health_page_and_models(client):
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ready"
    assert h.json()["model"] == "tiny" and h.json()["backend"] == "torch"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="add-stream"' in page.text and "EventSource" in page.text
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_eight_concurrent_offline_clips_over_loopback_lose_no_caption(live, hub, clips):
    t0 = time.monotonic()

    def one(clip: Path) -> tuple[str, list[dict]]:
        with httpx.Client(base_url=live, timeout=HTTP_TIMEOUT_S) as h:
            r = h.post("/v1/streams", json={"source": str(clip), "realtime": False, "name": clip.stem})
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            assert r.headers["location"] == f"/v1/streams/{sid}"
        return sid, follow(live, sid)

    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(one, clips))
    assert time.monotonic() - t0 < EIGHT_STREAMS_BUDGET_S
    assert len({sid for sid, _ in results}) == STREAMS
    rows = {row["id"]: row for row in httpx.get(f"{live}/v1/streams").json()["streams"]}
    for sid, events in results:
        caps = captions(events)
        assert events[-1] == {"type": "end", "stream": sid, "reason": "eof", "error": None}
        # offline: every window captioned, in order, none dropped, each once
        assert [c["windows"] for c in caps] == [[i] for i in range(CLIP_WINDOWS)]
        assert rows[sid]["captions"] == len(caps) and rows[sid]["dropped"] == 0
        assert all(c["stream"] == sid and c["text"] for c in caps)


def test_eight_live_streams_over_loopback_account_for_every_window(live, hub):
    """Realtime: a window is captioned or counted as dropped (the hub's latency bound, tests/test_hub.py),
    never lost; each client receives every caption the hub made for its stream."""
    graph = ("lavfi:testsrc=size=64x48:rate=10:duration=2[out0];"
             "sine=frequency={f}:sample_rate=16000:duration=2[out1]")

    def one(i: int) -> tuple[str, list[dict]]:
        with httpx.Client(base_url=live, timeout=HTTP_TIMEOUT_S) as h:
            sid = h.post("/v1/streams", json={"source": graph.format(f=300 + 50 * i)}).json()["id"]
        return sid, follow(live, sid)

    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(one, range(STREAMS)))
    rows = {row["id"]: row for row in httpx.get(f"{live}/v1/streams").json()["streams"]}
    for sid, events in results:
        caps, row = captions(events), rows[sid]
        assert events[-1]["reason"] == "eof" and row["windows"] >= 6  # 2 s = 20 slots, 3 per window
        assert len(caps) == row["captions"]
        assert sum(len(c["windows"]) for c in caps) + row["dropped"] == row["windows"]


def test_a_client_leaving_mid_stream_hurts_no_other(live, hub, clips):
    long_graph = "lavfi:testsrc=size=64x48:rate=10:duration=4[out0];sine=frequency=440:duration=4[out1]"
    with httpx.Client(base_url=live, timeout=HTTP_TIMEOUT_S) as h:
        leaver = h.post("/v1/streams", json={"source": long_graph, "realtime": True}).json()["id"]
        stayer = h.post("/v1/streams", json={"source": str(clips[0]), "realtime": False}).json()["id"]
        with h.stream("GET", f"/v1/streams/{leaver}/events") as r:  # read one caption, then hang up
            first = next(e for e in sse(r.iter_lines()) if e["type"] == "caption")
        assert first["stream"] == leaver
        # the server notices the hang-up and closes that subscription; the stream carries on
        wait_for(lambda: not hub._streams.get(leaver) or not hub._streams[leaver].subscribers,
                 what="the departed client's subscription to close")
        stayed = follow(live, stayer)
        assert [c["windows"] for c in captions(stayed)] == [[i] for i in range(CLIP_WINDOWS)]
        again = follow(live, leaver)  # a new client still gets the rest, up to the end of the source
    assert again[-1]["reason"] == "eof"
    assert httpx.get(f"{live}/v1/streams/{leaver}").json()["captions"] > first["index"] + 1


def ws_events(base: str, sid: str, count: int | None = None) -> list[dict]:
    """A real WebSocket client (the `websockets` package) on the live server: the first ``count`` events,
    or all until the end event. Leaving early closes the connection as a browser tab would. (Starlette's
    TestClient cancels the app's task the moment its client closes, and that raced the server's own
    cleanup: the test failed with CancelledError inside the test client.)"""
    from websockets.sync.client import connect

    events: list[dict] = []
    with connect(base.replace("http", "ws", 1) + f"/v1/streams/{sid}/ws", open_timeout=HTTP_TIMEOUT_S) as ws:
        while (count is None or len(events) < count) and (not events or events[-1]["type"] != "end"):
            events.append(json.loads(ws.recv(timeout=HTTP_TIMEOUT_S)))
    return events


def test_a_websocket_client_leaving_mid_stream_hurts_no_other(live, clips):
    graph = "lavfi:testsrc=size=64x48:rate=10:duration=3[out0];sine=frequency=440:duration=3[out1]"
    leaver = httpx.post(f"{live}/v1/streams", json={"source": graph}, timeout=HTTP_TIMEOUT_S).json()["id"]
    (first,) = ws_events(live, leaver, count=1)  # ... and the client goes away mid-stream
    assert first["stream"] == leaver and first["type"] in ("token", "caption")
    stayer = httpx.post(f"{live}/v1/streams", json={"source": str(clips[1]), "realtime": False},
                        timeout=HTTP_TIMEOUT_S).json()["id"]
    events = ws_events(live, stayer)
    assert [c["windows"] for c in captions(events)] == [[i] for i in range(CLIP_WINDOWS)]
    end = ws_events(live, leaver)[-1]  # the source runs to its end
    assert end["type"] == "end" and end["reason"] == "eof"


def test_a_stream_whose_source_dies_ends_with_an_end_event(client, tmp_path):
    whole = write_clip(tmp_path / "whole.mkv", 3.0).read_bytes()
    fifo = tmp_path / "camera.mkv"
    os.mkfifo(fifo)

    def camera() -> None:  # sends 40 % of the stream, then the device is gone
        with open(fifo, "wb") as f:
            f.write(whole[: int(len(whole) * 0.4)])

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    sid = client.post("/v1/streams", json={"source": str(fifo), "realtime": False}).json()["id"]
    with client.stream("GET", f"/v1/streams/{sid}/events") as r:
        events = sse(r.iter_lines())
    writer.join(5)
    assert events[-1]["type"] == "end" and events[-1]["reason"] in ("eof", "error")
    assert 1 <= len(captions(events)) < 10  # some of the 3-s stream (10 windows), not all
    assert client.get(f"/v1/streams/{sid}").json()["state"] == "ended"


def test_uploaded_clip_is_captioned_then_deleted(client, clips, uploads):
    with open(clips[2], "rb") as f:
        r = client.post("/v1/clips", files={"file": ("upload.mp4", f, "video/mp4")}, data={"name": "up"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    with client.stream("GET", f"/v1/streams/{sid}/events") as s:
        events = sse(s.iter_lines())
    assert len(captions(events)) == CLIP_WINDOWS and events[-1]["reason"] == "eof"
    wait_for(lambda: not any(uploads.iterdir()), what="the upload to be deleted")


def test_remove_ends_the_stream_for_its_listeners(live):
    graph = "lavfi:testsrc=size=64x48:rate=10:duration=30[out0]"
    with httpx.Client(base_url=live, timeout=HTTP_TIMEOUT_S) as h:
        sid = h.post("/v1/streams", json={"source": graph, "name": "cam"}).json()["id"]
        assert h.get(f"/v1/streams/{sid}").json()["name"] == "cam"
        with h.stream("GET", f"/v1/streams/{sid}/events") as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data:"):  # listening: the first event arrived
                pass
            assert h.delete(f"/v1/streams/{sid}").json() == {"id": sid, "removed": True}
            end = sse(lines)[-1]
        assert end == {"type": "end", "stream": sid, "reason": "removed", "error": None}
        assert_one_line_error(h.get(f"/v1/streams/{sid}"), 404, sid)  # removed streams are forgotten


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, url, body, status, words", [
    ("get", "/v1/streams/nope", None, 404, ("no such stream", "nope")),
    ("delete", "/v1/streams/nope", None, 404, ("no such stream",)),
    ("get", "/v1/streams/nope/events", None, 404, ("no such stream",)),
    ("post", "/v1/streams", {"source": "/no/such/clip.mp4"}, 422, ("/no/such/clip.mp4",)),
    ("post", "/v1/streams", {}, 422, ("source", "required")),
    ("post", "/v1/streams", {"source": "x", "colour": "red"}, 422, ("colour",)),
    ("post", "/v1/streams", {"source": ""}, 422, ("source",)),
    ("get", "/v1/nothing", None, 404, ("no such endpoint",)),
    ("put", "/v1/streams", {}, 405, ("not allowed",)),
])
def test_malformed_stream_requests_are_one_line_4xx(client, method, url, body, status, words):
    r = getattr(client, method)(url, **({} if body is None else {"json": body}))
    assert_one_line_error(r, status, *words)


def test_bad_json_is_a_4xx(client):
    r = client.post("/v1/streams", content=b"{not json", headers={"content-type": "application/json"})
    assert_one_line_error(r, 422)


def test_websocket_to_an_unknown_stream_is_closed_with_a_reason(client):
    with client.websocket_connect("/v1/streams/nope/ws") as ws:
        assert ws.receive_json() == {"type": "error", "error": "no such stream: nope"}
        with pytest.raises(Exception) as closed:
            ws.receive_json()
    assert getattr(closed.value, "code", None) == 4404


def test_too_many_streams_is_429(tiny_ckpt, hub, uploads):
    graph = "lavfi:testsrc=size=64x48:rate=10:duration=30[out0]"
    with TestClient(make_app(tiny_ckpt, hub, uploads, max_streams=1)) as c:
        sid = c.post("/v1/streams", json={"source": graph}).json()["id"]
        try:
            assert_one_line_error(c.post("/v1/streams", json={"source": graph}), 429, "too many streams", "1")
        finally:
            c.delete(f"/v1/streams/{sid}")
        assert c.post("/v1/streams", json={"source": graph}).status_code == 201  # room again
        for row in c.get("/v1/streams").json()["streams"]:
            if row["state"] == "running":
                c.delete(f"/v1/streams/{row['id']}")


def test_upload_limits(tiny_ckpt, hub, tmp_path, clips):
    with TestClient(make_app(tiny_ckpt, hub, tmp_path, max_upload_bytes=1000)) as c:
        with open(clips[0], "rb") as f:
            assert_one_line_error(c.post("/v1/clips", files={"file": ("c.mp4", f, "video/mp4")}), 413, "limit")
        assert_one_line_error(c.post("/v1/clips", files={"other": ("c.mp4", b"x", "video/mp4")}), 400, "'file'")
        assert_one_line_error(c.post("/v1/clips", files={"file": ("c.mp4", b"", "video/mp4")}), 400, "empty")
        assert_one_line_error(c.post("/v1/clips", json={"file": "x"}), 415, "multipart")
        bad = c.post("/v1/clips", files={"file": ("noise.mp4", os.urandom(600), "video/mp4")})
        assert_one_line_error(bad, 422, "cannot open")
        # a chat request whose base64 clip decodes past the limit, then bodies past the request limit
        big = "data:video/mp4;base64," + base64.b64encode(os.urandom(3000)).decode()
        assert_one_line_error(chat(c, [video(big), QUESTION]), 413, "limit")
        huge = json.dumps({"messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
        headers = {"content-type": "application/json"}
        assert_one_line_error(c.post("/v1/chat/completions", content=huge, headers=headers), 413, "limit")
        chunked = (huge[i:i + 8192] for i in range(0, len(huge), 8192))  # no Content-Length
        assert_one_line_error(c.post("/v1/chat/completions", content=chunked, headers=headers), 413, "limit")
    assert not any(tmp_path.iterdir())  # nothing refused is left behind


def test_loading_model_answers_503_then_ready(tiny_ckpt, tmp_path):
    app = create_app(ServerConfig(model=tiny_ckpt, backend="torch", upload_dir=tmp_path))
    with TestClient(app) as c:
        early = c.get("/health")
        assert early.status_code in (200, 503) and early.json()["status"] in ("loading", "ready")
        if early.status_code == 503:
            assert_one_line_error(c.get("/v1/streams"), 503, "loading")
        wait_for(lambda: c.get("/health").json()["status"] != "loading", what="the model to load")
        h = c.get("/health").json()
        assert h["status"] == "ready", h
        assert h["backend"].startswith("torch")


# -- chat completions ------------------------------------------------------------------------------
def chat(client, parts, **kw):
    return client.post("/v1/chat/completions",
                       json={"model": "tiny", "messages": [{"role": "user", "content": parts}], **kw})


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


QUESTION = {"type": "text", "text": "what appears?"}


def test_chat_completion_answers_what_the_clip_glue_answers(client, hub, clips):
    from runtime.clip import ask_clip

    expected = ask_clip(hub.backend, clips[3], "what appears?", max_new_tokens=5)
    r = chat(client, [video(str(clips[3])), QUESTION], max_tokens=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")
    # the same clip as a file:// URL and as a base64 data URL
    data = "data:video/mp4;base64," + base64.b64encode(clips[3].read_bytes()).decode()
    for url in (clips[3].as_uri(), data):
        assert chat(client, [video(url), QUESTION], max_tokens=5).json()["choices"][0]["message"]["content"] == expected


def test_streamed_chat_completion_adds_up_to_the_answer(client, clips):
    plain = chat(client, [video(str(clips[4])), QUESTION], max_tokens=5).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [video(str(clips[4])), QUESTION]}],
            "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        payloads = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and len({c["id"] for c in chunks}) == 1 for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == plain
    # token by token: the tiny tokenizer is word-level, so each word of the answer is its own chunk
    assert len(plain.split()) >= 2 and sum(1 for d in deltas if d.get("content")) == len(plain.split())
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_with_input_audio(client, tmp_path):
    wav = write_clip(tmp_path / "speech.wav", 1.0, video=False)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav.read_bytes()).decode(),
                                                   "format": "wav"}}
    r = chat(client, [part, QUESTION], max_tokens=3)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("parts, kw, status, words", [
    ([QUESTION], {}, 400, ("exactly one video or audio part", "found 0")),
    ([video("/a.mp4"), video("/b.mp4"), QUESTION], {}, 400, ("found 2",)),
    ([{"type": "image_url", "image_url": {"url": "x"}}, QUESTION], {}, 400, ("'image_url'", "accepted")),
    ([video("https://example.com/a.mp4"), QUESTION], {}, 400, ("remote URLs",)),
    ([video("data:video/mp4;base64,@@@"), QUESTION], {}, 400, ("base64",)),
    ([video("/no/such/clip.mp4"), QUESTION], {}, 422, ("/no/such/clip.mp4",)),
    ([{"type": "video_url"}, QUESTION], {}, 400, ("video_url needs",)),
    ([video("/a.mp4")], {}, 400, ("no text question",)),
    ([video("/a.mp4"), QUESTION], {"max_tokens": 100_000}, 400, ("max_tokens",)),
    ([video("/a.mp4"), QUESTION], {"max_tokens": 0}, 422, ("max_tokens",)),
    ([video("/a.mp4"), QUESTION], {"n": 2}, 400, ("n (2)",)),
    ([video("/no/such/clip.mp4"), QUESTION], {"stream": True}, 422, ("/no/such/clip.mp4",)),
])
def test_malformed_chat_requests_are_one_line_4xx(client, parts, kw, status, words):
    assert_one_line_error(chat(client, parts, **kw), status, *words)


def test_chat_needs_the_user_to_ask_last(client):
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [video("/a.mp4"), QUESTION]}, {"role": "assistant", "content": "hm"}]})
    assert_one_line_error(r, 400, "last message")
    assert_one_line_error(client.post("/v1/chat/completions", json={"messages": []}), 422, "messages")


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics_parse_and_count_what_was_served(client, clips):
    sid = client.post("/v1/streams", json={"source": str(clips[5]), "realtime": False}).json()["id"]
    with client.stream("GET", f"/v1/streams/{sid}/events") as r:
        got = captions(sse(r.iter_lines()))
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["favor_model_ready"].samples[0].value == 1

    def value(family: str, **labels) -> float:
        return next(s.value for s in families[family].samples
                    if s.name == family + ("_total" if families[family].type == "counter" else "")
                    and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("favor_stream_captions", stream=sid) == len(got) == CLIP_WINDOWS
    assert value("favor_stream_dropped", stream=sid, reason="late") == 0
    assert value("favor_stream_queue_depth", stream=sid) == 0
    assert 0 < value("favor_stream_latency_seconds", stream=sid, quantile="0.5") \
        <= value("favor_stream_latency_seconds", stream=sid, quantile="1")
    assert value("favor_captions") >= len(got)
    assert families["favor_chat_requests"].type == "counter"


# -- the command -----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], ("--port",)),
    (["--max-streams", "0"], ("--max-streams",)),
    (["--max-upload-mb", "0"], ("--max-upload-mb",)),
    (["--max-latency", "-1"], ("--max-latency",)),
    (["--backend", "nope"], ("--backend", "triton")),
    (["--backend", "triton"], ("--url",)),
    (["--url", "localhost:8000"], ("--url", "--backend auto")),
    (["--model", "/no/such/model.safetensors"], ("model not found",)),
])
def test_serve_options_are_checked_before_anything_starts(args, words):
    from typer.testing import CliRunner

    from runtime.cli import app

    r = CliRunner().invoke(app, ["serve", *args])
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words), r.stderr


@pytest.mark.slow  # a fresh process loads torch and the model: ~20 s on a loaded 2-core machine
def test_serve_command_binds_loopback_quietly_and_stops_on_sigint(tiny_ckpt, clips):
    import signal
    import subprocess
    import sys

    from runtime.server.live import free_port

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(tiny_ckpt), "--backend",
                             "torch", "--port", str(port)], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                            preexec_fn=sigint_at_default)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return httpx.get(f"{base}/health", timeout=5).json()["status"] == "ready"
            except httpx.TransportError:
                return False

        wait_for(ready, what="favor-rt serve to load the model")
        with httpx.Client(base_url=base, timeout=HTTP_TIMEOUT_S) as h:
            sid = h.post("/v1/streams", json={"source": str(clips[6]), "realtime": False}).json()["id"]
        assert len(captions(follow(base, sid))) == CLIP_WINDOWS
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err  # interrupted, as favor-rt run
    # quiet: our start and stop lines only (no access log, no library warnings, no traceback)
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"favor-rt serve: http://127.0.0.1:{port}/"), err
    assert lines[1:] == ["favor-rt serve: ready (torch)", "favor-rt serve: stopped"], err
