"""Answer extraction and checking: a model's free text against a task's expected answer.

Extraction rules (the same for every model, so that format errors cost every run alike):
- the answer is what follows the last "Answer:" marker (case-insensitive, markdown emphasis and
  quotes stripped, up to the end of its line);
- without a marker, the last "the answer is X"; without that, for a number the last number in
  the text, for a list or an exact answer the last non-empty line;
- a Python answer is the ```python block that defines the entry point (else the first code block,
  else the whole text), run against the task's tests in a sandboxed process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from handoff.edge.evaluation.sandbox import SandboxLimits, run_python_tests
from handoff.edge.evaluation.tasks import Task

_MARKER = re.compile(r"answer\s*(?:is)?\s*[:=]\s*(.*)", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer is\s*(.*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_STRIP = " \t*`'\"“”‘’.。;:$\\"


@dataclass(frozen=True)
class CheckResult:
    """Whether an output is correct, what was read from it, and why not when it is not."""

    correct: bool
    answer: str | None  # what was extracted (None: nothing answer-like); python: the status
    detail: str = ""


def _clean(s: str) -> str:
    s = s.strip()
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)  # LaTeX-style answers
    return s.strip(_STRIP).strip()


def extract_answer(text: str) -> str | None:
    """The text after the last 'Answer:' marker (or 'the answer is'), cleaned; None without one."""
    for pattern in (_MARKER, _ANSWER_IS):
        found = [m.group(1) for m in pattern.finditer(text)]
        found = [_clean(f.splitlines()[0] if f.strip() else f) for f in found]
        found = [f for f in found if f]
        if found:
            return found[-1]
    return None


def parse_number(s: str) -> Fraction | None:
    """The last number in s as an exact fraction ("1,234" -> 1234, "-3.5", "7/2"); None without one."""
    found = _NUMBER.findall(s)
    if not found:
        return None
    tok = found[-1].replace(",", "")
    try:
        return Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None


def _last_line(text: str) -> str | None:
    lines = [_clean(line) for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else None


def _items(s: str) -> list[str]:
    s = s.strip().strip("[](){}")
    parts = re.split(r"\s*,\s*|\s+", s)
    return [p.strip(_STRIP) for p in parts if p.strip(_STRIP)]


def _same_item(a: str, b: str) -> bool:
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a.casefold() == b.casefold()


def check_number(text: str, expected: str) -> CheckResult:
    extracted = extract_answer(text)
    value = parse_number(extracted) if extracted is not None else parse_number(text)
    if value is None:
        return CheckResult(False, extracted, "no number in the output")
    want = parse_number(expected)
    if want is None:
        raise ValueError(f"expected answer {expected!r} is not a number")
    return CheckResult(value == want, str(value), "" if value == want else f"expected {expected}")


def _answer_or_last_line(text: str) -> str | None:
    extracted = extract_answer(text)
    return _last_line(text) if extracted is None else extracted


def check_exact(text: str, expected: str) -> CheckResult:
    extracted = _answer_or_last_line(text)
    if extracted is None:
        return CheckResult(False, None, "empty output")
    ok = " ".join(extracted.split()) == " ".join(_clean(expected).split())
    return CheckResult(ok, extracted, "" if ok else f"expected {expected!r}")


def check_list(text: str, expected: str) -> CheckResult:
    extracted = _answer_or_last_line(text)
    if extracted is None:
        return CheckResult(False, None, "empty output")
    got, want = _items(extracted), _items(expected)
    ok = len(got) == len(want) and all(_same_item(a, b) for a, b in zip(got, want, strict=True))
    return CheckResult(ok, ", ".join(got), "" if ok else f"expected {expected}")


def extract_code(text: str, entry_point: str) -> str:
    """The code block that defines entry_point, else the first code block, else the whole text."""
    blocks = [body for _, body in _FENCE.findall(text)]
    for body in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", body, re.MULTILINE):
            return body
    return blocks[0] if blocks else text


def check_python(text: str, task: Task, limits: SandboxLimits) -> CheckResult:
    assert task.test is not None and task.entry_point is not None
    code = extract_code(text, task.entry_point)
    defines = re.search(rf"^\s*def\s+{re.escape(task.entry_point)}\s*\(", code, re.MULTILINE)
    if task.code_prefix and not defines:
        program = task.code_prefix + code  # a completion of the prompt's own signature
    else:
        program = (_imports(task.code_prefix) + code) if task.code_prefix else code
    result = run_python_tests(program, task.test, task.entry_point, limits)
    return CheckResult(result.passed, result.status, result.detail)


def _imports(prefix: str) -> str:
    """The import lines of a completion prompt: a full answer still needs them (typing.List, math)."""
    lines = [ln for ln in prefix.splitlines() if re.match(r"\s*(from\s+\S+\s+)?import\s", ln)]
    return "\n".join(lines) + "\n" if lines else ""


def check(task: Task, text: str, limits: SandboxLimits | None = None) -> CheckResult:
    """Check a model's output for a task (python tasks run in a sandboxed process)."""
    if task.checker == "python":
        return check_python(text, task, limits or SandboxLimits())
    assert task.answer is not None
    if task.checker == "number":
        return check_number(text, task.answer)
    if task.checker == "list":
        return check_list(text, task.answer)
    return check_exact(text, task.answer)


def passes(task: Task, text: str) -> bool:
    """Whether an output passes its task's checker (continuation labels: edge/routing/continuations.py)."""
    return check(task, text).correct
