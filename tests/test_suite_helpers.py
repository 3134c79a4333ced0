"""The suite's own machinery (tests/conftest.py): the tier markers and the waiting helpers."""

from __future__ import annotations

import asyncio
import time

import pytest

TIERS = ("unit", "tiny", "e2e")


def test_every_collected_test_has_exactly_one_tier(request):
    """`-m unit`, `-m "unit or tiny"` select by these: a test without a tier, or with two, would be lost."""
    items = request.session.items
    assert request.node in items
    wrong = {
        item.nodeid: tiers
        for item in items
        if len(tiers := [t for t in TIERS if item.get_closest_marker(t) is not None]) != 1
    }
    assert not wrong, wrong
    for item in items:
        if item.get_closest_marker("real_models") is not None:
            assert item.get_closest_marker("e2e") is not None, item.nodeid


def test_a_test_without_models_or_processes_is_unit(request):
    assert request.node.get_closest_marker("unit") is not None


def test_the_tiny_fixtures_make_a_test_tiny(request, tiny_model_dir):
    assert request.node.get_closest_marker("tiny") is not None


def test_running_the_command_makes_a_test_e2e(request, run_handoff):
    assert request.node.get_closest_marker("e2e") is not None
    assert run_handoff.argv("models", 3)[-4:] == ["-m", "handoff", "models", "3"]


def test_wait_until_returns_the_value_or_fails_past_the_timeout(wait_until):
    t0 = time.monotonic()
    assert wait_until(lambda: time.monotonic() - t0 > 0.05 and "done", timeout=5) == "done"
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for nothing"):
        wait_until(lambda: False, timeout=0.05, what="nothing")


def test_async_wait_until_lets_the_loop_run_and_awaits_coroutine_predicates(async_wait_until):
    async def scenario():
        done = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, done.set)
        await async_wait_until(done.is_set, timeout=5)

        async def later():
            return done.is_set() and 7

        assert await async_wait_until(later) == 7
        with pytest.raises(AssertionError, match="timed out"):
            await async_wait_until(lambda: None, timeout=0.05)

    asyncio.run(scenario())
