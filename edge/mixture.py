"""A mixture of small experts on the edge: several Q's drafting for one P (seed note §0.9.2).

The seed note asks for "smaller specialised models combined or selected by their divergence from the
reference model, defaulting to the reference when all diverge". An expert is a small model of P's
tokenizer, optionally with a system prompt of its own (ExpertSpec). A MixtureRunner holds one llama.cpp
context per expert and offers the controller the one-runner interface (start, step, append,
append_scored, truncate), so the controller drives it like any Q:

- every expert evaluates every token of the answer (its own prompt, then the same tokens), so all
  can draft the next one and each one's view of every drafted position is known;
- "select": the drafter is the expert the policy ranks best (the lowest recent divergence from P at
  check points, edge/policy/mixture.py); "weighted": the token is drawn from a mixture of the
  experts' full distributions, weighted by the policy's weights (a divergence-weighted ensemble);
- expert_views() gives each expert's view of drafted positions (its top-k and its log-probabilities
  at P's top-k: each expert's distribution is kept until its check point is judged), from which the
  policy gets each expert's KL from P there.

Positions are the controller's (P's): an expert whose prompt is longer (its system prompt) keeps an
offset. Memory: each expert is its own llama.cpp context (its KV cache: n_ctx x 12 KB per token for
the 0.5B in f16); experts of the same GGUF file share its weights through the page cache (llama.cpp
maps the file), so prompted experts of one model cost E KV caches and one set of weights; experts of
different files cost each file. Compute: every token is evaluated by every expert (E times Q's cost).
"""

from __future__ import annotations

import json
import operator
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from handoff.edge.runner import EdgeRunner, EdgeStep
from handoff.shared.constraints import Constraint, ConstraintError
from handoff.shared.divergence import log_softmax, logits_view
from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings, draw

__all__ = ["PROMPTED_EXPERTS", "ExpertSpec", "MixtureRunner", "load_experts"]

