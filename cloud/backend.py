"""The interface between the verifier service and a model runtime (transformers, llama.cpp, later vLLM).

A backend holds one model and many *sequences*, each with its own KV cache. The service calls
`forward` with a batch of items from different sequences; each item appends tokens to its
sequence's cache and asks for the views of the last `n_out` rows, where row j is the next-token
distribution after the item's j-th token. Everything a check point or a cloud token needs is
computed there, so that on a GPU only small arrays cross to the host:

    P's top-k ids and log-probabilities     [n_out, k]
    P's log-probabilities at given ids      per row, e.g. the edge token and Q's top-k ids
    P's full log-probabilities, last row    [V], only when asked (sampling a cloud token)

A constraint's per-row adjustment (ForwardItem.adjust) is applied to the logits before all of them.

All log-probabilities are log-softmax of the raw logits (temperature 1), natural log, float64 on
the host. `forward`, `truncate` and `release` are called from one worker thread at a time.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from handoff.shared.constraints import RowAdjust, adjust_rows, grammar_tokenizer
from handoff.shared.divergence import log_softmax, top_k
from handoff.shared.errors import HandoffError, ShapeError
from handoff.shared.model_info import ModelInfo
from handoff.shared.models import ModelRef
from handoff.shared.vocab import Vocabulary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendInfo:
    """What the service reports about its model (GetInfo)."""

    backend: str  # "transformers", "llama.cpp"
    model_id: str  # registry name, path or Hugging Face directory
    model_name: str
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int  # the model's trained context
    vocab_size: int  # rows of the output layer: ids in [0, vocab_size) are valid
    device: str
    dtype: str


def make_backend_info(
    backend: str,
    ref: ModelRef,
    model: ModelInfo,
    *,
    vocab_size: int,
    device: str,
    dtype: str,
    max_context: int,
) -> BackendInfo:
    """BackendInfo from the model's metadata; warns when sessions may outgrow the trained context."""
    if model.context_length and max_context > model.context_length:
        logger.warning(
            "max_context=%d is longer than %s's trained context of %d tokens",
            max_context,
            model.name,
            model.context_length,
        )
    return BackendInfo(
        backend=backend,
        model_id=ref.name,
        model_name=model.name,
        architecture=model.architecture,
        parameter_count=model.parameter_count,
        quantization=model.quantization,
        context_length=model.context_length,
        vocab_size=vocab_size,
        device=device,
        dtype=dtype,
    )


