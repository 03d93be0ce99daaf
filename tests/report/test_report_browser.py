"""report.html in a real browser: headless Debian Chromium, driven over the DevTools protocol.

The page is loaded through ``--remote-debugging-pipe`` (standard library only), which lets the test
see what a person's browser would: console errors, uncaught exceptions, failed loads and any request
that leaves the file (the page must be self-contained). It then reads the DOM for the headings and
takes a 1280×2000 screenshot, which must not be blank. A deliberately broken page is loaded the same
way first, to prove the checks can fail.

Skips when Chromium is missing, unless FLASHNET_REQUIRE_BROWSER=1 (CI installs it with
tests/e2e/cluster/system-deps.sh). FLASHNET_CHROMIUM=<path> picks another binary;
FLASHNET_SCREENSHOT_DIR=<dir> keeps the screenshots (viewport, full page, accuracy figure) for a look.
"""

from __future__ import annotations

import io

from browser import WINDOW, distinct_colours, keep_screenshot, load_page, require_chromium

from flashnet.report.build import build_report
from flashnet.report.html import SECTIONS


def test_checks_catch_a_broken_page(tmp_path):
    """The same checks on a page that throws, logs an error, reaches out and shows a docutils system
    message must report all four."""
    chromium = require_chromium()
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title></head><body>'
                    "<h1>broken</h1><script>console.error('deliberate console error');</script>"
                    "<script>throw new Error('deliberate exception');</script>"
                    '<div class="system-message"><p class="system-message-title">System Message: ERROR/3 '
                    '(<tt>&lt;string&gt;</tt>, line 19)</p>\n<p>Unexpected indentation.</p></div>'
                    '<img src="http://flashnet.invalid/missing.png" alt="external"></body></html>')
    seen = load_page(chromium, page, tmp_path / "profile")
    problems = "\n".join(seen["problems"])
    assert "deliberate console error" in problems
    assert "deliberate exception" in problems
    assert "request outside the page: http://flashnet.invalid/missing.png" in problems
    assert "docutils system message: System Message: ERROR/3 (<string>, line 19) Unexpected indentation." in problems
    assert seen["headings"] == ["broken"]


def test_report_page_in_chromium(tmp_path, make_run, settings):
    chromium = require_chromium()
    folders = [make_run("lars-b64"),
               make_run("sgd-b32", batch_size=32, optimizer="sgd", lr=0.1, final_top1=0.62, devices_per_node=1,
                        images_per_s=55.0)]
    files = build_report(folders, settings, tmp_path / "report")

    seen = load_page(chromium, files["report.html"], tmp_path / "profile")
    keep_screenshot("report-viewport.png", seen["viewport_png"])
    keep_screenshot("report-full-page.png", seen["full_page_png"])
    if seen["accuracy_png"]:
        keep_screenshot("report-accuracy.png", seen["accuracy_png"])

    assert seen["problems"] == []
    assert seen["headings"] == ["flashnet report", *(heading for _, heading, _ in SECTIONS)]
    assert "<script" not in seen["dom"]
    assert 'id="timing">Where the training time went</h3>' in seen["dom"]
    assert "<td>lars-b64</td><td class=\"num\">6 min 52 s</td><td class=\"num\">6 min 00 s (87%)</td>" in seen["dom"]
    assert len(seen["images"]) == 5 and all(image["loaded"] for image in seen["images"]), seen["images"]

    from PIL import Image

    viewport = Image.open(io.BytesIO(seen["viewport_png"]))
    assert viewport.size == WINDOW
    assert distinct_colours(seen["viewport_png"]) > 500  # text, tables, a figure: far from blank
    assert seen["accuracy_png"] is not None, "the accuracy-against-epoch figure is missing"
    accuracy = Image.open(io.BytesIO(seen["accuracy_png"])).convert("L")
    assert accuracy.width > 600
    low, high = accuracy.getextrema()
    assert high - low > 150  # dark curves and text on white, not a uniform block
    assert distinct_colours(seen["accuracy_png"]) > 50
