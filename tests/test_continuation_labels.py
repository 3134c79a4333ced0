"""Continuation labels (`handoff router label`): P continues from Q's token at each disagreement.

A tiny llama.cpp model is P. Generations are P's own greedy text with Q's top-1 planted away from
P's token at chosen positions; the labeller (one KV sequence per generation, truncated back after
each continuation, several generations per forward call) must give exactly the labels of a brute
force that starts a fresh sequence for every continuation. The "checker" is a property of the text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from handoff.cloud.backend import ForwardItem
from handoff.edge.evaluation.tasks import Task, generated_task
from handoff.edge.routing.continuations import continuation_labels
from handoff.edge.routing.data import (
    Generation,
    GenerationLabels,
    read_generations,
    read_labels,
    to_data,
    with_labels,
    write_labels,
)
from handoff.shared.errors import ShapeError
from handoff.shared.models import ModelRef

MAX_TOKENS = 24
STOP = 0  # a token id the tiny model may write: it ends a continuation and is not part of the text


def _task(task_id: str) -> Task:
    return Task(task_id, "arithmetic", "unused", "exact", answer="unused")


def _text(ids) -> str:
    return " ".join(str(int(t)) for t in ids if int(t) != STOP)


def _passes(task: Task, text: str) -> bool:
    # A property of the whole answer that single tokens can flip either way.
    return sum(map(int, text.split())) % 3 != 0 if text else True


def _greedy(backend, prefix: list[int], n: int) -> list[int]:
    """P's greedy continuation of prefix in a fresh sequence, one token per call, up to n or STOP."""
    seq = backend.new_sequence()
    try:
        out = backend.forward([ForwardItem(seq, list(prefix), 1, k=1)])[0]
        cont: list[int] = []
        while len(cont) < n:
            cont.append(int(out.topk_ids[0, 0]))
            if cont[-1] == STOP or len(cont) == n:
                break
            out = backend.forward([ForwardItem(seq, [cont[-1]], 1, k=1)])[0]
        return cont
    finally:
        backend.release(seq)


@pytest.fixture(scope="module")
def backend(tiny_gguf_a: Path):
    from handoff.cloud.backends.llama_backend import LlamaCppBackend

    b = LlamaCppBackend(ModelRef("gguf", tiny_gguf_a, tiny_gguf_a.name), max_sequences=4, max_context=256)
    yield b
    b.close()


def _generations(backend) -> list[Generation]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(6):
        prompt = rng.integers(10, 900, size=int(rng.integers(3, 12))).tolist()
        tokens = _greedy(backend, prompt, MAX_TOKENS)
        n = len(tokens)
        q_ids = np.stack([tokens, np.full(n, 7), np.full(n, 8)], axis=1).astype(np.int64)
        for t in rng.choice(n, size=min(n, 4), replace=False):
            q_ids[t, 0] = (tokens[t] + 1 + int(rng.integers(0, 50))) % 1000 or 1
        lp = np.tile([-0.1, -2.5, -3.0], (n, 1))
        g = Generation(
            f"tiny-{i}", "arithmetic", None, tuple(prompt), np.asarray(tokens, dtype=np.int64), q_ids, lp,
            np.full(n, 0.4), "test", MAX_TOKENS,
        )  # fmt: skip
        out.append(Generation(**{**g.__dict__, "correct": _passes(_task(g.task_id), _text(tokens))}))
    return out


def test_labels_equal_a_fresh_continuation_at_every_disagreement(backend) -> None:
    gens = _generations(backend)
    labels, stats = continuation_labels(
        backend, gens, stop_ids=[STOP], detokenize=lambda ids: _text(ids).encode(), max_tokens=MAX_TOKENS,
        concurrency=3, task_of=_task, passes=_passes,
    )  # fmt: skip
    right = [g for g in gens if g.correct]
    assert 0 < len(right) < len(gens), "the planted checker should pass some generations and fail others"
    assert stats.generations == len(right) and stats.skipped_wrong == len(gens) - len(right)
    assert stats.recheck_mismatch == 0
    assert [lab.task_id for lab in labels] == [g.task_id for g in right]
    seen = set()
    for g, lab in zip(right, labels, strict=True):
        where = np.flatnonzero(g.disagreements).tolist()
        assert list(lab.positions) == where and lab.digest == g.digest
        for t, div, n in zip(where, lab.divergent, lab.continuation_tokens, strict=True):
            q = int(g.q_topk_ids[t, 0])
            cont = _greedy(backend, [*g.prompt_ids, *g.tokens[:t].tolist(), q], MAX_TOKENS - t - 1)
            assert n == len(cont) <= MAX_TOKENS - t - 1
            assert div == (not _passes(_task(g.task_id), _text([*g.tokens[:t], q, *cont])))
            seen.add(div)
    assert seen == {True, False}, "the planted checker should give both labels"
    assert backend.active_sequences == 0


