"""A broken session's cache, kept for its resynchronising edge: the prefix is adopted, not prefilled again."""

from __future__ import annotations

import asyncio

import pytest

from handoff.cloud.resume import RetainedSequences, common_prefix
from handoff.cloud.service import VerifierService
from handoff.cloud.settings import CloudSettings
from handoff.edge.cloud_harness import llama_backend_factory, run, score_all, vocabulary_of
from handoff.edge.verifier_client import InProcessTransport, VerifierClient
from handoff.shared.errors import ShapeError


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [1], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2, 3], [1, 9, 3], 1),
        ([5], [6], 0),
    ],
)
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == n == common_prefix(b, a)


def test_retained_takes_the_longest_shared_prefix_and_evicts_the_oldest():
    kept = RetainedSequences(capacity=2, ttl_s=60, min_tokens=2)
    assert kept.put("s1", [1, 2, 3]) == []
    assert kept.put("s2", [1, 2, 3, 4, 5]) == []
    assert kept.put("s0", [1]) == ["s0"]  # too short to be worth keeping: released at once
    assert kept.take([7, 7, 7]) is None  # nothing shares enough
    assert kept.take([1, 2, 3, 4, 9]) == ("s2", 4)
    assert kept.put("s3", [8, 8]) == []
    assert kept.put("s4", [9, 9]) == ["s1"]  # over capacity: the oldest goes
    assert len(kept) == 2 and kept.pop_oldest() == "s3" and kept.drain() == ["s4"]


def test_retained_expire_after_ttl_and_can_be_off():
    kept = RetainedSequences(capacity=4, ttl_s=10)
    kept.put("s1", [1, 2])
    assert kept.expired(now=kept._items[0].since + 5) == []
    assert kept.expired(now=kept._items[0].since + 11) == ["s1"] and len(kept) == 0
    off = RetainedSequences(capacity=0, ttl_s=10)
    assert off.put("s1", [1, 2]) == ["s1"] and off.take([1, 2]) is None
    with pytest.raises(ShapeError):
        RetainedSequences(capacity=-1, ttl_s=10)


def _service(path, max_sessions: int = 64) -> VerifierService:
    backend = llama_backend_factory(path, max_sequences=max_sessions)()
    return VerifierService(backend, CloudSettings(batch_wait_s=0.0, max_sessions=max_sessions))


def test_resynchronised_session_adopts_the_broken_ones_cache_with_identical_views(tiny_gguf_a):
    """Break a session mid-way, reopen with prompt + its tokens: the prefix is reused and P's views at
    the later positions are bit-identical to the unbroken session's (deterministic mode)."""
    vocab = vocabulary_of(tiny_gguf_a)
    prompt, tokens = list(range(10, 30)), list(range(100, 140))

    async def scenario():
        service = _service(tiny_gguf_a)
        await service.start()
        client = VerifierClient(InProcessTransport(service))
        try:
            first = await client.open_session(prompt, vocab, top_k=8)
            assert first.reused_tokens == 0 and first.server_id == service.server_id
            whole = await score_all(first, len(prompt), tokens, [8] * 5)
            first.abort()  # the stream breaks: no Close
            await asyncio.sleep(0.05)
            assert len(service._retained) == 1
            cut = 24  # the edge had committed 24 of the tokens when it came back
            second = await client.open_session(prompt + tokens[:cut], vocab, top_k=8)
            # All but the new prompt's last token came from the kept cache (the open feeds that one).
            assert second.reused_tokens == len(prompt) + cut - 1
            assert service.metrics.resumed_tokens._value.get() == second.reused_tokens
            start = len(prompt) + cut
            rest = await score_all(second, start, tokens[cut:], [5, 11])
            await second.close()
            assert len(service._retained) == 0  # a closed session is not kept
            third = await client.open_session(prompt + tokens[:cut], vocab, top_k=8)
            assert third.reused_tokens == 0  # nothing kept: prefilled from scratch
            await third.close()
            return whole[cut:], rest
        finally:
            await client.close()
            await service.stop()

    expected, got = run(scenario())
    assert [s.SerializeToString() for s in got] == [s.SerializeToString() for s in expected]


def test_kept_caches_give_way_to_new_sessions(tiny_gguf_a):
    """A backend with no free sequence evicts kept caches for a new session instead of refusing it."""
    vocab = vocabulary_of(tiny_gguf_a)

    async def scenario():
        service = _service(tiny_gguf_a, max_sessions=2)
        await service.start()
        client = VerifierClient(InProcessTransport(service))
        try:
            for i in range(2):
                s = await client.open_session([10 + i] * 12, vocab, top_k=4)
                s.abort()
            await asyncio.sleep(0.05)
            assert len(service._retained) == 2
            live = [await client.open_session([50 + i] * 12, vocab, top_k=4) for i in range(2)]
            assert len(service._retained) == 0 and all(s.reused_tokens == 0 for s in live)
            for s in live:
                await s.close()
        finally:
            await client.close()
            await service.stop()

    run(scenario())
