"""Vocabulary fingerprints and compatibility checks on hand-made vocabularies."""

from __future__ import annotations

import dataclasses

import pytest

from handoff.shared.errors import VocabularyMismatch
from handoff.shared.vocab import (
    BLOCK_SIZE,
    VocabFingerprint,
    Vocabulary,
    check_compatible,
    check_vocabularies,
)
from handoff.shared.wire import fingerprint_from_proto, fingerprint_to_proto, pb


def vocab(n: int, changes: dict[int, bytes] | None = None, name: str = "") -> Vocabulary:
    tokens = [f"tok{i}".encode() for i in range(n)]
    for i, t in (changes or {}).items():
        tokens[i] = t
    return Vocabulary(tuple(tokens), name=name)


def hashes_of(v: Vocabulary):
    calls = []

    def fetch(start: int, end: int):
        calls.append((start, end))
        return v.token_hashes(start, end).tolist()

    fetch.calls = calls
    return fetch


def test_fingerprint_is_deterministic_and_blocked():
    fp = vocab(2500).fingerprint
    assert fp == vocab(2500).fingerprint
    assert fp.vocab_size == 2500 and fp.block_size == BLOCK_SIZE
    assert len(fp.block_digests) == 3  # [0,1024), [1024,2048), [2048,2500)
    assert fp.block_range(2) == (2048, 2500)
    assert all(len(d) == 8 for d in fp.block_digests) and len(fp.digest) == 32


def test_fingerprint_depends_on_ids_not_just_strings():
    a = Vocabulary((b"x", b"y"))
    b = Vocabulary((b"y", b"x"))
    assert a.fingerprint.digest != b.fingerprint.digest
    # Length-prefixing: "ab"+"c" is not "a"+"bc".
    assert Vocabulary((b"ab", b"c")).fingerprint.digest != Vocabulary((b"a", b"bc")).fingerprint.digest


def test_identical_vocabularies_are_compatible():
    check_vocabularies(vocab(3000), vocab(3000))
    check_compatible(vocab(3000), vocab(3000).fingerprint)


def test_shared_range_decides_for_different_sizes():
    small, large = vocab(2500), vocab(4000)  # same strings on [0, 2500)
    check_vocabularies(small, large)
    # The larger side can check every block of the smaller one.
    check_compatible(large, small.fingerprint)
    # The smaller side checks the blocks inside its range, and the straddling one with token hashes.
    check_compatible(small, large.fingerprint)
    fetcher = hashes_of(large)
    check_compatible(small, large.fingerprint, remote_token_hashes=fetcher)
    assert fetcher.calls == [(2048, 2500)]


def test_mismatch_names_the_first_differing_ids_locally():
    a, b = vocab(3000, name="edge.gguf"), vocab(3000, {1500: b"other", 2999: b"last"}, name="cloud.gguf")
    with pytest.raises(VocabularyMismatch) as e:
        check_vocabularies(a, b)
    msg = str(e.value)
    assert "first differing ids: 1500 ('tok1500' vs 'other'), 2999" in msg
    assert "edge.gguf" in msg and "cloud.gguf" in msg


def test_mismatch_over_the_wire_names_the_block_or_the_ids():
    local, remote = vocab(3000, name="edge"), vocab(3000, {1500: b"other"})
    with pytest.raises(VocabularyMismatch, match=r"differ in ids \[1024, 2048\)"):
        check_compatible(local, remote.fingerprint)
    with pytest.raises(VocabularyMismatch, match=r"first differing ids: 1500 \(local 'tok1500'\)"):
        check_compatible(local, remote.fingerprint, remote_token_hashes=hashes_of(remote))


def test_mismatch_in_the_straddling_block_needs_token_hashes():
    small, large = vocab(2500), vocab(4000, {2400: b"changed"})
    check_compatible(small, large.fingerprint)  # cannot see it without token hashes...
    with pytest.raises(VocabularyMismatch, match="first differing ids: 2400"):
        check_compatible(small, large.fingerprint, remote_token_hashes=hashes_of(large))
    with pytest.raises(VocabularyMismatch, match=r"differ in ids \[2048, 2500\)"):
        check_compatible(large, small.fingerprint)  # ...and the larger side sees it anyway


def test_a_wrong_number_of_token_hashes_is_reported():
    local, remote = vocab(3000), vocab(3000, {5: b"x"})
    with pytest.raises(VocabularyMismatch, match="returned 3 token hashes"):
        check_compatible(local, remote.fingerprint, remote_token_hashes=lambda s, e: [1, 2, 3])


def test_other_algorithms_and_malformed_fingerprints_are_rejected():
    fp = vocab(100).fingerprint
    with pytest.raises(VocabularyMismatch, match="uses vocabulary fingerprint 'other'"):
        check_compatible(vocab(100), dataclasses.replace(fp, algorithm="other"))
    with pytest.raises(VocabularyMismatch, match="malformed vocabulary fingerprint"):
        VocabFingerprint(vocab_size=5000, block_size=BLOCK_SIZE, block_digests=(b"12345678",), digest=b"")
    with pytest.raises(VocabularyMismatch, match="malformed"):
        fingerprint_from_proto(pb.VocabFingerprint(vocab_size=10, block_size=0))


def test_fingerprint_round_trips_through_the_wire():
    fp = vocab(2100).fingerprint
    msg = pb.VocabFingerprint.FromString(fingerprint_to_proto(fp).SerializeToString())
    assert fingerprint_from_proto(msg) == fp
