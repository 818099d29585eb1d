#!/usr/bin/env bash
# Download the baseline wheels that benchmarks/bench_gpu.py imports into .whl/, for a GPU
# machine that cannot reach a package index (Python 3.12, linux x86_64).
#
#   bash benchmarks/fetch_wheels.sh            # on a machine where pip reaches PyPI
#
# benchmarks/gpu_check.sh installs .whl/*.whl with `pip install --no-index --no-deps` when
# the folder is there, and names every baseline that stays missing.
#
# Carrying .whl/ to the GPU machine: .whl/ is gitignored (wheels are never committed), and
# the workplace's device tool sends tracked and untracked-not-ignored files only, plus the
# ignored paths a call names in `carry`.  So every call that runs gpu_check.sh names it:
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
# The wheels are well under 5 MiB (the working tree that travels may not exceed 64 MiB).
#
# Only what the card lacks is fetched, one package at a time with --no-deps, so torch and
# its CUDA libraries are never downloaded.  The card's image already has torch 2.11,
# torchvision 0.26, triton 3.6, numpy, regex, tqdm, huggingface_hub, safetensors and timm
# (the rest of open_clip_torch's requirements); a machine without them (a rehearsal venv)
# installs those from its own index first, as the card has them.
#   open_clip_torch  open_clip.loss.ClipLoss        (requires ftfy, beyond the card's)
#   ftfy, wcwidth    open_clip's tokenizer import   (ftfy requires wcwidth)
#   inf_cl           Inf-CL (cal_flash_loss)        (requires triton, numpy: on the card)
#   siglip_kernel    fused_siglip_loss (SigLIP rows) (py3-none-any, Python + Triton; requires
#                    torch>=2.1, triton>=3.0: on the card; its import queries the GPU)
# Pinned so that a rerun fetches the same bytes; raise a pin deliberately.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEST="${WHEEL_DIR:-.whl}"
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 inf_cl==1.2.1 siglip_kernel==0.1.2)
mkdir -p "$DEST"
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$spec"
done
# One version per package: two versions of one name would stop the card's install.
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "more than one wheel of: $dups -- remove the old ones from $DEST" >&2; exit 1; fi
ls -la "$DEST"
echo "carry [\"$DEST\"] in the device call that runs benchmarks/gpu_check.sh"
