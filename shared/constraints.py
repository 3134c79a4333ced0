"""Constraints on a completion, applied identically to Q's logits on the edge and P's in the cloud.

A `Constraint` is what a request asks of the completion beyond sampling: a grammar the text must
match (JSON mode, a JSON schema, a tool call's shape), OpenAI's frequency and presence penalties and
a logit bias. At every position of the completion it becomes a `RowAdjust`: an additive bias on a
few ids and a mask of the ids the grammar allows there. Both sides apply the same adjustment to the
raw logits (temperature 1) before anything else reads them, so Q's top-k view, the KL against P,
the exact policy's p/q ratios, the tokens P generates and the tokens Q drafts all come from the
distributions the constraint leaves. Greedy exact under a constraint therefore equals cloud-only
under the same constraint, as it does without one.

Order, as OpenAI and vLLM apply them: logit bias, then the penalties, then the grammar's mask
(a masked id gets -inf: probability 0 on both sides, which the divergence math treats as 0 log 0).

Penalties (OpenAI's definition, "frequency and presence penalties" in the API reference): with
c[j] the number of times token j occurs in the completion so far,

    logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty

The prompt does not count, as in vLLM. The grammar engine is llguidance (docs/grammar.md says why):
`ConstraintState` keeps its matcher in step with the completion's tokens (accept, roll back).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from handoff.shared.errors import HandoffError, ShapeError

# OpenAI's ranges for these request fields.
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
# JSON the way models write it compactly; no free whitespace, so a model cannot pad forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(HandoffError, ValueError):
    """A constraint that cannot be built (a bad grammar or schema), or a token it does not allow."""


@dataclass(frozen=True)
class Constraint:
    """What a completion must respect besides its sampling settings; the default constrains nothing."""

    grammar: str = ""  # an llguidance grammar (its JSON form, see json_schema_grammar); "" for none
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (id, bias) sorted by id, ids distinct

    def __post_init__(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and -MAX_PENALTY <= v <= MAX_PENALTY):
                raise ConstraintError(f"{name}: expected a number in [-2, 2], got {v!r}")
        ids = [i for i, _ in self.logit_bias]
        if ids != sorted(set(ids)):
            raise ConstraintError("logit_bias: ids must be distinct and sorted")
        for i, b in self.logit_bias:
            if not (isinstance(i, int) and i >= 0):
                raise ConstraintError(f"logit_bias: token ids must be non-negative ints, got {i!r}")
            if not (math.isfinite(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS):
                raise ConstraintError(f"logit_bias: the bias of token {i} must be in [-100, 100], got {b!r}")

    @classmethod
    def build(
        cls,
        *,
        grammar: str = "",
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        logit_bias: dict[int, float] | None = None,
    ) -> Constraint:
        """A constraint from request-style fields (None: not given).

        Values are checked as given, then rounded to float32, the wire's precision, so that the
        cloud's copy is identical.
        """
        bias = sorted((int(i), float(b)) for i, b in (logit_bias or {}).items())
        cls(grammar, float(frequency_penalty or 0.0), float(presence_penalty or 0.0), tuple(bias))
        f32 = lambda v: float(np.float32(v or 0.0))  # noqa: E731
        return cls(
            grammar=grammar,
            frequency_penalty=f32(frequency_penalty),
            presence_penalty=f32(presence_penalty),
            logit_bias=tuple((i, f32(b)) for i, b in bias),
        )

    @property
    def active(self) -> bool:
        """Whether it changes any distribution at all."""
        return bool(self.grammar or self.frequency_penalty or self.presence_penalty or self.logit_bias)

    def check_ids(self, vocab_size: int) -> None:
        """Refuse logit_bias ids outside [0, vocab_size)."""
        bad = [i for i, _ in self.logit_bias if i >= vocab_size]
        if bad:
            raise ConstraintError(f"logit_bias: token ids outside [0, {vocab_size}): {bad[:5]}")


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """The llguidance grammar of JSON documents valid under a JSON schema (compact separators).

    Raises:
        ConstraintError: the schema is not JSON or uses what the engine cannot enforce.
    """
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"the JSON schema is not valid: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"the JSON schema cannot be enforced: {error}")
    return grammar


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's response_format json_object)."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(lark: str) -> str:
    """An llguidance grammar from Lark text (llguidance's dialect, e.g. %json and <[id]> tokens).

    Raises:
        ConstraintError: the grammar does not compile.
    """
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ConstraintError(f"the grammar is not valid: {error}")
    return grammar


# ---------------------------------------------------------------------------------------------
# One position's adjustment, as arrays


@dataclass(frozen=True, eq=False)
class RowAdjust:
    """The adjustment of one position's logits: add a bias at a few ids, then mask."""

    bias_ids: np.ndarray  # int64 [m], distinct
    bias_values: np.ndarray  # float32 [m], added to the logits at bias_ids
    allowed: np.ndarray | None  # bool [W]: ids the grammar allows (ids >= W are not); None = all

    def __post_init__(self) -> None:
        if self.bias_ids.ndim != 1 or self.bias_ids.shape != self.bias_values.shape:
            raise ShapeError(
                f"bias: expected ids and values of one shape [m], got {self.bias_ids.shape} "
                f"and {self.bias_values.shape}"
            )
        if self.allowed is not None and (self.allowed.ndim != 1 or self.allowed.dtype != bool):
            raise ShapeError(
                f"allowed: expected a bool array [W], got {self.allowed.dtype} {self.allowed.shape}"
            )

    def allows(self, token_id: int) -> bool:
        """Whether the grammar allows this id here."""
        a = self.allowed
        return a is None or (0 <= token_id < a.size and bool(a[token_id]))


def unpack_mask(bitmask: np.ndarray, width: int) -> np.ndarray:
    """A token bitmask (bit j of word j // 32, little-endian) as bool [width].

    Args:
        bitmask: int32 [ceil(V / 32)] as llguidance fills it.
        width: how many ids to return (at most 32 * len(bitmask)).
    """
    words = np.ascontiguousarray(bitmask, dtype=np.int32)
    if words.ndim != 1 or width > 32 * words.size:
        raise ShapeError(f"bitmask: expected int32 [>= {-(-width // 32)}], got {words.shape}")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:width].astype(bool)


