"""`handoff serve-edge`: the OpenAI-compatible API, driven over a real socket with the official client.

Most tests share one server (uvicorn in a thread of its own, on a free port) over the tiny models:
Q = tiny A-near on the edge, P = tiny A in an embedded verifier, with a threshold low enough that
both models produce tokens within a few dozen. The text-assembly and queue logic are also tested on
their own, without models. One test runs the real default pair through the `handoff serve-edge`
command.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from handoff.edge.cloud_harness import ServerThread, wait_for_line
from handoff.edge.openai_protocol import LogprobFormatter, TextAssembler
from handoff.edge.records import GenerationResult, TokenRecord
from handoff.edge.serving import GenerationQueue, Job, QueueFull, ServerStopping
from handoff.shared.sampling import SamplingSettings

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Hello there"}]
# Greedy generation on the tiny pair does not reach a stop token for thousands of tokens: a request
# this long keeps the model busy for many seconds unless it is cancelled.
LONG = 1500


# --------------------------------------------------------------------------------------------------
# Helpers


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """A raw HTTP request: (status, headers, body bytes), 4xx and 5xx included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(server: ServerThread, path: str, body: bytes | str, key: str | None = KEY, **headers: str):
    data = body.encode() if isinstance(body, str) else body
    hdrs = {"Content-Type": "application/json", **headers}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    return http("POST", server.url(path), data, hdrs)


def metrics(server: ServerThread) -> dict[tuple[str, tuple], float]:
    """The /metrics samples as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http("GET", server.url("/metrics"))
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def sample(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def grew(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much a metric sample grew between two /metrics readings."""
    return sample(after, name, **labels) - sample(before, name, **labels)


def tokens_grew(before: dict, after: dict) -> float:
    return sum(
        grew(before, after, "handoff_edge_tokens_total", source=s) for s in ("edge", "cloud", "corrected")
    )


def requests_grew(before: dict, after: dict, outcome: str, endpoint: str = "chat.completions") -> float:
    return grew(before, after, "handoff_edge_requests_total", endpoint=endpoint, outcome=outcome)


def idle(server: ServerThread) -> bool:
    """Nothing running or waiting."""
    return not server.api.queue.busy and server.api.queue.depth == 0


@pytest.fixture
def wait_idle(wait_until):
    """`wait_idle(server, timeout=10)`: seconds until the server is idle (fails past the timeout)."""

    def wait(server: ServerThread, timeout: float = 10.0) -> float:
        t0 = time.perf_counter()
        wait_until(lambda: idle(server), timeout, what="the server to be idle")
        return time.perf_counter() - t0

    return wait


def extension(obj) -> dict:
    """The `handoff` extension field of a response or chunk (the client keeps unknown fields)."""
    return obj.model_extra["handoff"]


@pytest.fixture(scope="module")
def server(tiny_gguf_a, tiny_gguf_a_near):
    with ServerThread(tiny_gguf_a_near, tiny_gguf_a, max_queue=3, api_key=KEY) as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model_id(server) -> str:
    return server.api.model_id


@pytest.fixture(scope="module")
def tiny_models(tiny_gguf_a, tiny_gguf_a_near):
    """Q and P loaded on their own, to check the server's numbers against the models themselves."""
    from handoff.shared.llama_cpp_model import LlamaCppModel

    q = LlamaCppModel(tiny_gguf_a_near, n_ctx=512, n_threads=1)
    p = LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1)
    yield q, p
    q.close()
    p.close()


def chat(client, model_id, **kw):
    args = {"model": model_id, "messages": MESSAGES, "max_tokens": 24, "temperature": 0.0} | kw
    return client.chat.completions.create(**args)


# --------------------------------------------------------------------------------------------------
# Text assembly and the queue, without models


def _fake_detokenize(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids)


def _records(ids, source="edge"):
    return [TokenRecord(position=i, token_id=t, source=source, q_logprob=-0.5, q_topk_ids=[t, 99],
                        q_topk_logprobs=[-0.5, -1.0]) for i, t in enumerate(ids)]  # fmt: skip


def test_text_assembler_and_logprobs_take_ps_tokens_by_their_bytes_across_tokenizers():
    """Across tokenizers a cloud token's id is P's: its bytes come with the record (`raw`), an id equal
    to a Q stop id is still text, and P's end of turn (no bytes) ends the answer."""
    detok = _fake_detokenize({1: b"Hel", 7: b"<end>", 99: b"x"})
    a = TextAssembler(detok, frozenset({7}), [])
    p_hash = TokenRecord(position=1, token_id=7, source="cloud", raw=b"#", p_logprob=-0.1,
                         p_topk_ids=[7, 151], p_topk_logprobs=[-0.1, -2.0])  # fmt: skip
    p_end = TokenRecord(position=2, token_id=151645, source="cloud", raw=b"", p_logprob=-0.01)
    for r in [*_records([1]), p_hash, p_end]:
        assert not a.add(r)
    text, toks = a.take(final=True)
    assert text == "Hel#" and [t.record.token_id for t in toks] == [1, 7]
    entry = LogprobFormatter(detok, top=2).chat(toks)[1]
    assert entry == {"token": "#", "logprob": -0.1, "bytes": [35], "top_logprobs": []}


