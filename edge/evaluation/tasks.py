"""Tasks with automatically checkable answers: seeded generated suites and external JSONL suites.

Each generated suite is a pure function of (n, seed, difficulty): the same arguments give the same
tasks on any machine, so runs can be resumed and compared. Difficulty (1 = easiest) scales the
number of steps, list lengths and edge cases, so that a suite can be tuned to sit between the
small and the large model's abilities: a suite that both solve, or both fail, tells nothing.

Suites:
- arithmetic: one multi-step integer expression (+, -, *, parentheses).
- sorting: a list of integers or of words in ascending order.
- word_problems: a templated story of several steps with a numeric answer.
- algorithmic: small string/list tasks (reverse, count, dedupe, runs, second largest, ...).
- python: write a function; its answer is executed against unit tests in a sandbox.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Checker = Literal["number", "exact", "list", "python"]
CHECKERS: tuple[str, ...] = ("number", "exact", "list", "python")

ANSWER_HINT = "Give the final answer on the last line, as 'Answer: <answer>'."
# Coder models answer with a program when they may: these suites test the model, not a program.
NO_CODE = "Do not write code."
REASON = "Do not write code. Reason step by step in a few short lines, one calculation per line."


@dataclass(frozen=True)
class Task:
    """One task: the user message, and how its answer is checked.

    `answer` is the expected answer for number/exact/list checkers; python tasks carry `test`
    (defines check(candidate)) and `entry_point` (the function the answer must define) instead.
    `code_prefix` is prepended to a python answer (a completion-style prompt's imports and signature).
    """

    task_id: str
    suite: str
    prompt: str
    checker: Checker
    answer: str | None = None
    test: str | None = None
    entry_point: str | None = None
    code_prefix: str = ""

    def __post_init__(self) -> None:
        if self.checker not in CHECKERS:
            raise ValueError(f"task {self.task_id}: checker must be one of {CHECKERS}, got {self.checker!r}")
        if self.checker == "python":
            if not self.test or not self.entry_point:
                raise ValueError(f"task {self.task_id}: a python task needs `test` and `entry_point`")
        elif self.answer is None:
            raise ValueError(f"task {self.task_id}: a {self.checker} task needs `answer`")

    @property
    def digest(self) -> str:
        """A short hash of everything that defines the task: a resumed run redoes changed tasks."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# -- generated suites ----------------------------------------------------------------------------

_NAMES = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam"]
_ITEMS = ["apple", "marble", "pencil", "sticker", "coin", "card", "book", "shell", "stamp", "cookie"]
_WORDS = (
    "river maple copper lantern violet harbor falcon meadow saddle quartz ember tulip walnut glacier "
    "pepper orbit canyon velvet nectar thistle cobalt juniper marble summit willow breeze cactus "
    "dolphin fabric garnet hazel island jasper kettle lemon mango noble olive pebble raven sierra "
    "tiger umber vessel wander yonder zephyr anchor bishop candle dagger"
).split()


def _arithmetic(rng: random.Random, difficulty: int) -> tuple[str, str, Checker]:
    n_ops = difficulty + 1
    hi = 9 + 10 * difficulty
    expr = str(rng.randint(2, hi))
    for _ in range(n_ops):
        op = rng.choice(["+", "-", "*"])
        operand = str(rng.randint(2, 12 if op == "*" else hi))
        if op == "*" and rng.random() < 0.5:
            expr = f"({expr}) * {operand}"  # make precedence matter
        else:
            expr = f"{expr} {op} {operand}"
    value = eval(expr, {"__builtins__": {}})  # our own expression of digits and + - * ( )
    prompt = f"Compute {expr}. {REASON} {ANSWER_HINT}"
    return prompt, str(value), "number"


def _sorting(rng: random.Random, difficulty: int) -> tuple[str, str, Checker]:
    if rng.random() < 0.5:
        lo = -50 if difficulty >= 3 else 0
        xs = rng.sample(range(lo, 100 * difficulty), 3 + 2 * difficulty)
        shown, answer = ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
        what = "numbers"
    else:
        ws = rng.sample(_WORDS, 3 + 2 * difficulty)
        shown, answer = ", ".join(ws), ", ".join(sorted(ws))
        what = "words alphabetically"
    prompt = (
        f"Sort these {what} in ascending order: {shown}. "
        f"{NO_CODE} Give the sorted list on the last line, comma-separated, as 'Answer: <list>'."
    )
    return prompt, answer, "list"


def _word_problem(rng: random.Random, difficulty: int) -> tuple[str, str, Checker]:
    name, friend = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    value = rng.randint(5, 20 + 10 * difficulty)
    sentences = [f"{name} has {value} {item}s."]
    for _ in range(difficulty + 1):
        kind = rng.choice(["buy", "give", "boxes", "times", "share"])
        if kind == "buy":
            b = rng.randint(2, 30)
            value += b
            sentences.append(f"Then {name} buys {b} more {item}s.")
        elif kind == "give" and value > 2:
            b = rng.randint(1, value - 1)
            value -= b
            sentences.append(f"{name} gives {b} {item}s to {friend}.")
        elif kind == "boxes":
            c, d = rng.randint(2, 6), rng.randint(2, 12)
            value += c * d
            sentences.append(f"{name} receives {c} boxes with {d} {item}s in each box.")
        elif kind == "times":
            m = rng.choice([2, 3])
            value *= m
            word = {2: "doubles", 3: "triples"}[m]
            sentences.append(f"A lucky trade {word} the number of {item}s {name} has.")
        else:
            divisors = [m for m in (2, 3, 4, 5) if value % m == 0]
            if not divisors:
                b = rng.randint(2, 9)
                value += b
                sentences.append(f"{friend} gives {name} {b} {item}s.")
                continue
            m = rng.choice(divisors)
            value //= m
            sentences.append(
                f"{name} splits all the {item}s equally into {m} bags and keeps only one bag, "
                "giving the other bags away."
            )
    sentences.append(f"How many {item}s does {name} have now?")
    prompt = " ".join(sentences) + f" {REASON} {ANSWER_HINT}"
    return prompt, str(value), "number"


def _algorithmic(rng: random.Random, difficulty: int) -> tuple[str, str, Checker]:
    prompt, answer, checker = _algorithmic_task(rng, difficulty)
    return (
        f"{prompt} {NO_CODE}"
        if "Answer: <list>" in prompt
        else prompt.replace(ANSWER_HINT, f"{NO_CODE} {ANSWER_HINT}"),
        answer,
        checker,
    )


def _algorithmic_task(rng: random.Random, difficulty: int) -> tuple[str, str, Checker]:
    letters = "abcdefghij"[: 3 + difficulty]
    kind = rng.randrange(6)
    if kind == 0:
        word = "".join(rng.choice(letters) for _ in range(4 + 2 * difficulty))
        return f'Reverse the string "{word}". {ANSWER_HINT}', word[::-1], "exact"
    if kind == 1:
        word = "".join(rng.choice(letters) for _ in range(6 + 3 * difficulty))
        ch = rng.choice(word)
        prompt = f'How many times does the letter "{ch}" appear in "{word}"? {ANSWER_HINT}'
        return prompt, str(word.count(ch)), "number"
    if kind == 2:
        xs = [rng.randint(1, 20 * difficulty) for _ in range(4 + 2 * difficulty)]
        prompt = f"What is the sum of the even numbers in the list {xs}? {ANSWER_HINT}"
        return prompt, str(sum(x for x in xs if x % 2 == 0)), "number"
    if kind == 3:
        xs = rng.sample(range(1, 50 * difficulty + 10), 4 + 2 * difficulty)
        prompt = f"What is the second largest number in the list {xs}? {ANSWER_HINT}"
        return prompt, str(sorted(xs)[-2]), "number"
    if kind == 4:
        xs = [rng.randint(1, 3 + 2 * difficulty) for _ in range(5 + 2 * difficulty)]
        seen: list[int] = []
        for x in xs:
            if x not in seen:
                seen.append(x)
        prompt = (
            f"Remove the duplicates from the list {xs}, keeping the first occurrence of each number "
            "in its original order. Give the resulting list on the last line, comma-separated, "
            "as 'Answer: <list>'."
        )
        return prompt, ", ".join(map(str, seen)), "list"
    word = "".join(rng.choice(letters[:3]) for _ in range(6 + 3 * difficulty))
    longest = max(len(run) for run in _runs(word))
    prompt = (
        f'What is the length of the longest run of the same letter repeated consecutively in "{word}"? '
        f"{ANSWER_HINT}"
    )
    return prompt, str(longest), "number"


def _runs(s: str) -> list[str]:
    runs: list[str] = []
    for ch in s:
        if runs and runs[-1][0] == ch:
            runs[-1] += ch
        else:
            runs.append(ch)
    return runs


# Python tasks: (entry point, signature, description, reference, argument generator)
def _py_specs(rng: random.Random, difficulty: int) -> list[tuple[str, str, str, Callable, list[tuple]]]:
    a, b = rng.sample([3, 4, 5, 6, 7], 2)
    base = rng.choice([2, 3, 5, 7])
    k = rng.randint(1, 4)
    chars = "".join(sorted(rng.sample("aeioustrn", 3)))
    edge_cases = difficulty >= 3
    lists = [[rng.randint(-9, 30) for _ in range(rng.randint(3, 8))] for _ in range(3)]
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(3, 9))) for _ in range(3)]
    texts = ["".join(rng.choice("aeioustrnxyz ") for _ in range(rng.randint(5, 15))) for _ in range(3)]

    def nth_prime(n: int) -> int:
        found, x = 0, 1
        while found < n:
            x += 1
            if all(x % d for d in range(2, int(x**0.5) + 1)):
                found += 1
        return x

    def collatz(n: int) -> int:
        steps = 0
        while n != 1:
            n = n // 2 if n % 2 == 0 else 3 * n + 1
            steps += 1
        return steps

    def digit_sum(n: int) -> int:
        s = 0
        while n:
            s, n = s + n % base, n // base
        return s

    def balanced(s: str) -> bool:
        stack: list[str] = []
        pairs = {")": "(", "]": "[", "}": "{"}
        for ch in s:
            if ch in "([{":
                stack.append(ch)
            elif ch in pairs:
                if not stack or stack.pop() != pairs[ch]:
                    return False
        return not stack

    brackets = ["([]{})", "(]", "((a)[b]{c})", "({)}", "((("] + (["", "x)"] if edge_cases else [])
    return [
        (
            "sum_multiples",
            "sum_multiples(n: int) -> int",
            f"returns the sum of all positive integers below n that are multiples of {a} or {b}",
            lambda n: sum(x for x in range(1, n) if x % a == 0 or x % b == 0),
            [(10,), (rng.randint(20, 60),), (rng.randint(100, 300),)] + ([(1,), (0,)] if edge_cases else []),
        ),
        (
            "count_chars",
            "count_chars(s: str) -> int",
            f"returns how many characters of s are one of the letters {chars!r} (case-insensitive)",
            lambda s: sum(ch.lower() in chars for ch in s),
            [(t,) for t in texts] + ([("",), (texts[0].upper(),)] if edge_cases else []),
        ),
        (
            "rotate_left",
            "rotate_left(xs: list[int], k: int) -> list[int]",
            "returns a new list with the elements of xs rotated left by k positions (k may exceed len(xs))",
            lambda xs, k_: xs[k_ % len(xs) :] + xs[: k_ % len(xs)] if xs else [],
            [(xs, k) for xs in lists] + ([([], 3), (lists[0], len(lists[0]) + k)] if edge_cases else []),
        ),
        (
            "digit_sum",
            "digit_sum(n: int) -> int",
            f"returns the sum of the digits of the non-negative integer n written in base {base}",
            digit_sum,
            [(rng.randint(10, 999),) for _ in range(3)] + ([(0,), (base**4,)] if edge_cases else []),
        ),
        (
            "collatz_steps",
            "collatz_steps(n: int) -> int",
            "returns how many steps the Collatz process (n -> n/2 if n is even, else 3n+1) takes to reach 1",
            collatz,
            [(rng.randint(2, 60),) for _ in range(3)] + ([(1,), (27,)] if edge_cases else []),
        ),
        (
            "running_max",
            "running_max(xs: list[int]) -> list[int]",
            "returns the list whose i-th element is the maximum of xs[0..i]",
            lambda xs: [max(xs[: i + 1]) for i in range(len(xs))],
            [(xs,) for xs in lists] + ([([],), ([-3, -5, -1],)] if edge_cases else []),
        ),
        (
            "is_balanced",
            "is_balanced(s: str) -> bool",
            "returns True when the brackets (), [] and {} in s are balanced and properly nested "
            "(other characters are ignored)",
            balanced,
            [(s,) for s in brackets],
        ),
        (
            "nth_prime",
            "nth_prime(n: int) -> int",
            "returns the n-th prime number, counting from nth_prime(1) == 2",
            nth_prime,
            [(rng.randint(2, 10),), (rng.randint(11, 30),)] + ([(1,), (100,)] if edge_cases else []),
        ),
        (
            "run_length",
            "run_length(s: str) -> str",
            "returns the run-length encoding of s: each run of a repeated character becomes the character "
            'followed by the run\'s length, e.g. "aaab" -> "a3b1"',
            lambda s: "".join(f"{r[0]}{len(r)}" for r in _runs(s)),
            [(w,) for w in words] + ([("",), ("z",)] if edge_cases else []),
        ),
    ]


