"""The policy core (edge.policy): PolicyConfig's checks, HandoffPolicy's decisions on hand-made arrays,
the registry of kinds, and one policy object shared by the live controller and the offline replay."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest

from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.policy import (
    CallableScorer,
    EntropyScorer,
    ExactPolicy,
    HandoffPolicy,
    KLScorer,
    PolicyConfig,
    RollbackPolicy,
    SeedPolicy,
    WindowDecision,
    WindowView,
    make_policy,
    policy_class,
    policy_kinds,
    register_policy,
)
from handoff.edge.runner import EdgeRunner
from handoff.edge.simulation.replay import replay_policy
from handoff.edge.simulation.traces import Generation
from handoff.shared.errors import ShapeError
from handoff.shared.wire import pb

NAN = math.nan
INF = math.inf


# --------------------------------------------------------------------------------------------------
# PolicyConfig: every check raises ShapeError naming the field
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"aggregation": "median"}, "aggregation"),
        ({"check_interval": 0}, "check_interval"),
        ({"check_interval": True}, "check_interval"),
        ({"handback_tokens": 0}, "handback_tokens"),
        ({"top_k": 0}, "top_k"),
        ({"seed_tokens": -1}, "seed_tokens"),
        ({"agree_tokens": -1}, "agree_tokens"),
        ({"lookahead_windows": -1}, "lookahead_windows"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": NAN}, "threshold"),
        ({"threshold": INF}, "threshold"),
        ({"kind": "magic"}, "kind"),
        ({"kind": ""}, "kind"),
        ({"trigger": "reward"}, "trigger"),
        ({"skip": "sometimes"}, "kind"),  # the skip gate's own check
        ({"skip": "entropy", "skip_entropy_max": -1.0}, "entropy_max"),
        ({"skip": "top1", "skip_top1_min": 0.0}, "top1_min"),
        ({"budget": -0.1}, "budget"),
        ({"budget": 1.0}, "budget"),
        ({"budget": NAN}, "budget"),
        ({"budget": 0.2, "budget_window": 0}, "budget_window"),
        ({"budget": 0.2, "budget_gain": 0.0}, "gain"),
        ({"draft_tokens": 0}, "draft_tokens"),
        ({"draft_tokens": 13, "draft_tokens_max": 12}, "draft_tokens"),
        ({"draft_tokens_max": 0}, "draft_tokens"),
    ],
)
def test_policy_config_rejects_each_bad_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        PolicyConfig(**kwargs)


def test_policy_config_defaults_and_edges_are_valid() -> None:
    PolicyConfig()
    PolicyConfig(threshold=0.0, seed_tokens=0, agree_tokens=0, lookahead_windows=0, budget=0.0)
    PolicyConfig(draft_tokens=12, draft_tokens_max=12, check_interval=np.int64(3))
    PolicyConfig(budget=0.5, budget_window=1)
    PolicyConfig(budget_window=0)  # unused while the budget is off, as before
    for kind in ("seed", "rollback", "exact"):
        assert kind in policy_kinds() and PolicyConfig(kind=kind).kind == kind


def test_policy_config_to_proto_names_the_kind() -> None:
    assert PolicyConfig(kind="seed").to_proto().kind == pb.POLICY_KIND_SEED
    assert PolicyConfig(kind="rollback").to_proto().kind == pb.POLICY_KIND_ROLLBACK
    assert PolicyConfig(kind="exact").to_proto().kind == pb.POLICY_KIND_EXACT


# --------------------------------------------------------------------------------------------------
# HandoffPolicy: decisions on hand-made arrays
# --------------------------------------------------------------------------------------------------


def core(**kw) -> HandoffPolicy:
    return make_policy(PolicyConfig(**({"threshold": 0.2} | kw)))


def test_make_policy_builds_the_registered_class() -> None:
    assert type(core(kind="seed")) is SeedPolicy
    assert type(core(kind="rollback")) is RollbackPolicy
    exact = core(kind="exact")
    assert type(exact) is ExactPolicy and exact.round == "draft" and exact.cut_kind == "rollback"
    assert core().round == "window"
    with pytest.raises(ShapeError, match="kind"):
        SeedPolicy(PolicyConfig(kind="rollback"))


def test_rollback_cuts_at_the_first_position_over_tau() -> None:
    assert core().decide_scores([0.1, 0.3, 0.5, 0.0]) == WindowDecision(1, True)
    assert core().decide_scores([0.9, 0.0]) == WindowDecision(0, True)
    assert core().decide_scores([0.1, 0.2, 0.0]) == WindowDecision(3, False)  # tau itself stays


def test_seed_keeps_the_window_and_hands_over() -> None:
    assert core(kind="seed").decide_scores([0.1, 0.3, 0.5, 0.0]) == WindowDecision(4, True)
    assert core(kind="seed").decide_scores([0.1, 0.1]) == WindowDecision(2, False)


def test_nan_is_not_scored() -> None:
    # Never cut at, left out of the aggregate; a window without a score stands.
    assert core().decide_scores([NAN, 0.3, NAN]) == WindowDecision(1, True)
    assert core(aggregation="mean").decide_scores([NAN, 0.0, 0.5]) == WindowDecision(2, True)
    assert core(threshold=0.0).decide_scores([NAN, NAN]) == WindowDecision(2, False)
    assert core().decide_scores([]) == WindowDecision(0, False)


def test_mean_averages_a_spike_away_and_max_does_not() -> None:
    spike = [0.0, 0.0, 0.0, 0.6]
    assert core(aggregation="mean").decide_scores(spike) == WindowDecision(4, False)
    assert core(aggregation="max").decide_scores(spike) == WindowDecision(3, True)
    several = [0.0, 0.3, 0.3, 0.6]  # mean 0.3 > tau: the cut is still at the first position over
    assert core(aggregation="mean").decide_scores(several) == WindowDecision(1, True)


def test_decide_rejects_bad_scores() -> None:
    with pytest.raises(ShapeError, match=r"scores: expected shape \[n\]"):
        core().decide_scores([[0.1]])
    with pytest.raises(ShapeError, match="scores: expected a real-valued"):
        core().decide_scores(["high"])


def view(kls: list[float] | None, entropy: list[float] | None = None) -> WindowView:
    n = len(kls if kls is not None else entropy or [])
    ent = entropy if entropy is not None else [0.1] * n
    return WindowView(
        token_ids=np.arange(n),
        q_topk_ids=np.arange(2 * n).reshape(n, 2),
        q_topk_logprobs=np.full((n, 2), -1.0),
        q_entropy=np.asarray(ent),
        p_kls=None if kls is None else np.asarray(kls),
    )


def test_decide_scores_the_window_with_the_trigger() -> None:
    w = view([0.0, 0.5, 0.0], entropy=[0.1, 0.1, 3.0])
    assert isinstance(core().scorer, KLScorer) and core().decide(w) == WindowDecision(1, True)
    by_entropy = core(trigger="entropy", threshold=1.0)
    assert isinstance(by_entropy.scorer, EntropyScorer) and by_entropy.decide(w) == WindowDecision(2, True)
    # Any TokenScorer replaces the trigger.
    third = CallableScorer(lambda v: np.array([0.0, 0.0, 9.0]))
    assert make_policy(PolicyConfig(), scorer=third).decide(w) == WindowDecision(2, True)


def test_window_decision_is_checked_against_the_window() -> None:
    assert WindowDecision(3, False).checked(3) == WindowDecision(3, False)
    assert WindowDecision(0, True).checked(3).keep == 0
    with pytest.raises(ShapeError, match="cannot keep"):
        WindowDecision(4, True).checked(3)
    with pytest.raises(ShapeError, match="not handed over keeps all its 3 tokens"):
        WindowDecision(2, False).checked(3)
    with pytest.raises(ShapeError, match="keep"):
        WindowDecision(-1, True)


def test_hand_back_after_agree_tokens_agreeing_positions() -> None:
    turn = core(agree_tokens=3).hand_back()
    assert [turn.agreed(kl) for kl in (0.1, 0.2, 0.05)] == [False, False, True]  # <= tau agrees


def test_hand_back_streak_resets_on_a_disagreement() -> None:
    turn = core(agree_tokens=2).hand_back()
    assert [turn.agreed(kl) for kl in (0.1, 0.5, 0.1, NAN, INF, 0.0, 0.1)] == [
        False, False, False, False, False, False, True,
    ]  # fmt: skip
    # Each turn starts its own streak.
    policy = core(agree_tokens=2)
    first = policy.hand_back()
    first.agreed(0.0)
    assert policy.hand_back().agreed(0.0) is False


def test_no_early_hand_back_when_off_or_not_asked() -> None:
    assert not any(core(agree_tokens=0).hand_back().agreed(0.0) for _ in range(10))
    turn = core(agree_tokens=1).hand_back(early=False)  # seed tokens, cloud-only turns
    assert not any(turn.agreed(0.0) for _ in range(10))


def test_budget_moves_tau_and_the_decisions_follow() -> None:
    policy = core(threshold=0.2, budget=0.1, budget_window=16, budget_gain=2.0, agree_tokens=1)
    assert policy.threshold == 0.2 and policy.budget is not None
    window = [0.0, 0.25, 0.0]
    assert policy.decide_scores(window) == WindowDecision(1, True)
    assert policy.hand_back().agreed(0.22) is False
    for _ in range(4):  # all cloud, far over the 10% budget: tau rises
        policy.on_committed(8, 8)
    assert policy.threshold > 0.25
    assert policy.decide_scores(window) == WindowDecision(3, False)
    assert policy.hand_back().agreed(0.22) is True
    # Without a budget, committed counts change nothing.
    plain = core()
    assert plain.on_committed(8, 8) == 0.2 and plain.threshold == 0.2


def test_budget_is_per_policy_object_not_per_generation() -> None:
    policy = core(budget=0.1, budget_window=16)
    policy.on_committed(8, 8)
    tau = policy.threshold
    policy.begin()  # a new generation keeps the budget's tau
    assert policy.threshold == tau != 0.2
    assert core(budget=0.1, budget_window=16).threshold == 0.2  # a new object starts afresh


def test_skip_gate_is_composed() -> None:
    assert not core().skips_uploads
    gated = core(skip="top1", skip_top1_min=0.5)
    assert gated.skips_uploads
    assert gated.skip([0.1, 2.0], [math.log(0.9), math.log(0.2)]).tolist() == [True, False]


# --------------------------------------------------------------------------------------------------
# The registry: a new policy is one class plus a registration
# --------------------------------------------------------------------------------------------------


@register_policy("test-keep-two")
class KeepTwoPolicy(HandoffPolicy):
    """Test policy: every window keeps two tokens and hands over; every cloud position agrees."""

    def decide(self, view: WindowView) -> WindowDecision:
        return WindowDecision(min(2, view.n), True)

    def decide_scores(self, scores) -> WindowDecision:
        return WindowDecision(min(2, len(scores)), True)

    def agrees(self, kl: float) -> bool:
        return True


class SpyPolicy(RollbackPolicy):
    """Rollback, recording every decision it makes (and every object made of it)."""

    made: ClassVar[list[SpyPolicy]] = []

    def __init__(self, config, *, scorer=None) -> None:
        super().__init__(config, scorer=scorer)
        self.windows: list[WindowDecision] = []
        self.agreements: list[float] = []
        SpyPolicy.made.append(self)

    def decide_scores(self, scores) -> WindowDecision:
        decision = super().decide_scores(scores)
        self.windows.append(decision)
        return decision

    def agrees(self, kl: float) -> bool:
        self.agreements.append(kl)
        return super().agrees(kl)


register_policy("test-spy")(SpyPolicy)


def test_a_registered_kind_is_a_valid_config_kind() -> None:
    assert "test-keep-two" in policy_kinds() and policy_class("test-keep-two") is KeepTwoPolicy
    config = PolicyConfig(kind="test-keep-two")
    assert type(make_policy(config)) is KeepTwoPolicy
    assert config.to_proto().kind == pb.POLICY_KIND_UNSPECIFIED  # no wire name: the cloud accepts it


def test_a_registered_kind_is_selectable_from_settings_and_the_environment(monkeypatch) -> None:
    from pydantic import ValidationError

    from handoff.edge.settings import EdgeSettings

    assert EdgeSettings(policy="test-keep-two").policy_config().kind == "test-keep-two"
    monkeypatch.setenv("HANDOFF_EDGE_POLICY", "test-keep-two")
    assert type(make_policy(EdgeSettings().policy_config())) is KeepTwoPolicy
    with pytest.raises(
        ValidationError, match="unknown policy 'magic'; auto or registered: seed, rollback, exact"
    ):
        EdgeSettings(policy="magic")


def test_register_policy_refuses_clashes_and_non_policies() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_policy("rollback")
        class Other(HandoffPolicy):
            pass

    with pytest.raises(ValueError, match="not a HandoffPolicy"):
        register_policy("test-not-a-policy")(dict)  # type: ignore[arg-type]

    class Weird(HandoffPolicy):
        round = "telepathy"  # type: ignore[assignment]

    with pytest.raises(ValueError, match="round"):
        register_policy("test-weird")(Weird)
    assert "test-weird" not in policy_kinds() and policy_class("rollback") is RollbackPolicy


async def _generate(cloud_path, edge_path, policy: PolicyConfig, max_tokens: int = 20):
    runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=512, n_threads=1)
    try:
        async with running_server(llama_backend_factory(cloud_path)) as (_, client):
            gen = HybridGenerator(runner, client, vocabulary_of(edge_path), policy)
            prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": "Hi"}]))
            return gen, await gen.generate(prompt, max_tokens)
    finally:
        runner.close()


def test_a_registered_policy_drives_the_unchanged_controller(tiny_gguf_a, tiny_gguf_a_near):
    """HybridGenerator runs a kind it has never heard of: the toy's window and hand-back rules decide."""
    policy = PolicyConfig(kind="test-keep-two", check_interval=4, handback_tokens=3, agree_tokens=1,
                          lookahead_windows=0)  # fmt: skip
    gen, result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, policy))
    assert type(gen.core) is KeepTwoPolicy
    sources = [r.source for r in result.records]
    # Each window keeps 2 edge tokens; the cloud corrects the third and hands back at once (agrees).
    assert sources[:9] == ["edge", "edge", "corrected"] * 3
    assert "cloud" not in sources and result.handbacks_early >= 3


