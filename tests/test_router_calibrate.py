"""scripts/router_calibrate.py: the held-out prompts are router train's, and the threshold checks the target."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from handoff.edge.routing.data import RouterData, split_by_prompt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "router_calibrate.py"


def _module():
    spec = importlib.util.spec_from_file_location("router_calibrate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def _trace(
    path: Path, gens: list[tuple[list[int], list[tuple[float | None, bool]]]], turn: int | None = None
) -> Path:
    lines = []
    for prompt, tokens in gens:
        lines.append(
            {
                "record": "generation",
                "prompt_ids": prompt,
                **({} if turn is None else {"policy": {"router_turn": turn}}),
            }
        )
        lines += [{"record": "token", "gate_score": s, "checked": c} for s, c in tokens]
        lines.append({"record": "summary", "mode": "hybrid"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_held_out_prompts_are_router_trains(tmp_path: Path) -> None:
    mod = _module()
    prompts = [[5, 1], [2], [9, 9], [3], [7], [4, 4], [1], [8]]
    train = _trace(tmp_path / "train.jsonl", [(p, []) for p in prompts])
    held = mod.validation_prompts([train], 4)

    class G:  # the fields split_by_prompt reads
        def __init__(self, p):
            self.prompt_ids = tuple(p)

    data = RouterData(
        tuple(G(p) for p in prompts), np.zeros((0, 1)), None, np.zeros(0), np.zeros(0, int), np.zeros(0)
    )
    _, val = split_by_prompt(data, 4)
    assert held == {g.prompt_ids for g in val.generations} and len(held) == 2


def test_threshold_checks_the_target_share_of_held_out_positions(tmp_path: Path) -> None:
    prompts = [[1], [2], [3], [4]]  # [4] is held out (every 4th, sorted)
    train = _trace(tmp_path / "train.jsonl", [(p, []) for p in prompts])
    # 0.00, 0.01, ..., 0.99: the top fifth starts at 0.80
    held_scores = [(float(s), bool(s >= 0.5)) for s in np.linspace(0.0, 0.99, 100)]
    run = _trace(tmp_path / "run.jsonl", [([1], [(0.99, True)] * 50), ([4], held_scores)])
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(train), "--run", str(run), "--target", "0.2"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "1 validation generations, 100 positions (100 scored); checked in the run: 0.5000" in out
    assert "threshold for 0.2: 0.80000 (checks 0.2000 of the positions)" in out


def test_the_threshold_is_written_into_a_copy_of_the_router_file(tmp_path: Path) -> None:
    from handoff.edge.policy import RouterModel
    from handoff.edge.policy.features import SCALAR_FEATURES

    f = len(SCALAR_FEATURES)
    router = tmp_path / "r.json"
    RouterModel(np.zeros(f), np.ones(f), ((np.zeros((f, 1)), np.zeros(1)),), 0.3, "00" * 32, 10).save(router)
    train = _trace(tmp_path / "train.jsonl", [([p], []) for p in range(4)])
    run = _trace(tmp_path / "run.jsonl", [([3], [(float(s), True) for s in np.linspace(0.0, 0.99, 100)])])
    out = tmp_path / "calibrated.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(train), "--run", str(run), "--target", "0.2",
         "--router", str(router), "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    back = RouterModel.from_json(json.loads(out.read_text()))
    assert back.threshold == 0.8 and back.meta["calibration"]["file_threshold"] == 0.3
    assert back.meta["calibration"]["positions"] == 100
    bad = subprocess.run([sys.executable, str(SCRIPT), str(train), "--run", str(run), "--router", str(router)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "go together" in bad.stderr


def test_a_turn_run_calibrates_on_all_positions_and_the_copy_keeps_its_turn(tmp_path: Path) -> None:
    """P's turn tokens carry no router score: the threshold checks the target share of all positions."""
    from handoff.edge.policy import RouterModel
    from handoff.edge.policy.features import SCALAR_FEATURES

    f = len(SCALAR_FEATURES)
    router = tmp_path / "r.json"
    RouterModel(np.zeros(f), np.ones(f), ((np.zeros((f, 1)), np.zeros(1)),), 0.3, "00" * 32, 10).save(router)
    train = _trace(tmp_path / "train.jsonl", [([p], []) for p in range(4)])
    scored = [(float(s), bool(s >= 0.75)) for s in np.linspace(0.0, 0.99, 100)]
    cloud = [(None, True)] * 25  # 125 positions, 100 scored: 20 % of all is 25 % of the scored
    run = _trace(tmp_path / "run.jsonl", [([3], scored + cloud)], turn=4)
    out = tmp_path / "calibrated.json"
    text = subprocess.run(
        [sys.executable, str(SCRIPT), str(train), "--run", str(run), "--target", "0.2",
         "--router", str(router), "--out", str(out)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "125 positions (100 scored); checked in the run: 0.2000" in text
    assert "threshold for 0.2: 0.75000 (checks 0.2000 of the positions)" in text
    back = RouterModel.from_json(json.loads(out.read_text()))
    assert back.threshold == 0.75 and back.turn == 4 and back.meta["calibration"]["turn"] == 4
    assert (
        back.meta["calibration"]["positions"] == 125 and back.meta["calibration"]["scored_positions"] == 100
    )
    # --turn: the copy runs another turn than the run's (a gate chosen for it), recorded beside the run's
    subprocess.run(
        [sys.executable, str(SCRIPT), str(train), "--run", str(run), "--target", "0.2",
         "--router", str(router), "--out", str(out), "--turn", "8"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    back = RouterModel.from_json(json.loads(out.read_text()))
    assert back.threshold == 0.75 and back.turn == 8
    assert back.meta["calibration"]["turn"] == 8 and back.meta["calibration"]["run_turn"] == 4
    too_many = subprocess.run([sys.executable, str(SCRIPT), str(train), "--run", str(run), "--target", "0.9"],
                              capture_output=True, text=True)  # fmt: skip
    assert too_many.returncode != 0 and "scored" in too_many.stderr