def adjust_logits(logits: np.ndarray, row: RowAdjust | None) -> np.ndarray:
    """One position's logits after the constraint: biased, then masked with -inf.

    Args:
        logits: [V] raw logits (float32 or float64); not modified.
        row: the position's adjustment; None leaves the logits as they are (no copy).

    Returns:
        [V] adjusted logits (float32 when the input is), at least one of them finite.

    Raises:
        ConstraintError: the mask allows no id of this vocabulary.
    """
    x = np.asarray(logits)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise ShapeError(f"logits: expected a float array of shape [V], got {x.dtype} {x.shape}")
    if row is None:
        return x
    out = x
    if row.bias_ids.size:
        out = x.copy()
        keep = row.bias_ids < out.size
        out[row.bias_ids[keep]] += row.bias_values[keep].astype(out.dtype)
    if row.allowed is not None:
        allowed = row.allowed[: out.size]
        if not allowed.any():
            raise ConstraintError("the grammar allows no token at this position")
        # Copying the allowed entries into a row of -inf (ids past the grammar's vocabulary stay
        # -inf): ~31 us for 151,936 ids against ~82 us for a copy and a boolean assignment.
        masked = np.full_like(out, -np.inf)
        np.copyto(masked[: allowed.size], out[: allowed.size], where=allowed)
        out = masked
    return out if out is not x else x.copy()


