"""Vocabulary fingerprints: is P's id space the same as Q's?

The fingerprint hashes the token strings by id. It is cut into fixed blocks of ids so that two
vocabularies of different sizes (Qwen models pad their embedding tables to different lengths) can
be compared on their shared id range, and so that a mismatch can be located without shipping
151,936 strings over the wire: the block digests say which block differs, per-token hashes of that
block (the GetInfo call serves them) name the exact ids.

Encoding of one token, for every digest here: uint32 little-endian id, uint32 little-endian
byte length, then the token's bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from handoff.shared.errors import VocabularyMismatch

ALGORITHM = "handoff-vocab-v1"
BLOCK_SIZE = 1024
BLOCK_DIGEST_BYTES = 8
# Ids named in a mismatch error; more would only be noise.
MAX_NAMED_IDS = 5

TokenHashFetcher = Callable[[int, int], Sequence[int]]


def _encode(token_id: int, token: bytes) -> bytes:
    return struct.pack("<II", token_id, len(token)) + token


def token_hash(token_id: int, token: bytes) -> int:
    """32-bit hash of one (id, string) pair; fits the wire's fixed32."""
    return int.from_bytes(hashlib.sha256(_encode(token_id, token)).digest()[:4], "little")


@dataclass(frozen=True)
class VocabFingerprint:
    """Hash of a vocabulary's token strings, in blocks of `block_size` ids."""

    vocab_size: int
    block_size: int
    block_digests: tuple[bytes, ...]  # [ceil(vocab_size / block_size)], BLOCK_DIGEST_BYTES each
    digest: bytes  # sha256 over every token
    algorithm: str = ALGORITHM

    def __post_init__(self) -> None:
        expected = -(-self.vocab_size // self.block_size) if self.block_size else 0
        if self.block_size < 1 or len(self.block_digests) != expected:
            raise VocabularyMismatch(
                f"malformed vocabulary fingerprint: {len(self.block_digests)} block digests for "
                f"vocab_size={self.vocab_size}, block_size={self.block_size} (expected {expected})"
            )

    @property
    def short(self) -> str:
        """First 16 hex digits of the digest, for humans."""
        return self.digest.hex()[:16]

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.vocab_size)


@dataclass(frozen=True)
class Vocabulary:
    """Token strings by id, as bytes (GGUF stores them as UTF-8 text)."""

    tokens: tuple[bytes, ...]
    name: str = field(default="", compare=False)

    def __len__(self) -> int:
        return len(self.tokens)

    def text(self, token_id: int) -> str:
        """Printable form of a token string, for error messages."""
        return self.tokens[token_id].decode("utf-8", errors="backslashreplace")

    def block_digest(self, start: int, end: int) -> bytes:
        h = hashlib.sha256()
        for i in range(start, end):
            h.update(_encode(i, self.tokens[i]))
        return h.digest()[:BLOCK_DIGEST_BYTES]

    @cached_property
    def fingerprint(self) -> VocabFingerprint:
        n = len(self.tokens)
        full = hashlib.sha256()
        blocks = []
        for start in range(0, n, BLOCK_SIZE):
            end = min(start + BLOCK_SIZE, n)
            block = b"".join(_encode(i, self.tokens[i]) for i in range(start, end))
            full.update(block)
            blocks.append(hashlib.sha256(block).digest()[:BLOCK_DIGEST_BYTES])
        return VocabFingerprint(n, BLOCK_SIZE, tuple(blocks), full.digest())

    def token_hashes(self, start: int, end: int) -> np.ndarray:
        """Per-token hashes for ids [start, end).

        Returns:
            uint32 array [end - start].
        """
        if not 0 <= start <= end <= len(self.tokens):
            raise VocabularyMismatch(
                f"token hash range [{start}, {end}) is outside the vocabulary of {len(self.tokens)} tokens"
            )
        return np.array([token_hash(i, self.tokens[i]) for i in range(start, end)], dtype=np.uint32)


