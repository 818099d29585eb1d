"""Fine-tune a sentence embedding model with sentence-transformers' trainer and clip_fast's
fused MultipleNegativesRankingLoss, offline.

    python examples/sentence_transformers_finetune.py [--cached] [--steps 20] [--out DIR]

The model is a small random-init BERT built from a config with a WordPiece vocabulary
written here, so nothing is downloaded; swap in ``SentenceTransformer("your/model")`` for a
real run.  The training code is sentence-transformers' own: the switch makes its
``MultipleNegativesRankingLoss`` (or ``CachedMultipleNegativesRankingLoss`` with ``--cached``)
the fused twin, so the lines below are what a sentence-transformers user already writes.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile

from clip_fast.integrations.sentence_transformers import use_fast_st_losses

WORDS = ("the a cat dog bird sat ran flew on under over mat rug tree red blue green big small "
         "house car road sun moon rain snow day night fast slow").split()


def tiny_bert(folder: str, dim: int = 64):
    """A SentenceTransformer over a 2-layer random-init BERT with a local vocabulary."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=4 * dim, max_position_embeddings=64)).save_pretrained(folder)
    return SentenceTransformer(modules=[Transformer(folder), Pooling(dim, pooling_mode="mean")], device="cpu")


def pairs(n: int, seed: int = 0):
    """(anchor, positive, negative) rows: the positive shuffles the anchor's words, the
    negative is another random sentence."""
    from datasets import Dataset

    rng = random.Random(seed)
    anchors = [" ".join(rng.choices(WORDS, k=rng.randint(4, 8))) for _ in range(n)]
    positives = [" ".join(rng.sample(a.split(), len(a.split()))) for a in anchors]
    negatives = [" ".join(rng.choices(WORDS, k=rng.randint(4, 8))) for _ in range(n)]
    return Dataset.from_dict({"anchor": anchors, "positive": positives, "negative": negatives})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cached", action="store_true", help="CachedMultipleNegativesRankingLoss (mini-batches of 16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="st_finetune_")
    os.makedirs(os.path.join(out, "init"), exist_ok=True)
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses

    model = tiny_bert(os.path.join(out, "init"))
    with use_fast_st_losses():  # sentence-transformers' loss classes are the fused twins inside
        if args.cached:
            loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=16)
        else:
            loss = losses.MultipleNegativesRankingLoss(model)
    print(f"loss: {type(loss).__name__}")
    trainer = SentenceTransformerTrainer(
        model=model, train_dataset=pairs(args.steps * args.batch_size), loss=loss,
        args=SentenceTransformerTrainingArguments(
            output_dir=os.path.join(out, "run"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=5e-4, logging_steps=max(1, args.steps // 5), save_strategy="no", report_to=[],
            use_cpu=True, seed=0))
    trainer.train()
    model.save(os.path.join(out, "final"))
    print(f"saved {os.path.join(out, 'final')}")


if __name__ == "__main__":
    main()
