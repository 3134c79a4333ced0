"""Continuation labels for the edge router: which of Q's disagreements with P change the answer.

R2R (Fu et al., "R2R: Efficiently Navigating Divergent Reasoning Paths with Small-Large Model Token
Routing", arXiv 2505.21600) labels each position where the small model's token differs from the
large model's: the large model continues the text from the small model's token, and the position is
*divergent* when the outcome changes, *neutral* when it does not. Here the outcome is the task's own
checker. For each cloud-only generation whose answer P got right, at each argmax disagreement t (Q's
most likely token q_t is not P's token), P continues greedily from P's text up to t followed by q_t,
within the run's token budget; t is divergent when that answer no longer passes. Generations that P
got wrong are left out by default: there, routing to P keeps P's wrong answer whatever the label.
With `which="wrong"` (or "all") they are labelled the same way, and t is *rescuing* when the answer
from Q's token passes: a disagreement the override gate should decline, which labels on P-right
generations alone cannot show it.

The tasks and their checker come from the evaluation (edge/evaluation), passed in by the command
line. The continuations run on the cloud backend directly (one KV sequence per generation, truncated back
after each continuation; several generations share each forward call).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handoff.cloud.backend import Backend, ForwardItem, ForwardOutput
from handoff.edge.routing.data import Generation, GenerationLabels
from handoff.shared.errors import HandoffError

__all__ = ["LabelStats", "continuation_labels"]

logger = logging.getLogger(__name__)

# A task, as the evaluation defines it (edge/evaluation/tasks.py): the labeller only passes it on.
Task = Any


@dataclass
class LabelStats:
    """What the labeller did: generations labelled and skipped, continuations, checks of its set-up."""

    generations: int = 0
    skipped_wrong: int = 0  # P's answer was wrong: not labelled (which="right")
    skipped_right: int = 0  # P's answer was right: not labelled (which="wrong")
    recheck_mismatch: int = 0  # P's own text re-checked here disagreed with the trace's verdict
    continuations: int = 0
    divergent: int = 0  # on generations P got right: Q's token makes the answer fail
    rescuing: int = 0  # on generations P got wrong: Q's token makes the answer pass
    continuation_tokens: int = 0


# A step of one generation's walk: ("forward", tokens, n_out) -> ForwardOutput, or ("truncate", length).
_Step = tuple
_Walk = Generator[_Step, ForwardOutput | None, GenerationLabels]


def _walk(
    g: Generation,
    task: Task,
    stop_ids: frozenset[int],
    text_of: Callable[[Sequence[int]], str],
    max_tokens: int,
    passes: Callable[[Task, str], bool],
) -> _Walk:
    """One generation's continuations, as steps for the driver (which batches many generations)."""
    prompt, tokens = list(g.prompt_ids), [int(t) for t in g.tokens]
    where = np.flatnonzero(g.disagreements).tolist()
    fed = None  # P tokens after the prompt in the sequence's cache (None: nothing fed yet)
    divergent, lengths = [], []
    for t in where:
        q = int(g.q_topk_ids[t, 0])
        new = (prompt if fed is None else []) + tokens[(fed or 0) : t] + [q]
        out = yield ("forward", new, 1)
        cont: list[int] = []
        while len(cont) < max_tokens - t - 1:  # the run's budget: t + 1 tokens are already written
            assert out is not None
            nxt = int(out.topk_ids[0, 0])  # greedy: P's most likely token
            cont.append(nxt)
            if nxt in stop_ids or len(cont) == max_tokens - t - 1:
                break
            out = yield ("forward", [nxt], 1)
        ok = passes(task, text_of([*tokens[:t], q, *cont]))
        divergent.append(ok != bool(g.correct))  # the verdict on P's answer changes
        lengths.append(len(cont))
        yield ("truncate", len(prompt) + t)
        fed = t
    return GenerationLabels(
        g.task_id, g.digest, tuple(where), tuple(divergent), tuple(lengths), bool(g.correct)
    )