@dataclass
class ForwardItem:
    """Append `tokens` to `seq` and return the views of the last `n_out` rows."""

    seq: object  # a handle from Backend.new_sequence()
    tokens: list[int]
    n_out: int
    k: int
    # [n_out] lists of ids whose log-probabilities to return per output row (None = none).
    gather: list[list[int] | None] | None = None
    full_last: bool = False  # also return the last row's full log-probabilities
    full_rows: bool = False  # also return every output row's full log-probabilities (speculative drafts)
    # [n_out] adjustments of each output row's logits before any view (a constraint, see
    # shared/constraints.py): every view and log-probability is then the constrained distribution's.
    adjust: list[RowAdjust | None] | None = None

    def check(self, vocab_size: int) -> None:
        if not 0 <= self.n_out <= len(self.tokens):
            raise ShapeError(f"n_out={self.n_out} rows requested from {len(self.tokens)} new tokens")
        if self.gather is not None and len(self.gather) != self.n_out:
            raise ShapeError(f"gather: expected {self.n_out} rows, got {len(self.gather)}")
        if self.adjust is not None and len(self.adjust) != self.n_out:
            raise ShapeError(f"adjust: expected {self.n_out} rows, got {len(self.adjust)}")
        if self.full_last and self.n_out < 1:
            raise ShapeError("full_last needs at least one output row")
        bad = [t for t in self.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ShapeError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")


@dataclass
class ForwardOutput:
    """The views of one item's output rows."""

    topk_ids: np.ndarray  # [n_out, k] int32
    topk_logprobs: np.ndarray  # [n_out, k] float64
    gathered: list[np.ndarray | None] = field(default_factory=list)  # [n_out] of [len(gather[j])] float64
    last_logprobs: np.ndarray | None = None  # [V] float64 when full_last
    full_logprobs: np.ndarray | None = None  # [n_out, V] float64 when full_rows


def views_from_logits(logits: np.ndarray, item: ForwardItem) -> ForwardOutput:
    """Host-side views of one item's output rows (backends that have the logits on the host).

    Args:
        logits: [n_out, V] raw logits of the item's last n_out rows.
        item: the request.

    Returns:
        The item's ForwardOutput.
    """
    if logits.ndim != 2 or logits.shape[0] != item.n_out:
        raise ShapeError(f"logits: expected shape [{item.n_out}, V], got {logits.shape}")
    if item.n_out == 0:
        empty = np.zeros((0, item.k))
        return ForwardOutput(empty.astype(np.int32), empty, [], None)
    lp = log_softmax(adjust_rows(logits, item.adjust))  # [n_out, V]
    ids, vals = top_k(lp, item.k)
    gathered = [
        None
        if (item.gather is None or item.gather[j] is None)
        else lp[j, np.asarray(item.gather[j], dtype=np.int64)]
        for j in range(item.n_out)
    ]
    return ForwardOutput(
        ids, vals, gathered, lp[-1].copy() if item.full_last else None, lp.copy() if item.full_rows else None
    )


class Backend(ABC):
    """One model and the KV caches of many sequences."""

    info: BackendInfo
    vocabulary: Vocabulary  # token strings by id, for the fingerprint
    name = "model"  # for messages: "the llama.cpp backend is closed"
    sequence_type: type = object  # the handle class new_sequence returns
    _closed = True  # until the subclass has loaded its model
    model_ref: ModelRef | None = None  # the model's files (set by the subclass): for grammar_tokenizer

    def grammar_tokenizer(self, stop_ids: Sequence[int]):
        """The grammar engine's tokenizer of this model's vocabulary (constrained sessions), cached.

        Built from the GGUF file as the edge builds Q's (shared.constraints.grammar_tokenizer), so a
        grammar masks the same ids on both sides.
        """
        ref = self.model_ref
        if ref is None or ref.kind != "gguf":
            raise HandoffError(f"the {self.name} backend has no GGUF vocabulary for grammars")
        return grammar_tokenizer(ref.path, stop_ids)

    def _check_open(self) -> None:
        if self._closed:
            raise HandoffError(f"the {self.name} backend is closed")

    def _own(self, seq: object):
        """`seq` as this backend's live sequence handle, or a HandoffError saying why not."""
        self._check_open()
        if not isinstance(seq, self.sequence_type) or getattr(seq, "_owner", None) is not self:
            raise HandoffError(f"{seq!r} is not a sequence of this backend")
        if not seq.alive:
            raise HandoffError(f"{seq!r} was released")
        return seq

    @abstractmethod
    def new_sequence(self) -> object:
        """A handle for a new, empty sequence (raises ResourceExhausted-style HandoffError when full)."""

    def sequence_length(self, seq: object) -> int:
        """Tokens in the sequence's cache."""
        return self._own(seq).length

    @abstractmethod
    def forward(self, items: Sequence[ForwardItem]) -> list[ForwardOutput]:
        """Append each item's tokens to its sequence in as few forward passes as the runtime allows.

        Items refer to distinct sequences. Row j of an item is the distribution after its j-th new
        token given everything before it in that sequence; the result for an item is the same
        whatever else is in the batch (up to floating-point noise of the runtime).
        """

    @abstractmethod
    def raw_forward(self, items: Sequence[ForwardItem]) -> None:
        """The bare batched forward pass of `forward`: caches appended, logits of each item's last
        n_out rows computed on the device, nothing read back or post-processed.

        The baseline that scripts/bench_cloud.py measures the service against.
        """

    @abstractmethod
    def truncate(self, seq: object, length: int) -> None:
        """Drop tokens at positions >= length from the sequence's cache."""

    @abstractmethod
    def release(self, seq: object) -> None:
        """Free the sequence's cache; the handle is dead afterwards."""

    def close(self) -> None:  # noqa: B027 - optional for backends without native resources
        """Free the model."""
