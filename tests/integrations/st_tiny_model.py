"""A tiny random-init BERT SentenceTransformer built offline (no downloads): a WordPiece
vocabulary written to a folder, a BertConfig model saved beside it, Transformer + mean Pooling."""
from __future__ import annotations

import torch

WORDS = ("the a cat dog sat ran on under mat rug red blue big small house tree car road sun moon "
         "rain snow day night fast slow eats drinks water milk bird fish sky sea").split()


def sentences(n, gen, length=(3, 7)):
    """``n`` random sentences over WORDS (lengths differ, so padding and masks are exercised)."""
    out = []
    for _ in range(n):
        k = int(torch.randint(length[0], length[1] + 1, (1,), generator=gen))
        idx = torch.randint(0, len(WORDS), (k,), generator=gen).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def tiny_model(folder, dim=16, dropout=0.1, seed=0, dtype=torch.float64):
    """A SentenceTransformer over a 1-layer BERT of width ``dim``, in ``dtype``, on CPU."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=dim, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=2 * dim, max_position_embeddings=32, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(str(folder))
    model = SentenceTransformer(modules=[Transformer(str(folder)), Pooling(dim, pooling_mode="mean")],
                                device="cpu")
    return model.to(dtype)