def test_text_assembler_trims_stop_strings_across_tokens_and_holds_back_prefixes():
    pieces = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xc3", 6: b"\xa9!", 7: b"<end>", 99: b"x"}
    detok = _fake_detokenize(pieces)
    a = TextAssembler(detok, frozenset({7}), ["ld", "o w"])
    sent = []
    for r in _records([1, 2, 3, 4]):
        stop = a.add(r)
        sent.append(a.take())
        if stop:
            break
    assert stop and a.text == "Hell"  # the first stop string to appear ends it, across token boundaries
    # Text that could start a stop string is held back: "l" ("ld"), then "o" ("o w") until " wor" comes.
    assert [t for t, _ in sent] == ["He", "ll", ""]
    assert a.take(final=True) == ("", [])
    released = [t.record.token_id for _, toks in sent for t in toks]
    assert released == [1, 2]  # "lo" is partly before the stop string: it belongs to the answer; " wor" not

    # A character split over two tokens comes out whole; a stop token's text is not part of the answer.
    b = TextAssembler(detok, frozenset({7}), [])
    out = []
    for r in _records([5, 6, 7]):
        assert not b.add(r)
        out.append(b.take())
    assert "".join(t for t, _ in out) == "é!" and b.take(final=True) == ("", [])
    assert [len(toks) for _, toks in out] == [1, 1, 0]  # the first token is released with no text

    # An unfinished character at the end is flushed as U+FFFD; no stop string means nothing is held.
    c = TextAssembler(detok, frozenset(), ["zzz"])
    for r in _records([1, 5]):
        c.add(r)
    text, toks = c.take()
    assert text == "Hel" and [t.record.token_id for t in toks] == [1, 5]  # 5 so far: bytes, no text
    assert c.take(final=True) == ("\ufffd", []) and c.text == "Hel\ufffd"

    f = LogprobFormatter(detok, top=1)
    chat_lp = f.chat([t for _, toks in sent for t in toks])
    assert len(chat_lp) == 2
    hel = {"token": "Hel", "logprob": -0.5, "bytes": list(b"Hel")}
    assert chat_lp[0] == hel | {"top_logprobs": [hel]}
    comp = f.completion([t for _, toks in sent for t in toks])
    assert comp == {"tokens": ["Hel", "lo"], "token_logprobs": [-0.5, -0.5],
                    "top_logprobs": [{"Hel": -0.5}, {"lo": -0.5}], "text_offset": [0, 3]}  # fmt: skip


def test_logprobs_come_from_the_model_that_produced_the_token():
    detok = _fake_detokenize({1: b"a", 2: b"b", 3: b"c"})
    cloud = TokenRecord(position=0, token_id=1, source="cloud", q_logprob=-3.0, p_logprob=-0.1,
                        q_topk_ids=[2], q_topk_logprobs=[-0.2],
                        p_topk_ids=[1, 3], p_topk_logprobs=[-0.1, -2.5])  # fmt: skip
    edge = TokenRecord(position=1, token_id=2, source="edge", q_logprob=-0.2, p_logprob=-4.0,
                       q_topk_ids=[2, 3], q_topk_logprobs=[-0.2, -1.8],
                       p_topk_ids=[1], p_topk_logprobs=[-0.3])  # fmt: skip
    a = TextAssembler(detok, frozenset(), [])
    for r in (cloud, edge):
        a.add(r)
    _, toks = a.take(final=True)
    lp = LogprobFormatter(detok, top=2).chat(toks)
    assert [e["logprob"] for e in lp] == [-0.1, -0.2]
    assert [[t["token"] for t in e["top_logprobs"]] for e in lp] == [["a", "c"], ["b", "c"]]


