"""The chat page in headless Chromium (Debian's package, driven by Playwright): a message is sent, the
reasoning streams into a collapsible block, the answer streams below it, token counts and cost appear,
and a screenshot is saved (pytest tmp dir, copied to runs/screenshots/)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from browser_support import ARGS, CHROMIUM

from r1lab.serve.app import ServeSettings, create_app
from r1lab.serve.background import serve_in_thread
from r1lab.serve.engine import BatchingEngine
from r1lab.serve.prompts import ChatRenderer
from r1lab.serve.scripted import ScriptedEngine, ScriptedTokenizer

REPO = Path(__file__).resolve().parents[2]
REPLY = (
    "<think>The user asks for 17 + 25. 17 + 25 = 42. Check: 42 - 25 = 17.</think>The answer is \\boxed{42}."
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs it)"),
]


class GatedEngine(ScriptedEngine):
    """Stops mid-reasoning until `gate` is set: the page is checked while the stream is surely open,
    however slowly a loaded machine runs the browser (a free-running 2 s stream could end unseen)."""

    def __init__(self, reply: str, hold_at: int, **kw):
        super().__init__(reply, **kw)
        self.hold_at, self.gate = hold_at, threading.Event()

    def step(self):
        if not self.gate.is_set() and any(r.pos >= self.hold_at for r in self.requests.values()):
            self.gate.wait(timeout=120)  # bounded: a failed test must not hang the worker thread
        return super().step()


def test_chat_page_streams_reasoning_and_answer(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    step_engine = GatedEngine(REPLY, hold_at=len("<think>The user asks"), step_seconds=0.02)
    engine = BatchingEngine(step_engine, max_batch=4, max_queue=4)
    app = create_app(
        engine,
        ChatRenderer(ScriptedTokenizer(), 4096),
        ServeSettings("r1lab-tiny", api_key="k", price_per_hour=0.1),
    )
    with serve_in_thread(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(
                viewport={"width": 1000, "height": 700}, bypass_csp=True
            )  # the page has a CSP
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.fill("#key", "k")
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('r1lab-tiny')")
            page.fill("#prompt", "What is 17 + 25?")
            page.click("#send")
            # Streaming: reasoning text is on the page while the answer is still incomplete (the engine
            # holds mid-reasoning until the page has shown it).
            page.wait_for_function(
                "(() => { const b = document.querySelector('.assistant');"
                " return b && b.querySelector('pre').textContent.length > 0"
                " && b.querySelector('.stats').textContent === ''; })()"
            )
            step_engine.gate.set()
            page.wait_for_function(
                "document.querySelector('.assistant .stats').textContent.includes('tokens')"
            )
            box = page.locator(".assistant")
            assert (
                box.locator("details.reasoning pre").text_content()
                == "The user asks for 17 + 25. 17 + 25 = 42. Check: 42 - 25 = 17."
            )
            assert box.locator(".answer").text_content() == "The answer is \\boxed{42}."
            assert "<think>" not in box.inner_text()
            summary = box.locator("details.reasoning summary").text_content()
            assert summary.startswith("Reasoning (") and "tokens" in summary
            stats = box.locator(".stats").text_content()
            assert "completion tokens" in stats and "reasoning" in stats and "$" in stats
            box.locator("details.reasoning summary").click()  # unfold the reasoning for the screenshot
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000 and not errors
            out = REPO / "runs" / "screenshots"
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / "chat_page.png")
        finally:
            step_engine.gate.set()
            browser.close()