# --------------------------------------------------------------------------------------------------
# One policy object for the live controller and the offline replay
# --------------------------------------------------------------------------------------------------


def full_trace(kls: list[float]) -> Generation:
    """A synthetic full trace: P's token i is 100 + i, Q's greedy token agrees everywhere."""
    recs = [
        {"position": i, "token_id": 100 + i, "source": "cloud", "kl": kl, "q_topk_ids": [100 + i, 1],
         "p_topk_ids": [100 + i, 2]}
        for i, kl in enumerate(kls)
    ]  # fmt: skip
    meta = {"sampling": {"temperature": 0.0}, "open_bytes": [1, 1]}
    return Generation(meta, recs, {"mode": "cloud"}, "synthetic")


def test_replay_decides_with_the_registered_policy_class() -> None:
    kls = [0.0, 0.0, 0.5, 0.0, 0.1, 0.3, 0.0, 0.0, 0.0, 0.0]
    SpyPolicy.made.clear()
    policy = PolicyConfig(kind="test-spy", check_interval=4, handback_tokens=2, threshold=0.2, agree_tokens=1)
    out, info = replay_policy(full_trace(kls), policy)
    (spy,) = SpyPolicy.made
    # Window [0, 0, .5, 0]: cut at 2; the cloud corrects 2 (0.5: no agreement) and writes 3 (0.0
    # agrees): back at 4. Window [.1, .3, 0, 0]: cut at 5; the cloud corrects 5 (0.3) and writes 6
    # (0.0 agrees): back at 7. The last window [0, 0, 0] stands.
    assert [r["source"] for r in out.records] == [
        "edge", "edge", "corrected", "cloud", "edge", "corrected", "cloud", "edge", "edge", "edge",
    ]  # fmt: skip
    assert spy.windows == [WindowDecision(2, True), WindowDecision(1, True), WindowDecision(3, False)]
    assert spy.agreements == [0.5, 0.0, 0.3, 0.0]
    assert info.exact and out.meta["policy"]["kind"] == "test-spy"