class _FakeGenerator:
    """Counts tokens slowly; remembers the order in which generations started."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.swallow_cancel = False
        self.cleanups: list[bool] = []  # per generation: did its cleanup run to the end

    async def generate(self, prompt_ids, max_tokens, *, sampling=None, on_token=None, constraint=None):
        self.started.append(prompt_ids[0])
        result = GenerationResult(prompt_ids=list(prompt_ids), stop_reason="max_tokens")
        try:
            for i in range(max_tokens):
                try:
                    await asyncio.sleep(0.005)  # slow on purpose: a generation that takes time
                except asyncio.CancelledError:
                    # What Python 3.11's asyncio.wait_for does when the cancellation meets a completion.
                    if not self.swallow_cancel:
                        raise
                record = TokenRecord(
                    position=i, token_id=i, source="edge" if i % 2 else "cloud", checked=True
                )
                result.records.append(record)
                if on_token is not None and on_token(record):
                    result.stop_reason = "stopped"
                    break
            return result
        finally:
            # Like the controller's: closing the cloud session awaits; a second cancellation would cut it.
            self.cleanups.append(False)
            await asyncio.sleep(0.02)
            self.cleanups[-1] = True


def test_generation_queue_runs_jobs_in_order_refuses_when_full_and_cancels(async_wait_until):
    async def _until(predicate):
        await async_wait_until(predicate, timeout=5.0, interval=0.001)

    async def scenario():
        gen = _FakeGenerator()
        queue = GenerationQueue(gen, max_queue=2)
        queue.start()
        jobs = [queue.submit(Job([k], 5, SamplingSettings())) for k in range(3)]
        with pytest.raises(QueueFull) as full:
            queue.submit(Job([9], 5, SamplingSettings()))
        assert full.value.waiting == 2 and full.value.retry_after >= 1
        results = [await j.done for j in jobs]
        assert gen.started == [0, 1, 2] and [j.ahead for j in jobs] == [0, 1, 2]
        assert all(len(r.records) == 5 for r in results)
        assert jobs[0].t_started < jobs[1].t_started < jobs[2].t_started

        # Cancelling: a running job stops at once, a waiting one leaves the queue without running.
        long, waiting = (
            queue.submit(Job([10], 10_000, SamplingSettings())),
            queue.submit(Job([11], 5, SamplingSettings())),
        )
        await _until(lambda: len(long.records) >= 3)
        assert queue.cancel(waiting) and queue.depth == 0
        assert queue.cancel(long)
        await _until(lambda: len(gen.cleanups) == len(gen.started))  # its cleanup has begun
        assert queue.cancel(long)  # the stream's end and its closing both cancel: the task only once
        await asyncio.wait({long.done}, timeout=2)
        assert gen.cleanups[-1], "a second cancellation cut the generation's cleanup short"
        assert long.done.cancelled() and 3 <= len(long.records) < 100 and waiting.done.cancelled()
        assert 11 not in gen.started and queue.cancelled == 1

        # A generation that swallows its cancellation still stops, at its next token.
        gen.swallow_cancel = True
        deaf = queue.submit(Job([16], 10_000, SamplingSettings()))
        await _until(lambda: len(deaf.records) >= 3)
        assert queue.cancel(deaf)
        await asyncio.wait({deaf.done}, timeout=2)
        assert deaf.done.cancelled() and len(deaf.records) < 100 and queue.cancelled == 2
        gen.swallow_cancel = False

        # on_token returning True stops the generation; stop() fails what still waits.
        stopper = Job([12], 50, SamplingSettings(), on_token=lambda r: r.position == 2)
        assert (await queue.submit(stopper).done).stop_reason == "stopped" and len(stopper.records) == 3
        running = queue.submit(Job([13], 10_000, SamplingSettings()))
        late = queue.submit(Job([14], 5, SamplingSettings()))
        await _until(lambda: len(running.records) >= 1)
        queue.cancel(running)  # the client leaves, and the server stops while the cleanup runs
        await queue.stop()
        assert running.done.cancelled() and gen.cleanups[-1]
        with pytest.raises(ServerStopping):
            await late.done
        with pytest.raises(ServerStopping):
            queue.submit(Job([15], 5, SamplingSettings()))

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------------
# The API over the tiny models


def test_models_health_and_metrics(server, client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id] == ["tiny-a-near"]
    card = client.models.retrieve(model_id)
    assert card.owned_by == "handoff" and card.model_extra["handoff"]["cloud"]["backend"] == "llama.cpp"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    status, headers, body = http("GET", server.url("/health"))  # open without the key
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["model"] == model_id
    assert health["mode"] == "hybrid" and health["max_queue"] == 3 and health["n_ctx"] == 4096
    status, headers, body = http("GET", server.url("/metrics"))
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("handoff_edge_requests_total", "handoff_edge_tokens_total", "handoff_edge_handoffs_total",
                 "handoff_edge_queue_depth", "handoff_edge_busy",
                 "handoff_edge_time_to_first_token_seconds"):  # fmt: skip
        assert f"# HELP {name} " in body.decode(), name


def test_chat_completion_reports_logprobs_of_the_producing_model(server, client, model_id, tiny_models):
    """Each token's log-prob is Q's where the edge made it and P's where the cloud did, checked against
    the two models run on their own."""
    before = metrics(server)
    r = chat(client, model_id, max_tokens=24, logprobs=True, top_logprobs=3)
    choice, ext = r.choices[0], extension(r)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model_id
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 24 and r.usage.total_tokens == r.usage.prompt_tokens + 24
    assert sum(ext["by_source"][s] for s in ("edge", "cloud", "corrected")) == 24 == len(ext["sources"])
    assert ext["check_points"] >= 1 and ext["stop_reason"] == "max_tokens" and ext["mean_kl"] is not None
    assert ext["queue_ahead"] == 0 and ext["queue_wait_s"] >= 0 and ext["policy"] == "rollback"

    q, p = tiny_models
    by_bytes = {q.detokenize([i]): i for i in range(q.n_vocab)}  # BPE: every token's bytes are unique
    prompt = q.tokenize(q.chat_prompt(MESSAGES))
    assert r.usage.prompt_tokens == len(prompt)
    entries = choice.logprobs.content
    ids = [by_bytes[bytes(e.bytes)] for e in entries]
    assert len(entries) == 24 and "".join(e.token for e in entries) == choice.message.content

    def logprobs_along(model) -> np.ndarray:
        model.reset()
        model.eval(prompt)
        rows = []
        for t in ids:
            rows.append(model.next_logprobs())
            model.eval([t])
        return np.array(rows)

    q_lp, p_lp = logprobs_along(q), logprobs_along(p)
    seen = set()
    for j, (e, source, t) in enumerate(zip(entries, ext["sources"], ids, strict=True)):
        own, other = (q_lp[j], p_lp[j]) if source == "edge" else (p_lp[j], q_lp[j])
        # The verifier's KV cache layout moves P's values by a few 1e-3 against a standalone run.
        assert e.logprob == pytest.approx(own[t], abs=0.01), (j, source)
        alternatives = [by_bytes[bytes(a.bytes)] for a in e.top_logprobs]
        third = np.sort(own)[-3]  # the alternatives are the producer's best three (up to near-ties)
        assert len(alternatives) == 3 and all(own[i] >= third - 0.01 for i in alternatives), (j, source)
        assert [a.logprob for a in e.top_logprobs] == pytest.approx([own[i] for i in alternatives], abs=0.01)
        if abs(own[t] - other[t]) > 0.05:  # where the models differ, it is the producer's value
            assert abs(e.logprob - own[t]) < abs(e.logprob - other[t]), (j, source)
            seen.add(source)
    assert "edge" in seen and seen & {"cloud", "corrected"}, f"both models should produce tokens: {ext}"

    after = metrics(server)
    by_source = {
        s: grew(before, after, "handoff_edge_tokens_total", source=s) for s in ("edge", "cloud", "corrected")
    }
    assert by_source == {s: ext["by_source"][s] for s in by_source}
    assert requests_grew(before, after, "completed") == 1
    assert grew(before, after, "handoff_edge_handoffs_total") == ext["handoffs"]
    assert grew(before, after, "handoff_edge_check_points_total") == ext["check_points"]
    assert grew(before, after, "handoff_edge_time_to_first_token_seconds_count") == 1


def test_chat_stream_matches_the_plain_answer(server, client, model_id):
    plain = chat(client, model_id, max_tokens=30, logprobs=True, top_logprobs=2)
    stream = chat(client, model_id, max_tokens=30, logprobs=True, top_logprobs=2, stream=True,
                  stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2  # tokens arrive as they are committed, not in one piece at the end
    assert "".join(c.choices[0].delta.content for c in content) == plain.choices[0].message.content
    streamed_lp = [(e.token, e.logprob) for c in content for e in c.choices[0].logprobs.content]
    assert streamed_lp == [(e.token, e.logprob) for e in plain.choices[0].logprobs.content]
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "length"
    assert extension(final)["by_source"] == extension(plain)["by_source"]
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30 == plain.usage.completion_tokens
    )


def test_stream_is_server_sent_events_ending_with_done(server, model_id):
    body = json.dumps({"model": model_id, "messages": MESSAGES, "max_tokens": 5, "temperature": 0,
                       "stream": True})  # fmt: skip
    status, headers, raw = post_json(server, "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length" and "handoff" in last and "usage" not in last


def test_text_completions_plain_streamed_and_from_token_ids(server, client, model_id, tiny_models):
    q, _ = tiny_models
    prompt = "def fibonacci(n):"
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0, logprobs=2)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.text and choice.finish_reason == "length"
    assert plain.usage.prompt_tokens == len(q.tokenize(prompt)) and plain.usage.completion_tokens == 20
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 20
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        # Greedy: each token is its producer's likeliest, so it heads that model's top list.
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-9)
    by_source = extension(plain)["by_source"]
    assert by_source["edge"] + by_source["cloud"] + by_source["corrected"] == 20

    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0,
                                            logprobs=2, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert chunks[-1].choices[0].finish_reason == "length" and "handoff" in chunks[-1].model_extra

    by_ids = client.completions.create(
        model=model_id, prompt=q.tokenize(prompt), max_tokens=20, temperature=0
    )
    assert by_ids.choices[0].text == choice.text and by_ids.usage.prompt_tokens == plain.usage.prompt_tokens
    one_of_list = client.completions.create(model=model_id, prompt=[prompt], max_tokens=20, temperature=0)
    assert one_of_list.choices[0].text == choice.text


def test_seed_makes_sampling_reproducible(server, client, model_id):
    def sampled(seed, **kw):
        return chat(client, model_id, max_tokens=32, temperature=0.9, top_p=0.95, seed=seed, **kw)

    a, b, other = sampled(11), sampled(11), sampled(12)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert extension(a)["sources"] == extension(b)["sources"]
    assert other.choices[0].message.content != a.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in sampled(11, stream=True) if c.choices)
    assert streamed == a.choices[0].message.content
    neg = [sampled(-5).choices[0].message.content for _ in range(2)]  # a negative seed is a seed too
    assert neg[0] == neg[1]


def _stop_at(text: str, start: int = 6) -> tuple[str, int]:
    """A 3-character stop string whose first occurrence in `text` is at index >= start."""
    for i in range(start, len(text) - 3):
        s = text[i : i + 3]
        if text.find(s) == i and "\ufffd" not in s and s.strip():
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_sequences_end_generation_early_and_are_trimmed(server, client, model_id):
    full = chat(client, model_id, max_tokens=40).choices[0].message.content
    stop, at = _stop_at(full)
    r = chat(client, model_id, max_tokens=40, stop=[stop, "never-seen-stop"])
    assert r.choices[0].message.content == full[:at] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40 and extension(r)["stop_reason"] == "stopped"  # stopped, not trimmed
    streamed = chat(client, model_id, max_tokens=40, stop=stop, stream=True)
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"

    text = (
        client.completions.create(model=model_id, prompt="x = ", max_tokens=40, temperature=0).choices[0].text
    )
    stop, at = _stop_at(text, start=3)
    cut = client.completions.create(model=model_id, prompt="x = ", max_tokens=40, temperature=0, stop=stop)
    assert cut.choices[0].text == text[:at] and cut.choices[0].finish_reason == "stop"


def test_parallel_requests_are_served_one_at_a_time_in_arrival_order(
    server, client, model_id, wait_idle, wait_until
):
    wait_idle(server)
    done_at = {}

    def request(i):
        with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120) as c:
            r = chat(c, model_id, max_tokens=60)
        done_at[i] = time.perf_counter()
        return r

    # A stream holds the model while three requests arrive one after the other, then lets them run.
    blocker = chat(client, model_id, max_tokens=LONG, stream=True)
    next(iter(blocker))
    with ThreadPoolExecutor(3) as pool:
        futures = []
        for i in range(3):
            futures.append(pool.submit(request, i))
            wait_until(lambda i=i: server.api.queue.depth == i + 1, what=f"request {i} to queue")
        blocker.close()
        results = [f.result() for f in futures]
    assert [extension(r)["queue_ahead"] for r in results] == [1, 2, 3]
    waits = [extension(r)["queue_wait_s"] for r in results]
    assert 0 < waits[0] < waits[1] < waits[2]
    assert done_at[0] < done_at[1] < done_at[2]
    assert len({r.choices[0].message.content for r in results}) == 1  # one model, reused cleanly


def test_a_full_queue_answers_429_with_retry_after(server, model_id, wait_idle):
    wait_idle(server)
    before = metrics(server)
    c = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=120)
    streams = []
    try:
        running = chat(c, model_id, max_tokens=LONG, stream=True)
        streams.append(running)
        next(iter(running))  # the role chunk: the generation has started
        for _ in range(3):  # max_queue = 3 may wait behind it
            streams.append(chat(c, model_id, max_tokens=LONG, stream=True))
        assert server.api.queue.depth == 3 and server.api.queue.busy
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as e:
                chat(c, model_id, max_tokens=5, stream=stream)
            assert e.value.status_code == 429 and e.value.code == "queue_full"
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["type"] == "rate_limit_exceeded" and "max_queue 3" in e.value.body["message"]
    finally:
        for s in reversed(streams):
            s.close()
        c.close()
    wait_idle(server)
    after = metrics(server)
    assert requests_grew(before, after, "rejected") == 2
    # The running generation and the three waiting ones were all dropped with their clients.
    assert grew(before, after, "handoff_edge_generations_total", reason="cancelled") == 4
    assert requests_grew(before, after, "disconnected") == 4


def _cloud_sessions(server) -> int:
    # The embedded verifier's own count: a cancelled generation must close its cloud session.
    return server.api.assistant._server.service.session_count


def _runner_threads() -> list[threading.Thread]:
    # The controller runs llama.cpp on a thread of its own per generation ("edge-runner"); a generation
    # that ended must have joined it, or it could still be using the model the next one uses.
    return [t for t in threading.enumerate() if t.name.startswith("edge-runner")]


def _assert_cleaned_up(server, wait_until) -> None:
    wait_until(lambda: idle(server), what="the server to be idle")
    wait_until(lambda: _cloud_sessions(server) == 0, timeout=5, what="the cloud sessions to close")
    wait_until(lambda: not _runner_threads(), timeout=5, what="the generations' llama.cpp threads to end")


def test_client_disconnect_stops_a_streaming_generation(server, client, model_id, wait_idle, wait_until):
    wait_idle(server)
    reference = chat(client, model_id, max_tokens=20, temperature=0.9, seed=3).choices[0].message.content
    before = metrics(server)
    stream = chat(client, model_id, max_tokens=LONG, stream=True)
    for n, _ in enumerate(stream):
        if n == 2:
            break  # a few tokens in
    t0 = time.perf_counter()
    stream.close()
    stopped_in = wait_idle(server)
    after = metrics(server)
    tokens = tokens_grew(before, after)
    assert grew(before, after, "handoff_edge_generations_total", reason="cancelled") == 1
    assert requests_grew(before, after, "disconnected") == 1
    assert 0 < tokens < LONG / 2, tokens  # stopped early: a full answer is 1500 tokens (~15 s here)
    assert stopped_in < 3.0 and time.perf_counter() - t0 < 5.0
    _assert_cleaned_up(server, wait_until)

    # Many disconnects in a row, at different moments: every generation is stopped and cleaned up.
    for i in range(12):
        stream = chat(client, model_id, max_tokens=LONG, stream=True)
        for n, _ in enumerate(stream):
            if n == i % 4:
                break
        stream.close()
    _assert_cleaned_up(server, wait_until)
    assert tokens_grew(before, metrics(server)) < LONG
    # The model is left clean: the same seeded request gives the same answer as before.
    assert (
        chat(client, model_id, max_tokens=20, temperature=0.9, seed=3).choices[0].message.content == reference
    )


def test_client_disconnect_stops_a_plain_request_running_or_waiting(
    server, client, model_id, wait_idle, wait_until
):
    wait_idle(server)
    before = metrics(server)
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=1.0) as impatient:
        with pytest.raises(openai.APITimeoutError):
            chat(impatient, model_id, max_tokens=LONG)  # running when its client gives up
        wait_idle(server, timeout=3)
        running = chat(client, model_id, max_tokens=LONG, stream=True)
        try:
            next(iter(running))
            with pytest.raises(openai.APITimeoutError):
                chat(impatient, model_id, max_tokens=LONG)  # waiting behind `running` when it gives up
            wait_until(lambda: server.api.queue.depth == 0, timeout=3, what="the waiting request to leave")
            assert server.api.queue.busy  # the other client's generation goes on
        finally:
            running.close()
    _assert_cleaned_up(server, wait_until)
    after = metrics(server)
    assert requests_grew(before, after, "disconnected") == 3
    assert grew(before, after, "handoff_edge_generations_total", reason="cancelled") == 3
    # Two generations ran (the waiting request never started), and the three counted as cancelled above
    # were stopped, not finished (a finished one counts under its stop reason). A bound on their tokens
    # would depend on the machine's speed: ~700 tok/s here put two seconds of them over LONG.
    assert grew(before, after, "handoff_edge_generation_seconds_count") == 2


def _error(status_body) -> dict:
    """The OpenAI-shaped error of a raw response, with its status."""
    status, _, body = status_body
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return {"status": status} | err


def test_errors_use_the_openai_shape_and_status(server, client, model_id):
    before = metrics(server)

    def raw_chat(body, **kw):
        return _error(post_json(server, "/v1/chat/completions", body, **kw))

    # Malformed JSON, a body that is not an object, no JSON content type: 400, not FastAPI's 422.
    e = raw_chat('{"model": "x", "messages": [}')
    assert e["status"] == 400 and e["type"] == "invalid_request_error" and "JSON" in e["message"]
    assert raw_chat("[1, 2]")["status"] == 400
    e = _error(http("POST", server.url("/v1/completions"), b"model=x", {"Authorization": f"Bearer {KEY}"}))
    assert e["status"] == 400 and "application/json" in e["message"]
    e = raw_chat(json.dumps({"model": model_id}))
    assert (e["status"], e["param"], e["code"]) == (400, "messages", "missing_required_parameter")
    e = raw_chat(json.dumps({"model": model_id, "messages": MESSAGES, "max_tokens": "5"}))
    assert (e["status"], e["param"], e["code"]) == (400, "max_tokens", "invalid_value")
    e = raw_chat(json.dumps({"model": model_id, "messages": [{"role": "robot", "content": "hi"}]}))
    assert (e["status"], e["param"]) == (400, "messages[0].role")

    # Unknown model: 404 model_not_found.
    with pytest.raises(openai.NotFoundError) as nf:
        chat(client, "gpt-4o")
    assert nf.value.status_code == 404 and nf.value.code == "model_not_found" and nf.value.param == "model"

    # Context overflow: a prompt longer than the context, or a completion that would not fit.
    long_messages = [{"role": "user", "content": "hello " * 5000}]
    for kw in ({"messages": long_messages}, {"max_tokens": 5000}):
        with pytest.raises(openai.BadRequestError) as over:
            chat(client, model_id, **kw)
        assert over.value.code == "context_length_exceeded" and "4096" in over.value.message
    with pytest.raises(openai.BadRequestError) as over:
        client.completions.create(model=model_id, prompt="hi", max_tokens=4096)
    assert over.value.code == "context_length_exceeded" and over.value.param == "prompt"

    # Bad parameter values, in the chat and text APIs, streamed or not.
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    bad = [
        ({"temperature": 3.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"5": 101.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1.0}}, "logit_bias"),
        ({"seed": 2**64}, "seed"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        ({"messages": image}, "messages[0].content[0]"),
        ({"stream": True, "temperature": -1}, "temperature"),
    ]
    for kw, param in bad:
        with pytest.raises(openai.BadRequestError) as e400:
            chat(client, model_id, **kw)
        assert e400.value.status_code == 400 and e400.value.param == param, (kw, e400.value.body)
        assert e400.value.body["type"] == "invalid_request_error"
    bad_completions = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [10**7]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "best_of": 2}, "best_of"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "suffix": "s"}, "suffix"),
    ]
    for kw, param in bad_completions:
        with pytest.raises(openai.BadRequestError) as e400:
            client.completions.create(model=model_id, max_tokens=4, **kw)
        assert e400.value.param == param, (kw, e400.value.body)

    # The API key: missing or wrong is 401 (health stays open); unknown URLs and methods are shaped too.
    for key in (None, "wrong"):
        e = raw_chat(json.dumps({"model": model_id, "messages": MESSAGES}), key=key)
        assert (e["status"], e["code"]) == (401, "invalid_api_key")
    with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    authorized = {"Authorization": f"Bearer {KEY}"}
    e = _error(http("GET", server.url("/v1/nothing-here"), headers=authorized))
    assert (e["status"], e["code"]) == (404, "unknown_url")
    e = _error(http("GET", server.url("/v1/chat/completions"), headers=authorized))
    assert (e["status"], e["code"]) == (405, "method_not_allowed")

    after = metrics(server)
    assert requests_grew(before, after, "invalid") >= len(bad) + 6
    assert requests_grew(before, after, "unauthorized") == 2
    assert tokens_grew(before, after) == 0  # nothing was generated for any of them


# --------------------------------------------------------------------------------------------------
# The command


def _start_command(
    run_handoff, args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Start `handoff serve-edge`; return the process and the base URL it prints once ready."""
    proc = run_handoff.start("serve-edge", *args, env=env)
    found = wait_for_line(proc, r"at (http://\S+/v1) ", 300)
    if found is None:
        proc.kill()
        raise AssertionError(f"serve-edge did not start: {proc.communicate(timeout=30)[1][-3000:]}")
    return proc, found.group(1)


