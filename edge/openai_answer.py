"""One request's answer in serve-edge: its generations' tokens -> an OpenAI response body or event stream.

An `Answer` is one choice of a request (n > 1 makes several, run one after another): it feeds the
committed tokens to its TextAssembler, builds the chat or text completion (tool calls split out of
the text when tools were offered), or streams chunks as the tokens come, with the usage and
`[DONE]` after the last choice. A client that goes away stops its generation; a server that stops
ends the stream with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from handoff.edge.openai_protocol import (
    APIError,
    LogprobFormatter,
    OutToken,
    TextAssembler,
    chat_chunk,
    chat_completion,
    finish_reason,
    text_completion,
    token_detail,
    usage,
)
from handoff.edge.records import GenerationResult, TokenRecord
from handoff.edge.serving import Job, ServerStopping
from handoff.edge.tools import (
    parse_tool_calls,
)
from handoff.shared.errors import HandoffError, VerifierError

if TYPE_CHECKING:  # the API's state; it imports this module
    from handoff.edge.openai_server import EdgeAPI

logger = logging.getLogger(__name__)

CHAT = "chat.completions"
COMPLETIONS = "completions"


class Answer:
    """One request's answer, built from its job's tokens."""

    def __init__(
        self,
        *,
        api: EdgeAPI,
        chat: bool,
        id: str,
        created: int,
        model: str,
        prompt_tokens: int,
        text: TextAssembler,
        logprobs: LogprobFormatter | None,
        include_usage: bool,
        detail: bool = False,
        index: int = 0,
        last: bool = True,
        tools: bool = False,
    ) -> None:
        self.api = api
        self.chat = chat
        self.endpoint = CHAT if chat else COMPLETIONS
        self.id = id
        self.created = created
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.text = text
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.detail = detail  # handoff_stream: per-token sources in each streamed chunk
        # Tokens without text still go out in a chunk of their own when the client wants them one by one.
        self.per_token = logprobs is not None or detail
        self.index = index  # the choice (n > 1)
        self.last = last  # the last choice: its stream ends with the usage and [DONE]
        self.tools = tools  # tools were offered: the answer may be tool calls
        self.calling = False  # its first token opened a tool call: the text is held, calls go out at the end
        self._seen = 0  # tokens committed
        self.earlier_tokens = 0  # streamed n > 1: the earlier choices' tokens (the usage counts all)
        self.outcome = ""  # how its stream ended: completed, failed, disconnected

    def _logprobs(self, tokens: list[OutToken]) -> Any:
        if self.logprobs is None:
            return None
        return self.logprobs.chat(tokens) if self.chat else self.logprobs.completion(tokens)

    # -- not streamed --------------------------------------------------------------------------

    def _add(self, record: TokenRecord) -> bool:
        """A committed token into the text; the first one says whether the answer is tool calls."""
        if (
            self.tools
            and not self._seen
            and self.api.tool_markers
            and record.token_id == self.api.tool_markers[0]
        ):
            self.calling = True
        self._seen += 1
        return self.text.add(record)

    def _tool_calls(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of the whole answer; no calls unless tools were offered."""
        return parse_tool_calls(text) if self.tools else (text, [])

    async def run(self, request: Request, job: Job) -> dict[str, Any] | None:
        """Run the job and build its response body; None if the client disconnected first."""
        job.on_token = self._add
        self.api.submit(job)
        assert job.done is not None
        gone = asyncio.get_running_loop().create_task(_disconnected(request))
        try:
            await asyncio.wait({job.done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done.done():
                self.api.queue.cancel(job)
                self.api.count(self.endpoint, "disconnected")
                logger.info("client went away: generation stopped after %d tokens", len(job.records))
                return None
        finally:
            gone.cancel()
            self.api.queue.cancel(job)  # a no-op once it finished
        result = job_outcome(job)
        text, tokens = self.text.take(final=True)
        usage_ = usage(self.prompt_tokens, len(job.records))
        handoff = self.api.extension(job, result)
        if self.chat:
            content, calls = self._tool_calls(self.text.text)
            body = chat_completion(
                id=self.id, created=self.created, model=self.model, text=content if calls else text,
                finish="tool_calls" if calls else finish_reason(result), logprobs=self._logprobs(tokens),
                usage_=usage_, handoff=handoff, index=self.index, tool_calls=calls,
            )  # fmt: skip
        else:
            body = text_completion(
                id=self.id, created=self.created, model=self.model, text=text, finish=finish_reason(result),
                logprobs=self._logprobs(tokens), usage_=usage_, handoff=handoff, index=self.index,
            )  # fmt: skip
        self.api.count(self.endpoint, "completed")
        return body

    # -- streamed ------------------------------------------------------------------------------

    def submit_streamed(self, job: Job) -> asyncio.Queue:
        """Queue the job (a full queue raises the 429) with hooks that turn its tokens into stream events."""
        events: asyncio.Queue[tuple[str, str, list[OutToken]]] = asyncio.Queue()

        def on_token(record: TokenRecord) -> bool:
            stop = self._add(record)
            if self.calling:
                return stop  # a tool call: its deltas go out whole, at the end
            text, tokens = self.text.take()
            if text or tokens:
                events.put_nowait(("delta", text, tokens))
            return stop

        job.on_token = on_token
        job.on_event = lambda kind: events.put_nowait((kind, "", []))
        self.api.submit(job)
        return events

    def _role_chunk(self) -> dict[str, Any]:
        """A chat stream's first chunk says who speaks; sent when the generation starts."""
        return chat_chunk(
            id=self.id, created=self.created, model=self.model, delta={"role": "assistant", "content": ""},
            with_usage=self.include_usage, index=self.index,
        )  # fmt: skip

    def _delta_chunk(self, text: str, tokens: list[OutToken]) -> dict[str, Any]:
        logprobs = self._logprobs(tokens)
        detail = token_detail(tokens, self.text.text) if self.detail else None
        if self.chat:
            return chat_chunk(
                id=self.id, created=self.created, model=self.model, delta={"content": text},
                logprobs=logprobs, with_usage=self.include_usage, handoff=detail, index=self.index,
            )  # fmt: skip
        return text_completion(
            id=self.id, created=self.created, model=self.model, text=text, finish=None, logprobs=logprobs,
            usage_=None, handoff=detail, with_usage=self.include_usage, index=self.index,
        )  # fmt: skip

    def _tool_call_chunks(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A chat stream's tool calls as OpenAI streams them: per call, its id and name, then its arguments."""
        out = []
        for i, call in enumerate(calls):
            fn = call["function"]
            head = {
                "index": i,
                "id": call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            for delta in (
                {"tool_calls": [head]},
                {"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]},
            ):
                out.append(chat_chunk(id=self.id, created=self.created, model=self.model, delta=delta,
                                      with_usage=self.include_usage, index=self.index))  # fmt: skip
        return out

    def _final_chunk(self, finish: str, handoff: dict[str, Any]) -> dict[str, Any]:
        """The chunk with the finish reason, and the `handoff` extension field."""
        if self.chat:
            return chat_chunk(
                id=self.id, created=self.created, model=self.model, delta={}, finish=finish,
                with_usage=self.include_usage, handoff=handoff, index=self.index,
            )  # fmt: skip
        return text_completion(
            id=self.id, created=self.created, model=self.model, text="", finish=finish, logprobs=None,
            usage_=None, handoff=handoff, with_usage=self.include_usage, index=self.index,
        )  # fmt: skip

    def _usage_chunk(self, usage_: dict[str, int]) -> dict[str, Any]:
        """With stream_options.include_usage: a last chunk without choices that carries the usage."""
        if self.chat:
            return chat_chunk(
                id=self.id, created=self.created, model=self.model, delta=None, with_usage=True, usage_=usage_
            )
        return text_completion(
            id=self.id, created=self.created, model=self.model, text="", finish=None, logprobs=None,
            usage_=usage_, handoff=None, choices=False,
        )  # fmt: skip

    async def _events(
        self, job: Job, events: asyncio.Queue, shutdown: anyio.Event
    ) -> AsyncIterator[ServerSentEvent]:
        outcome = "disconnected"  # unless the stream reaches its end

        async def watch_shutdown() -> None:
            await shutdown.wait()
            events.put_nowait(("shutdown", "", []))

        watcher = asyncio.get_running_loop().create_task(watch_shutdown())
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                text, tokens, ended = "", [], False
                for kind, piece, toks in batch:
                    if kind == "start" and self.chat:
                        yield _event(self._role_chunk())
                    elif kind == "delta":
                        text += piece
                        tokens += toks
                    elif kind == "end":
                        ended = True
                    elif kind == "shutdown":
                        self.api.queue.cancel(job)
                        outcome = "failed"
                        # An error event, so that the client knows the answer was cut short.
                        yield _event(stopping().body())
                        return
                # Tokens committed together (a checked window) go out as one chunk.
                if text or (tokens and self.per_token):
                    yield _event(self._delta_chunk(text, tokens))
                if not ended:
                    continue
                try:
                    result = job_outcome(job)
                except APIError as e:
                    outcome = "failed"
                    yield _event(e.body())  # the client library raises it as an APIError
                    return
                text, tokens = self.text.take(final=True)
                finish = finish_reason(result)
                content, calls = self._tool_calls(self.text.text) if self.calling else (None, [])
                if calls:
                    if content:
                        yield _event(self._delta_chunk(content, []))
                    for chunk in self._tool_call_chunks(calls):
                        yield _event(chunk)
                    finish = "tool_calls"
                elif text or (tokens and self.per_token):
                    yield _event(self._delta_chunk(text, tokens))
                yield _event(self._final_chunk(finish, self.api.extension(job, result)))
                if self.include_usage and self.last:
                    yield _event(
                        self._usage_chunk(usage(self.prompt_tokens, self.earlier_tokens + len(job.records)))
                    )
                if self.last:
                    yield ServerSentEvent(data="[DONE]")
                outcome = "completed"
                return
        finally:
            self.outcome = outcome
            watcher.cancel()
            self.api.queue.cancel(job)  # the client left mid-stream: stop generating for nobody
            self.api.count(self.endpoint, outcome)
            if outcome == "disconnected":
                logger.info("stream closed by the client after %d tokens", len(job.records))


def stream_all(calls: list[Answer], jobs: list[Job]) -> Response:
    """Stream a request's choices one after another, each queued when the one before has ended.

    The first is queued now, so that a full queue is a 429 before any event; the usage and [DONE]
    come once, after the last choice.
    """
    first = calls[0].submit_streamed(jobs[0])
    shutdown = anyio.Event()  # set by sse-starlette when the server shuts down

    async def events() -> AsyncIterator[ServerSentEvent]:
        earlier = 0
        for i, (call, job) in enumerate(zip(calls, jobs, strict=True)):
            try:
                queue = first if i == 0 else call.submit_streamed(job)
            except APIError as e:
                yield _event(e.body())
                return
            call.earlier_tokens = earlier
            async for event in call._events(job, queue, shutdown):
                yield event
            if call.outcome != "completed":
                return
            earlier += len(job.records)

    return _EventStream(
        events(),
        on_close=lambda: [calls[0].api.queue.cancel(job) for job in jobs],
        sep="\n",
        ping=15,
        shutdown_event=shutdown,
        shutdown_grace_period=1.0,
    )


def merge_choices(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """n > 1: one response with every choice; the usage counts every choice's tokens, the `handoff`
    extension becomes one entry per choice."""
    if len(bodies) == 1:
        return bodies[0]
    out = dict(bodies[0])
    out["choices"] = [b["choices"][0] for b in bodies]
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    out["usage"] = usage(out["usage"]["prompt_tokens"], completion)
    out["handoff"] = [b["handoff"] for b in bodies]
    return out


def _event(data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(data, ensure_ascii=False, separators=(",", ":")))


def stopping() -> APIError:
    return APIError(503, "The server is shutting down.", type="server_error", code="server_shutting_down")


def job_outcome(job: Job) -> GenerationResult:
    """The job's result, or the APIError that answers its failure."""
    assert job.done is not None and job.done.done()
    if job.done.cancelled():
        raise stopping()  # the client is still here, so it was the server that cancelled it
    error = job.done.exception()
    if error is None:
        return job.done.result()
    if isinstance(error, ServerStopping):
        raise stopping()
    if isinstance(error, VerifierError):
        if error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            message = f"The cloud verifier is unreachable: {error}"
            raise APIError(503, message, type="server_error", code="cloud_unavailable")
        message = f"The cloud verifier refused the request: {error}"
        raise APIError(502, message, type="server_error", code="cloud_error")
    if isinstance(error, HandoffError):
        raise APIError(400, str(error), code="invalid_request")
    raise APIError(500, f"The server had an error while generating: {error}", type="server_error")


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read: only a disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _EventStream(EventSourceResponse):
    """An SSE response that always tells its job when it ends, however it ends (even before starting)."""

    def __init__(
        self, content: AsyncIterator[ServerSentEvent], *, on_close: Callable[[], Any], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()  # synchronous: nothing to await while a cancellation is being delivered
