"""Task suites and checkers: right and wrong answers per suite, malformed output, code that loops or crashes."""

from __future__ import annotations

import json
import re

import pytest

from handoff.edge.evaluation.checkers import check, extract_answer, extract_code, parse_number
from handoff.edge.evaluation.sandbox import SandboxLimits
from handoff.edge.evaluation.tasks import SUITES, Task, generate_suite, load_jsonl

FAST = SandboxLimits(timeout_s=3.0, cpu_s=3, memory_mb=256)

# A correct implementation of every python task's entry point (the suite's specs, written independently).
SOLUTIONS = {
    "sum_multiples": None,  # depends on the task's (a, b): derived from the prompt below
    "count_chars": None,
    "digit_sum": None,
    "rotate_left": """
def rotate_left(xs, k):
    if not xs:
        return []
    k %= len(xs)
    return xs[k:] + xs[:k]
""",
    "collatz_steps": """
def collatz_steps(n):
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps
""",
    "running_max": """
def running_max(xs):
    out, best = [], None
    for x in xs:
        best = x if best is None or x > best else best
        out.append(best)
    return out
""",
    "is_balanced": """
def is_balanced(s):
    stack, pairs = [], {')': '(', ']': '[', '}': '{'}
    for ch in s:
        if ch in '([{':
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack
""",
    "nth_prime": """
def nth_prime(n):
    count, x = 0, 1
    while count < n:
        x += 1
        if all(x % d for d in range(2, int(x ** 0.5) + 1)):
            count += 1
    return x
""",
    "run_length": """
def run_length(s):
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(f"{s[i]}{j - i}")
        i = j
    return "".join(out)
""",
}


def solution(task: Task) -> str:
    """A correct answer for a python task, parameterised from its prompt where the spec has constants."""
    name = task.entry_point
    if name == "sum_multiples":
        a, b = map(int, re.search(r"multiples of (\d+) or (\d+)", task.prompt).groups())
        return (
            f"def sum_multiples(n):\n    return sum(x for x in range(1, n) if x % {a} == 0 or x % {b} == 0)\n"
        )
    if name == "count_chars":
        chars = re.search(r"one of the letters '(\w+)'", task.prompt).group(1)
        return f"def count_chars(s):\n    return sum(c.lower() in {chars!r} for c in s)\n"
    if name == "digit_sum":
        base = int(re.search(r"in base (\d+)", task.prompt).group(1))
        return f"def digit_sum(n):\n    s = 0\n    while n:\n        s, n = s + n % {base}, n // {base}\n    return s\n"
    return SOLUTIONS[name]


def model_reply(answer: str) -> str:
    return f"Let me think.\nStep 1: something.\nAnswer: {answer}"


# -- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITES)
def test_suites_are_seeded_and_extend(suite):
    a = generate_suite(suite, 6, seed=3, difficulty=2)
    assert a == generate_suite(suite, 6, seed=3, difficulty=2)
    assert generate_suite(suite, 10, seed=3, difficulty=2)[:6] == a  # a larger n extends a smaller one
    assert a != generate_suite(suite, 6, seed=4, difficulty=2)
    assert len({t.task_id for t in a}) == 6 and all(t.suite == suite for t in a)
    assert len({t.digest for t in a}) == 6


def test_difficulty_scales_the_tasks():
    easy = generate_suite("sorting", 20, difficulty=1)
    hard = generate_suite("sorting", 20, difficulty=4)
    length = lambda ts: sum(len(t.answer.split(",")) for t in ts)  # noqa: E731
    assert length(hard) > length(easy)
    assert sum(
        t.prompt.count("*") + t.prompt.count("+") for t in generate_suite("arithmetic", 20, difficulty=4)
    ) > sum(t.prompt.count("*") + t.prompt.count("+") for t in generate_suite("arithmetic", 20, difficulty=1))


def test_bad_suite_or_difficulty():
    with pytest.raises(ValueError, match="unknown suite"):
        generate_suite("poetry", 3)
    with pytest.raises(ValueError, match="difficulty"):
        generate_suite("sorting", 3, difficulty=9)


# -- checkers: right and wrong answers per suite ---------------------------------------------------


@pytest.mark.parametrize("suite", [s for s in SUITES if s != "python"])
@pytest.mark.parametrize("difficulty", [1, 3])
def test_expected_answers_pass_and_wrong_ones_fail(suite, difficulty):
    for task in generate_suite(suite, 12, difficulty=difficulty):
        assert check(task, model_reply(task.answer)).correct, task
        if task.checker == "number":
            wrong = str(int(parse_number(task.answer)) + 1)
        elif task.checker == "list":
            items = task.answer.split(", ")
            wrong = ", ".join(items[1:] + items[:1]) if len(set(items)) > 1 else task.answer + ", 0"
        else:
            wrong = task.answer + "x"
        result = check(task, model_reply(wrong))
        assert not result.correct, (task, wrong)
        assert result.detail.startswith("expected")


@pytest.mark.parametrize("suite", [s for s in SUITES if s != "python"])
@pytest.mark.parametrize("output", ["", "   \n", "I don't know.", "Answer:", "<|im_end|>", "Answer: ???"])
def test_malformed_output_is_wrong_not_an_error(suite, output):
    task = generate_suite(suite, 1)[0]
    result = check(task, output)
    assert result.correct is False


