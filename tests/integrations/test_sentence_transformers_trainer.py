"""sentence-transformers' own ``SentenceTransformerTrainer`` with the library's loss and with
the fused twin: same seed, same data, a few steps; per-step losses and final weights agree.

A tiny offline BERT in float64 (dropout on), 27 (anchor, positive, negative) rows, batches
of 9, 3 steps of AdamW; MNRL and the cached MNRL (mini-batches of 4).  In float64 the runs
differ only by the rounding of the loss stage, so the bound is tight (1e-9 relative).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="the sentence-transformers extra is not installed")
pytest.importorskip("datasets", reason="SentenceTransformerTrainer needs datasets")
pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs accelerate")

from helpers import assert_same_training  # noqa: E402

pytestmark = pytest.mark.slow  # two training runs per test

STEPS, BATCH = 3, 9


def _dataset():
    from datasets import Dataset
    from st_tiny_model import sentences

    gen = torch.Generator().manual_seed(0)
    n = STEPS * BATCH
    return Dataset.from_dict({"anchor": sentences(n, gen), "positive": sentences(n, gen),
                              "negative": sentences(n, gen)})


def train(folder, make_loss):
    """Train a fresh tiny model for STEPS steps: (per-step losses, final state dict)."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from st_tiny_model import tiny_model

    model = tiny_model(folder / "bert", seed=0)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "out"), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=1e-3,
        seed=0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True)
    loss = make_loss(model)
    losses = []  # each step's loss, unrounded (the trainer's log rounds it)
    loss.register_forward_hook(lambda module, inputs, out: losses.append(out.item()))
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=_dataset(), loss=loss)
    trainer.train()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _compare(tmp_path, lib_loss, fast_loss):
    want_losses, want = train(tmp_path / "lib", lib_loss)
    got_losses, got = train(tmp_path / "fast", fast_loss)
    assert len(want_losses) == STEPS and len(got_losses) == STEPS
    step_worst, worst = assert_same_training(got_losses, want_losses, got, want)
    print(f"max relative difference: per-step loss {step_worst:.2e}, "
          f"final weights {worst:.2e}")


def test_trainer_mnrl_and_fused_twin_agree(tmp_path):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from clip_fast.integrations.sentence_transformers import FastMultipleNegativesRankingLoss

    _compare(tmp_path, MultipleNegativesRankingLoss, FastMultipleNegativesRankingLoss)


def test_trainer_cached_mnrl_and_fused_twin_agree(tmp_path):
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from clip_fast.integrations.sentence_transformers import FastCachedMultipleNegativesRankingLoss

    _compare(tmp_path, lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=4),
             lambda m: FastCachedMultipleNegativesRankingLoss(m, mini_batch_size=4))


@pytest.mark.parametrize("cached", [False, True], ids=["mnrl", "cached"])
def test_readme_finetuning_example_runs_offline(tmp_path, cached):
    """examples/sentence_transformers_finetune.py (the README's example), 2 steps, through the switch."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "examples", "sentence_transformers_finetune.py"), "--steps", "2",
           "--batch-size", "8", "--out", str(tmp_path)] + (["--cached"] if cached else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    twin = "FastCachedMultipleNegativesRankingLoss" if cached else "FastMultipleNegativesRankingLoss"
    assert f"loss: {twin}" in out.stdout
    assert os.path.isdir(tmp_path / "final")
