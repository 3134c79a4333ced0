"""The wire protocol, handoff.v1: generated messages (see proto/) and conversions to our types.

The generated modules `handoff_pb2*` are committed; regenerate them with scripts/gen_proto.py.
"""

from __future__ import annotations

import numpy as np

from handoff.shared.errors import ShapeError
from handoff.shared.vocab import VocabFingerprint
from handoff.shared.wire import handoff_pb2 as pb
from handoff.shared.wire import handoff_pb2_grpc as pb_grpc

PROTOCOL_VERSION = "handoff.v1"

__all__ = [
    "PROTOCOL_VERSION",
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
