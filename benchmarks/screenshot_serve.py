"""The web page of ``favor-rt serve`` in a real headless Chromium: add a stream through the page's form,
wait until captions appear in the DOM, save a screenshot (benchmarks/serve_page.png).

    python benchmarks/screenshot_serve.py                       # demo model, demo clip -> benchmarks/serve_page.png
    python benchmarks/screenshot_serve.py --model tiny.safetensors --backend torch --out /tmp/page.png

The server runs in this process (uvicorn on a free loopback port); Chromium (Debian's ``chromium``
package) is driven over the DevTools protocol (a WebSocket, the ``websockets`` package uvicorn already
uses): navigate, fill the form, click "Add stream", poll the DOM, ``Page.captureScreenshot``.
tests/test_server_browser.py runs ``capture`` on the tiny model.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "serve_page.png"
DEFAULT_CLIP = ROOT / "favor" / "assets" / "demo" / "demo_clip.mp4"
WINDOW = (1100, 760)  # CSS pixels of the screenshot
# Flags for a quiet, self-contained headless run: no sandbox (root in containers), no GPU, and none of
# the background traffic (updates, sync, metrics) a browser would otherwise start.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
                  "--disable-sync", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
                  "--metrics-recording-only", "--mute-audio", "--hide-scrollbars")
POLL_S = 0.1


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@dataclass
class Browser:
    """One headless Chromium and a DevTools session on its first page."""

    process: subprocess.Popen
    ws: object
    profile: tempfile.TemporaryDirectory
    stack: contextlib.ExitStack  # the DevTools WebSocket
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def start(cls, executable: str, timeout: float = 30.0) -> Browser:
        import httpx
        from websockets.sync.client import connect

        profile = tempfile.TemporaryDirectory(prefix="favor-chromium-")
        w, h = WINDOW
        process = subprocess.Popen([executable, *CHROMIUM_FLAGS, f"--window-size={w},{h}",
                                    "--remote-debugging-port=0", f"--user-data-dir={profile.name}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(profile.name) / "DevToolsActivePort"  # Chromium writes its port here
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{executable} did not start its DevTools endpoint")
            time.sleep(POLL_S)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        stack = contextlib.ExitStack()
        ws = stack.enter_context(connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout))
        return cls(process, ws, profile, stack)

    def call(self, method: str, **params) -> dict:
        """A DevTools command's result (events arriving meanwhile are skipped)."""
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == n:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.js(expression):
                return value
            time.sleep(POLL_S)
        raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # already gone: only the process needs reaping
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stack.close()
        self.profile.cleanup()


def add_stream_through_the_page(browser: Browser, url: str, source: str, realtime: bool, name: str) -> None:
    browser.call("Page.navigate", url=url)
    browser.wait("document.readyState === 'complete' && document.getElementById('health').className === 'ready'",
                 30, "the page to load and the server to say ready")
    fill = {"source": source, "name": name}
    browser.js(f"""(() => {{
        const v = {json.dumps(fill)};
        for (const k in v) document.getElementById(k).value = v[k];
        document.getElementById('realtime').checked = {json.dumps(realtime)};
        document.getElementById('add').click();
    }})()""")


def capture(base_url: str, source: str, out: Path, *, min_captions: int = 3, realtime: bool = True,
            name: str = "demo clip", timeout: float = 120.0, executable: str | None = None) -> dict:
    """Drive the page at ``base_url``; {"captions": DOM caption texts, "message": the page's error line}.
    The screenshot is written atomically to ``out`` once ``min_captions`` captions are on the page."""
    from favor.fileio import atomic_write

    executable = executable or chromium_path()
    if executable is None:
        raise RuntimeError("no chromium found (apt-get install chromium)")
    browser = Browser.start(executable)
    try:
        add_stream_through_the_page(browser, base_url + "/", source, realtime, name)
        # enough captions, or an error line, or the stream over with fewer
        browser.wait(f"document.querySelectorAll('.caption').length >= {min_captions} || "
                     "document.getElementById('message').textContent !== '' || "
                     "[...document.querySelectorAll('.ended')].some(e => e.textContent)",
                     timeout, f"{min_captions} captions in the page")
        texts = browser.js("[...document.querySelectorAll('.caption')].map(li => li.lastChild.textContent)")
        message = browser.js("document.getElementById('message').textContent")
        if len(texts) < min_captions:
            status = browser.js("[...document.querySelectorAll('.stream')].map(e => e.innerText).join(' | ')")
            raise RuntimeError(f"{len(texts)} captions in the page, not {min_captions}: {message or status}")
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        atomic_write(out, lambda tmp: Path(tmp).write_bytes(png))
        return {"captions": texts, "message": message}
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo model)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--clip", default=str(DEFAULT_CLIP), help="source typed into the page's form")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--min-captions", type=int, default=4)
    p.add_argument("--offline", action="store_true", help="caption as fast as possible (default: live pace)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the model to load and caption")
    args = p.parse_args(argv)

    from favor.quiet import quiet_libraries
    from runtime.server import ServerConfig, create_app
    from runtime.server.live import running

    quiet_libraries()
    app = create_app(ServerConfig(model=args.model, backend=args.backend))
    with running(app) as url:
        state = app.state.server
        if not state.wait_ready(args.timeout):
            sys.exit(f"error: the model did not load: {state.error or 'timed out'}")
        result = capture(url, args.clip, args.out, min_captions=args.min_captions, realtime=not args.offline,
                         timeout=args.timeout)
    print(json.dumps({"out": str(args.out), **result}, indent=1))


if __name__ == "__main__":
    main()