def adjust_rows(logits: np.ndarray, rows: Sequence[RowAdjust | None] | None) -> np.ndarray:
    """Several positions' logits after their adjustments.

    Args:
        logits: [n, V] raw logits.
        rows: [n] adjustments (None entries, or None for all, leave rows as they are).

    Returns:
        [n, V] adjusted logits (the input itself when nothing changes).
    """
    if rows is None:
        return logits
    if logits.ndim != 2 or len(rows) != logits.shape[0]:
        raise ShapeError(
            f"rows: expected {logits.shape[0]} adjustments for logits {logits.shape}, got {len(rows)}"
        )
    if all(r is None for r in rows):
        return logits
    return np.stack([adjust_logits(row_logits, r) for row_logits, r in zip(logits, rows, strict=True)])


def penalty_bias(counts: dict[int, int], frequency: float, presence: float) -> tuple[np.ndarray, np.ndarray]:
    """OpenAI's penalties as a sparse bias: -(c[j] * frequency + presence) at every id seen.

    Args:
        counts: token id -> occurrences in the completion so far (> 0).
        frequency: frequency_penalty.
        presence: presence_penalty.

    Returns:
        (ids int64 [m], bias float32 [m]); empty when both penalties are 0.
    """
    if not (frequency or presence) or not counts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    c = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    return ids, (-(c * frequency) - presence).astype(np.float32)


