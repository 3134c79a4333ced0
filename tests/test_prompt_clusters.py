"""Tasks that share a prompt: the cluster bootstrap of RPI and RPI per prompt (shared/quality.py), and
the report reading rows' prompt keys (edge/evaluation/report.py)."""

from __future__ import annotations

import numpy as np
import pytest

from handoff.edge.evaluation.report import ALL_SUITES, markdown, summarize
from handoff.edge.evaluation.runner import prompt_key
from handoff.shared.errors import ShapeError
from handoff.shared.quality import bootstrap_rpi, cluster_rpi, rpi
from tests.test_eval_report import row

RNG = np.random.default_rng(7)
SMALL = RNG.random(40) < 0.3  # [40]
LARGE = SMALL | (RNG.random(40) < 0.5)
HYBRID = np.where(RNG.random(40) < 0.7, LARGE, SMALL)


def test_one_task_per_cluster_is_the_plain_bootstrap() -> None:
    plain = bootstrap_rpi(SMALL, LARGE, HYBRID, n_resamples=500)
    alone = bootstrap_rpi(SMALL, LARGE, HYBRID, clusters=[f"p{i}" for i in range(40)], n_resamples=500)
    assert (alone.estimate, alone.low, alone.high) == (plain.estimate, plain.low, plain.high)
    assert plain.n_clusters is None and alone.n_clusters == 40
    assert cluster_rpi(SMALL, LARGE, HYBRID, range(40)) == pytest.approx(rpi(SMALL, LARGE, HYBRID))


def test_repeated_prompts_count_once_and_widen_the_interval() -> None:
    # Every task repeated 5 times (one prompt, five unit tests, one greedy generation).
    rep = [np.repeat(x, 5) for x in (SMALL, LARGE, HYBRID)]
    clusters = np.repeat(np.arange(40), 5)
    plain = bootstrap_rpi(SMALL, LARGE, HYBRID, n_resamples=500)
    naive = bootstrap_rpi(*rep, n_resamples=500)
    clustered = bootstrap_rpi(*rep, clusters=clusters, n_resamples=500)
    assert naive.estimate == clustered.estimate == plain.estimate
    # Drawing whole prompts gives the interval of the 40 distinct generations; task by task is narrower.
    assert (clustered.low, clustered.high) == pytest.approx((plain.low, plain.high))
    assert naive.high - naive.low < 0.6 * (clustered.high - clustered.low)
    assert cluster_rpi(*rep, clusters) == pytest.approx(rpi(SMALL, LARGE, HYBRID))


def test_rpi_per_prompt_on_hand_made_outcomes() -> None:
    # Prompt a: 3 tasks, Q 0/3, P 3/3, hybrid 3/3; prompt b: 1 task, Q 0, P 1, hybrid 0.
    small, large, hybrid = [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]
    assert rpi(small, large, hybrid) == 0.75  # per task
    assert cluster_rpi(small, large, hybrid, ["a", "a", "a", "b"]) == 0.5  # per prompt
    assert cluster_rpi([0, 1], [0, 1], [1, 1], ["a", "b"]) is None  # Q and P tie
    with pytest.raises(ShapeError, match="clusters"):
        cluster_rpi(small, large, hybrid, ["a"])
    with pytest.raises(ShapeError, match="clusters"):
        bootstrap_rpi(small, large, hybrid, clusters=["a", "b"])


def test_the_report_groups_tasks_by_their_prompt_keys() -> None:
    # Three tasks of one prompt and one of another, as above.
    outcomes = {"small": [0, 0, 0, 0], "large": [1, 1, 1, 1], "h-0.1": [1, 1, 1, 0]}
    keys = [prompt_key([1, 2, 3])] * 3 + [prompt_key([1, 2, 4])]
    rows = [
        row(run, "py", i, bool(ok), "?", 10, prompt_key=keys[i])
        for run, oks in outcomes.items()
        for i, ok in enumerate(oks)
    ]
    got = summarize(rows)["by_suite"][ALL_SUITES]["runs"]["h-0.1"]["rpi"]
    assert got["estimate"] == 0.75 and got["per_prompt"] == 0.5 and got["n_clusters"] == 2
    assert "| 0.50 |" in markdown(summarize(rows))
    old = summarize([{k: v for k, v in r.items() if k != "prompt_key"} for r in rows])
    assert old["by_suite"][ALL_SUITES]["runs"]["h-0.1"]["rpi"]["per_prompt"] is None  # tasks alone
    assert prompt_key([1, 2, 3]) != prompt_key([1, 2, 4]) and len(prompt_key([1])) == 16
