"""The README's screenshot of the page (``docs/page.png``), taken in Debian's chromium.

    python -m tools.page_screenshot

Starts ``thinkingvit serve`` with the shipped model on a free loopback port, sends the page's
sample images through the API (so the live panel has figures), opens the page, classifies an
easy sample with ``explain=all`` (it leaves after stage 0; stage 1's answer is shown too) in the
target-accuracy mode (the calibration profile's accuracy at the default threshold, so the server
picks that threshold) and saves the page, with the samples in the batch view below. Development
time only, like tools.page_samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "service" / "page" / "samples"
OUT = ROOT / "docs" / "page.png"


def main() -> int:
    sock = socket.socket()  # bound here and handed over (the `fd` setting): clients wait in its backlog
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {**os.environ, "THINKINGVIT_FD": str(sock.fileno()), "THINKINGVIT_API_SERVERS": "1",
           "THINKINGVIT_LOG_LEVEL": "warning"}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env,
                              pass_fds=(sock.fileno(),))  # fmt: skip
    sock.close()
    try:
        httpx.get(f"{url}/readyz", timeout=120).raise_for_status()
        samples = json.loads((SAMPLES / "samples.json").read_text())["samples"]
        for s in samples:
            httpx.post(f"{url}/classify", files={"file": (s["file"], (SAMPLES / s["file"]).read_bytes())})
        shown = [s for s in samples if s["kind"] == "easy"][1]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=30_000)
            page.locator(f'.sample[data-file="{shown["file"]}"]').click()
            expect(page.locator("#answer")).to_be_visible(timeout=30_000)
            page.locator("#mode-target").check()
            expect(page.locator("#target-picked")).to_contain_text("picks threshold", timeout=30_000)
            expect(page.locator("#live-p50")).to_contain_text("ms", timeout=30_000)
            page.locator("#files-input").set_input_files([SAMPLES / s["file"] for s in samples])
            expect(page.locator("#batch-grid .tile")).to_have_count(len(samples), timeout=30_000)
            page.screenshot(path=OUT, full_page=True)
            browser.close()
        print(f"{OUT} ({shown['file']}, {shown['label']})")
    finally:
        server.terminate()
        server.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