def test_replay_of_rollback_matches_the_policy_objects_rules() -> None:
    rng = np.random.default_rng(5)
    kls = rng.exponential(0.15, size=60).round(3).tolist()
    policy = PolicyConfig(check_interval=5, handback_tokens=3, threshold=0.2, agree_tokens=2)
    out, _ = replay_policy(full_trace(kls), policy)
    spied, _ = replay_policy(full_trace(kls), replace(policy, kind="test-spy"))
    assert [r["source"] for r in out.records] == [r["source"] for r in spied.records]
    assert [r["token_id"] for r in out.records] == [100 + i for i in range(60)]  # P's text, relabelled


def test_live_and_replay_share_the_policy_object(tiny_gguf_a, tiny_gguf_a_near):
    """The live controller calls the same class's decide_scores and agrees as the replay does."""
    SpyPolicy.made.clear()
    policy = PolicyConfig(kind="test-spy", check_interval=4, handback_tokens=6, threshold=0.02, agree_tokens=2,
                          lookahead_windows=0)  # fmt: skip
    gen, result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, policy, max_tokens=30))
    (spy,) = SpyPolicy.made
    assert gen.core is spy and spy.windows and result.check_points == len(spy.windows)
    assert sum(d.hand_over for d in spy.windows) == result.handoffs
    # Every cloud token the policy judged is one the controller committed with that KL.
    cloud_kls = [r.kl for r in result.records if r.source in ("cloud", "corrected")]
    assert spy.agreements and all(kl in cloud_kls for kl in spy.agreements)
