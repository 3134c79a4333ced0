"""The router's training data: full traces of cloud-only runs, turned into feature rows and labels.

A cloud-only run (`handoff eval`'s "large" run, or `handoff generate --cloud-only --trace`) has P
write every token while Q scores each position on the way (its top-k view of P's prefix), so its
trace holds, at every position t of P's text, what the edge would know there. The label is the
argmax disagreement: Q's most likely token at t is not P's (greedy) token — exactly the positions the
correction policy replaces. Along P's own text, a router that flags every such position makes the
gated correction policy write P's text token for token.

Continuation labels (`handoff router label`, edge/routing/continuations.py) refine that: of the
disagreements, only those where Q's token, continued by P, changes whether the answer passes the
task's checker are labelled positive ("divergent", R2R's labels); `with_labels` attaches them.
Generations P got wrong can be labelled too: there a disagreement is *rescuing* when Q's token,
continued by P, makes the answer pass. Overriding Q there keeps P's wrong answer, so none of a P-wrong
generation's disagreements is a position to override (labels all False) and the rescuing ones are
kept apart (`Generation.rescuing`) for the answer counts (report.corrected_stats).

Q's hidden states are not in traces (they would be large): extract() recomputes them with one
batched pass of Q over each generation (EdgeRunner.score_sequence).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from handoff.edge.policy.features import SCALAR_FEATURES, scalar_features
from handoff.shared.errors import ShapeError

__all__ = [
    "Generation",
    "GenerationLabels",
    "RouterData",
    "generation_digest",
    "held_out_prompts",
    "override_rows",
    "p_wrong_rows",
    "read_generations",
    "read_labels",
    "split_by_prompt",
    "to_data",
    "with_labels",
    "write_labels",
    "wrong_rows",
]


@dataclass(frozen=True)
class Generation:
    """One cloud-only generation's positions: P's tokens and Q's view of each.

    Arrays are [n] or [n, k] over the generated positions, in order.
    """

    task_id: str
    suite: str
    correct: bool | None
    prompt_ids: tuple[int, ...]
    tokens: np.ndarray  # int64 [n], P's tokens
    q_topk_ids: np.ndarray  # int64 [n, k]
    q_topk_logprobs: np.ndarray  # float64 [n, k]
    q_entropy: np.ndarray  # float64 [n]
    source: str  # file, for messages
    max_tokens: int | None = None  # the run's token budget per generation
    divergent: np.ndarray | None = None  # bool [n]: continuation labels, when attached (with_labels)
    p_topk_ids: np.ndarray | None = None  # int64 [n, kp], P's top-k at each position (None: not traced)
    p_topk_logprobs: np.ndarray | None = None  # float64 [n, kp]
    rescuing: np.ndarray | None = None  # bool [n]: on a P-wrong generation, Q's token there passes

    @property
    def disagreements(self) -> np.ndarray:
        """[n] bool: Q's most likely token is not P's token (an argmax disagreement)."""
        return self.q_topk_ids[:, 0] != self.tokens

    @property
    def labels(self) -> np.ndarray:
        """[n] bool, what the router learns: the continuation labels when attached, else the argmax
        disagreements."""
        return self.disagreements if self.divergent is None else self.divergent

    @property
    def digest(self) -> str:
        return generation_digest(self.prompt_ids, self.tokens)


def generation_digest(prompt_ids: Sequence[int], tokens: Sequence[int] | np.ndarray) -> str:
    """A short hash of a generation's prompt and P's tokens: continuation labels belong to it only."""
    data = json.dumps([list(map(int, prompt_ids)), [int(t) for t in tokens]]).encode()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class GenerationLabels:
    """Continuation labels of one cloud-only generation.

    positions: [d] the argmax disagreements (indices into the generation's tokens); divergent: [d]
    whether P, continuing after Q's token there, changes the checker's verdict on P's answer (on a
    generation P got right: no longer passes; on one P got wrong, p_correct False: now passes, a
    *rescuing* disagreement); continuation_tokens: [d] tokens P wrote after Q's token.
    """

    task_id: str
    digest: str
    positions: tuple[int, ...]
    divergent: tuple[bool, ...]
    continuation_tokens: tuple[int, ...]
    p_correct: bool = True

    def __post_init__(self) -> None:
        if not len(self.positions) == len(self.divergent) == len(self.continuation_tokens):
            raise ShapeError(f"{self.task_id}: positions, divergent and continuation_tokens differ in length")


def write_labels(path: Path, labels: Iterable[GenerationLabels], meta: dict[str, Any]) -> None:
    """JSONL: a "labels" header (meta), then one record per generation."""
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"record": "labels"} | meta) + "\n")
        for g in labels:
            f.write(json.dumps({"record": "generation"} | asdict(g)) + "\n")


def read_labels(paths: Iterable[Path | str]) -> dict[tuple[str, str], GenerationLabels]:
    """Continuation labels by (task id, generation digest), from files write_labels wrote.

    The task id is part of the key: tasks that share a prompt (the Python suite's, with different
    unit tests) share P's greedy text, and so its digest, but not the checker's verdicts.
    """
    out: dict[tuple[str, str], GenerationLabels] = {}
    for path in map(Path, paths):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                rec = json.loads(line) if line.strip() else {}
                if rec.get("record") != "generation":
                    continue
                try:
                    g = GenerationLabels(
                        str(rec["task_id"]), str(rec["digest"]), tuple(map(int, rec["positions"])),
                        tuple(map(bool, rec["divergent"])), tuple(map(int, rec["continuation_tokens"])),
                        bool(rec.get("p_correct", True)),  # files from before P-wrong labels: P right
                    )  # fmt: skip
                except (KeyError, TypeError, ValueError) as e:
                    raise ShapeError(f"{path}:{line_no}: not a continuation-label record ({e})") from None
                out[g.task_id, g.digest] = g
    return out


def with_labels(
    generations: Sequence[Generation], labels: dict[tuple[str, str], GenerationLabels]
) -> list[Generation]:
    """The generations that have continuation labels, with them attached (the others are left out:
    by default the labeller skips generations whose answer P got wrong).

    A P-right generation's labels become `divergent`; a P-wrong one's become `rescuing`, and its
    `divergent` is all False (overriding there never brings the answer back).

    Raises:
        ShapeError: labels whose positions are not the generation's disagreements, or whose verdict
            on P's answer is not the trace's.
    """
    out = []
    for g in generations:
        lab = labels.get((g.task_id, g.digest))
        if lab is None:
            continue
        where = np.flatnonzero(g.disagreements)
        if tuple(where.tolist()) != lab.positions:
            raise ShapeError(f"{g.source}: the labels of {lab.task_id} are not at its disagreements")
        if g.correct is not None and bool(g.correct) != lab.p_correct:
            raise ShapeError(f"{g.source}: the labels of {lab.task_id} disagree with the trace on P's answer")
        marked = np.zeros(len(g.tokens), dtype=bool)
        marked[where] = lab.divergent
        if lab.p_correct:
            out.append(replace(g, divergent=marked))
        else:
            out.append(replace(g, divergent=np.zeros(len(g.tokens), dtype=bool), rescuing=marked))
    return out


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_generations(paths: Iterable[Path | str]) -> list[Generation]:
    """The cloud-only generations in trace files (JSONL or .jsonl.gz; other modes are skipped).

    Raises:
        ShapeError: a cloud-only generation without Q's view at some position (not a full trace).
    """
    out: list[Generation] = []
    for path in map(Path, paths):
        header: dict[str, Any] | None = None
        records: list[dict[str, Any]] = []
        with _open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                kind = rec.get("record")
                if kind == "generation":
                    header, records = rec, []
                elif kind == "token":
                    records.append(rec)
                elif kind == "summary" and header is not None:
                    if rec.get("mode") == "cloud" and records:
                        out.append(_generation(header, records, f"{path}:{line_no}"))
                    header = None
    return out


def _generation(header: dict[str, Any], records: list[dict[str, Any]], where: str) -> Generation:
    if any(not r.get("q_topk_ids") for r in records):
        raise ShapeError(f"{where}: a position lacks Q's view; the router needs full cloud-only traces")
    k = min(len(r["q_topk_ids"]) for r in records)
    kp = min(len(r.get("p_topk_ids") or ()) for r in records)
    return Generation(
        task_id=str(header.get("task_id", where)),
        suite=str(header.get("suite", "")),
        correct=header.get("correct"),
        prompt_ids=tuple(header["prompt_ids"]),
        tokens=np.asarray([r["token_id"] for r in records], dtype=np.int64),
        q_topk_ids=np.asarray([r["q_topk_ids"][:k] for r in records], dtype=np.int64),
        q_topk_logprobs=np.asarray([r["q_topk_logprobs"][:k] for r in records], dtype=np.float64),
        q_entropy=np.asarray([r["q_entropy"] for r in records], dtype=np.float64),
        source=where,
        max_tokens=header.get("max_tokens"),
        p_topk_ids=np.asarray([r["p_topk_ids"][:kp] for r in records], dtype=np.int64) if kp else None,
        p_topk_logprobs=(
            np.asarray([r["p_topk_logprobs"][:kp] for r in records], dtype=np.float64) if kp else None
        ),
    )


@dataclass(frozen=True)
class RouterData:
    """Feature rows and labels of many generations, with which generation each row came from.

    scalars: [N, len(SCALAR_FEATURES)]; hidden: [N, d] or None; labels: [N] bool, what the router
    learns (Generation.labels); group: [N] int, the index of the row's generation in `generations`;
    disagreements: [N] bool argmax disagreements (each flagged one is an override token).
    """

    generations: tuple[Generation, ...]
    scalars: np.ndarray
    hidden: np.ndarray | None
    labels: np.ndarray
    group: np.ndarray
    disagreements: np.ndarray

    def subset(self, keep: np.ndarray) -> RouterData:
        """The rows of the generations where keep [len(generations)] is True (renumbered)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self.generations),):
            raise ShapeError(f"keep: expected [{len(self.generations)}], got {keep.shape}")
        rows = keep[self.group]
        renumber = np.cumsum(keep) - 1
        return RouterData(
            tuple(g for g, k in zip(self.generations, keep, strict=True) if k),
            self.scalars[rows],
            None if self.hidden is None else self.hidden[rows],
            self.labels[rows],
            renumber[self.group[rows]],
            self.disagreements[rows],
        )


