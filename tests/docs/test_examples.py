"""Every example in the documentation runs: each ```python and ```bash block of README.md and
docs/*.md is executed offline on CPU, from the repository root, in a fresh process, with
TRITON_INTERPRET=1, so a renamed argument breaks a test and not a reader.  A block preceded
on the line before its fence by `<!-- example: skip (reason) -->` is not run (a GPU, torchrun
at full size, a long run, an install, a fragment); the skip is reported with its reason."""
import os
import subprocess
import sys
import time

import pytest

from markdown_pages import ROOT, RUN_LANGS, blocks, pages, read, stray_skip_markers

# Each example is meant to take ~30 s at most on an idle 2-core CPU; the limit leaves room
# for a loaded machine without letting a hung example stall the suite.
TIMEOUT_S = 300

ALL_BLOCKS = [b for page in pages() for b in blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS]


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1",          # Triton kernels on CPU tensors
               CUDA_VISIBLE_DEVICES="",       # CPU, also on a machine with a GPU
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MPLBACKEND="Agg",
               TMPDIR=str(tmp_path),          # what `mktemp -d` in an example makes is cleaned up
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               # `python`, `pytest` and `torchrun` in a bash example are this interpreter's
               PATH=os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", ""))))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_example_runs(block, tmp_path):
    if block.skip is not None:
        pytest.skip(f"marked in the docs: {block.skip}")
    if os.environ.get("CLIP_FAST_TEST_EXAMPLES") == "0":
        # CI's old leg: the examples run once per CI, in the new leg (the README's test command).
        pytest.skip("CLIP_FAST_TEST_EXAMPLES=0")
    script = tmp_path / ("example.py" if RUN_LANGS[block.lang] == "python" else "example.sh")
    script.write_text(block.code)
    cmd = [sys.executable, str(script)] if RUN_LANGS[block.lang] == "python" else \
        ["bash", "-euo", "pipefail", str(script)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id}: still running after {TIMEOUT_S} s\n{block.code}\n"
                    f"stdout:\n{(exc.stdout or '')[-3000:]}\nstderr:\n{(exc.stderr or '')[-3000:]}")
    took = time.monotonic() - start
    assert proc.returncode == 0, (f"{block.id}: exit {proc.returncode} after {took:.1f} s\n{block.code}\n"
                                  f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


def test_examples_are_found_and_skips_say_why():
    """The runner sees the examples (a parser that found none would pass vacuously), each
    skip marker sits on the line before a fence, and more examples run than are skipped."""
    run = [b for b in RUNNABLE if b.skip is None]
    skipped = [b for b in RUNNABLE if b.skip is not None]
    assert len(run) >= 20, f"only {len(run)} runnable examples found"
    assert len(run) > len(skipped), f"{len(skipped)} skipped against {len(run)} run"
    for page in pages():
        assert not stray_skip_markers(page), f"{page}: skip markers not before a fence, lines {stray_skip_markers(page)}"
    unknown = sorted({b.lang for b in ALL_BLOCKS} - set(RUN_LANGS) - {"text", "bibtex", ""})
    assert not unknown, f"fenced blocks in languages the runner neither runs nor knows: {unknown}"


def test_readme_opens_with_the_main_job_and_ci_test_command():
    """The README's first block holds the two commands: set up and run the main job, set up and
    run the tests; the second is the command .ci/run runs (its new leg)."""
    first = blocks("README.md")[0]
    commands = [ln.split("#")[0].strip() for ln in first.code.splitlines() if ln.strip()]
    assert commands[:2] == ["scripts/setup.sh && .venv/bin/python -m clip_fast.train",
                            "scripts/setup.sh --test && .venv/bin/python -m pytest -q tests"]
    assert first.skip, "the first block sets up a venv and runs everything: it must be marked skip"
    ci = "\n".join(read(".ci/run"))
    assert commands[1] in ci, ".ci/run no longer runs the README's test command"