def _python(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    specs = _py_specs(rng, difficulty)
    name, signature, description, reference, cases = specs[rng.randrange(len(specs))]
    lines = ["def check(candidate):"]
    for args in cases:
        expected = reference(*[list(x) if isinstance(x, list) else x for x in args])
        shown = ", ".join(repr(x) for x in args)
        message = f"candidate({shown}) should be {expected!r}"
        lines.append(f"    assert candidate({shown}) == {expected!r}, {message!r}")
    prompt = (
        f"Write a Python function `{signature}` that {description}. "
        "Reply with only the function in one ```python code block: no explanation, no examples."
    )
    return prompt, "\n".join(lines) + "\n", name


SUITES: tuple[str, ...] = ("arithmetic", "sorting", "word_problems", "algorithmic", "python")
_MAKERS = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "word_problems": _word_problem,
    "algorithmic": _algorithmic,
}


def generate_suite(suite: str, n: int, *, seed: int = 0, difficulty: int = 2) -> list[Task]:
    """The first n tasks of a generated suite; the same (suite, seed, difficulty) gives the same tasks.

    Task i depends only on (suite, seed, difficulty, i): a larger n extends a smaller one.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; the generated suites are {', '.join(SUITES)}")
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty must be 1..5, got {difficulty}")
    tasks = []
    for i in range(n):
        rng = random.Random(f"{suite}/{seed}/{difficulty}/{i}")
        task_id = f"{suite}-d{difficulty}-s{seed}-{i:04d}"
        if suite == "python":
            prompt, test, entry = _python(rng, difficulty)
            tasks.append(Task(task_id, suite, prompt, "python", test=test, entry_point=entry))
        else:
            prompt, answer, checker = _MAKERS[suite](rng, difficulty)
            tasks.append(Task(task_id, suite, prompt, checker, answer=answer))
    return tasks


_TASK_ID = re.compile(r"^(?P<suite>[a-z_]+)-d(?P<difficulty>\d)-s(?P<seed>\d+)-(?P<index>\d{4})$")


def generated_task(task_id: str) -> Task:
    """The generated task a task id names (`arithmetic-d2-s1-0007`: suite, difficulty, seed, index).

    Raises:
        ValueError: not a generated task's id.
    """
    m = _TASK_ID.match(task_id)
    if m is None or m["suite"] not in SUITES:
        raise ValueError(f"{task_id!r} is not a generated task's id (suite-dD-sS-NNNN)")
    index = int(m["index"])
    task = generate_suite(m["suite"], index + 1, seed=int(m["seed"]), difficulty=int(m["difficulty"]))[index]
    assert task.task_id == task_id, (task.task_id, task_id)
    return task


# -- external suites -----------------------------------------------------------------------------


def load_jsonl(path: Path, *, suite: str | None = None, limit: int | None = None) -> list[Task]:
    """Tasks from a JSONL file of exact-answer or Python-completion records.

    Exact-answer records: {"task_id", "prompt", "answer", "checker": "exact" | "number"} (checker
    defaults to "exact"); the answer-format hint is appended to a prompt that does not ask for
    'Answer:' itself. Python-completion records (HumanEval's shape): {"task_id", "prompt", "test"
    defining check(candidate), "entry_point"}; the prompt (a signature and docstring) is shown to
    the model, and prepended to an answer that does not define the entry point itself.

    Args:
        path: the JSONL file (blank lines skipped).
        suite: the suite name in reports (default: the file's stem).
        limit: the first `limit` records only.

    Raises:
        ValueError: a record without the fields of either shape, naming the file and line.
    """
    name = suite or path.stem
    tasks: list[Task] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(tasks) >= limit:
                break
            where = f"{path}:{line_no}"
            try:
                rec: dict[str, Any] = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(rec, dict) or "prompt" not in rec or "task_id" not in rec:
                raise ValueError(f"{where}: a record needs 'task_id' and 'prompt'")
            task_id = f"{name}/{rec['task_id']}"
            if "test" in rec or "entry_point" in rec:
                if not rec.get("test") or not rec.get("entry_point"):
                    raise ValueError(f"{where}: a Python record needs 'test' and 'entry_point'")
                prompt = (
                    "Complete the following Python function. Reply with the complete function "
                    f"in a ```python code block.\n\n```python\n{rec['prompt'].rstrip()}\n```"
                )
                tasks.append(
                    Task(task_id, name, prompt, "python", test=rec["test"], entry_point=rec["entry_point"],
                         code_prefix=rec["prompt"])
                )  # fmt: skip
                continue
            if "answer" not in rec:
                raise ValueError(f"{where}: an exact-answer record needs 'answer'")
            checker = rec.get("checker", "exact")
            if checker not in ("exact", "number"):
                raise ValueError(f"{where}: checker must be 'exact' or 'number', got {checker!r}")
            prompt = rec["prompt"]
            if "answer:" not in prompt.lower():
                prompt = f"{prompt.rstrip()}\n\n{ANSWER_HINT}"
            tasks.append(Task(task_id, name, prompt, checker, answer=str(rec["answer"])))
    if not tasks:
        raise ValueError(f"{path}: no records")
    return tasks
