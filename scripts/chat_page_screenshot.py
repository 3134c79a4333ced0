"""A screenshot of serve-edge's chat page after a real exchange: docs/chat_page.png.

Starts `handoff serve-edge` on a free loopback port (by default the default pair: Q on the edge, P in
an embedded verifier), opens the page in headless Debian chromium through Playwright, sends the
prompts one after the other (a multi-turn conversation), waits for each answer and saves the page.
Arguments after `--` go to serve-edge as they are (other models, --threshold, ...).

    python scripts/chat_page_screenshot.py --out docs/chat_page.png
    python scripts/chat_page_screenshot.py --max-tokens 40 -- --edge tiny.gguf --cloud-model tiny.gguf
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from handoff.edge.cloud_harness import wait_for_line

DEFAULT_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Now make it ignore case and punctuation.",
]


def start_server(extra: list[str], threads: int | None) -> tuple[subprocess.Popen, str]:
    """`handoff serve-edge --port 0 ...`; the process and the page's URL once it is ready."""
    env = dict(os.environ, COLUMNS="300")
    if threads:
        env["HANDOFF_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "handoff", "serve-edge", "--host", "127.0.0.1", "--port", "0", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    found = wait_for_line(proc, r"chat page at (http://\S+/)", 900, echo=True)
    if found is None:
        proc.kill()
        sys.exit("serve-edge did not start")
    return proc, found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/chat_page.png"))
    parser.add_argument("--prompt", action="append", help="a user message (repeat for more turns)")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per answer at most")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="HANDOFF_THREADS for the server")
    parser.add_argument("serve_args", nargs="*", help="after --: arguments for handoff serve-edge")
    args = parser.parse_args()
    prompts = args.prompt or DEFAULT_PROMPTS

    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not installed: apt-get install -y chromium (scripts/setup.sh does this)")
    from playwright.sync_api import sync_playwright

    proc, url = start_server(args.serve_args, args.threads)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(url)
            page.wait_for_function("document.getElementById('policy-settings').children.length > 0")
            page.fill("#max-tokens", str(args.max_tokens))
            for i, prompt in enumerate(prompts, 1):
                t0 = time.perf_counter()
                page.fill("#prompt", prompt)
                page.click("#send")
                page.wait_for_function(
                    f"document.querySelectorAll('.msg.assistant.done, .msg.assistant.failed').length >= {i}",
                    timeout=1_800_000,
                )
                error = page.inner_text("#error")
                if error:
                    sys.exit(f"the page reports an error: {error}")
                live = " ".join(page.inner_text("#live").split())
                print(f"turn {i}: {time.perf_counter() - t0:.1f} s; {live}", flush=True)
            page.evaluate("document.getElementById('prompt').blur()")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
        print(f"wrote {args.out}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


if __name__ == "__main__":
    main()
