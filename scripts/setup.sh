#!/usr/bin/env bash
# Set up a virtual environment with everything clip_fast's main job and tests need, on a fresh Debian machine.
#   scripts/setup.sh               ./.venv: the package, the trainer's extras, the Fashion-MNIST files
#   scripts/setup.sh --test        also the test and benchmark extras (open_clip, pytest-benchmark),
#                                  the curation extra and WordNet (wordnet-base) for its tests,
#                                  and the CUDA extension clip_fast._C, built for sm_90 (needs nvcc)
#   scripts/setup.sh --test --old  the same in ./.venv-old, with the oldest supported versions, those of
#                                  the GPU card: Python 3.12, torch 2.11.0, triton 3.6.0
# Python: $PYTHON for ./.venv (default python3); $PYTHON_OLD for ./.venv-old (default: the first
# Python 3.12 among python3.12 and pyenv's versions).
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
old=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --old) old=1 ;;
    *) echo "setup: unknown argument '$arg' (expected --test, --old)" >&2; exit 2 ;;
  esac
done

# CI sets up both environments at once: apt, and the editable install (which writes into the
# source tree), take a lock, one setup at a time.
LOCK=${TMPDIR:-/tmp}/clip_fast-setup.lock
locked() { if command -v flock >/dev/null; then flock "$LOCK" "$@"; else "$@"; fi; }

DATA=/usr/share/datasets/fashion-mnist
if [ ! -d $DATA ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    locked sh -c "[ -d $DATA ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq dataset-fashion-mnist >/dev/null; }"
  else
    echo "setup: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir" >&2
  fi
fi

# WordNet 3.0's database files for `python -m clip_fast.curate queries` and its tests.
if [ "$want_test" = 1 ] && [ ! -f /usr/share/wordnet/data.noun ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    locked sh -c "[ -f /usr/share/wordnet/data.noun ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null; }"
  else
    echo "setup: WordNet missing; run 'sudo apt-get install wordnet-base' for the curation tests" >&2
  fi
fi

is_py312() { [ -n "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

if [ "$old" = 1 ]; then
  VENV=.venv-old
  PY=""
  for cand in "${PYTHON_OLD:-}" python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if is_py312 "$cand"; then PY=$cand; break; fi
  done
  if [ -z "$PY" ]; then
    echo "setup: --old needs Python 3.12; set PYTHON_OLD=/path/to/python3.12 (e.g. 'pyenv install 3.12')" >&2
    exit 1
  fi
  # The GPU card's versions. triton 3.6's interpreter converts loop bounds with int() of a
  # 1-element numpy array, which numpy 2.4 refuses: numpy < 2.4 lets it run the kernels on CPU.
  TORCH_PKGS=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 'numpy<2.4')
else
  VENV=.venv
  PY=${PYTHON:-python3}
  # torch 2.14.1 + torchvision 0.29.1: the pair that imports together here (open_clip needs
  # torchvision); its CUDA 13.0 build runs on CPU and lets nvcc build the extension. torch pins
  # the newest triton that installs beside it (3.8).
  TORCH_PKGS=(torch==2.14.1 torchvision==0.29.1)
fi
BUILD_CUDA=${CLIP_FAST_BUILD_CUDA:-$want_test}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel ninja pybind11
pip install -q "${TORCH_PKGS[@]}"
# The version pins again, so the extras cannot move torch, triton or numpy.
if [ "$want_test" = 1 ]; then
  CLIP_FAST_BUILD_CUDA=$BUILD_CUDA CLIP_FAST_CUDA_ARCHS=${CLIP_FAST_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
  locked "$VENV/bin/python" -m pip install -q --no-build-isolation -e '.[test,train,curate]' "${TORCH_PKGS[@]}"
else
  CLIP_FAST_BUILD_CUDA=$BUILD_CUDA \
  locked "$VENV/bin/python" -m pip install -q --no-build-isolation -e '.[train]' "${TORCH_PKGS[@]}"
fi
"$VENV/bin/python" -c "import sys, torch, clip_fast
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'not installed'
print(f'clip_fast in $VENV: Python {sys.version.split()[0]}, torch {torch.__version__}, triton {tv}')
print('clip_fast backends:', clip_fast.available_backends())"