def test_label_file_round_trips_and_attaches_only_to_its_generation(backend, tmp_path: Path) -> None:
    gens = _generations(backend)
    labels, _ = continuation_labels(
        backend, gens, stop_ids=[STOP], detokenize=lambda ids: _text(ids).encode(), max_tokens=MAX_TOKENS,
        task_of=_task, passes=_passes,
    )  # fmt: skip
    path = tmp_path / "labels.jsonl"
    write_labels(path, labels, {"stats": "x"})
    back = read_labels([path])
    assert set(back) == {(lab.task_id, lab.digest) for lab in labels} and list(back.values()) == labels
    attached = with_labels(gens, back)
    assert [g.task_id for g in attached] == [g.task_id for g in gens if g.correct]
    for g in attached:
        assert g.divergent is not None and not (g.divergent & ~g.disagreements).any()
        assert np.array_equal(g.labels, g.divergent)
    classes = np.zeros(1000, dtype=np.int64)
    data = to_data(attached, classes)
    assert np.array_equal(data.labels, np.concatenate([g.divergent for g in attached]))
    assert np.array_equal(data.disagreements, np.concatenate([g.disagreements for g in attached]))
    # Labels of another generation (other positions) are refused, not misapplied.
    g0 = next(g for g in attached if g.disagreements.any())
    lab = back[g0.task_id, g0.digest]
    moved = {(g0.task_id, g0.digest): type(lab)(lab.task_id, lab.digest, tuple(p + 1 for p in lab.positions),
                                  lab.divergent, lab.continuation_tokens)}  # fmt: skip
    with pytest.raises(ShapeError, match="not at its disagreements"):
        with_labels([g0], moved)


def test_wrong_generations_are_labelled_rescuing_where_qs_token_passes(backend, tmp_path: Path) -> None:
    """which="wrong": a P-wrong generation's disagreement is rescuing when P, continuing from Q's token,
    passes; attached, its labels stay False (never override there) and the rescuing ones are kept apart."""
    gens = _generations(backend)
    kw = dict(stop_ids=[STOP], detokenize=lambda ids: _text(ids).encode(), max_tokens=MAX_TOKENS,
              concurrency=2, task_of=_task, passes=_passes)  # fmt: skip
    labels, stats = continuation_labels(backend, gens, which="wrong", **kw)
    wrong = [g for g in gens if not g.correct]
    assert stats.generations == len(wrong) and stats.skipped_right == len(gens) - len(wrong)
    assert stats.skipped_wrong == 0 and stats.divergent == 0
    assert all(not lab.p_correct for lab in labels)
    seen = set()
    for g, lab in zip(wrong, labels, strict=True):
        for t, rescuing in zip(lab.positions, lab.divergent, strict=True):
            q = int(g.q_topk_ids[t, 0])
            cont = _greedy(backend, [*g.prompt_ids, *g.tokens[:t].tolist(), q], MAX_TOKENS - t - 1)
            assert rescuing == _passes(_task(g.task_id), _text([*g.tokens[:t], q, *cont]))
            seen.add(rescuing)
    assert stats.rescuing == sum(sum(lab.divergent) for lab in labels)
    assert seen == {True, False}, "the planted checker should give both labels"
    both, all_stats = continuation_labels(backend, gens, which="all", **kw)
    assert [lab.task_id for lab in both] == [g.task_id for g in gens]
    assert all_stats.rescuing == stats.rescuing and all_stats.skipped_wrong == all_stats.skipped_right == 0
    path = tmp_path / "all.jsonl"
    write_labels(path, both, {})
    back = read_labels([path])
    assert list(back.values()) == both  # p_correct round-trips
    attached = {g.task_id: g for g in with_labels(gens, back)}
    for g in wrong:
        a, lab = attached[g.task_id], back[g.task_id, g.digest]
        assert not a.labels.any() and a.rescuing is not None
        assert np.flatnonzero(a.rescuing).tolist() == [
            t for t, r in zip(lab.positions, lab.divergent, strict=True) if r
        ]
    # Labels made with the other verdict on P's answer are refused, not read the other way round.
    g0 = wrong[0]
    lab0 = back[g0.task_id, g0.digest]
    flipped = {(g0.task_id, g0.digest): type(lab0)(**{**lab0.__dict__, "p_correct": True})}
    with pytest.raises(ShapeError, match="disagree with the trace"):
        with_labels([g0], flipped)
    with pytest.raises(ValueError, match="right, wrong or all"):
        continuation_labels(backend, gens, which="both", **kw)
    assert backend.active_sequences == 0