def first_differences(a: Vocabulary, b: Vocabulary, limit: int = MAX_NAMED_IDS) -> list[int]:
    """Ids in the shared range [0, min(len(a), len(b))) whose strings differ, at most `limit`."""
    out: list[int] = []
    for i in range(min(len(a), len(b))):
        if a.tokens[i] != b.tokens[i]:
            out.append(i)
            if len(out) >= limit:
                break
    return out


def check_vocabularies(a: Vocabulary, b: Vocabulary) -> None:
    """Raise VocabularyMismatch naming the first differing ids if `a` and `b` differ on their shared range."""
    diff = first_differences(a, b)
    if diff:
        shown = ", ".join(f"{i} ({a.text(i)!r} vs {b.text(i)!r})" for i in diff)
        raise VocabularyMismatch(
            f"vocabularies of {a.name or 'model A'} ({len(a)} tokens) and {b.name or 'model B'} "
            f"({len(b)} tokens) differ; first differing ids: {shown}"
        )


def check_compatible(
    local: Vocabulary,
    remote: VocabFingerprint,
    *,
    remote_name: str = "the cloud model",
    remote_token_hashes: TokenHashFetcher | None = None,
) -> None:
    """Check a local vocabulary against a remote fingerprint on their shared id range.

    Blocks lying inside both vocabularies are compared by digest. A remote block that runs past
    the end of the local vocabulary can only be checked with per-token hashes, which
    `remote_token_hashes(start, end)` supplies when given (the remote side checks it otherwise).
    With the fetcher, a mismatch names the exact ids; without it, the first differing block.

    Raises:
        VocabularyMismatch: the vocabularies differ, or the fingerprint is of another algorithm.
    """
    if remote.algorithm != ALGORITHM or remote.block_size != BLOCK_SIZE:
        raise VocabularyMismatch(
            f"{remote_name} uses vocabulary fingerprint {remote.algorithm!r} with block size "
            f"{remote.block_size}; this side uses {ALGORITHM!r} with block size {BLOCK_SIZE}"
        )
    n_local = len(local)
    for block, digest in enumerate(remote.block_digests):
        start, end = remote.block_range(block)
        if start >= n_local:
            break
        if end <= n_local and local_block_digest(local, block, start, end) == digest:
            continue
        if end > n_local and remote_token_hashes is None:
            continue  # straddles our end: only per-token hashes can tell; the remote side checks it
        sizes = (
            f"local vocabulary {local.name} has {n_local} tokens (fingerprint {local.fingerprint.short}), "
            f"{remote_name} has {remote.vocab_size} (fingerprint {remote.short})"
        )
        end = min(end, n_local)
        if remote_token_hashes is None:
            raise VocabularyMismatch(
                f"vocabularies differ in ids [{start}, {end}) (the first differing block of "
                f"{remote.block_size}); {sizes}"
            )
        theirs = np.asarray(remote_token_hashes(start, end), dtype=np.uint32)
        if theirs.shape != (end - start,):
            raise VocabularyMismatch(
                f"{remote_name} returned {theirs.shape[0]} token hashes for ids [{start}, {end}); {sizes}"
            )
        differing = (np.flatnonzero(theirs != local.token_hashes(start, end)) + start)[:MAX_NAMED_IDS]
        if differing.size:
            shown = ", ".join(f"{i} (local {local.text(int(i))!r})" for i in differing)
            raise VocabularyMismatch(f"vocabularies differ; first differing ids: {shown}; {sizes}")
        if end == remote.block_range(block)[1]:
            # The digest differed but no 32-bit token hash does: name the block.
            raise VocabularyMismatch(f"vocabularies differ in ids [{start}, {end}); {sizes}")


def local_block_digest(local: Vocabulary, block: int, start: int, end: int) -> bytes:
    """The digest of ids [start, end) of `local`: from its cached fingerprint when its block is the same range."""
    fp = local.fingerprint
    if block < len(fp.block_digests) and fp.block_range(block) == (start, end):
        return fp.block_digests[block]
    return local.block_digest(start, end)