def _stop_command(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, stderr


def test_serve_edge_command(tiny_gguf_a, tiny_gguf_a_near, run_handoff):
    """The command: flags and HANDOFF_SERVE_* settings, a request, a clean exit on SIGTERM; bad settings."""
    env = {"HANDOFF_THREADS": "1", "HANDOFF_SERVE_MODEL_ALIAS": "tiny", "HANDOFF_SERVE_API_KEY": "k"}
    models = ["--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a)]
    flags = ["--port", "0", "--max-queue", "1", "--threshold", "0.02", "--check-interval", "6",
             "--handback-tokens", "3", "--n-ctx", "1024", "--default-max-tokens", "6",
             "--cors-origin", "http://localhost:3000"]  # fmt: skip
    proc, base_url = _start_command(run_handoff, [*models, *flags], env)
    try:
        with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=120) as c:
            assert [m.id for m in c.models.list().data] == ["tiny"]
            r = c.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0)  # no max_tokens
            assert r.usage.completion_tokens == 6 and extension(r)["check_points"] >= 1
        root = base_url.removesuffix("/v1")
        health = json.loads(http("GET", root + "/health")[2])
        assert health["max_queue"] == 1 and health["n_ctx"] == 1024 and health["model"] == "tiny"
        # A browser's preflight is answered without the key; the key is still required after it.
        status, headers, _ = http("OPTIONS", base_url + "/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"
        assert http("GET", base_url + "/models", headers={"Origin": "http://localhost:3000"})[0] == 401

        # SIGTERM while a stream is open: the stream ends with an error event, then the process exits.
        with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=120) as c:
            stream = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=900, temperature=0,
                                               stream=True)  # fmt: skip
            chunks = iter(stream)
            next(chunks), next(chunks)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(openai.APIError) as stopped:
                for _ in chunks:
                    pass
            assert stopped.value.code == "server_shutting_down"
    finally:
        rc, stderr = _stop_command(proc)
    assert rc == 0, stderr[-3000:]
    assert "Traceback" not in stderr

    def handoff(*args):
        return run_handoff("serve-edge", *args, timeout=120, env={"HANDOFF_THREADS": "1"})

    bad = handoff("--max-queue", "-1")
    assert bad.returncode == 2 and "max_queue" in bad.stderr and "Traceback" not in bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = handoff("--port", str(taken.getsockname()[1]), "--edge", str(tiny_gguf_a_near))
    assert busy.returncode == 2 and "cannot listen" in busy.stderr


