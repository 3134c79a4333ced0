"""Two vocabularies side by side: the tokens both have, and the divergence between their models.

When Q and P use different tokenizers, a token id means nothing to the other side. What they share
is text: a token of Q whose bytes are exactly a token of P is the same event in both id spaces. The
*intersection* is the set of such byte strings (special and control tokens excluded: they are not
text). This is the token-level intersection of Timor et al., "Accelerating LLM Inference with
Lossless Speculative Decoding Algorithms for Heterogeneous Vocabularies" (ICML 2025, TLI), and the
space vLLM's and Hugging Face's universal assisted generation use to pair unlike vocabularies.

`VocabAlignment` maps ids both ways through it (-1 where the other side has no such token) and is
computed once per pair of vocabularies, cached on disk under both fingerprints' digests.

Divergence across vocabularies (`intersection_kl`): each model's next-token distribution is pushed
onto the common space S ∪ {rest} (a token of the intersection keeps its probability; every other
token of that vocabulary goes to "rest"), and KL(P_S || Q_S) is taken there. That is a true KL
between two distributions on one space, 0 when the models agree on every shared token and on the
rest, and by the log-sum inequality it is a lower bound of the KL over any common refinement of the
two partitions. From top-k views, the estimate of shared/divergence.topk_kl over this space is in
turn a lower bound of KL(P_S || Q_S) (the same bucket argument): thresholds keep their meaning as
"the true divergence is at least this".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handoff.shared.divergence import topk_kl
from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.speculative import draft_distribution

logger = logging.getLogger(__name__)

ALIGNMENT_VERSION = 1


@dataclass(frozen=True, eq=False)
class VocabAlignment:
    """Ids of the same byte strings in Q's and P's vocabularies."""

    q_to_p: np.ndarray  # int32 [Vq]: P's id of Q's token's bytes, -1 if P has none (or it is special)
    p_to_q: np.ndarray  # int32 [Vp]: the reverse
    q_digest: str  # hex digests of the two vocabularies' fingerprints (shared/vocab.py)
    p_digest: str

    def __post_init__(self) -> None:
        for name in ("q_to_p", "p_to_q"):
            a = getattr(self, name)
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise ShapeError(f"{name}: expected integer ids of shape [V], got {a.dtype} {a.shape}")
        both = self.q_to_p >= 0
        if not np.array_equal(self.p_to_q[self.q_to_p[both]], np.flatnonzero(both)):
            raise ShapeError("q_to_p and p_to_q must be inverse on the intersection")

    @property
    def size(self) -> int:
        """Tokens in the intersection."""
        return int((self.q_to_p >= 0).sum())

    def q_ids_in_p(self, q_ids: np.ndarray) -> np.ndarray:
        """Q's ids in P's id space; ids P does not have become distinct ids past P's vocabulary.

        Args:
            q_ids: [..., k] Q token ids.

        Returns:
            [..., k] int64: P's id where the token is shared, else len(p_to_q) + (Q's id): never
            equal to a P id, and distinct within a row whenever q_ids are.
        """
        q = np.asarray(q_ids, dtype=np.int64)
        if q.size and (q.min() < 0 or q.max() >= self.q_to_p.size):
            raise ShapeError(f"q_ids: expected ids in [0, {self.q_to_p.size})")
        mapped = self.q_to_p[q].astype(np.int64)
        return np.where(mapped >= 0, mapped, self.p_to_q.size + q)

    def save(self, path: Path) -> None:
        """Write it as .npz (atomically: a partial file is never read back)."""
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            q_to_p=self.q_to_p,
            p_to_q=self.p_to_q,
            digests=np.array([self.q_digest, self.p_digest]),
            version=np.array(ALIGNMENT_VERSION),
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VocabAlignment:
        with np.load(path) as f:
            if int(f["version"]) != ALIGNMENT_VERSION:
                raise ShapeError(
                    f"{path}: alignment format {int(f['version'])}, expected {ALIGNMENT_VERSION}"
                )
            q_digest, p_digest = (str(d) for d in f["digests"])
            return cls(f["q_to_p"], f["p_to_q"], q_digest, p_digest)


def with_stops(alignment: VocabAlignment, q_stop: int, p_stop: int) -> VocabAlignment:
    """The alignment with Q's and P's end-of-turn tokens as one shared event.

    Special tokens are not text and never shared by align(); the end of a turn is still the same event
    for both models, and a divergence or a draft across tokenizers must see it.
    """
    q_to_p, p_to_q = alignment.q_to_p.copy(), alignment.p_to_q.copy()
    for name, arr, i in (("q_stop", q_to_p, q_stop), ("p_stop", p_to_q, p_stop)):
        if not 0 <= i < arr.size:
            raise ShapeError(f"{name}: expected an id in [0, {arr.size}), got {i}")
    if q_to_p[q_stop] >= 0 or p_to_q[p_stop] >= 0:
        # A model whose end of turn is also a text token: pairing it would take that text's place.
        logger.warning("the end-of-turn tokens are text tokens too: the end of turn stays unshared")
        return alignment
    q_to_p[q_stop], p_to_q[p_stop] = p_stop, q_stop
    return VocabAlignment(q_to_p, p_to_q, alignment.q_digest, alignment.p_digest)


def align(
    q_pieces: Sequence[bytes | None], p_pieces: Sequence[bytes | None], q_digest: str = "", p_digest: str = ""
) -> VocabAlignment:
    """The intersection of two vocabularies given each token's bytes (None: special, not text).

    Where one vocabulary spells the same bytes with several ids, the lowest id stands for them.

    Args:
        q_pieces: [Vq] Q's tokens' bytes.
        p_pieces: [Vp] P's tokens' bytes.
        q_digest, p_digest: the vocabularies' fingerprint digests (recorded, for the cache).
    """
    p_index: dict[bytes, int] = {}
    for i, piece in enumerate(p_pieces):
        if piece:
            p_index.setdefault(piece, i)
    q_to_p = np.full(len(q_pieces), -1, dtype=np.int32)
    p_to_q = np.full(len(p_pieces), -1, dtype=np.int32)
    for i, piece in enumerate(q_pieces):
        j = p_index.get(piece) if piece else None
        if j is not None and p_to_q[j] < 0:
            q_to_p[i] = j
            p_to_q[j] = i
    return VocabAlignment(q_to_p, p_to_q, q_digest, p_digest)


def token_pieces(gguf_path: Path | str) -> list[bytes | None]:
    """Each token's bytes as llama.cpp decodes it (its own tokenizer type); None for special tokens.

    Reads the process's vocabulary-only load of the file (shared.llama_cpp_model.gguf_tokenizer).
    """
    from handoff.shared.llama_cpp_model import gguf_tokenizer

    return gguf_tokenizer(gguf_path).text_pieces()


def cached_alignment(cache_dir: Path, q_digest: str, p_digest: str) -> VocabAlignment | None:
    """The cached alignment of two vocabularies (by their fingerprint digests), None if there is none.

    The cache file is named by both digests, so another model with the same vocabulary reuses it and
    a changed vocabulary never does.
    """
    path = _cache_path(cache_dir, q_digest, p_digest)
    if not path.exists():
        return None
    try:
        a = VocabAlignment.load(path)
    except (OSError, ValueError, KeyError, ShapeError) as e:
        logger.info("recomputing the alignment (%s)", e)
        return None
    return a if (a.q_digest, a.p_digest) == (q_digest, p_digest) else None


def store_alignment(cache_dir: Path, alignment: VocabAlignment) -> None:
    """Keep an alignment for cached_alignment."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    alignment.save(_cache_path(cache_dir, alignment.q_digest, alignment.p_digest))
    logger.info(
        "vocabulary alignment: %d shared tokens (of %d and %d)",
        alignment.size,
        alignment.q_to_p.size,
        alignment.p_to_q.size,
    )


