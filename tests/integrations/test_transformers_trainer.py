"""transformers' own ``Trainer`` on a tiny CLIPModel / SiglipModel whose batches ask for
``return_loss=True``: with transformers' loss and with the switch on (the context manager
for CLIP, ``apply_fast_loss`` for SigLIP), same seed, same data, a few steps of AdamW.
Per-step losses and final weights agree.

Float64 models, 21 pairs, batches of 7, 3 steps: the runs differ only by the rounding of the
loss stage, so the bound is tight (1e-9 relative per step loss; 1e-9 relative for the whole
weight vector, the worst tensor reported).  On CPU, torch 2.14.1, transformers 5.23.0 the
runs differed by at most 3.4e-16 relative per step loss and 5.1e-14 relative in the weights
(largest entry difference 4.8e-13).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers extra is not installed")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

from helpers import assert_same_training  # noqa: E402

pytestmark = pytest.mark.slow  # two training runs per test

STEPS, BATCH = 3, 7


class _Pairs(torch.utils.data.Dataset):
    """STEPS * BATCH (text, image) pairs as per-example dicts of tensors."""

    def __init__(self, kind):
        from hf_tiny_models import batch

        self.rows = batch(kind, STEPS * BATCH, torch.Generator().manual_seed(0))

    def __len__(self):
        return STEPS * BATCH

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.rows.items()}


def _collate(examples):
    """Stack the examples and ask the model for its loss, as transformers' run_clip example does."""
    out = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
    out["return_loss"] = True
    return out


def train(folder, kind, switch):
    """STEPS steps of a fresh tiny model: (per-step losses, final state dict, fused calls)."""
    from hf_tiny_models import tiny_model
    from transformers import Trainer, TrainingArguments

    import clip_fast.integrations.transformers as hf

    model = tiny_model(kind, seed=0)
    if switch == "apply":
        hf.apply_fast_loss(model)
    losses = []  # each step's loss, unrounded (the trainer's log rounds it)
    model.register_forward_hook(lambda module, inputs, out: losses.append(out.loss.item()))
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=BATCH, max_steps=STEPS,
                             learning_rate=1e-3, seed=0, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs(kind), data_collator=_collate)
    calls = []
    fused = hf.fused_loss
    hf.fused_loss = lambda *a, **k: calls.append(1) or fused(*a, **k)  # counts the fused losses
    try:
        if switch == "context":
            with hf.use_fast_hf_losses():
                trainer.train()
        else:
            trainer.train()
    finally:
        hf.fused_loss = fused
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, len(calls)


@pytest.mark.parametrize("kind,switch", [("clip", "context"), ("siglip", "apply")])
def test_trainer_steps_and_weights_match_transformers_loss(tmp_path, kind, switch):
    want_losses, want, lib_calls = train(tmp_path / "lib", kind, None)
    got_losses, got, fused_calls = train(tmp_path / "fast", kind, switch)
    assert (lib_calls, fused_calls) == (0, STEPS)
    assert len(want_losses) == STEPS and len(got_losses) == STEPS
    assert_same_training(got_losses, want_losses, got, want)
    assert any(not torch.equal(want[k], tiny_start) for k, tiny_start in _start(kind).items())


def _start(kind):
    """The untrained weights, to show that training moved them."""
    from hf_tiny_models import tiny_model

    return {k: v for k, v in tiny_model(kind, seed=0).state_dict().items() if v.is_floating_point()}
