"""serve-edge's chat page (GET /, edge/static): served as it is, and driven in a real headless browser.

One `handoff serve-edge` process over the tiny models (Q = tiny A-near, P = tiny A in an embedded
verifier, tau = 0.02 nats: both models produce tokens within a few dozen), with an API key: the page
and its assets stay open, /v1 wants the key, which the page sends once it is typed in.

The browser is Debian's chromium (scripts/setup.sh installs it), driven by Playwright through
executable_path (Playwright's own browser download is never used). Without chromium the browser test
fails with the command that installs it: it is part of the suite, not optional.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from handoff.edge.cloud_harness import wait_for_line

if TYPE_CHECKING:
    from playwright.sync_api import Browser

KEY = "page-key"
SOURCES = {"edge", "cloud", "corrected", "ensembled", "unchecked"}
MESSAGES = [{"role": "user", "content": "Hello there"}]


# --------------------------------------------------------------------------------------------------
# Helpers


def http(method: str, url: str, body: dict | None = None, key: str | None = None):
    """A raw HTTP request: (status, headers, body bytes), 4xx and 5xx included."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def stream_chunks(root: str, **body) -> list[dict]:
    """A streamed chat completion's chunks (the data of each event before [DONE])."""
    request = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "stream": True} | body
    status, headers, raw = http("POST", root + "/v1/chat/completions", request, key=KEY)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw[:500]
    data = [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.fixture(scope="module")
def root(tiny_gguf_a, tiny_gguf_a_near, run_handoff) -> Iterator[str]:
    """`handoff serve-edge` on a free port with an API key; yields http://127.0.0.1:PORT."""
    args = ["--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a), "--port", "0",
            "--threshold", "0.02", "--check-interval", "6", "--handback-tokens", "3", "--n-ctx", "1024"]  # fmt: skip
    env = {"HANDOFF_THREADS": "1", "HANDOFF_SERVE_API_KEY": KEY, "HANDOFF_SERVE_MODEL_ALIAS": "tiny"}
    proc = run_handoff.start("serve-edge", *args, env=env)
    found = wait_for_line(proc, r"chat page at (http://\S+)/", 300)
    if found is None:
        proc.kill()
        raise AssertionError(f"serve-edge did not start: {proc.communicate(timeout=30)[1][-3000:]}")
    try:
        yield found.group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# Served as it is


def test_the_page_and_its_assets_are_served_without_the_key(root):
    status, headers, page = http("GET", root + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    assert 'src="/static/app.js"' in html and 'href="/static/style.css"' in html
    assets = {}
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
        status, headers, body = http("GET", f"{root}/static/{name}")
        assert status == 200 and kind in headers["content-type"], (name, headers)
        assets[name] = body.decode()
    # Nothing is fetched from elsewhere: the page works offline (the SVG namespace is a name, not a fetch).
    external = re.compile(
        r"""(src|href)=["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import|fetch\(\s*["'`]http"""
    )
    assert not [name for name, text in assets.items() if external.search(text)]
    status, _, body = http("GET", root + "/static/missing.js")
    assert status == 404 and json.loads(body)["error"]["code"] == "unknown_url"
    assert http("GET", root + "/v1/models")[0] == 401  # the key still guards the API
    assert http("GET", root + "/v1/models", key=KEY)[0] == 200


def test_health_reports_the_policy_settings(root):
    health = json.loads(http("GET", root + "/health")[2])
    config = health["policy_config"]
    assert health["policy"] == config["kind"] == "rollback"
    assert config["threshold"] == 0.02 and config["check_interval"] == 6 and config["handback_tokens"] == 3


def test_handoff_stream_chunks_carry_each_tokens_source_only_when_asked(root):
    detailed = stream_chunks(root, max_tokens=40, handoff_stream=True, stream_options={"include_usage": True})
    deltas = [c for c in detailed if c["choices"] and c["choices"][0]["finish_reason"] is None]
    content = [c for c in deltas if c["choices"][0]["delta"].get("content") is not None]
    tokens = [c["handoff"] for c in content if "handoff" in c]
    assert len(tokens) == len(content) - 1 >= 2  # every chunk after the role chunk; several of them
    for t in tokens:
        assert set(t) == {"pieces", "sources", "kl", "checked", "unchecked"}
        assert len({len(v) for v in t.values()}) == 1 and t["sources"], t
    text = "".join(c["choices"][0]["delta"]["content"] for c in content)
    pieces = [p for t in tokens for p in t["pieces"]]
    sources = [s for t in tokens for s in t["sources"]]
    assert "".join(pieces) == text and text
    assert len(sources) == 40 == detailed[-1]["usage"]["completion_tokens"]
    final = next(c for c in detailed if c["choices"] and c["choices"][0]["finish_reason"])
    assert sources == final["handoff"]["sources"]  # the same as the final chunk's list, token by token
    assert "edge" in sources and {"cloud", "corrected"} & set(sources), sources
    kls = [k for t in tokens for k in t["kl"]]
    checked = [c for t in tokens for c in t["checked"]]
    assert any(k is not None and k >= 0 for k in kls) and all(checked)  # the cloud answered every window
    assert all(u is None for t in tokens for u in t["unchecked"])

    plain = stream_chunks(root, max_tokens=40)
    assert all("handoff" not in c for c in plain if c["choices"] and not c["choices"][0]["finish_reason"])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in plain if c["choices"]) == text


# --------------------------------------------------------------------------------------------------
# In a real browser


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Debian chromium under Playwright; a missing browser fails the test (it is not optional)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: the chat page is tested in Debian's chromium. Install it with "
            "`apt-get install -y chromium` (scripts/setup.sh, run by `make test`, does this)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield browser
        finally:
            browser.close()


TOKENS_JS = """() => Array.from(document.querySelectorAll('.msg.assistant.done')).pop()
    .querySelectorAll('.tok').length"""
SPANS_JS = """els => els.map(e => ({cls: e.classList[1], text: e.textContent,
    color: getComputedStyle(e).color, background: getComputedStyle(e).backgroundColor}))"""


def test_the_chat_page_streams_tokens_coloured_by_source(root):
    """Load, send (first without the key: the page says so), watch tokens stream in with their source's
    colour, the live line and the plot fill; a second message re-sends the conversation."""
    from playwright.sync_api import expect

    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        bodies: list[dict] = []
        urls: list[str] = []

        def on_request(request) -> None:
            urls.append(request.url)
            if request.url.endswith("/v1/chat/completions"):
                bodies.append(json.loads(request.post_data))

        page.on("request", on_request)
        page.goto(root + "/")
        expect(page.locator("#server-line")).to_contain_text("policy rollback")
        expect(page.locator("#policy-settings")).to_contain_text("threshold")
        expect(page.locator("#policy-settings")).to_contain_text("0.02")

        # Without the key: the server's message is shown and the question is not kept.
        page.fill("#prompt", "Hello there")
        page.press("#prompt", "Enter")
        expect(page.locator("#error")).to_contain_text("API key")
        problems.clear()  # the browser logs the 401 itself

        page.fill("#api-key", KEY)
        page.fill("#max-tokens", "60")
        # Record how many tokens the page shows at each change: streamed means several steps, not one.
        page.evaluate("""() => {
            window.tokenCounts = [];
            new MutationObserver(() => window.tokenCounts.push(
                document.querySelectorAll('.msg.assistant.streaming .tok').length))
                .observe(document.getElementById('conversation'), {childList: true, subtree: true});
        }""")
        page.fill("#prompt", "Hello there")
        page.click("#send")
        page.wait_for_selector(".msg.assistant .tok", timeout=120_000)
        page.wait_for_selector(".msg.assistant.done", timeout=300_000)
        counts = [n for n in page.evaluate("window.tokenCounts") if n]
        assert len(set(counts)) >= 2, counts

        spans = page.eval_on_selector_all(".msg.assistant.done .tok", SPANS_JS)
        assert len(spans) == 60 == page.evaluate(TOKENS_JS)
        answer = page.eval_on_selector(".msg.assistant.done .body", "e => e.textContent")
        assert "".join(s["text"] for s in spans) == answer and answer.strip()
        classes = {s["cls"] for s in spans}
        assert classes <= SOURCES and "edge" in classes and classes & {"cloud", "corrected"}, classes
        colours = {s["cls"]: (s["color"], s["background"]) for s in spans}
        assert len(set(colours.values())) == len(colours) >= 2, colours  # each source its own colour

        # The live line: numbers, from the stream and the final chunk.
        stat = {name: page.inner_text(f"#stat-{name}") for name in
                ("tokens", "cloud-share", "check-points", "handoffs", "tps")}  # fmt: skip
        assert stat["tokens"] == "60" and re.fullmatch(r"\d+%", stat["cloud-share"]), stat
        share = sum(s["cls"] in ("cloud", "corrected") for s in spans) / 60
        assert int(stat["cloud-share"][:-1]) == round(100 * share), stat
        assert int(stat["check-points"]) >= 1 and int(stat["handoffs"]) >= 1 and float(stat["tps"]) > 0, stat
        # The plot: a point per token P checked, coloured like its token, and the threshold line.
        points = page.eval_on_selector_all(
            "#kl-points circle", "els => els.map(e => e.getAttribute('class'))"
        )
        assert len(points) >= 6 and set(points) <= SOURCES, points
        assert page.get_attribute("#kl-threshold", "visibility") == "visible"

        # A second turn re-sends the conversation: question, the answer as shown, the new question.
        page.fill("#prompt", "And again")
        page.press("#prompt", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant.done').length == 2", timeout=300_000
        )
        messages = bodies[-1]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[1]["content"] == answer and messages[2]["content"] == "And again"
        assert bodies[-1]["stream"] is True and bodies[-1]["handoff_stream"] is True
        assert page.locator(".msg.assistant.done").nth(1).locator(".tok").count() == 60

        assert all(u.startswith(root) for u in urls), urls  # nothing from elsewhere
        assert not problems, problems
        page.close()
