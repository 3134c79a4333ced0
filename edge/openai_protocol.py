"""The OpenAI wire format of `handoff serve-edge`: requests, errors, output text and response shapes.

Nothing here runs a model: the request models validate what a client sends, `TextAssembler` turns
committed tokens into the text a client sees (incremental UTF-8, stop strings, the log-probs that
go with each piece), and the builders shape chat and text completions, streamed or not.

Log-probs report, for each token, the model that produced it: Q's log-probability for an edge
token, P's for a cloud or corrected one, with that same model's top-k (both at temperature 1).
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from handoff.edge.records import GenerationResult, TokenRecord

# The OpenAI API's limits for these fields.
MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
# n > 1 runs the generations one after another on one model: bounded so one request cannot hog it.
MAX_CHOICES = 8
# What JSON gets for a log-probability of -inf (JSON has no infinities); OpenAI uses the same value.
NEG_INF_LOGPROB = -9999.0

# How a generation ended (GenerationResult.stop_reason) -> the API's finish_reason. A cloud that went
# away in cloud-only mode cut the answer short: "length" is the API's word for a truncated answer, and
# the `handoff` extension field carries the exact reason.
FINISH_REASONS = {
    "stop_token": "stop",
    "stopped": "stop",
    "max_tokens": "length",
    "context_full": "length",
    "cloud_unavailable": "length",
}


class APIError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """An error response.

        Args:
            status: HTTP status.
            message: what went wrong and what to do, for a person.
            type: the error's class (invalid_request_error, server_error, ...).
            param: the request field at fault, if one is.
            code: a machine-readable code (model_not_found, context_length_exceeded, ...).
            headers: extra response headers (Retry-After, WWW-Authenticate).
        """
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_param(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# pydantic's tags for the members of a union in an error's location (e.g. ("prompt", "list[int]", 1)).
_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none", "function-", "literal[")


def _param_of(loc: Sequence[str | int]) -> str | None:
    """The request field an error's location points to, as `messages[0].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.lower().startswith(_TYPE_TAGS) or "[" in part:
            break  # a union member's tag: the field itself is what the client got wrong
        else:
            out += ("." if out else "") + part
    return out or None


def validation_error(errors: Sequence[dict[str, Any]], content_type: str | None) -> APIError:
    """The 400 answer for a body FastAPI could not parse or validate (its default would be a 422).

    Args:
        errors: RequestValidationError.errors().
        content_type: the request's Content-Type header.
    """
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind = first.get("type", "")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request: "
            f"{(first.get('ctx') or {}).get('error', 'invalid JSON')}. The body must be a JSON object.",
        )
    if kind == "model_attributes_type" and not loc:
        if content_type is None or "json" not in content_type:
            return APIError(400, "The body must be a JSON object sent with Content-Type: application/json.")
        return APIError(400, "The body must be a JSON object.")
    param = _param_of(loc)
    if kind == "missing":
        return bad_param(param or "", f"Missing required parameter: '{param}'.", "missing_required_parameter")
    return bad_param(param or "", f"Invalid value for '{param}': {first.get('msg', 'invalid')}.")


# ---------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    # Strict: `"n": true` or `"max_tokens": "5"` is a client's mistake, not something to coerce.
    # Unknown fields are ignored, as clients send more than any one server understands.
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False