# --------------------------------------------------------------------------------------------------
# The real default pair


@pytest.fixture(scope="module")
def pair():
    from handoff.shared.models import ensure_model
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    return ensure_model(DEFAULT_EDGE_MODEL), ensure_model(DEFAULT_CLOUD_MODEL)


@pytest.mark.real_models
def test_serve_edge_on_the_default_pair(pair, run_handoff):
    """The default pair behind the API: an OpenAI client gets code, made mostly on the edge and checked."""
    from handoff.shared.settings import DEFAULT_EDGE_MODEL

    proc, base_url = _start_command(run_handoff, ["--port", "0"])
    try:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as c:
            messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
            r = c.chat.completions.create(
                model=DEFAULT_EDGE_MODEL, messages=messages, max_tokens=24, temperature=0
            )
            ext = extension(r)
            assert r.usage.completion_tokens == 24 or r.choices[0].finish_reason == "stop"
            assert "def " in r.choices[0].message.content or "```" in r.choices[0].message.content
            assert ext["by_source"]["edge"] > 0 and ext["check_points"] >= 1 and ext["cloud_model"]
            streamed = c.chat.completions.create(model=DEFAULT_EDGE_MODEL, messages=messages, max_tokens=24,
                                                 temperature=0, stream=True)  # fmt: skip
            text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
            assert text == r.choices[0].message.content
    finally:
        rc, stderr = _stop_command(proc)
    assert rc == 0, stderr[-3000:]