def _cache_path(cache_dir: Path, q_digest: str, p_digest: str) -> Path:
    return cache_dir / f"alignment-{q_digest[:16]}-{p_digest[:16]}.npz"


def alignment_for(q_path: Path | str, p_path: Path | str, cache_dir: Path) -> VocabAlignment:
    """The alignment of two GGUF models' vocabularies, from the cache when both are unchanged."""
    from handoff.shared.model_info import load_model_info
    from handoff.shared.models import ModelRef

    digests = []
    for path in (q_path, p_path):
        path = Path(path)
        digests.append(load_model_info(ModelRef("gguf", path, path.name))[1].fingerprint.digest.hex())
    a = cached_alignment(cache_dir, *digests)
    if a is None:
        a = align(token_pieces(q_path), token_pieces(p_path), *digests)
        store_alignment(cache_dir, a)
    return a


def intersection_kl(
    p_ids: Any,
    p_logprobs: Any,
    q_ids: Any,
    q_logprobs: Any,
    alignment: VocabAlignment,
    p_logprobs_at_q_ids: Any | None = None,
    concept_of: np.ndarray | None = None,
) -> np.ndarray:
    """KL(P_S || Q_S) per position from top-k views in two vocabularies (see the module docstring).

    Args:
        p_ids: [n, kp] P's top-k ids (P's vocabulary).
        p_logprobs: [n, kp] P's log-probabilities there.
        q_ids: [n, kq] Q's top-k ids (Q's vocabulary).
        q_logprobs: [n, kq] Q's log-probabilities there.
        alignment: the two vocabularies' alignment.
        p_logprobs_at_q_ids: [n, kq] P's log-probabilities at Q's ids mapped into P's space (-inf
            where P has no such token), or None.
        concept_of: [2 Vp + Vq] concept ids over the mapped id space (char_concepts_across): the KL
            over concepts of the shared tokens (e.g. the next character), or None: over tokens.

    Returns:
        [n] nats >= 0, a lower bound of KL(P_S || Q_S); tokens outside the intersection count in
        the rest bucket on their side.
    """
    q_in_p = alignment.q_ids_in_p(np.asarray(q_ids))  # [n, kq]
    shared = q_in_p < alignment.p_to_q.size  # [n, kq]
    # Q's unshared tokens belong to Q's rest: as entries of probability 0 on both sides they add
    # nothing, and their mass stays in Q's rest bucket (1 - what S holds).
    q_lp = np.where(shared, np.asarray(q_logprobs, dtype=float), -np.inf)  # [n, kq]
    p_at_q = None
    if p_logprobs_at_q_ids is not None:
        p_at_q = np.where(shared, np.asarray(p_logprobs_at_q_ids, dtype=float), -np.inf)  # [n, kq]
    p = np.asarray(p_ids, dtype=np.int64)  # [n, kp]
    if p.size and (p.min() < 0 or p.max() >= alignment.p_to_q.size):
        raise ShapeError(f"p_ids: expected ids in [0, {alignment.p_to_q.size})")
    # P's unshared tokens: moved past every id Q's side can have, so that they never match.
    p_out = alignment.p_to_q[p] < 0
    p_mapped = np.where(p_out, alignment.p_to_q.size + alignment.q_to_p.size + p, p)
    return topk_kl(p_mapped, p_logprobs, q_in_p, q_lp, p_logprobs_at_q_ids=p_at_q, concept_of=concept_of)