def generation_scalars(g: Generation, classes: np.ndarray) -> np.ndarray:
    """[n, len(SCALAR_FEATURES)]: the router's scalar features along one generation."""
    n = len(g.tokens)
    prev_entropy = np.concatenate([[0.0], g.q_entropy[:-1]])
    prev_top1 = np.concatenate([[0.0], g.q_topk_logprobs[:-1, 0]])
    return scalar_features(
        g.q_topk_logprobs, g.q_entropy, classes[g.q_topk_ids[:, 0]], np.arange(n), prev_entropy, prev_top1
    )


def to_data(
    generations: Sequence[Generation], classes: np.ndarray, hidden: Sequence[np.ndarray] | None = None
) -> RouterData:
    """Feature rows and labels of every position of the generations.

    Args:
        generations: the cloud-only generations.
        classes: [V] token classes (features.token_classes of the pair's vocabulary).
        hidden: per generation, [n_i, d] Q's hidden states at its positions; None: no hidden features.
    """
    if hidden is not None and len(hidden) != len(generations):
        raise ShapeError(f"hidden: expected {len(generations)} arrays, got {len(hidden)}")
    scalars, labels, groups, hid, dis = [], [], [], [], []
    for i, g in enumerate(generations):
        scalars.append(generation_scalars(g, classes))
        labels.append(g.labels)
        dis.append(g.disagreements)
        groups.append(np.full(len(g.tokens), i))
        if hidden is not None:
            h = np.asarray(hidden[i], dtype=np.float32)
            if h.shape[0] != len(g.tokens):
                raise ShapeError(
                    f"{g.source}: hidden states for {h.shape[0]} positions, {len(g.tokens)} tokens"
                )
            hid.append(h)
    width = len(SCALAR_FEATURES)
    return RouterData(
        tuple(generations),
        np.concatenate(scalars) if scalars else np.zeros((0, width)),
        np.concatenate(hid) if hid else None,
        np.concatenate(labels) if labels else np.zeros(0, dtype=bool),
        np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64),
        np.concatenate(dis) if dis else np.zeros(0, dtype=bool),
    )