@pytest.mark.real_models
@pytest.mark.slow
def test_structured_output_and_a_tool_call_on_the_default_pair(pair, run_handoff):
    """The default pair: json_object and json_schema answers parse and validate under the hybrid and
    exact policies, and a tool call comes back with valid arguments."""
    import jsonschema

    from handoff.shared.settings import DEFAULT_EDGE_MODEL

    schema = {"type": "object", "properties": {"name": {"type": "string"}, "year": {"type": "integer"},
                                               "languages": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "year", "languages"], "additionalProperties": False}  # fmt: skip
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"], "additionalProperties": False}}}  # fmt: skip
    for policy in ("rollback", "exact"):
        proc, base_url = _start_command(run_handoff, ["--port", "0", "--policy", policy])
        try:
            with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300) as c:
                ask = [{"role": "user", "content": "Describe the Python language as JSON."}]
                r = c.chat.completions.create(model=DEFAULT_EDGE_MODEL, messages=ask, max_tokens=200, temperature=0,
                                              response_format={"type": "json_object"})  # fmt: skip
                assert r.choices[0].finish_reason == "stop" and isinstance(
                    json.loads(r.choices[0].message.content), dict
                )
                r = c.chat.completions.create(
                    model=DEFAULT_EDGE_MODEL, messages=ask, max_tokens=200, temperature=0,
                    response_format={"type": "json_schema", "json_schema": {"name": "lang", "schema": schema}},
                )  # fmt: skip
                jsonschema.validate(json.loads(r.choices[0].message.content), schema)
                if policy == "rollback":
                    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
                    r = c.chat.completions.create(model=DEFAULT_EDGE_MODEL, messages=ask, tools=[weather],
                                                  tool_choice="required", max_tokens=60, temperature=0)  # fmt: skip
                    calls = r.choices[0].message.tool_calls
                    assert r.choices[0].finish_reason == "tool_calls" and calls
                    assert all(call.function.name == "get_weather" for call in calls)
                    assert "paris" in json.loads(calls[0].function.arguments)["city"].lower()
        finally:
            rc, stderr = _stop_command(proc)
        assert rc == 0, stderr[-3000:]
