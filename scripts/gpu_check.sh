#!/usr/bin/env bash
# Every GPU measurement the project needs, in one command, within 10 minutes, written under docs/gpu/.
#
#   bash scripts/gpu_check.sh             # on a machine with an NVIDIA GPU
#   bash scripts/gpu_check.sh --dry-run   # print the steps and their time limits; runs nothing
#   bash scripts/gpu_check.sh --out DIR   # write somewhere else than docs/gpu
#
# Needs: this checkout, its .venv (`make setup`; on a GPU machine pip's default index gives the CUDA
# build of the pinned torch unless TORCH_INDEX_URL points at a CPU-only index) and the default models
# (`handoff models fetch`, or `make models`). Nothing is downloaded: the steps run with the Hugging Face
# libraries offline. The steps, each with its own time limit (the sum stays under 10 minutes):
#   prepare       P loaded once, transformers on CUDA, bf16 (converts and caches the weights), a token run
#   bench-on/off  scripts/bench_cloud.py, 1/4/16/64 sessions, service vs raw forward (deterministic on, off)
#   profile       scripts/bench_cloud.py --profile: the latency profile `handoff simulate` reads
#   invariance    scripts/batch_invariance.py, 16 and 64 sessions, natural and random prompts, both modes
#   eval          `handoff eval` with the embedded verifier on CUDA: 10 tasks, 2 thresholds
# A step that fails or runs out of time is recorded and the next one runs; SUMMARY.md lists every step
# (status, seconds, log), the GPU (nvidia-smi) and the headline numbers. Exit status: 0 when every step
# passed, 1 when one did not, 2 when the machine cannot run the check (no GPU, no CUDA torch, no models).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=docs/gpu
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=${2:?--out needs a directory}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (--dry-run, --out DIR, --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=.venv/bin/python
HANDOFF=.venv/bin/handoff
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}  # overridable so that the tests can play a machine without a GPU
CLOUD_MODEL=qwen2.5-coder-1.5b-instruct-q4_k_m
EDGE_MODEL=qwen2.5-coder-0.5b-instruct-q4_k_m
GPU_ARGS=(--backend transformers --device cuda --dtype bfloat16)
# The edge (llama.cpp, CPU) and the eval's sandboxes share the host's cores; half of them, at most 8.
THREADS=$(( $(nproc) / 2 )); [ "$THREADS" -ge 1 ] || THREADS=1; [ "$THREADS" -le 8 ] || THREADS=8
# The machine reaches nothing outside: never let transformers or huggingface_hub try.
COMMON_ENV=(HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1)

# bench_cloud.py takes the deterministic mode from HANDOFF_CLOUD_DETERMINISTIC (CloudSettings) and, once
# it has one, from its own option, which would override the variable: pass both when the option exists.
BENCH_HELP=""
if [ -x "$PY" ]; then BENCH_HELP=$("$PY" scripts/bench_cloud.py --help 2>/dev/null || true); fi
bench_det_flag() {  # bench_det_flag on|off: the option's words for that mode (none without the option)
  if grep -q -- '--no-deterministic' <<<"$BENCH_HELP"; then
    if [ "$1" = on ]; then echo --deterministic; else echo --no-deterministic; fi
  elif grep -qE -- '--deterministic \{?on' <<<"$BENCH_HELP"; then
    echo "--deterministic $1"
  fi
}
det_env() { if [ "$1" = on ]; then echo HANDOFF_CLOUD_DETERMINISTIC=1; else echo HANDOFF_CLOUD_DETERMINISTIC=0; fi; }

# ------------------------------------------------------------------------------------------------
# The steps: name, time limit in seconds, then the command (an `env VAR=... program ...` line).

STEP_NAMES=() STEP_LIMITS=() STEP_CMDS=() STEP_SHOW=()
add_step() {  # add_step NAME SECONDS WORD...
  local name=$1 limit=$2; shift 2
  STEP_NAMES+=("$name"); STEP_LIMITS+=("$limit")
  STEP_CMDS+=("$(printf '%q ' "$@")")  # for eval: the same words back
  STEP_SHOW+=("$*")                     # for people: no word here needs quoting
}