def merge_bias(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Two sparse biases added into one with distinct ids ([m] ids, [m] values each)."""
    if not a[0].size:
        return b
    if not b[0].size:
        return a
    ids, inverse = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    values = np.zeros(ids.size, dtype=np.float64)
    np.add.at(values, inverse, np.concatenate([a[1], b[1]]).astype(np.float64))
    return ids, values.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# A completion under a constraint, token by token


# (file, stop ids) -> llguidance's tokenizer. It calls into the vocabulary-only llama.cpp load of the
# file (shared.llama_cpp_model.gguf_tokenizer), which stays loaded for the process.
_TOKENIZERS: dict[tuple[str, tuple[int, ...]], Any] = {}


def _tokenizer_for(path: str, eos: tuple[int, ...]):
    """llguidance's tokenizer of a GGUF's vocabulary (llama.cpp loads the vocabulary only, ~1 s)."""
    key = (path, eos)
    if key not in _TOKENIZERS:
        from llguidance.llamacpp import lltokenizer_from_vocab

        from handoff.shared.llama_cpp_model import gguf_tokenizer

        vocab = gguf_tokenizer(path).vocab
        with warnings.catch_warnings():  # llguidance calls a deprecated alias once per token
            warnings.simplefilter("ignore", DeprecationWarning)
            _TOKENIZERS[key] = lltokenizer_from_vocab(vocab, eos_token=list(eos))
    return _TOKENIZERS[key]


def grammar_tokenizer(gguf_path: str, stop_ids: Iterable[int]):
    """The grammar engine's view of a model's vocabulary, cached per (file, stop tokens).

    Both sides build it from their GGUF file the same way, so that a mask is the same bit for bit
    wherever it is computed (the vocabularies are checked equal when a session opens). The stop
    tokens are the ones a grammar allows once its text is complete.

    Args:
        gguf_path: the model's GGUF file.
        stop_ids: end-of-generation token ids.
    """
    return _tokenizer_for(str(gguf_path), tuple(sorted(int(t) for t in stop_ids)))


class ConstraintState:
    """One completion under a constraint: the adjustment of the next position, accept, roll back.

    Invariant: the matcher (if any) has consumed exactly `tokens`, the completion so far, except
    end-of-generation tokens: llguidance takes one when the text is complete but does not count it
    among the tokens a rollback undoes (a rollback over it would undo one text token too many), so
    they are checked against the mask and kept here only.
    """

    def __init__(self, constraint: Constraint, tokenizer: Any | None = None) -> None:
        """Start an empty completion.

        Args:
            constraint: what to enforce.
            tokenizer: llguidance's LLTokenizer of the model (grammar_tokenizer); needed with a grammar.

        Raises:
            ConstraintError: the grammar does not compile for this vocabulary.
        """
        self.constraint = constraint
        self.tokens: list[int] = []
        self._counts: Counter[int] = Counter()
        self._bias = (
            np.array([i for i, _ in constraint.logit_bias], dtype=np.int64),
            np.array([b for _, b in constraint.logit_bias], dtype=np.float32),
        )
        self._matcher = None
        self._eos: frozenset[int] = frozenset()
        self._bitmask: np.ndarray | None = None
        self._cached: tuple[int, RowAdjust] | None = None  # (len(tokens), the next row)
        if constraint.grammar:
            if tokenizer is None:
                raise ConstraintError("a grammar needs the model's tokenizer")
            import llguidance

            self._matcher = llguidance.LLMatcher(tokenizer, constraint.grammar, log_level=0)
            if self._matcher.is_error():
                raise ConstraintError(f"the grammar does not compile: {self._matcher.get_error()}")
            self._width = int(tokenizer.vocab_size)
            self._eos = frozenset(int(t) for t in tokenizer.eos_tokens)
            self._bitmask = np.full(-(-self._width // 32), -1, dtype=np.int32)

    @property
    def length(self) -> int:
        """Tokens of the completion consumed so far."""
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        """The grammar's text is complete: only an end-of-generation token may follow."""
        return self._matcher is not None and self._matcher.is_stopped()

    def row(self) -> RowAdjust:
        """The adjustment of the next position's logits (computed once per position)."""
        n = len(self.tokens)
        if self._cached is not None and self._cached[0] == n:
            return self._cached[1]
        c = self.constraint
        bias = merge_bias(self._bias, penalty_bias(self._counts, c.frequency_penalty, c.presence_penalty))
        allowed = None
        if self._matcher is not None:
            assert self._bitmask is not None
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if self._matcher.is_error():
                raise ConstraintError(f"the grammar failed: {self._matcher.get_error()}")
            allowed = unpack_mask(self._bitmask, self._width)
        row = RowAdjust(bias[0], bias[1], allowed)
        self._cached = (n, row)
        return row

    def accept(self, token_id: int) -> None:
        """The completion's next token.

        Raises:
            ConstraintError: the grammar does not allow it here (the state is unchanged).
        """
        token_id = int(token_id)
        if self._matcher is not None:
            if not self.row().allows(token_id):
                raise ConstraintError(
                    f"token {token_id} at completion position {len(self.tokens)} is not allowed by the grammar"
                )
            if token_id not in self._eos and not self._matcher.consume_token(token_id):
                raise ConstraintError(f"the grammar failed on token {token_id}: {self._matcher.get_error()}")
        self.tokens.append(token_id)
        self._counts[token_id] += 1

    def extend(self, token_ids: Iterable[int]) -> list[RowAdjust]:
        """accept() each token in order, all or none.

        Returns:
            The adjustment of each token's position (the row it was accepted under), in order.

        Raises:
            ConstraintError: the grammar does not allow one of them (none is kept then).
        """
        before, rows = len(self.tokens), []
        try:
            for t in token_ids:
                rows.append(self.row())
                self.accept(t)
        except ConstraintError:
            self.truncate(before)
            raise
        return rows

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens of the completion (a rollback)."""
        if not 0 <= length <= len(self.tokens):
            raise ShapeError(f"truncate: cannot cut a completion of {len(self.tokens)} tokens to {length}")
        if length == len(self.tokens):
            return
        n = sum(t not in self._eos for t in self.tokens[length:])  # what the matcher consumed
        if self._matcher is not None and n and not self._matcher.rollback(n):
            raise ConstraintError(f"the grammar could not roll back {n} tokens: {self._matcher.get_error()}")
        for t in self.tokens[length:]:
            self._counts[t] -= 1
            if not self._counts[t]:
                del self._counts[t]
        del self.tokens[length:]
        self._cached = None