def override_rows(
    generations: Sequence[Generation], classes: np.ndarray, surface: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The override gate's rows: every argmax disagreement of the labelled generations.

    At a disagreement t along P's text, the check would have answered with P's top-k there while Q's
    token was its own top-1; the label is the continuation label (Q's token changes the answer), or
    True without continuation labels.

    Args:
        generations: with P's top-k traced (continuation labels attached: with_labels).
        classes: [V] token classes; surface: [V] surface-form ids (policy/override.py).

    Returns:
        rows [N, len(OVERRIDE_FEATURES)], labels [N] bool (divergent), group [N] generation index;
        the rows are in the order of the generations' disagreements (RouterData.disagreements).
    """
    from handoff.edge.policy.override import OVERRIDE_FEATURES, override_features

    rows, labels, group = [], [], []
    for i, g in enumerate(generations):
        if g.p_topk_ids is None or g.p_topk_logprobs is None:
            raise ShapeError(
                f"{g.source}: the override gate needs P's top-k at every position (a full trace)"
            )
        at = np.flatnonzero(g.disagreements)  # [d]
        rows.append(
            override_features(
                g.q_topk_ids[at, 0],
                g.q_topk_ids[at],
                g.q_topk_logprobs[at],
                g.q_entropy[at],
                g.p_topk_ids[at],
                g.p_topk_logprobs[at],
                at,
                classes,
                surface,
            )
        )
        labels.append(g.labels[at])
        group.append(np.full(len(at), i))
    if not rows:
        return np.zeros((0, len(OVERRIDE_FEATURES))), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(labels).astype(bool), np.concatenate(group)


def gate_rows(
    data: RouterData,
    classes: np.ndarray,
    surface: np.ndarray,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """override_rows of data's generations, then, with `project`, Q's projected hidden state there.

    Args:
        data: rows with Q's hidden states (to_data's hidden) when `project` is given.
        classes, surface: [V] token classes and surface-form ids.
        project: [N, d] hidden states -> [N, r] the gate's hidden-state columns; None: none.

    Returns:
        rows [N, len(OVERRIDE_FEATURES) + r], labels [N] bool, group [N], as override_rows.
    """
    rows, labels, group = override_rows(data.generations, classes, surface)
    if project is None:
        return rows, labels, group
    if data.hidden is None:
        raise ShapeError("this override gate reads Q's hidden state: extract it with the traces")
    hidden = data.hidden[data.disagreements]  # [N, d], the order of override_rows
    return np.concatenate([rows, project(hidden)], axis=1), labels, group


def wrong_rows(data: RouterData) -> tuple[np.ndarray, np.ndarray]:
    """Of gate_rows' rows (data's argmax disagreements, in order): which come from labelled P-wrong
    generations, and which of those are rescuing.

    Returns:
        wrong [D] bool, rescuing [D] bool, D = data.disagreements.sum().
    """
    wrong, rescuing = [], []
    for g in data.generations:
        d = int(g.disagreements.sum())
        wrong.append(np.full(d, g.rescuing is not None))
        rescuing.append(g.rescuing[g.disagreements] if g.rescuing is not None else np.zeros(d, dtype=bool))
    if not wrong:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    return np.concatenate(wrong), np.concatenate(rescuing)


def p_wrong_rows(wrong: np.ndarray, rescuing: np.ndarray, mode: str) -> np.ndarray:
    """[D] bool: which of gate_rows' rows the override gate learns from, by what it does with the
    disagreements of labelled P-wrong generations (all labelled "decline").

    Args:
        wrong, rescuing: [D] bool, as wrong_rows returns them.
        mode: "all" (every one), "rescuing" (only those where Q's token leads P to a passing answer:
            at the others the answer is lost whatever the gate does) or "none" (no P-wrong row).
    """
    if mode not in ("all", "rescuing", "none"):
        raise ValueError(f"expected all, rescuing or none, got {mode!r}")
    wrong, rescuing = np.asarray(wrong, dtype=bool), np.asarray(rescuing, dtype=bool)
    if wrong.shape != rescuing.shape or wrong.ndim != 1:
        raise ShapeError(f"expected wrong [D] and rescuing [D], got {wrong.shape}, {rescuing.shape}")
    if mode == "all":
        return np.ones(len(wrong), dtype=bool)
    return ~wrong | (rescuing if mode == "rescuing" else False)


def held_out_prompts(prompts: Iterable[tuple[int, ...]], every: int) -> set[tuple[int, ...]]:
    """The validation prompts: every `every`-th distinct prompt, in sorted order."""
    if every < 2:
        raise ShapeError(f"every: expected >= 2, got {every}")
    return {p for i, p in enumerate(sorted(set(prompts))) if i % every == every - 1}


def split_by_prompt(data: RouterData, every: int) -> tuple[RouterData, RouterData]:
    """(train, validation): the held_out_prompts go to validation.

    A prompt's generations stay on one side, so validation never sees a training prompt.
    """
    held = held_out_prompts((g.prompt_ids for g in data.generations), every)
    is_val = np.asarray([g.prompt_ids in held for g in data.generations], dtype=bool)
    return data.subset(~is_val), data.subset(is_val)