# Loads P once (the first load converts the GGUF and caches the weights; CUDA starts) on a token workload.
add_step prepare 90 env "${COMMON_ENV[@]}" "$(det_env on)" "$PY" scripts/bench_cloud.py --model "$CLOUD_MODEL" \
  "${GPU_ARGS[@]}" --sessions 2 --rounds 1 --prompt 16
for mode in on off; do
  # shellcheck disable=SC2046  # the flag is zero, one or two words
  add_step "bench-$mode" 80 env "${COMMON_ENV[@]}" "$(det_env $mode)" "$PY" scripts/bench_cloud.py \
    --model "$CLOUD_MODEL" "${GPU_ARGS[@]}" --sessions 1,4,16,64 $(bench_det_flag $mode) \
    --json "$OUT/bench_cloud_1.5b_transformers_cuda_det_$mode.json"
done
add_step profile 70 env "${COMMON_ENV[@]}" "$(det_env on)" "$PY" scripts/bench_cloud.py \
  --model "$CLOUD_MODEL" "${GPU_ARGS[@]}" --profile --json "$OUT/bench_cloud_profile_1.5b_cuda.json"
add_step invariance 100 env "${COMMON_ENV[@]}" "$PY" scripts/batch_invariance.py \
  --model "$CLOUD_MODEL" "${GPU_ARGS[@]}" --sessions 16,64 --prompts both --deterministic both \
  --timeout 60 --load-timeout 60 --json-out "$OUT/batch_invariance_cuda.json"
# The embedded verifier takes its backend, device and dtype from HANDOFF_CLOUD_* (CloudSettings).
add_step eval 130 env "${COMMON_ENV[@]}" HANDOFF_CLOUD_BACKEND=transformers HANDOFF_CLOUD_DEVICE=cuda \
  HANDOFF_CLOUD_DTYPE=bfloat16 "$(det_env on)" HANDOFF_THREADS="$THREADS" "$HANDOFF" eval \
  --out "$OUT/eval" --tasks 2 --difficulty 2,sorting=1,algorithmic=1 --thresholds 0.1,0.3 --no-progress
# Whatever eval finished, even if it ran out of time: it is resumable and the report rebuilds from its rows.
add_step eval-report 20 env "${COMMON_ENV[@]}" "$HANDOFF" eval --out "$OUT/eval" --report-only

