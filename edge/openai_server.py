"""`handoff serve-edge`: an OpenAI-compatible HTTP API over hybrid generation, on the user's device.

Existing chat clients, editors and SDKs point their base URL at this server and use Handoff
unchanged. It serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions (streamed as
server-sent events ending with `data: [DONE]`, or not), plus /health and Prometheus /metrics.

One model instance answers requests one at a time, in arrival order (edge/serving.py): a request that
finds `max_queue` others waiting gets 429 with Retry-After, and a client that disconnects, streaming
or not, stops its generation (or leaves the queue) at once. Every response, and the final chunk of a
stream, carries a `handoff` field: tokens by source, check points, handoffs, mean KL, stop reason.
Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}.

GET / is a chat page (edge/static: plain HTML, CSS and JS, nothing fetched from elsewhere) that streams
with the `handoff_stream` extension and colours each token by its source.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from handoff.edge.openai_answer import CHAT, COMPLETIONS, Answer, merge_choices, stopping, stream_all
from handoff.edge.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LogprobFormatter,
    TextAssembler,
    bad_param,
    chat_messages,
    check_unsupported,
    error_body,
    handoff_extension,
    stop_strings,
    validation_error,
)
from handoff.edge.records import GenerationResult
from handoff.edge.serving import GenerationQueue, Job, QueueFull, ServeMetrics, ServerStopping
from handoff.edge.settings import EdgeSettings, ServeSettings
from handoff.edge.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    ToolPlan,
    plan_tools,
    response_format_grammar,
)
from handoff.shared.constraints import Constraint, ConstraintError
from handoff.shared.errors import HandoffError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.settings import HandoffSettings

logger = logging.getLogger(__name__)

_ENDPOINTS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS}
# OpenAI's default for /v1/completions when max_tokens is not given.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# The chat page at GET / and its assets at /static (package data: they ship in the wheel).
_STATIC = resources.files("handoff.edge").joinpath("static")


def _default_alias(name: str) -> str:
    """A model id for a GGUF path: its file name without .gguf; a registry name as it is."""
    return Path(name).stem if name.endswith(".gguf") or "/" in name else name


class EdgeAPI:
    """The API's state and request handling: the assistant, its queue, the served model id, metrics."""

    def __init__(self, assistant: Any, settings: ServeSettings, metrics: ServeMetrics | None = None) -> None:
        """Serve an Assistant that is already started.

        Args:
            assistant: an edge.assistant.Assistant inside its `async with`.
            settings: the HTTP side.
            metrics: where to count; a fresh registry if None.
        """
        self.assistant = assistant
        self.settings = settings
        self.metrics = metrics or ServeMetrics()
        self.queue = GenerationQueue(assistant, max_queue=settings.max_queue, metrics=self.metrics)
        self.model_id = settings.model_alias or _default_alias(assistant.model_name)
        # Requests may name the model by its id or by what the edge model was given as.
        self.model_names = {self.model_id, assistant.model_name}
        self.created = int(time.time())
        runner = assistant.runner
        self.n_ctx: int = runner.n_ctx
        self.n_vocab: int = runner.n_vocab
        self.top_k: int = runner.k
        self.detokenize = runner.detokenize
        self.stop_ids: frozenset[int] = runner.stop_token_ids
        # The chat template's tool-call markers (<tool_call>, </tool_call>) when the model has them.
        markers = [runner.model.token_id(t) for t in (CALL_OPEN, CALL_CLOSE)]
        self.tool_markers: tuple[int, int] | None = None if None in markers else (markers[0], markers[1])

    # -- shared checks -------------------------------------------------------------------------

    def count(self, endpoint: str | None, outcome: str) -> None:
        if endpoint is not None:
            self.metrics.requests.labels(endpoint, outcome).inc()

    def check_model(self, name: str) -> None:
        if name not in self.model_names:
            raise APIError(
                404,
                f"The model '{name}' does not exist. This server serves '{self.model_id}' "
                "(see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def sampling(self, req: ChatCompletionRequest | CompletionRequest) -> SamplingSettings:
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if req.seed is not None and not _SEED_MIN <= req.seed <= _SEED_MAX:
            raise bad_param("seed", "seed must be a 64-bit integer.")
        if req.top_k is not None and req.top_k > self.n_vocab:
            raise bad_param("top_k", f"top_k must be at most the vocabulary size {self.n_vocab}.")
        # top_p 0 keeps only the likeliest token: greedy. The wire carries seeds as uint64; a negative
        # seed maps to the same 64 bits, so it still means one fixed sequence.
        return SamplingSettings(
            temperature=0.0 if top_p == 0.0 else temperature,
            top_p=top_p if top_p > 0.0 else 1.0,
            top_k=req.top_k or 0,
            seed=None if req.seed is None else req.seed % 2**64,
        )

    def max_tokens(self, prompt_tokens: int, requested: int | None, default: int | None, param: str) -> int:
        """Tokens to generate: the request's, checked against the context, or the default."""
        room = self.n_ctx - prompt_tokens
        if room < 1 or (requested is not None and requested > room):
            asked = prompt_tokens + (requested or 1)
            raise APIError(
                400,
                f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                f"{asked} tokens ({prompt_tokens} in the {param}, {asked - prompt_tokens} in the completion)."
                f" Please reduce the length of the {param} or the completion.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is not None:
            return requested
        return room if default is None else min(default, room)

    def chat_prompt(self, req: ChatCompletionRequest, tools: list[dict[str, Any]] | None = None) -> list[int]:
        messages = chat_messages(req.messages)
        try:
            return self.assistant.chat_prompt_ids(messages, tools)
        except Exception as e:  # a template's raise_exception(): the conversation's shape is wrong
            raise bad_param("messages", f"The chat template rejected the messages: {e}") from None

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_param("prompt", f"Only one prompt per request is supported, got {len(prompt)}.")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.assistant.tokenize(prompt) if prompt else []
        else:
            ids = list(prompt)  # type: ignore[arg-type]
            bad = [t for t in ids if not 0 <= t < self.n_vocab]
            if bad:
                raise bad_param("prompt", f"Token ids must be in [0, {self.n_vocab}), got {bad[:5]}.")
        if not ids:
            raise bad_param("prompt", "The prompt must not be empty.")
        return ids

    def submit(self, job: Job) -> Job:
        try:
            return self.queue.submit(job)
        except QueueFull as e:
            raise APIError(
                429,
                f"The model is busy: {e.waiting} requests are waiting already (max_queue "
                f"{self.queue.max_queue}). Retry after {e.retry_after} s.",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": str(e.retry_after)},
            ) from None
        except ServerStopping:
            raise stopping() from None

    def extension(self, job: Job, result: GenerationResult) -> dict[str, Any]:
        return handoff_extension(
            result,
            {
                "policy": self.assistant.policy.kind,
                "queue_wait_s": job.queue_wait_s,
                "queue_ahead": job.ahead,
                "cloud_model": self.assistant.cloud_info.get("model"),
                # One per generated token (usage.completion_tokens), in order: clients can colour text.
                "sources": [r.source for r in job.records],
            },
        )

    # -- a request -----------------------------------------------------------------------------

    def constraint(
        self, req: ChatCompletionRequest | CompletionRequest
    ) -> tuple[Constraint, ToolPlan | None]:
        """The request's constraint (response_format or tools, penalties, logit_bias) and its tool plan."""
        plan, grammar = None, ""
        if isinstance(req, ChatCompletionRequest):
            plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self.tool_markers)
            grammar = response_format_grammar(req.response_format)
            if plan is not None and plan.grammar:
                if grammar:
                    raise bad_param(
                        "response_format", "response_format and tool calls cannot both constrain an answer."
                    )
                grammar = plan.grammar
        try:  # the penalties' ranges are the request model's; the bias's ids and values checked here
            constraint = Constraint.build(
                grammar=grammar,
                frequency_penalty=req.frequency_penalty,
                presence_penalty=req.presence_penalty,
                logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
            )
            constraint.check_ids(self.n_vocab)
        except ConstraintError as e:
            raise bad_param("logit_bias", f"Invalid logit_bias: {e}.") from None
        cloud = self.assistant.cloud_info
        if constraint.active and self.assistant.edge.mode != "edge" and cloud.get("constraints") == "false":
            raise APIError(
                400,
                "The cloud verifier does not enforce constraints (response_format, tools, penalties, "
                "logit_bias): update it, or run the edge alone.",
                code="unsupported_parameter",
            )
        return constraint, plan

    async def handle(self, request: Request, req: ChatCompletionRequest | CompletionRequest) -> Response:
        """Check a request, queue it, and answer it (a JSON response, or a stream of events)."""
        chat = isinstance(req, ChatCompletionRequest)
        self.check_model(req.model)
        check_unsupported(req)
        stops = stop_strings(req.stop)
        constraint, plan = self.constraint(req)
        if isinstance(req, ChatCompletionRequest):
            prompt_ids = self.chat_prompt(req, None if plan is None else plan.tools)
            requested = req.max_completion_tokens or req.max_tokens
            max_tokens = self.max_tokens(
                len(prompt_ids), requested, self.settings.default_max_tokens, "messages"
            )
            top = (req.top_logprobs or 0) if req.logprobs else None
        else:
            prompt_ids = self.completion_prompt(req)
            max_tokens = self.max_tokens(
                len(prompt_ids), req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt"
            )
            top = req.logprobs
        sampling = self.sampling(req)
        n = req.n or 1
        id_ = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        calls, jobs = [], []
        for i in range(n):  # n > 1: independent generations, each with its own seed (seed + i)
            seed = None if sampling.seed is None else (sampling.seed + i) % 2**64
            calls.append(
                Answer(
                    api=self,
                    chat=chat,
                    id=id_,
                    created=int(time.time()),
                    model=req.model,
                    prompt_tokens=len(prompt_ids),
                    text=TextAssembler(self.detokenize, self.stop_ids, stops),
                    logprobs=None if top is None else LogprobFormatter(self.detokenize, min(top, self.top_k)),
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    detail=bool(req.handoff_stream),
                    index=i,
                    last=i == n - 1,
                    tools=plan is not None and plan.tools is not None,
                )
            )
            jobs.append(
                Job(
                    prompt_ids=prompt_ids,
                    max_tokens=max_tokens,
                    constraint=constraint,
                    sampling=dataclasses.replace(sampling, seed=seed),
                )
            )
        if req.stream:
            return stream_all(calls, jobs)
        bodies = []
        for call, job in zip(calls, jobs, strict=True):
            body = await call.run(request, job)
            if body is None:
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            bodies.append(body)
        return JSONResponse(merge_choices(bodies))


class _BearerAuth:
    """Require `Authorization: Bearer <key>` on /v1 (health and metrics stay open, like serve-cloud's)."""

    def __init__(self, app: ASGIApp, key: str, api: EdgeAPI) -> None:
        self.app = app
        self.key = key.encode()
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/v1") and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                self.api.count(_ENDPOINTS.get(path), "unauthorized")
                message = (
                    "Incorrect API key provided."
                    if header
                    else "Missing API key: send Authorization: Bearer <key>."
                )
                response = JSONResponse(
                    error_body(message, param=None, code="invalid_api_key"),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(assistant: Any, settings: ServeSettings, *, metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app over a started Assistant; its lifespan runs the generation queue's worker.

    Args:
        assistant: an edge.assistant.Assistant inside its `async with`.
        settings: host-independent serving settings (queue, key, alias, CORS).
        metrics: where to count; a fresh registry if None.

    Returns:
        The app; `app.state.api` is its EdgeAPI.
    """
    api = EdgeAPI(assistant, settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        api.queue.start()
        try:
            yield
        finally:
            await api.queue.stop()

    app = FastAPI(
        title="Handoff edge API",
        summary="OpenAI-compatible hybrid edge-cloud generation",
        lifespan=lifespan,
    )
    app.state.api = api

    def error_response(request: Request, e: APIError) -> JSONResponse:
        kind = "rejected" if e.status == 429 else "invalid" if e.status < 500 else "failed"
        if request.method == "POST":
            api.count(_ENDPOINTS.get(request.url.path), kind)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI clients expect 400 and the error shape.
        return error_response(request, validation_error(e.errors(), request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message, code = f"Unknown request URL: {request.method} {request.url.path}.", "unknown_url"
        elif e.status_code == 405:
            message, code = (
                f"Method {request.method} is not allowed on {request.url.path}.",
                "method_not_allowed",
            )
        else:
            message, code = str(e.detail), None
        return JSONResponse(error_body(message, code=code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(
            request,
            APIError(500, f"The server had an error processing your request: {e}", type="server_error"),
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(api)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        api.check_model(model_id)
        return _model_card(api)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.handle(request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.handle(request, body)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        # Open like /health: the page asks for the API key itself and sends it with its /v1 requests.
        return HTMLResponse(_STATIC.joinpath("index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(packages=[("handoff.edge", "static")]), name="static")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": api.model_id,
            "edge_model": assistant.model_name,
            "mode": assistant.edge.mode,
            "policy": assistant.policy.kind,
            "policy_config": dataclasses.asdict(assistant.policy),
            "cloud": assistant.cloud_info,
            "busy": api.queue.busy,
            "queue_depth": api.queue.depth,
            "max_queue": api.queue.max_queue,
            "n_ctx": api.n_ctx,
        }

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.api_key:
        app.add_middleware(_BearerAuth, key=settings.api_key, api=api)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Outermost, so that a browser's preflight is answered before the key is asked for.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    return app


def _model_card(api: EdgeAPI) -> dict[str, Any]:
    return {
        "id": api.model_id,
        "object": "model",
        "created": api.created,
        "owned_by": "handoff",
        "handoff": {
            "edge_model": api.assistant.model_name,
            "cloud": api.assistant.cloud_info,
            "mode": api.assistant.edge.mode,
            "policy": api.assistant.policy.kind,
            "n_ctx": api.n_ctx,
        },
    }


# ---------------------------------------------------------------------------------------------
# Running it


class _Uvicorn(uvicorn.Server):
    """uvicorn, minus re-raising the signal after its shutdown (that would end the process before the
    Assistant and an embedded verifier are closed): a signal here only asks for a graceful exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            # handle_exit (as sse-starlette patches it) also ends open event streams at once.
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), before any model is loaded: a busy port fails fast.

    Raises:
        HandoffError: the address cannot be bound.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise HandoffError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise HandoffError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class EdgeServer:
    """The app under uvicorn on a bound socket."""

    def __init__(self, app: FastAPI, sock: socket.socket, settings: ServeSettings) -> None:
        self.app = app
        self.api: EdgeAPI = app.state.api
        self.sock = sock
        self.host = settings.host
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_config=None, lifespan="on", timeout_graceful_shutdown=settings.shutdown_timeout_s
        )
        self.uvicorn = _Uvicorn(config)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def stop(self) -> None:
        """Ask for a graceful shutdown (safe from any thread: uvicorn polls the flag)."""
        self.uvicorn.should_exit = True

    async def run(self, on_ready: Callable[[EdgeServer], None] | None = None) -> None:
        task = asyncio.ensure_future(self.uvicorn.serve(sockets=[self.sock]))
        while not self.uvicorn.started and not task.done():
            await asyncio.sleep(0.02)
        if self.uvicorn.started and on_ready is not None:
            on_ready(self)
        await task


async def serve(
    settings: HandoffSettings,
    edge: EdgeSettings,
    serve_settings: ServeSettings,
    *,
    edge_model: str | None = None,
    cloud_model: str | None = None,
    on_ready: Callable[[EdgeServer], None] | None = None,
) -> None:
    """Bind, load Q and connect to the cloud (an embedded verifier by default), serve until stopped.

    Args:
        settings: process settings (cache, threads, default models).
        edge: the cloud's address, mode, policy and timeouts.
        serve_settings: the HTTP side.
        edge_model: Q (registry name or GGUF path); default settings.edge_model.
        cloud_model: P for an embedded verifier; default settings.cloud_model.
        on_ready: called once the server accepts connections (with it: its port, stop()).
    """
    from handoff.edge.assistant import Assistant

    sock = bind(serve_settings.host, serve_settings.port)
    try:
        async with Assistant(settings, edge, edge_model=edge_model, cloud_model=cloud_model) as assistant:
            server = EdgeServer(create_app(assistant, serve_settings), sock, serve_settings)
            logger.info("serving %s on %s", server.api.model_id, server.base_url)
            await server.run(on_ready)
    finally:
        sock.close()
