"""OpenAI tool calling and structured output for `serve-edge`: requests -> grammars, output -> tool calls.

The model's own chat template renders the tools (Qwen2.5's puts their JSON signatures in the system
prompt and asks for `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`). A grammar
(shared/constraints.py, enforced on the edge and in the cloud alike) holds the model to that shape
where a call must or may come, with the arguments valid under the function's JSON schema:

    tool_choice "none"        tools are not rendered, no grammar: plain text
    tool_choice "auto"        text, or one or more calls (the first token decides)
    tool_choice "required"    one or more calls (one when parallel_tool_calls is false)
    {"function": {"name"}}    exactly one call of that function

The markers are the template's special tokens, so free text can never produce them: a call is a call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from handoff.edge.openai_protocol import APIError, bad_param
from handoff.shared.constraints import (
    JSON_OPTIONS,
    ConstraintError,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools do to a generation: the template's tools and the output grammar."""

    tools: list[dict[str, Any]] | None  # as the chat template takes them; None: not rendered
    grammar: str  # "" for none


def response_format_grammar(response_format: dict[str, Any] | None) -> str:
    """The grammar of OpenAI's response_format ("" for text).

    Raises:
        APIError: 400 for an unknown type or a schema the engine cannot enforce.
    """
    if not response_format:
        return ""
    kind = response_format.get("type", "text")
    try:
        if kind == "text":
            return ""
        if kind == "json_object":
            return json_object_grammar()
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise bad_param("response_format.json_schema", "json_schema needs a 'name' and a 'schema'.")
            schema = spec.get("schema", {})
            if not isinstance(schema, dict):
                raise bad_param("response_format.json_schema.schema", "The schema must be a JSON object.")
            return json_schema_grammar(schema)
    except ConstraintError as e:
        raise bad_param("response_format", f"Invalid response_format: {e}") from None
    raise bad_param(
        "response_format.type",
        f"response_format type must be text, json_object or json_schema, got '{kind}'.",
    )


def _functions(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """The request's function definitions, checked: [{"name", "description"?, "parameters"?}]."""
    out, names = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_param(f"tools[{i}]", "Each tool must be {'type': 'function', 'function': {...}}.")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise bad_param(f"tools[{i}].function.name", "A function name is 1-64 letters, digits, _ or -.")
        if name in names:
            raise bad_param(f"tools[{i}].function.name", f"The function name '{name}' is given twice.")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_param(f"tools[{i}].function.parameters", "parameters must be a JSON schema object.")
        out.append({"name": name, "description": fn.get("description", ""), "parameters": params})
    return out


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    """A call of one function as the template writes it: {"name": NAME, "arguments": {...}}."""
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def plan_tools(
    tools: Sequence[Any] | None, tool_choice: Any, parallel: bool | None, markers: tuple[int, int] | None
) -> ToolPlan | None:
    """The tools' effect on one chat request (None when it has no tools).

    Args:
        tools: the request's `tools`.
        tool_choice: "none", "auto" (default), "required", or {"type": "function", "function": {"name"}}.
        parallel: parallel_tool_calls (default true): more than one call in one answer.
        markers: the token ids of <tool_call> and </tool_call> in the model's vocabulary (None: absent).

    Raises:
        APIError: 400 for malformed tools or choices, or a model whose template has no tool calls.
    """
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "tool_choice needs tools.")
        return None
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(None, "")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise bad_param("tool_choice", f"tool_choice names no function of `tools`: {name!r}.")
        functions, choice, parallel = chosen, "required", False
    elif choice not in ("auto", "required"):
        raise bad_param("tool_choice", "tool_choice must be none, auto, required or a named function.")
    if markers is None:
        raise APIError(400, "This model's chat template has no tool-call markers.", param="tools")
    schema = (
        {"anyOf": [_call_schema(f) for f in functions]} if len(functions) > 1 else _call_schema(functions[0])
    )
    schema["x-guidance"] = JSON_OPTIONS  # compact, as the template writes calls: no padding forever
    open_id, close_id = markers
    calls = "call" if parallel is False else 'call ("\\n" call)*'
    lark = f"""start: {calls}{" | TEXT" if choice == "auto" else ""}
call: <[{open_id}]> "\\n" %json {json.dumps(schema)} "\\n" <[{close_id}]>
TEXT: /(?s:.+)/
"""
    try:
        grammar = lark_grammar(lark)
    except ConstraintError as e:
        raise bad_param("tools", f"The tools' parameters cannot be enforced: {e}") from None
    template_tools = [{"type": "function", "function": f} for f in functions]
    return ToolPlan(template_tools, grammar)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a completion into its text and its tool calls (OpenAI's shape, arguments as a JSON string).

    Returns:
        (content, tool_calls): content None when the answer is only calls.
    """
    calls = []
    for m in _CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue  # cut short (max_tokens): not a call a client could run
        if not isinstance(call, dict) or "name" not in call:
            continue
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
                },
            }
        )
    if not calls:
        return text, []
    rest = _CALL.sub("", text).strip()
    return rest or None, calls
