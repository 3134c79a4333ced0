"""The wire protocol, handoff.v1: generated messages (see proto/) and conversions to our types.

The generated modules `handoff_pb2*` are committed; regenerate them with scripts/gen_proto.py.
"""

from __future__ import annotations

import numpy as np

from handoff.shared.constraints import Constraint
from handoff.shared.errors import ShapeError
from handoff.shared.vocab import VocabFingerprint
from handoff.shared.wire import handoff_pb2 as pb
from handoff.shared.wire import handoff_pb2_grpc as pb_grpc

PROTOCOL_VERSION = "handoff.v1"

__all__ = [
    "PROTOCOL_VERSION",
    "constraint_from_proto",
    "constraint_to_proto",
    "fingerprint_from_proto",
    "fingerprint_to_proto",
    "pb",
    "pb_grpc",
    "topk_from_proto",
    "topk_to_proto",
]


def fingerprint_to_proto(fp: VocabFingerprint) -> pb.VocabFingerprint:
    return pb.VocabFingerprint(
        vocab_size=fp.vocab_size,
        block_size=fp.block_size,
        block_digests=list(fp.block_digests),
        digest=fp.digest,
        algorithm=fp.algorithm,
    )


def fingerprint_from_proto(msg: pb.VocabFingerprint) -> VocabFingerprint:
    """Raises VocabularyMismatch when the message is malformed (wrong number of blocks)."""
    return VocabFingerprint(
        vocab_size=msg.vocab_size,
        block_size=msg.block_size,
        block_digests=tuple(msg.block_digests),
        digest=msg.digest,
        algorithm=msg.algorithm,
    )


def topk_to_proto(ids: np.ndarray, logprobs: np.ndarray) -> pb.TopK:
    """Args: ids [k] integer, logprobs [k] float."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.ndim != 1 or ids.shape != logprobs.shape:
        raise ShapeError(
            f"top-k view: expected ids [k] and logprobs [k], got {ids.shape} and {logprobs.shape}"
        )
    return pb.TopK(ids=ids.astype(np.int32).tolist(), logprobs=logprobs.astype(np.float32).tolist())


def topk_from_proto(msg: pb.TopK, vocab_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns: ids int32 [k], logprobs float64 [k]; raises ShapeError on a malformed view."""
    ids = np.asarray(msg.ids, dtype=np.int32)
    logprobs = np.asarray(msg.logprobs, dtype=np.float64)
    if ids.shape != logprobs.shape:
        raise ShapeError(f"top-k view: {ids.shape[0]} ids but {logprobs.shape[0]} log-probabilities")
    bad = ids[(ids < 0) | (ids >= vocab_size)] if vocab_size is not None else ids[ids < 0]
    if bad.size:
        raise ShapeError(
            f"top-k view: token ids outside [0, {vocab_size or 'vocab_size'}): {bad[:5].tolist()}"
        )
    if np.any(np.isnan(logprobs)) or np.any(logprobs > 1e-4):
        raise ShapeError("top-k view: log-probabilities must be <= 0 and not NaN")
    return ids, logprobs


def constraint_to_proto(constraint: Constraint | None, completion_start: int) -> pb.Constraint | None:
    """A completion's constraint on the wire (None when there is nothing to enforce).

    Args:
        constraint: the completion's constraint, or None.
        completion_start: the completion's first position (the original prompt's length).
    """
    if constraint is None or not constraint.active:
        return None
    return pb.Constraint(
        grammar=constraint.grammar,
        frequency_penalty=constraint.frequency_penalty,
        presence_penalty=constraint.presence_penalty,
        logit_bias=dict(constraint.logit_bias),
        completion_start=completion_start,
    )


def constraint_from_proto(msg: pb.Constraint) -> tuple[Constraint, int]:
    """(the constraint, its completion's first position) from the wire.

    The wire's float32 values are exactly the edge's (Constraint.build rounds to float32), so both
    sides adjust their logits with the same numbers.

    Raises:
        ConstraintError: a value is out of range.
    """
    return (
        Constraint(
            grammar=msg.grammar,
            frequency_penalty=msg.frequency_penalty,
            presence_penalty=msg.presence_penalty,
            logit_bias=tuple(sorted((int(i), float(b)) for i, b in msg.logit_bias.items())),
        ),
        msg.completion_start,
    )