class ContentPart(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="Extension (as in vLLM): sample from the k best.")
    n: int | None = Field(
        None, ge=1, le=MAX_CHOICES, description="Independent generations, one after another."
    )
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    handoff_stream: bool | None = Field(
        False,
        description="Extension: with stream, each delta chunk carries a `handoff` field with one entry per "
        "token in it (pieces, sources, kl, checked, unchecked); plain clients leave it out.",
    )


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """The request's stop sequences, checked (at most 4, none empty)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_param("stop", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}.")
    if any(s == "" for s in stops):
        raise bad_param("stop", "Stop sequences must not be empty strings.")
    return stops


def check_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    """Refuse, clearly, what this server cannot honour instead of silently ignoring it."""
    # logit_bias keys must be token ids; their range and the values' are the Constraint's to check.
    bad = [key for key in req.logit_bias or {} if not key.isdigit()]
    if bad:
        raise bad_param("logit_bias", f"logit_bias keys must be token ids, got {bad[0]!r}.")
    if isinstance(req, ChatCompletionRequest):
        if req.functions:
            message = "The deprecated `functions` field is not supported: use `tools`."
            raise bad_param("functions", message, "unsupported_parameter")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_param("top_logprobs", "top_logprobs needs logprobs to be true.")
    else:
        if req.echo:
            raise bad_param("echo", "echo is not supported by this server.", "unsupported_parameter")
        if req.suffix:
            raise bad_param("suffix", "suffix is not supported by this server.", "unsupported_parameter")
        if (req.best_of or 1) != 1:
            raise bad_param("best_of", "Only best_of=1 is supported.", "unsupported_parameter")


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: role and text (text parts joined by newlines), an
    assistant's earlier tool calls (their arguments as objects: the template writes the JSON) and
    tools' results."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        text = _message_text(m, i)
        # The chat templates know system and tool, not OpenAI's newer or older names for them.
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        entry: dict[str, Any] = {"role": role, "content": text}
        if m.role == "assistant" and m.tool_calls:
            entry["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]")
                                   for j, call in enumerate(m.tool_calls)]  # fmt: skip
        elif text is None:
            raise bad_param(f"messages[{i}].content", "Each message needs text content.")
        out.append(entry)
    return out


def _message_text(m: ChatMessage, i: int) -> str | None:
    if m.content is None or isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise bad_param(
                f"messages[{i}].content[{j}]", f"Only text content parts are supported, got '{part.type}'."
            )
        parts.append(part.text)
    return "\n".join(parts)


def _template_call(call: Any, param: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_param(param, "A tool call needs function.name.")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        raise bad_param(f"{param}.function.arguments", "A tool call's arguments must be JSON.") from None
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


# ---------------------------------------------------------------------------------------------
# Output text


@dataclass
class OutToken:
    """A committed token as the API reports it: where its text lies in the completion."""

    record: TokenRecord
    start: int  # character offset of its text in the completion
    end: int  # start == end: a token ending inside a UTF-8 character (its text comes with the next)


class TextAssembler:
    """Committed tokens -> the completion's text: incremental UTF-8, stop strings trimmed, held back.

    `add` is given each committed token and says when a stop string has appeared (the generation
    should stop there); `take` returns the text that is safe to send and the tokens that go with it.
    Text that could be the start of a stop string is held back until it is clear it is not one.
    """

    def __init__(
        self, detokenize: Callable[[list[int]], bytes], stop_ids: frozenset[int], stops: Sequence[str]
    ) -> None:
        """Start an empty completion.

        Args:
            detokenize: the edge model's token ids -> bytes.
            stop_ids: end-of-generation tokens (their text is not part of the answer).
            stops: stop strings; the completion ends before the first one.
        """
        self._detokenize = detokenize
        self._stop_ids = stop_ids
        self.stops = list(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._tokens: list[OutToken] = []
        self._released = 0  # characters handed out by take()
        self._next = 0  # first token not handed out yet
        self._end: int | None = None  # where a stop string begins, once one has appeared
        self._flushed = False

    @property
    def stopped(self) -> bool:
        """A stop string has appeared."""
        return self._end is not None

    @property
    def text(self) -> str:
        """The completion so far (trimmed at a stop string)."""
        return self._text if self._end is None else self._text[: self._end]

    def add(self, record: TokenRecord) -> bool:
        """Take a committed token; True when the completion now contains a stop string."""
        # P's token across tokenizers: its id is not Q's; one without text is P's end of turn.
        ends = not record.raw if record.raw is not None else record.token_id in self._stop_ids
        if self._end is not None or ends:
            return self._end is not None
        before = len(self._text)
        raw = record.raw if record.raw is not None else self._detokenize([record.token_id])
        self._text += self._decoder.decode(raw)
        self._tokens.append(OutToken(record, before, len(self._text)))
        if self.stops and len(self._text) > before:
            # Text before `before` held no stop string, and any suffix of it that could start one was
            # held back, so a new match starts at or after both of these.
            start = max(self._released, before - self._longest + 1, 0)
            hits = [i for s in self.stops if (i := self._text.find(s, start)) >= 0]
            if hits:
                self._end = min(hits)
        return self._end is not None

    def _held_back(self) -> int:
        """Characters at the end that could be the beginning of a stop string."""
        tail = self._text[self._released :]
        for n in range(min(len(tail), self._longest - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stops):
                return n
        return 0

    def take(self, final: bool = False) -> tuple[str, list[OutToken]]:
        """The text not handed out yet that is safe to send, and the tokens whose text it completes.

        Args:
            final: the generation is over: flush everything (an incomplete UTF-8 tail becomes U+FFFD).

        Returns:
            (text, tokens) to send now; both may be empty.
        """
        if final and not self._flushed and self._end is None:
            self._flushed = True
            tail = self._decoder.decode(b"", final=True)
            if tail:
                self._text += tail
                if self._tokens:
                    self._tokens[-1].end = len(self._text)
        done = final or self._end is not None
        if self._end is not None:
            limit = self._end
        elif final:
            limit = len(self._text)
        else:
            limit = len(self._text) - self._held_back()
        limit = max(limit, self._released)
        text = self._text[self._released : limit]
        self._released = limit
        out = []
        while self._next < len(self._tokens):
            t = self._tokens[self._next]
            # A token goes out once all its text has; at the end, also one partly before a stop string.
            if t.end <= limit or (done and t.start < limit):
                out.append(t)
                self._next += 1
            elif done:
                self._next = len(self._tokens)  # inside the trimmed stop string: not part of the answer
            else:
                break
        return text, out


# ---------------------------------------------------------------------------------------------
# Log-probabilities


def _finite(lp: float | None) -> float:
    return NEG_INF_LOGPROB if lp is None or not math.isfinite(lp) else float(lp)


def producer_view(record: TokenRecord) -> tuple[float | None, list[int], list[float]]:
    """The token's log-prob and the top-k of the model that produced it: Q for edge, P otherwise.

    Returns:
        (log-prob of the token, top-k ids, their log-probs), temperature 1.
    """
    if record.source == "edge" or record.p_logprob is None:
        return record.q_logprob, list(record.q_topk_ids or []), list(record.q_topk_logprobs or [])
    return record.p_logprob, list(record.p_topk_ids or []), list(record.p_topk_logprobs or [])


class LogprobFormatter:
    """Shapes per-token log-probs for chat (`content` entries) and text completions (parallel lists)."""

    def __init__(self, detokenize: Callable[[list[int]], bytes], top: int) -> None:
        """Format with `top` alternatives per token.

        Args:
            detokenize: the edge model's token ids -> bytes.
            top: how many alternatives per token (0..20; at most the policy's top-k).
        """
        self._detokenize = detokenize
        self.top = top
        self._pieces: dict[int, bytes] = {}

    def _bytes(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self._detokenize([token_id])
        return piece

    def _entry(self, token_id: int, lp: float | None, raw: bytes | None = None) -> dict[str, Any]:
        raw = self._bytes(token_id) if raw is None else raw
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _finite(lp), "bytes": list(raw)}

    def chat(self, tokens: Sequence[OutToken]) -> list[dict[str, Any]]:
        """`choices[0].logprobs.content` entries of a chat completion (across tokenizers a P token's
        alternatives are P's ids, which the edge cannot spell: they are left out)."""
        out = []
        for t in tokens:
            lp, ids, lps = producer_view(t.record)
            if t.record.raw is not None:
                ids, lps = [], []
            entry = self._entry(t.record.token_id, lp, t.record.raw)
            entry["top_logprobs"] = [
                self._entry(i, v) for i, v in list(zip(ids, lps, strict=False))[: self.top]
            ]
            out.append(entry)
        return out

    def completion(self, tokens: Sequence[OutToken]) -> dict[str, Any]:
        """`choices[0].logprobs` of a text completion: tokens, token_logprobs, top_logprobs, text_offset."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            lp, ids, lps = producer_view(t.record)
            raw = t.record.raw
            if raw is not None:  # P's token across tokenizers: its alternatives are P's ids
                ids, lps = [], []
            else:
                raw = self._bytes(t.record.token_id)
            out["tokens"].append(raw.decode("utf-8", errors="replace"))
            out["token_logprobs"].append(_finite(lp))
            top: dict[str, float] = {}
            for i, v in list(zip(ids, lps, strict=False))[: self.top]:
                # Two ids can print the same (U+FFFD): keep the likelier, which comes first.
                top.setdefault(self._bytes(i).decode("utf-8", errors="replace"), _finite(v))
            out["top_logprobs"].append(top)
            out["text_offset"].append(t.start)
        return out


# ---------------------------------------------------------------------------------------------
# Responses


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.stop_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def handoff_extension(result: GenerationResult, extra: dict[str, Any]) -> dict[str, Any]:
    """The `handoff` field: where the tokens came from and what the hybrid generation did."""
    summary = result.summary()
    summary.pop("tokens", None)
    return summary | extra


def token_detail(tokens: Sequence[OutToken], text: str) -> dict[str, list[Any]]:
    """A streamed chunk's `handoff` field (request extension `handoff_stream`): one entry per token in it.

    Args:
        tokens: the chunk's tokens, in order.
        text: the completion so far (TextAssembler.text): each token's piece is its slice of it, so the
            pieces of all chunks join to the answer (a token ending inside a character has piece "";
            an unfinished character flushed as U+FFFD at the very end may come with no token).

    Returns:
        pieces, sources (edge, cloud, corrected, ensembled), kl (top-k KL(P || Q) or None), checked
        (P scored the position), unchecked (an edge token P never checked: by_design or unreachable).
    """
    kls = [t.record.kl for t in tokens]
    return {
        "pieces": [text[t.start : t.end] for t in tokens],
        "sources": [t.record.source for t in tokens],
        "kl": [kl if kl is not None and math.isfinite(kl) else None for kl in kls],
        "checked": [t.record.checked for t in tokens],
        "unchecked": [t.record.unchecked for t in tokens],
    }


def chat_completion(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish: str,
    logprobs: list[dict[str, Any]] | None,
    usage_: dict[str, int],
    handoff: dict[str, Any],
    index: int = 0,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A `chat.completion`; with tool_calls, the message carries them (content None if there is no text)."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": index,
                "message": message,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish,
            }
        ],
        "usage": usage_,
        "handoff": handoff,
    }


def chat_chunk(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    with_usage: bool = False,
    usage_: dict[str, int] | None = None,
    handoff: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; delta None makes the usage-only chunk (no choices)."""
    out: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [
            {
                "index": index,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish,
            }
        ],
    }
    if with_usage:
        out["usage"] = usage_  # null on every chunk but the last, as the API does with include_usage
    if handoff is not None:
        out["handoff"] = handoff
    return out


def text_completion(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish: str | None,
    logprobs: dict[str, Any] | None,
    usage_: dict[str, int] | None,
    handoff: dict[str, Any] | None,
    with_usage: bool = True,
    choices: bool = True,
    index: int = 0,
) -> dict[str, Any]:
    """A `text_completion` object: the whole response, or one streamed chunk of it."""
    out: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]
        if choices
        else [],
    }
    if with_usage:
        out["usage"] = usage_
    if handoff is not None:
        out["handoff"] = handoff
    return out