def test_answer_extraction_rules():
    assert extract_answer("blah\nAnswer: 42") == "42"
    assert extract_answer("Answer: 1\nwait, no.\n**Answer:** 7.") == "7"  # the last marker wins
    assert extract_answer("So the answer is 12.") == "12"
    assert extract_answer("The final answer is: `abc`") == "abc"
    assert extract_answer("no marker here") is None
    assert parse_number("Answer: 1,234 apples") == 1234
    assert parse_number("-3.5") == parse_number("-7/2")
    assert parse_number("none") is None
    task = Task("t", "s", "p", "number", answer="17")
    # Without a marker a number answer is the text's last number.
    assert check(task, "5 + 12 = 17").correct
    assert check(task, "$\\boxed{17}$").correct
    assert not check(task, "17 is wrong; it is 18").correct
    words = Task("w", "s", "p", "list", answer="apple, pear")
    assert check(words, "Answer: [Apple, 'pear']").correct
    assert not check(words, "Answer: apple").correct
    exact = Task("e", "s", "p", "exact", answer="olleh")
    assert check(exact, 'Answer: "olleh".').correct
    assert not check(exact, "Answer: hello").correct


# -- python tasks -----------------------------------------------------------------------------


def python_tasks() -> list[Task]:
    """One task per entry point, from the generated suite."""
    seen: dict[str, Task] = {}
    for difficulty in (1, 3):
        for task in generate_suite("python", 80, difficulty=difficulty):
            seen.setdefault(f"{task.entry_point}/{difficulty}", task)
    return list(seen.values())


def test_python_suite_covers_every_spec():
    assert {t.entry_point for t in python_tasks()} == set(SOLUTIONS)


@pytest.mark.parametrize("task", python_tasks(), ids=lambda t: t.task_id)
def test_python_reference_solutions_pass(task):
    reply = f"Here is the function:\n\n```python\n{solution(task)}```\n\nIt works."
    result = check(task, reply, FAST)
    assert result.correct, result


def test_python_wrong_malformed_looping_and_crashing_answers_fail():
    task = next(t for t in generate_suite("python", 40, difficulty=3) if t.entry_point == "running_max")
    cases = {
        "wrong": "```python\ndef running_max(xs):\n    return xs\n```",
        "no code": "I cannot do that.",
        "syntax": "```python\ndef running_max(xs)\n    return xs\n```",
        "other name": "```python\ndef running_maximum(xs):\n    return xs\n```",
        "loops forever": "```python\ndef running_max(xs):\n    while True:\n        pass\n```",
        "crashes": "```python\nimport ctypes\nctypes.string_at(0)\n```",
        "exits": "```python\nimport sys\nsys.exit(0)\n```",
    }
    statuses = {}
    for name, reply in cases.items():
        result = check(task, reply, FAST)
        assert not result.correct, name
        statuses[name] = result.answer
    assert statuses["loops forever"] == "timeout"
    assert statuses["crashes"] == "crashed"
    assert statuses["syntax"] == "syntax_error"
    assert statuses["wrong"] == "failed"
    # ...and the next task still runs normally.
    assert check(task, f"```python\n{solution(task)}```", FAST).correct


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = "```\npip install x\n```\n\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(text, "f").startswith("def f")
    assert extract_code("def f(): pass", "f") == "def f(): pass"
    assert "def f" in extract_code("```python\ndef f():\n    return 1", "f")  # an unclosed fence (cut off)


# -- external JSONL suites ---------------------------------------------------------------------


def test_jsonl_exact_and_python_records(tmp_path):
    path = tmp_path / "mini.jsonl"
    records = [
        {"task_id": "q1", "prompt": "What is 6*7?", "answer": 42, "checker": "number"},
        {"task_id": "q2", "prompt": "Capital of France? Answer: <city>", "answer": "Paris"},
        {
            "task_id": "HumanEval/0",
            "prompt": 'from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    """Sum xs."""\n',
            "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
            "entry_point": "add",
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    tasks = load_jsonl(path)
    assert [t.task_id for t in tasks] == ["mini/q1", "mini/q2", "mini/HumanEval/0"]
    assert [t.checker for t in tasks] == ["number", "exact", "python"]
    assert "Answer: <answer>" in tasks[0].prompt and tasks[1].prompt.count("Answer:") == 1
    assert check(tasks[0], "6*7 = 42").correct and not check(tasks[0], "Answer: 41").correct
    assert check(tasks[1], "Answer: Paris").correct
    # A chat answer with the full function (needs the prompt's import) and a bare completion both pass.
    full = "```python\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```"
    assert check(tasks[2], full, FAST).correct
    assert check(tasks[2], "    return sum(xs)\n", FAST).correct
    assert not check(tasks[2], "    return 0\n", FAST).correct
    assert len(load_jsonl(path, limit=2)) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('{"prompt": "x"}', "task_id"),
        ('{"task_id": 1, "prompt": "x"}', "answer"),
        ('{"task_id": 1, "prompt": "x", "answer": 1, "checker": "regex"}', "checker"),
        ('{"task_id": 1, "prompt": "x", "test": "def check(c): pass"}', "entry_point"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": 0, "prompt": "ok", "answer": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        load_jsonl(path)
    assert "bad.jsonl:2" in str(e.value)


def test_jsonl_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_jsonl(path)