def continuation_labels(
    backend: Backend,
    generations: Sequence[Generation],
    *,
    stop_ids: Sequence[int],
    detokenize: Callable[[Sequence[int]], bytes],
    max_tokens: int,
    task_of: Callable[[str], Task],
    passes: Callable[[Task, str], bool],
    concurrency: int = 4,
    progress: Callable[[int], None] | None = None,
    which: str = "right",
) -> tuple[list[GenerationLabels], LabelStats]:
    """Continuation labels of the generations P answered correctly (and, by `which`, wrongly).

    Args:
        backend: P's backend (greedy continuations; sequences are created and released here).
        generations: cloud-only generations (routing.data.read_generations).
        stop_ids: P's end-of-generation ids (they end a continuation and are not part of the answer).
        detokenize: token ids -> bytes (P's tokenizer).
        max_tokens: the runs' token budget per generation (continuations stop where P's would have).
        concurrency: generations walked side by side (their tokens share forward calls).
        task_of: task id -> the task (evaluation.tasks.generated_task: routing does not import the
            evaluation, a leaf of its own; the command line passes it in).
        passes: (task, answer text) -> whether it passes (evaluation.checkers.passes).
        progress: called with 1 per generation finished or skipped.
        which: "right" (the generations P answered correctly), "wrong" (those it answered wrongly:
            GenerationLabels.p_correct False, divergent = rescuing) or "all".

    Returns:
        (labels, one per labelled generation in input order; stats).
    """
    if which not in ("right", "wrong", "all"):
        raise ValueError(f"which: expected right, wrong or all, got {which!r}")
    stops = frozenset(map(int, stop_ids))
    stats = LabelStats()

    def text_of(ids: Sequence[int]) -> str:
        return detokenize([t for t in ids if t not in stops]).decode("utf-8", errors="replace")

    todo: list[tuple[int, Generation, Task]] = []
    for i, g in enumerate(generations):
        task = task_of(g.task_id)
        if g.correct is None:
            raise HandoffError(f"{g.source}: the trace does not say whether P's answer was right")
        if passes(task, text_of(g.tokens.tolist())) != g.correct:
            stats.recheck_mismatch += 1
            logger.warning("%s: re-checking P's text disagrees with the trace's verdict", g.task_id)
        if which == ("wrong" if g.correct else "right"):
            if g.correct:
                stats.skipped_right += 1
            else:
                stats.skipped_wrong += 1
            if progress:
                progress(1)
            continue
        todo.append((i, g, task))
    results: dict[int, GenerationLabels] = {}
    active: list[tuple[int, object, _Walk, _Step]] = []  # (index, sequence, walk, its pending step)

    def start(i: int, g: Generation, task: Task) -> None:
        walk = _walk(g, task, stops, text_of, max_tokens, passes)
        seq = backend.new_sequence()
        advance(i, seq, walk, None)

    def advance(i: int, seq: object, walk: _Walk, sent: ForwardOutput | None) -> None:
        try:
            step = walk.send(sent) if sent is not None else next(walk)
            while step[0] == "truncate":
                backend.truncate(seq, step[1])
                step = next(walk)
        except StopIteration as done:
            backend.release(seq)
            results[i] = done.value
            if progress:
                progress(1)
            return
        active.append((i, seq, walk, step))

    queue = list(todo)
    batch: list[tuple[int, object, _Walk, _Step]] = []
    try:
        while queue or active:
            while queue and len(active) < concurrency:
                start(*queue.pop(0))
            batch, active[:] = list(active), []
            items = [ForwardItem(seq, list(step[1]), step[2], k=1) for _, seq, _, step in batch]
            outputs = backend.forward(items)
            for (i, seq, walk, _), output in zip(batch, outputs, strict=True):
                advance(i, seq, walk, output)
            batch = []
    finally:  # a failure half way leaves no sequence behind (release is a no-op on released ones)
        for _, seq, _, _ in [*batch, *active]:
            backend.release(seq)
    labels = [results[i] for i, _, _ in todo]
    stats.generations = len(labels)
    stats.continuations = sum(len(lab.positions) for lab in labels)
    stats.divergent = sum(sum(lab.divergent) for lab in labels if lab.p_correct)
    stats.rescuing = sum(sum(lab.divergent) for lab in labels if not lab.p_correct)
    stats.continuation_tokens = sum(sum(lab.continuation_tokens) for lab in labels)
    return labels, stats