if [ "$DRY_RUN" = 1 ]; then
  total=0
  echo "gpu_check: dry run; nothing is run. Output: $OUT/ (SUMMARY.md, one log per step under $OUT/logs/)"
  echo "checks first: $NVIDIA_SMI lists a GPU; torch (here $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'missing')) can use CUDA; $CLOUD_MODEL and $EDGE_MODEL are fetched"
  for i in "${!STEP_NAMES[@]}"; do
    total=$(( total + STEP_LIMITS[i] ))
    printf 'step %d/%d %s (at most %d s): %s\n' $(( i + 1 )) ${#STEP_NAMES[@]} "${STEP_NAMES[i]}" \
      "${STEP_LIMITS[i]}" "${STEP_SHOW[i]}"
  done
  echo "at most $total s of steps in all"
  exit 0
fi

# ------------------------------------------------------------------------------------------------
# Refuse clearly where the check cannot run.

refuse() { echo "gpu_check: $*" >&2; exit 2; }
command -v "$NVIDIA_SMI" >/dev/null 2>&1 ||
  refuse "no NVIDIA GPU here ($NVIDIA_SMI not found). This check measures the cloud on a GPU; --dry-run shows its steps."
GPU=$("$NVIDIA_SMI" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
[ -n "$GPU" ] || refuse "$NVIDIA_SMI lists no GPU (is the driver loaded?)"
[ -x "$PY" ] || refuse "no .venv here: run \`make setup\` first"
"$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null ||
  refuse "torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null) cannot use the GPU.
A CPU-only build (+cpu, CUDA None) came from a CPU index or wheel directory (TORCH_INDEX_URL, pip's own
configuration). scripts/setup.sh keeps any torch 2.13.0 it finds, whatever its build: reinstall the CUDA build,
\`.venv/bin/python -m pip install --force-reinstall --no-deps torch==2.13.0 [--index-url <a CUDA wheel index>]\`."
"$PY" - "$CLOUD_MODEL" "$EDGE_MODEL" <<'PY' || refuse "the default models are not fetched: run \`make models\` (or \`handoff models fetch\`) first"
import sys
from handoff.shared.models import resolve
for name, role in zip(sys.argv[1:], ("cloud", "edge")):
    resolve(name, role, fetch_missing=False)
PY
command -v timeout >/dev/null || refuse "coreutils' timeout is missing"

# ------------------------------------------------------------------------------------------------
# Run.

mkdir -p "$OUT/logs"
rm -rf "$OUT/eval"  # a fresh evaluation: resumed rows would not be timed on this machine
STEPS_TSV="$OUT/logs/steps.tsv"
: >"$STEPS_TSV"
STARTED=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
# Ten minutes in all, whatever happens: no step may run past this (the summary takes a few seconds).
DEADLINE=$(( $(date +%s) + 590 ))
failed=0
echo "gpu_check: $GPU; output in $OUT/"
for i in "${!STEP_NAMES[@]}"; do
  name=${STEP_NAMES[i]} limit=${STEP_LIMITS[i]} cmd=${STEP_CMDS[i]} show=${STEP_SHOW[i]}
  log="$OUT/logs/$name.log"
  start=$(date +%s)
  left=$(( DEADLINE - start ))
  [ "$limit" -le "$left" ] || limit=$left
  echo "gpu_check: [$(( i + 1 ))/${#STEP_NAMES[@]}] $name (at most $limit s) -> $log"
  rc=0
  if [ "$limit" -lt 5 ]; then
    rc=skip; echo "skipped: the check's ten minutes are spent" >"$log"
  else
    # shellcheck disable=SC2086  # cmd was built with printf %q: eval restores its words exactly
    eval timeout --kill-after=5 "$limit" $cmd >"$log" 2>&1 || rc=$?
  fi
  seconds=$(( $(date +%s) - start ))
  case $rc in
    0) status=ok ;;
    skip) status="skipped (out of time)" ;;
    124|137) status="timeout ($limit s)" ;;
    *) status="failed (exit $rc)" ;;
  esac
  if [ "$name" = invariance ] && [ "$rc" = 1 ]; then status="differences with deterministic on (exit 1)"; fi
  [ "$status" = ok ] || failed=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$log" "$show" >>"$STEPS_TSV"
  echo "gpu_check: $name: $status after $seconds s"
  tail -n 3 "$log" | sed 's/^/    /'
done

# ------------------------------------------------------------------------------------------------
# SUMMARY.md: what ran, when, where, and the numbers that matter.

"$PY" - "$OUT" "$STARTED" "$GPU" <<'PY'
import json, platform, subprocess, sys
from pathlib import Path

out, started, gpu = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = ["# GPU measurements", "", f"Run by `scripts/gpu_check.sh` from {started} to "
         f"{subprocess.run(['date', '-u', '+%Y-%m-%d %H:%M:%S UTC'], capture_output=True, text=True).stdout.strip()}.", "",
         f"- GPU (nvidia-smi: name, memory, driver): {gpu}", f"- host: {platform.node()}, {platform.machine()}"]
try:
    import torch
    lines.append(f"- torch {torch.__version__}, CUDA {torch.version.cuda}")
except Exception as e:  # the summary must be written whatever failed
    lines.append(f"- torch: {e}")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
lines += [f"- checkout: {commit or '?'}{' (with uncommitted changes)' if dirty else ''}", "", "## Steps", "",
          "| step | status | seconds | log |", "|---|---|---:|---|"]
steps = [row.split("\t") for row in (out / "logs" / "steps.tsv").read_text().splitlines() if row]
for name, status, seconds, log, _ in steps:
    lines.append(f"| {name} | {status} | {seconds} | `{log}` |")
lines += ["", "Commands:", "", "```"] + [f"{name}: {cmd}" for name, _, _, _, cmd in steps] + ["```"]


def load(name):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


lines += ["", "## Throughput: service vs raw batched forward (scripts/bench_cloud.py)", ""]
for mode in ("on", "off"):
    bench = load(f"bench_cloud_1.5b_transformers_cuda_det_{mode}.json")
    if bench is None:
        lines += [f"deterministic {mode}: no result (see the step's log)", ""]
        continue
    lines += [f"deterministic {mode}: {bench['model']}, {bench['backend']} on {bench['device']}, {bench['dtype']}", "",
              "| sessions | service tok/s | raw tok/s | ratio |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['sessions']} | {r['service_tok_s']:,.0f} | {r['raw_tok_s']:,.0f} | {r['ratio']:.2f} |"
              for r in bench["results"]]
    top = max(bench["results"], key=lambda r: r["sessions"])
    lines += ["", f"**Ratio at {top['sessions']} sessions: {top['ratio']:.2f}** (target >= 0.7).", ""]

lines += ["## Latency profile (bench_cloud.py --profile; `handoff simulate --cloud-profile`)", ""]
profile = load("bench_cloud_profile_1.5b_cuda.json")
if profile is None:
    lines += ["no result (see the step's log)", ""]
else:
    p = profile["profile"]
    lines.append(f"- loopback round trip {p['rtt_s'] * 1000:.2f} ms")
    lines += [f"- open, {o['prompt_tokens']}-token prompt: {o['seconds'] * 1000:.1f} ms" for o in p["open"]]
    lines += [f"- check point of {c['tokens']} tokens, {c['sessions']} sessions: {c['seconds'] * 1000:.1f} ms"
              for c in p["check"] if c["tokens"] in (8, 16)]
    lines += [f"- handoff, {d['sessions']} sessions: {d['seconds_per_token'] * 1000:.1f} ms/token, first token "
              f"{d['first_token_s'] * 1000:.1f} ms" for d in p["decode"]]
    lines.append("")

lines += ["## Batch invariance (scripts/batch_invariance.py)", ""]
inv = load("batch_invariance_cuda.json")
if inv is None:
    lines += ["no result (see the step's log)", ""]
else:
    lines += [f"**{inv['verdict']}**", "", "| deterministic | prompts | sessions | differing | max abs diff of top-1 "
              "log-prob (nats) | top-1 changed (sessions) | generated tokens changed | alone twice |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in inv["runs"]:
        s = r["summary"]
        lines.append(f"| {r['deterministic']} | {r['prompts']} | {r['sessions']} | {s['sessions_differing']} | "
                     f"{s['max_top1_diff']:.4g} | {s['sessions_with_top1_changes']} | {s['tokens_differing']} | "
                     f"{'identical' if s['repeat_identical'] else 'differs'} |")
    lines.append("")

lines += ["## Hybrid evaluation, cloud on the GPU (handoff eval)", ""]
summary = load("eval/summary.json")
if summary is None:
    lines += ["no result (see the step's log)", ""]
else:
    meta = summary["meta"]
    cloud = meta.get("cloud") or {}
    lines += [f"`{meta['command']}`: {meta['tasks']} tasks; cloud {cloud.get('model')} ({cloud.get('backend')} on "
              f"{cloud.get('device')}); "
              f"{meta['wall_seconds_generating']} s generating. Full report: `eval/report.md`.", "",
              "| run | accuracy | cloud fraction | RPI |", "|---|---:|---:|---:|"]
    for name, r in summary["by_suite"]["all"]["runs"].items():
        rpi = r.get("rpi") or {}
        est = rpi.get("estimate")
        lines.append(f"| {name} | {r['accuracy']['value']:.2f} | {r['cloud_fraction']:.2f} | "
                     f"{'' if est is None else f'{est:.2f}'} |")
    lines.append("")
(out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
print(f"gpu_check: wrote {out / 'SUMMARY.md'}")
PY

exit "$failed"
