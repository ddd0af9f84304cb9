"""The web page of ``favor-rt serve`` in a real headless Chromium (Debian's ``chromium``; `make sysdeps`
installs it): uvicorn on a free loopback port, the stream added through the page's form, captions
awaited in the DOM, a screenshot taken (benchmarks/screenshot_serve.py, which also makes the committed
benchmarks/serve_page.png with the demo model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

from runtime.server import ServerConfig, create_app
from runtime.server.live import running
from runtime.synthclip import write_clip

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLIP_WINDOWS = 6  # 1.5 s at the tiny preset's 10 FPS, 3 frames per window


def _script():
    spec = importlib.util.spec_from_file_location("screenshot_serve", ROOT / "benchmarks" / "screenshot_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


screenshot = _script()
pytestmark = pytest.mark.skipif(screenshot.chromium_path() is None,
                                reason="chromium is not installed (make sysdeps, or apt-get install chromium)")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_page_shows_live_captions_in_chromium(tiny_ckpt, tmp_path, one_thread):
    from runtime.backends import make_backend
    from runtime.hub import StreamHub

    clip = write_clip(tmp_path / "clip.mp4", 1.5)
    out = tmp_path / "page.png"
    with StreamHub(make_backend("torch", tiny_ckpt), max_new_tokens=3) as hub:
        app = create_app(ServerConfig(model=tiny_ckpt, backend="torch", upload_dir=tmp_path / "up"),
                         hub=hub, backend="torch")
        with running(app) as url:
            result = screenshot.capture(url, str(clip), out, min_captions=CLIP_WINDOWS, realtime=False,
                                        name="browser test", timeout=60)
            rows = httpx.get(f"{url}/v1/streams").json()["streams"]
            with httpx.stream("GET", f"{url}/v1/streams/{rows[0]['id']}/events", timeout=60) as r:
                sent = [json.loads(ln[5:]) for ln in r.iter_lines() if ln.startswith("data:")]
    assert result["message"] == ""
    assert len(rows) == 1 and rows[0]["name"] == "browser test" and rows[0]["source"] == str(clip)
    # the DOM holds exactly the captions the server pushed, in order
    assert result["captions"] == [e["text"] for e in sent if e["type"] == "caption"]
    png = out.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