_SYSTEM_HEAD = "<|im_start|>system\n"
_TURN_END = "<|im_end|>\n"
MAX_KEPT = 64  # drafted positions whose expert distributions wait for a check point (E x V floats each)


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: a small model (registry name or GGUF path; "" = the edge model) and its system prompt
    ("" = the conversation's own, unchanged)."""

    name: str
    model: str = ""
    system: str = ""


# The package index holds one small model of the family (the 0.5B): the real mixture runs it with
# differently specialised system prompts. "general" keeps the conversation's own prompt (plain Q).
PROMPTED_EXPERTS: tuple[ExpertSpec, ...] = (
    ExpertSpec("general"),
    ExpertSpec(
        "math",
        system="You are a careful mathematician. Work through arithmetic and word problems one "
        "operation per line, check every intermediate result, and end with the final answer.",
    ),
    ExpertSpec(
        "code",
        system="You are an expert programmer. Reason precisely about lists, indices and algorithms, "
        "and write correct, complete Python.",
    ),
)


def load_experts(setting: str) -> tuple[ExpertSpec, ...]:
    """The experts of `--experts`: "prompted" (PROMPTED_EXPERTS) or a JSON file of
    [{"name": ..., "model": ..., "system": ...}, ...]; "" = none (a single Q).

    Raises:
        ShapeError: an unreadable file, a bad entry, fewer than one expert or a repeated name.
    """
    if not setting:
        return ()
    if setting == "prompted":
        return PROMPTED_EXPERTS
    path = Path(setting)
    try:
        raw = json.loads(path.read_text())
        experts = tuple(
            ExpertSpec(str(e["name"]), str(e.get("model", "")), str(e.get("system", ""))) for e in raw
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ShapeError(
            f"experts: expected 'prompted' or a JSON list of {{name, model, system}}: {path}: {e}"
        ) from None
    names = [e.name for e in experts]
    if not experts or len(set(names)) != len(names) or not all(names):
        raise ShapeError(f"experts: expected one or more experts with distinct non-empty names, got {names}")
    return experts


def expert_prompt(text: str, system: str) -> str:
    """The conversation's prompt with the expert's system prompt (ChatML: Qwen's template).

    Replaces the first system turn's content, or puts a system turn first when there is none.
    """
    if not system:
        return text
    if text.startswith(_SYSTEM_HEAD):
        end = text.find(_TURN_END)
        if end < 0:
            raise ShapeError("experts: the prompt's system turn has no end (<|im_end|>)")
        return _SYSTEM_HEAD + system + text[end:]
    if "<|im_start|>" not in text:
        raise ShapeError("experts: a system prompt needs a ChatML chat template (<|im_start|> turns)")
    return _SYSTEM_HEAD + system + _TURN_END + text


@dataclass
class _Expert:
    spec: ExpertSpec
    runner: EdgeRunner
    offset: int = 0  # its prompt's length minus the conversation's


class MixtureRunner:
    """Several experts behind the EdgeRunner interface the controller uses (see the module docstring).

    Args:
        experts: (spec, runner) per expert, in order; the runners share one vocabulary.
    """

    def __init__(self, experts: Sequence[tuple[ExpertSpec, EdgeRunner]]) -> None:
        if not experts:
            raise ShapeError("experts: expected at least one")
        self.experts = [_Expert(s, r) for s, r in experts]
        vocab = {e.runner.n_vocab for e in self.experts}
        if len(vocab) != 1:
            raise ShapeError(f"experts: every expert must share one vocabulary, got sizes {sorted(vocab)}")
        self.k = self.experts[0].runner.k
        self.n_vocab = self.experts[0].runner.n_vocab
        self.stop_token_ids = self.experts[0].runner.stop_token_ids
        self.active = [0]
        self.mode = "select"
        self._core: Any = None
        self._prompt: list[int] = []
        self._views: dict[int, np.ndarray] = {}  # drafted position -> [E, V] each expert's log-probabilities
        self._rng = SamplingSettings().rng()
        self.drafted: Counter[str] = Counter()  # tokens each expert drafted ("mixture": weighted draws)

    # -- the policy ---------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [e.spec.name for e in self.experts]

    def follow(self, core: Any) -> None:
        """A generation starts under `core`: its config's use_experts picks the experts (all when empty;
        a policy other than the mixture drafts with the first of them alone)."""
        wanted = [n.strip() for n in core.config.use_experts.split(",") if n.strip()] or self.names
        unknown = [n for n in wanted if n not in self.names]
        if unknown:
            raise ShapeError(f"use_experts: unknown expert(s) {unknown}; the edge has {self.names}")
        chosen = [self.names.index(n) for n in wanted]
        mixing = hasattr(core, "expert_weights")
        self.active = chosen if mixing else chosen[:1]
        self.mode = core.config.mixture if mixing else "select"
        self._core = core if mixing else None

    def _weights(self) -> np.ndarray:
        """[E_active] the policy's weights of the active experts (select drafts with the largest; one
        expert alone, or another policy: one-hot on the first)."""
        if self._core is None:
            w = np.zeros(len(self.active))
            w[0] = 1.0
            return w
        return self._core.expert_weights(len(self.active))

    def drafter(self) -> _Expert:
        return self.experts[self.active[int(np.argmax(self._weights()))]]

    # -- the EdgeRunner interface ------------------------------------------------------------------

    @property
    def model(self):  # tokenizer and chat template: the first expert's (one vocabulary)
        return self.experts[0].runner.model

    @property
    def sampling(self) -> SamplingSettings:
        return self.experts[0].runner.sampling

    @sampling.setter
    def sampling(self, s: SamplingSettings) -> None:
        for e in self.experts:
            e.runner.sampling = s

    @property
    def keep_draft_probs(self) -> bool:
        return self.experts[0].runner.keep_draft_probs

    @keep_draft_probs.setter
    def keep_draft_probs(self, on: bool) -> None:
        for e in self.experts:
            e.runner.keep_draft_probs = on

    @property
    def hidden(self) -> bool:
        return False

    @hidden.setter
    def hidden(self, on: bool) -> None:
        if on:
            raise ShapeError(
                "a mixture of experts has no single hidden state: the learned router needs one Q"
            )

    def _live(self) -> list[_Expert]:
        return [self.experts[i] for i in self.active]

    @property
    def length(self) -> int:
        e = self.experts[self.active[0]]
        return e.runner.length - e.offset

    @property
    def n_ctx(self) -> int:
        return min(e.runner.n_ctx - e.offset for e in self._live())

    @property
    def tokens(self) -> list[int]:
        e = self.experts[self.active[0]]
        return self._prompt + e.runner.tokens[len(self._prompt) + e.offset :]

    def detokenize(self, ids: Iterable[int]) -> bytes:
        return self.experts[0].runner.detokenize(ids)

    def start(
        self,
        prompt_ids: Iterable[int],
        sampling: SamplingSettings | None = None,
        constraint: Constraint | None = None,
    ) -> None:
        """Each active expert starts on the prompt with its own system prompt (see expert_prompt).

        Raises:
            ConstraintError: a constraint was given; the experts' mixed drafts do not support one yet.
        """
        if constraint is not None and constraint.active:
            raise ConstraintError(
                "constraints (response_format, tools, penalties, logit_bias) are not supported with a "
                "mixture of experts on the edge; run one edge model"
            )
        self._prompt = [operator.index(t) for t in prompt_ids]
        text = self.model.detokenize(self._prompt).decode("utf-8", errors="replace")
        for e in self._live():
            ids = (
                self._prompt if not e.spec.system else self.model.tokenize(expert_prompt(text, e.spec.system))
            )
            e.runner.start(ids, sampling)
            e.offset = len(ids) - len(self._prompt)
        self._views.clear()
        self._rng = self.sampling.rng()

    def step(self) -> EdgeStep:
        """The next token: the drafter's (select) or the weighted mixture's; every expert evaluates it."""
        t0 = time.perf_counter()
        position = self.length
        if position >= self.n_ctx:
            raise ShapeError(f"step: the context is full ({position} of n_ctx {self.n_ctx} tokens)")
        live = self._live()
        # Each expert's full distribution here, kept until the check point is judged (its KL from P
        # needs its log-probabilities at P's top-k, known only then); one expert alone is never asked.
        lps = (
            [log_softmax(e.runner.model.next_logits()).astype(np.float32) for e in live]
            if len(live) > 1
            else []
        )
        if self.mode == "select" or len(live) == 1:
            d = self.drafter()
            step = d.runner.step()
            for e in live:
                if e is not d:
                    e.runner.model.eval([step.token_id])
            self.drafted[d.spec.name] += 1
            self._keep(position, lps)
            return replace(step, position=position, seconds=time.perf_counter() - t0, expert=d.spec.name)
        top_ids, top_lp, ent, mix = self._mixed(lps)
        if self.sampling.greedy:
            token, sampled = int(top_ids[0]), 0.0
        else:
            token, sampled = draw(mix, self.sampling, self.sampling.rng_for(position, self._rng))
        for e in live:
            e.runner.model.eval([token])
        self._keep(position, lps)
        self.drafted["mixture"] += 1
        return EdgeStep(position=position, token_id=token, topk_ids=top_ids, topk_logprobs=top_lp, entropy=ent,
                        sampled_logprob=sampled, token_logprob=float(mix[token]), seconds=time.perf_counter() - t0,
                        expert="mixture")  # fmt: skip

    def _mixed(self, lps: list[np.ndarray], at_ids: np.ndarray | None = None) -> tuple:
        """The weighted mixture's view: (top-k ids, top-k logprobs, entropy, its log-probabilities [V]
        or, with at_ids, at those ids)."""
        w = self._weights()
        mix = np.log(
            np.maximum(sum(wi * np.exp(lp.astype(np.float64)) for wi, lp in zip(w, lps, strict=True)), 1e-300)
        )
        ids, top, ent, at = logits_view(mix, self.k, at_ids)
        return ids, top, ent, (mix if at_ids is None else at)

    def _keep(self, position: int, lps: list[np.ndarray]) -> None:
        if not lps:
            return  # one expert drafting alone: nobody asks for its views
        self._views[position] = np.stack(lps)  # [E, V] float32
        while len(self._views) > MAX_KEPT:  # never checked (the cloud was gone): drop the oldest
            del self._views[min(self._views)]

    def append(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        for e in self._live():
            e.runner.append(ids)

    def append_scored(
        self, token_id: int, at_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """Append a cloud token to every expert; the view returned is the drafter's (select) or, in
        weighted mode, the mixture's."""
        live = self._live()
        if self.mode == "select" or len(live) == 1:
            d = self.drafter()
            out = d.runner.append_scored(token_id, at_ids)
            for e in live:
                if e is not d:
                    e.runner.append([token_id])
            return out
        lps = [log_softmax(e.runner.model.next_logits()) for e in live]
        ids, top, ent, at = self._mixed(lps, at_ids)
        for e in live:
            e.runner.model.eval([token_id])
        return ids, top, ent, at

    def truncate(self, length: int) -> None:
        for e in self._live():
            e.runner.truncate(length + e.offset)
        for p in [p for p in self._views if p >= length]:
            del self._views[p]

    def replace_tail(self, length: int, ids: Iterable[int]) -> None:
        ids = list(ids)
        for e in self._live():
            e.runner.replace_tail(length + e.offset, ids)
        for p in [p for p in self._views if p >= length]:
            del self._views[p]

    def expert_views(self, positions: Sequence[int], p_ids: np.ndarray) -> tuple[np.ndarray, ...] | None:
        """Each active expert's view of drafted positions, for its KL from P (the views are then dropped).

        Args:
            positions: [n] drafted positions (a checked window's).
            p_ids: [n, kp] P's top-k ids there.

        Returns:
            ([n, E, k] top-k ids, [n, E, k] their log-probabilities, [n, E, kp] log-probabilities at
            P's ids), or None when one expert drafts alone or a position was not drafted here.
        """
        if len(self.active) < 2 or any(p not in self._views for p in positions):
            return None
        full = np.stack([self._views.pop(p) for p in positions])  # [n, E, V]
        n, e = full.shape[:2]
        ids = np.empty((n, e, self.k), dtype=np.int64)
        lps = np.empty((n, e, self.k))
        for j in range(n):
            for x in range(e):
                ids[j, x], lps[j, x], _, _ = logits_view(full[j, x], self.k)
        at_p = np.take_along_axis(full, np.asarray(p_ids)[:, None, :].repeat(e, axis=1), axis=2)  # [n, E, kp]
        return ids, lps, at_p.astype(np.float64)

    def close(self) -> None:
        for e in self.experts:
            e.runner.close()

    def __enter__(self) -> MixtureRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
