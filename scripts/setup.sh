#!/usr/bin/env bash
# Set up ./.venv with everything clip_fast's main job and tests need, on a fresh Debian machine.
#   scripts/setup.sh           the package, the trainer's extras, the Fashion-MNIST files
#   scripts/setup.sh --test    also the test and benchmark extras (open_clip, pytest-benchmark),
#                              the curation extra and WordNet (wordnet-base) for its tests,
#                              and the CUDA extension clip_fast._C, built for sm_90 (needs nvcc)
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir" >&2
  fi
fi

# WordNet 3.0's database files for `python -m clip_fast.curate queries` and its tests.
if [ "$want_test" = 1 ] && [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null
  else
    echo "setup: WordNet missing; run 'sudo apt-get install wordnet-base' for the curation tests" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel ninja pybind11
# torch 2.14.1 + torchvision 0.29.1: the pair that imports together here (open_clip needs
# torchvision); its CUDA 13.0 build runs on CPU and lets nvcc build the extension.
pip install -q torch==2.14.1 torchvision==0.29.1
if [ "$want_test" = 1 ]; then
  CLIP_FAST_BUILD_CUDA=${CLIP_FAST_BUILD_CUDA:-1} CLIP_FAST_CUDA_ARCHS=${CLIP_FAST_CUDA_ARCHS:-9.0} \
  MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation -e '.[test,train,curate]'
else
  CLIP_FAST_BUILD_CUDA=${CLIP_FAST_BUILD_CUDA:-0} pip install -q --no-build-isolation -e '.[train]'
fi
.venv/bin/python -c "import clip_fast; print('clip_fast backends:', clip_fast.available_backends())"
