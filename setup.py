"""Build clip_fast: the Python package, the Triton kernels (as ``clip_fast.kernels``)
and, where a CUDA build of torch and ``nvcc`` are present, the CUDA extension ``clip_fast._C``.

Environment flags:
    CLIP_FAST_BUILD_CUDA=0   never build the extension
    CLIP_FAST_BUILD_CUDA=1   build it or fail (no silent skip)
    (unset)                  build it when possible, else install without it and say why
    CLIP_FAST_CUDA_ARCHS     target architectures, e.g. "8.0;9.0" (default "8.0;9.0")
    MAX_JOBS                 parallel compile jobs (ninja); keep it low on small machines
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["clip_fast", "clip_fast.backends", "clip_fast.kernels"]
PACKAGE_DIR = {"clip_fast": "clip_fast", "clip_fast.kernels": "kernels"}


def _say(msg: str) -> None:
    print(f"clip_fast setup: {msg}", file=sys.stderr)


def cuda_extension():
    """Return (ext_modules, cmdclass) for clip_fast._C, or ([], {}) with a message why not."""
    flag = os.environ.get("CLIP_FAST_BUILD_CUDA", "").strip()
    if flag == "0":
        _say("CLIP_FAST_BUILD_CUDA=0: skipping the CUDA extension")
        return [], {}
    force = flag == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing from the build environment
        reason = f"torch is not importable in the build environment ({exc}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif CUDA_HOME is None and shutil.which("nvcc") is None:
            reason = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
        elif not sources:
            reason = "csrc/ holds no sources"
    if reason is not None:
        if force:
            raise RuntimeError(f"CLIP_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"installing without the CUDA extension: {reason}")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("CLIP_FAST_CUDA_ARCHS", "8.0;9.0"))
    ext = CUDAExtension(
        name="clip_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                     "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="clip-fast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for the CLIP contrastive loss, without the N x N logits",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["tqdm", "matplotlib", "pillow"],
        "bench": ["open-clip-torch", "matplotlib", "pytest-benchmark"],
        "test": ["pytest", "pytest-benchmark", "open-clip-torch", "tqdm", "matplotlib", "pillow"],
    },
    entry_points={"console_scripts": ["clip-fast-train=clip_fast.train:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