def test_tasks_sharing_a_text_keep_their_own_labels(tmp_path: Path) -> None:
    """Two tasks with one prompt (the Python suite's, other unit tests) share P's text and its digest:
    each gets its own labels, and P's verdict on one is never read as the other's."""
    tokens = np.asarray([3, 4, 5], dtype=np.int64)
    q_ids = np.asarray([[3, 1], [9, 1], [5, 1]], dtype=np.int64)
    lp = np.log(np.tile([0.7, 0.3], (3, 1)))
    common = dict(suite="python", prompt_ids=(1, 2), tokens=tokens, q_topk_ids=q_ids, q_topk_logprobs=lp,
                  q_entropy=np.full(3, 0.6), source="hand-made", max_tokens=3)  # fmt: skip
    right = Generation(task_id="python-a", correct=True, **common)
    wrong = Generation(task_id="python-b", correct=False, **common)
    assert right.digest == wrong.digest
    path = tmp_path / "labels.jsonl"
    write_labels(path, [
        GenerationLabels("python-a", right.digest, (1,), (True,), (2,)),
        GenerationLabels("python-b", wrong.digest, (1,), (True,), (2,), p_correct=False),
    ], {})  # fmt: skip
    a, b = with_labels([right, wrong], read_labels([path]))
    assert a.labels.tolist() == [False, True, False] and a.rescuing is None
    assert not b.labels.any() and b.rescuing.tolist() == [False, True, False]


def test_label_files_from_before_p_wrong_labels_read_as_p_right(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    rec = {"record": "generation", "task_id": "t", "digest": "d", "positions": [1], "divergent": [True],
           "continuation_tokens": [3]}  # fmt: skip
    path.write_text(json.dumps({"record": "labels"}) + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    assert read_labels([path])["t", "d"].p_correct is True


def test_generated_task_ids_name_their_task() -> None:
    task = generated_task("sorting-d1-s0-0003")
    assert task.task_id == "sorting-d1-s0-0003" and task.suite == "sorting"
    with pytest.raises(ValueError, match="not a generated task"):
        generated_task("humaneval/12")
    with pytest.raises(ValueError, match="not a generated task"):
        generated_task("nosuchsuite-d2-s0-0001")


@pytest.mark.real_models
@pytest.mark.slow
def test_cli_labels_a_trace_file(run_handoff, tmp_path: Path) -> None:
    """`handoff router label` on a real cloud-only trace of the default pair: one generation."""
    src = Path(__file__).parent.parent / "docs/router/train/large.jsonl.gz"
    gens = read_generations([src])
    pick = next(g for g in gens if g.correct and g.suite == "arithmetic" and 0 < g.disagreements.sum() <= 3)
    import gzip

    lines, keep = [], False
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["record"] == "generation":
                keep = rec["task_id"] == pick.task_id
            if keep:
                lines.append(line)
    trace = tmp_path / "one.jsonl"
    trace.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    done = run_handoff("router", "label", str(trace), "--out", str(out), "--concurrency", "2", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    back = read_labels([out])
    assert list(back) == [(pick.task_id, pick.digest)]
    lab = back[pick.task_id, pick.digest]
    assert list(lab.positions) == np.flatnonzero(pick.disagreements).tolist()
    header = json.loads(out.read_text().splitlines()[0])
    assert header["stats"]["generations"] == 1 and header["stats"]["recheck_mismatch"] == 0
