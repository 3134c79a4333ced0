#!/usr/bin/env bash
# Set up (or bring up to date) the project's virtual environment in .venv.
#
# Idempotent and cheap to re-run: a stamp keyed by the hash of pyproject.toml and this script
# skips everything when nothing changed; llama-cpp-python is compiled only when the pinned version
# is missing from the venv, and then pip's wheel cache makes a second venv reuse the first build.
# With the test extra, Debian's chromium is installed (apt-get, through sudo when not root) if missing.
#
# Environment:
#   PYTHON            interpreter for the venv (default: python3.11, else python3; needs >= 3.11)
#   HANDOFF_EXTRAS    extras to install (default: cloud,test; `make test` adds ray)
#   TORCH_INDEX_URL   where pip finds torch (e.g. a CPU-only wheel index on a machine without a GPU
#                     whose pip would otherwise take the CUDA build); default: pip's own configuration
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
EXTRAS=${HANDOFF_EXTRAS:-cloud,test}
TORCH_VERSION=2.13.0
LLAMA_CPP_VERSION=0.3.36

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python >= 3.11 is needed, $PYTHON is $("$PYTHON" --version 2>&1)" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

# The chat page's browser test (tests/test_chat_page.py) drives Debian's chromium through Playwright
# (never Playwright's own browser download). Checked before the stamp: a machine whose venv is up to
# date but lacks the browser gets it; once it is there this costs nothing.
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v chromium >/dev/null; then
  echo "setup: installing chromium (Debian package) for the chat page's browser test"
  as_root=()
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then as_root=(sudo); fi
  { "${as_root[@]}" apt-get update -qq &&
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
    echo "setup: could not install chromium (apt-get install -y chromium); the chat page's browser test will fail" >&2
fi

stamp="$VENV/.setup-$(cat pyproject.toml scripts/setup.sh scripts/llama_cpp_build.cmake | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

has_version() {  # has_version DIST VERSION: is exactly that version installed in the venv?
  "$py" - "$1" "$2" <<'PY' 2>/dev/null
import importlib.metadata as m, sys
sys.exit(m.version(sys.argv[1]).split("+")[0] != sys.argv[2])
PY
}

# torch first, pinned: anything installed later that wants torch finds it satisfied instead of
# pulling the newest release with several GB of CUDA packages.
if [[ ",$EXTRAS," == *",cloud,"* ]] && ! has_version torch "$TORCH_VERSION"; then
  echo "setup: installing torch==$TORCH_VERSION"
  "${pip[@]}" install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi

# llama.cpp compiles from source; skip the multimodal library and llama.cpp's `common` library,
# which the Python package never loads (about 2.2 min instead of 6.5 on 2 cores).
if ! has_version llama-cpp-python "$LLAMA_CPP_VERSION"; then
  echo "setup: installing llama-cpp-python==$LLAMA_CPP_VERSION (compiles llama.cpp unless pip's wheel cache has it)"
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/scripts/llama_cpp_build.cmake ${CMAKE_ARGS:-}" \
    "${pip[@]}" install "llama-cpp-python==$LLAMA_CPP_VERSION"
fi

echo "setup: installing handoff[$EXTRAS]"
"${pip[@]}" install -e ".[$EXTRAS]"

rm -f "$VENV"/.setup-*
touch "$stamp"
echo "setup: done"
