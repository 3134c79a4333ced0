"""scripts/gpu_check.sh on a machine without a GPU: its dry run lists every measurement, within ten
minutes, with options the scripts really have; without --dry-run it refuses clearly and writes nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEP = re.compile(r"^step (\d+)/(\d+) (\S+) \(at most (\d+) s\): (.*)$")

pytestmark = pytest.mark.e2e  # the script in a real process


def gpu_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu") / "gpu"
    return out, gpu_check("--dry-run", "--out", str(out))


def steps(proc: subprocess.CompletedProcess) -> dict[str, tuple[int, list[str]]]:
    """name -> (time limit, the command's words) from the dry run's `step` lines."""
    found = {}
    for line in proc.stdout.splitlines():
        if m := STEP.match(line):
            found[m.group(3)] = (int(m.group(4)), shlex.split(m.group(5)))
    return found


def test_dry_run_lists_every_measurement_within_ten_minutes(dry_run) -> None:
    out, proc = dry_run
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()  # nothing was run or written
    found = steps(proc)
    assert list(found) == ["prepare", "bench-on", "bench-off", "profile", "invariance", "eval", "eval-report"]
    assert sum(limit for limit, _ in found.values()) <= 570  # leaves time for the checks and the summary
    gpu = ["--backend", "transformers", "--device", "cuda", "--dtype", "bfloat16"]

    def has(words: list[str], *seq: str) -> bool:
        return any(words[i : i + len(seq)] == list(seq) for i in range(len(words)))

    for mode, flag in (("on", "1"), ("off", "0")):
        words = found[f"bench-{mode}"][1]
        assert (
            "scripts/bench_cloud.py" in words and has(words, *gpu) and has(words, "--sessions", "1,4,16,64")
        )
        assert f"HANDOFF_CLOUD_DETERMINISTIC={flag}" in words
        assert has(words, "--json", f"{out}/bench_cloud_1.5b_transformers_cuda_det_{mode}.json")
    assert "--profile" in found["profile"][1] and has(found["profile"][1], *gpu)
    inv = found["invariance"][1]
    assert "scripts/batch_invariance.py" in inv and has(inv, *gpu)
    assert (
        has(inv, "--sessions", "16,64")
        and has(inv, "--prompts", "both")
        and has(inv, "--deterministic", "both")
    )
    ev = found["eval"][1]
    assert {"HANDOFF_CLOUD_BACKEND=transformers", "HANDOFF_CLOUD_DEVICE=cuda"} <= set(ev)
    assert has(ev, ".venv/bin/handoff", "eval") and has(ev, "--out", f"{out}/eval")
    assert len(ev[ev.index("--thresholds") + 1].split(",")) == 2
    assert has(found["eval-report"][1], "--out", f"{out}/eval", "--report-only")
    # Nothing reaches the network: the Hugging Face libraries run offline in every step.
    assert all("HF_HUB_OFFLINE=1" in words for _, words in found.values())


def test_dry_run_options_exist(dry_run) -> None:
    """Every option a step passes is one its program lists in --help."""
    _, proc = dry_run
    helps: dict[str, str] = {}
    for _, words in steps(proc).values():
        if "scripts/bench_cloud.py" in words or "scripts/batch_invariance.py" in words:
            program = next(w for w in words if w.startswith("scripts/"))
            argv = [sys.executable, str(ROOT / program), "--help"]
        else:
            program = "handoff eval"
            argv = [str(ROOT / ".venv" / "bin" / "handoff"), "eval", "--help"]
        if program not in helps:
            helps[program] = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
                env={**os.environ, "COLUMNS": "300"},
            ).stdout
        used = {w.split("=")[0] for w in words if w.startswith("--")}
        missing = [o for o in used if not re.search(rf"{re.escape(o)}\b", helps[program])]
        assert not missing, (program, missing)


def test_refuses_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    proc = gpu_check("--out", str(out), env={"NVIDIA_SMI": str(tmp_path / "no-nvidia-smi")})
    assert proc.returncode == 2
    assert "no NVIDIA GPU here" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


def test_unknown_option_is_refused() -> None:
    proc = gpu_check("--bogus")
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the whole check")
def test_refuses_a_cpu_only_torch(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "NVIDIA Pretend, 1024 MiB, 1.0"\n')
    fake.chmod(0o755)
    out = tmp_path / "gpu"
    proc = gpu_check("--out", str(out), env={"NVIDIA_SMI": str(fake)})
    assert proc.returncode == 2
    assert "cannot use the GPU" in proc.stderr and "TORCH_INDEX_URL" in proc.stderr, proc.stderr
    assert not out.exists()