def char_concepts_across(alignment: VocabAlignment, q_pieces: Sequence[bytes | None]) -> np.ndarray:
    """Concept ids over intersection_kl's id space: a shared token's first character, every other id its own.

    With them intersection_kl is the KL over the next character among the shared tokens: tokens that
    begin the same text (" hel" and " hello") stop counting as a disagreement, whatever the two
    tokenizers make of the rest. Tokens outside the intersection only ever fall in a rest bucket.

    Args:
        alignment: the vocabularies' alignment.
        q_pieces: [Vq] Q's tokens' bytes (a shared token's bytes are P's too).

    Returns:
        [2 Vp + Vq] int64 concept ids.
    """
    from handoff.shared.concepts import first_char

    vp, vq = alignment.p_to_q.size, alignment.q_to_p.size
    if len(q_pieces) != vq:
        raise ShapeError(f"q_pieces: expected {vq} tokens, got {len(q_pieces)}")
    out = np.arange(2 * vp + vq, dtype=np.int64) + 2 * vp + vq  # own concepts, past every shared one
    keys: dict[str, int] = {}
    for p in np.flatnonzero(alignment.p_to_q >= 0):
        key = first_char(q_pieces[alignment.p_to_q[p]])
        if key is not None:
            out[p] = keys.setdefault(key, len(keys))
    return out


def intersection_draft(
    topk_ids: Any, topk_logprobs: Any, settings: SamplingSettings, alignment: VocabAlignment
) -> tuple[np.ndarray, np.ndarray]:
    """Q's draft distribution restricted to the shared tokens, in P's id space (TLI).

    Token-level intersection, Timor et al. (ICML 2025): Q drafts only tokens P also has, from its
    sampling distribution over its top-k restricted to them and renormalised; P verifies the draft as
    its own tokens with standard speculative sampling (shared.speculative.verify_draft, with these ids
    and probabilities as the draft's distribution), so the output is distributed exactly as P's own
    sampling. When greedy, the draft is Q's likeliest shared token.

    Args:
        topk_ids: [k] Q's top-k ids (Q's vocabulary), by descending log-probability.
        topk_logprobs: [k] their log-probabilities (temperature 1).
        settings: the edge's sampling settings.
        alignment: Q's and P's vocabularies aligned.

    Returns:
        (P's ids [m], probabilities [m] summing to 1); both empty when no top-k token is shared (the
        edge then has nothing to draft: P generates the token).
    """
    ids = np.asarray(topk_ids, dtype=np.int64)
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if ids.ndim != 1 or ids.shape != lp.shape:
        raise ShapeError(f"top-k view: expected ids [k] and logprobs [k], got {ids.shape} and {lp.shape}")
    shared = alignment.q_to_p[ids] >= 0
    if not shared.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    probs = draft_distribution(ids[shared], lp[shared], settings)  # renormalised over the shared
    return alignment.q_to_p[ids[shared]].astype(np.int64), probs
