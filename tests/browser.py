"""Headless Debian Chromium driven over the DevTools protocol (standard library only), for tests
that open a page as a person would: console errors, uncaught exceptions, failed loads, any request
that leaves the file and docutils' "System Message" blocks are collected; the DOM, headings and
screenshots come back.

Skips when Chromium is missing, unless FLASHNET_REQUIRE_BROWSER=1 (CI installs it with
tests/e2e/cluster/system-deps.sh). FLASHNET_CHROMIUM=<path> picks another binary;
FLASHNET_SCREENSHOT_DIR=<dir> keeps screenshots for a look.
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("FLASHNET_CHROMIUM", "/usr/bin/chromium")
# Without the network flags Chromium waits on background services on a machine without network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
                  "--remote-debugging-pipe")
WINDOW = (1280, 2000)
TIMEOUT_S = 60


def require_chromium() -> str:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("FLASHNET_REQUIRE_BROWSER") == "1":
        pytest.fail(f"FLASHNET_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")


class DevToolsPipe:
    """A Chromium process and its DevTools pipe: NUL-terminated JSON on fds 3 (to it) and 4 (from it)."""

    def __init__(self, chromium: str, profile: Path):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def give_child_the_pipe():  # runs in the child: the pipe must sit on fds 3 and 4
            read_end, write_end = os.dup(to_browser_read), os.dup(from_browser_write)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            pass_fds=(3, 4), preexec_fn=give_child_the_pipe,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"Chromium did not answer within {TIMEOUT_S} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe: "
                                   + self.process.stderr.read().decode(errors="replace")[-2000:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.process.stderr.close()


def load_page(chromium: str, page: Path, profile: Path) -> dict:
    """Open ``page`` and return what a person would have seen: problems, DOM, headings, screenshots."""
    browser = DevToolsPipe(chromium, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
                     session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")

        def evaluate(expression: str):
            result = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                       "awaitPromise": True}, session=session)
            return result["result"].get("value")

        evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")  # painted
        dom = evaluate("document.documentElement.outerHTML")
        # docutils renders a reStructuredText problem (a caption, Snakemake's workflow description)
        # into the page as a "System Message" block instead of failing: it counts as a problem.
        system_messages = evaluate("[...document.querySelectorAll('.system-message')]"
                                   ".map(m => m.textContent.replace(/\\s+/g, ' ').trim())")
        headings = evaluate("[...document.querySelectorAll('h1, h2')].map(h => h.textContent.trim())")
        images = evaluate("[...document.images].map(i => ({alt: i.alt, loaded: i.complete && i.naturalWidth > 0}))")
        accuracy_box = evaluate("""(() => { const i = document.querySelector('#figure-accuracy_vs_epoch img');
            if (!i) return null; const r = i.getBoundingClientRect();
            return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height}; })()""")
        viewport = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"},
                                                 session=session)["data"])
        accuracy = None
        if accuracy_box:
            accuracy = base64.b64decode(browser.send(
                "Page.captureScreenshot",
                {"format": "png", "captureBeyondViewport": True, "clip": {**accuracy_box, "scale": 1}},
                session=session)["data"])
        size = evaluate("(e => ({width: e.scrollWidth, height: e.scrollHeight}))(document.documentElement)")
        full_page = base64.b64decode(browser.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, **size, "scale": 1}},
            session=session)["data"])
        problems = page_problems(browser.events) + [f"docutils system message: {m}" for m in system_messages]
        return {"problems": problems, "dom": dom, "headings": headings, "images": images,
                "viewport_png": viewport, "accuracy_png": accuracy, "full_page_png": full_page}
    finally:
        browser.close()


def page_problems(events: list[dict]) -> list[str]:
    """Everything in the DevTools events that a clean, self-contained page must not produce."""
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            problems.append(f"uncaught exception: {details.get('exception', {}).get('description') or details['text']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
            problems.append(f"console.{params['type']}: {text}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            problems.append(f"log {params['entry']['level']}: {params['entry']['text']}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:", "about:")):
                problems.append(f"request outside the page: {url}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed load: {params.get('errorText')}")
    return problems


def distinct_colours(png: bytes) -> int:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    return len(image.getcolors(maxcolors=1 << 24))


def keep_screenshot(name: str, png: bytes) -> None:
    folder = os.environ.get("FLASHNET_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_bytes(png)
