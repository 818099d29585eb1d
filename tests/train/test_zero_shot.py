"""Zero-shot evaluation on toy models whose answers are known by construction."""
import pytest
import torch
import torch.nn.functional as F

from clip_fast.zero_shot import topk_correct, zero_shot_classifier, zero_shot_eval

CLASSES = ["cat", "dog", "bird", "fish"]
TEMPLATES = ["a photo of a {}.", "a {}.", "my {}!"]


class ToyModel(torch.nn.Module):
    """Images are class vectors; a caption embeds as its class's one-hot plus a template offset."""

    def __init__(self, dim=6):
        super().__init__()
        self.dim = dim
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.tokenizer = self.tokenize

    def tokenize(self, texts):
        rows = []
        for t in texts:
            cls = next(i for i, c in enumerate(CLASSES) if c in t)
            tmpl = next(i for i, p in enumerate(TEMPLATES) if p.format(CLASSES[cls]) == t)
            rows.append([cls, tmpl])
        return torch.tensor(rows)

    def encode_text(self, tokens):
        out = F.one_hot(tokens[:, 0], self.dim).float() * 3.0
        out[:, -1] = tokens[:, 1].float() - 1.0  # templates 0, 1, 2 add -1, 0, +1: cancels on average
        out[:, -2] = 1.0                          # a shared direction in every caption
        return out

    def encode_image(self, images):
        return images


def test_classifier_follows_clips_recipe():
    """Normalise each template's embedding, average, renormalise: columns are unit vectors."""
    model = ToyModel()
    clf = zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert clf.shape == (6, 4)
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(4))
    for c in range(4):
        embs = torch.stack([F.normalize(model.encode_text(model.tokenize([t.format(CLASSES[c])]))[0], dim=0)
                            for t in TEMPLATES])
        torch.testing.assert_close(clf[:, c], F.normalize(embs.mean(0), dim=0))
        assert clf[-1, c].abs() < 1e-6  # the template offsets cancel


def test_eval_known_accuracy():
    """Images equal to their class direction are all right; relabelling k of them costs exactly k."""
    model = ToyModel()
    clf = zero_shot_classifier(model, CLASSES, TEMPLATES)
    labels = torch.arange(40) % 4
    images = F.one_hot(labels, 6).float() + 0.01 * torch.randn(40, 6)
    res = zero_shot_eval(model, clf, (images, labels), batch_size=7, topk=(1, 2))
    assert res == {"top1": 1.0, "top2": 1.0}
    wrong = labels.clone()
    wrong[:10] = (wrong[:10] + 1) % 4
    res = zero_shot_eval(model, {"a": clf, "b": clf}, (images, wrong), batch_size=16, topk=(1, 4))
    assert res["a_top1"] == pytest.approx(30 / 40) and res["b_top1"] == pytest.approx(30 / 40)
    assert res["a_top4"] == 1.0


def test_eval_accepts_batches_and_a_real_clip():
    from clip_fast.train.models import CLIP, ModelConfig

    torch.manual_seed(0)
    model = CLIP(ModelConfig(cnn_widths=(4, 8), embed_dim=8, text_width=16, text_layers=1)).eval()
    clf = zero_shot_classifier(model, CLASSES, TEMPLATES)
    images = torch.randn(12, 1, 28, 28)
    labels = torch.randint(0, 4, (12,))
    a = zero_shot_eval(model, clf, (images, labels), batch_size=5)
    b = zero_shot_eval(model, clf, [(images[:6], labels[:6]), (images[6:], labels[6:])])
    assert a == b
    feats = F.normalize(model.encode_image(images), dim=-1)
    expected = (feats @ clf).argmax(1).eq(labels).float().mean().item()
    assert a["top1"] == pytest.approx(expected)


def test_topk_correct_matches_a_direct_count():
    logits = torch.randn(50, 7)
    labels = torch.randint(0, 7, (50,))
    got = topk_correct(logits, labels, (1, 3, 10))
    ranks = (logits > logits.gather(1, labels[:, None])).sum(1)  # labels' rank, 0 = best
    assert got == {1: int((ranks < 1).sum()), 3: int((ranks < 3).sum()), 10: 50}


def test_bad_arguments():
    model = ToyModel()
    with pytest.raises(ValueError, match="classnames"):
        zero_shot_classifier(model, [], TEMPLATES)
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(model, CLASSES, [])
    clf = zero_shot_classifier(model, CLASSES, TEMPLATES)
    with pytest.raises(ValueError, match="differ in length"):
        zero_shot_eval(model, clf, (torch.zeros(3, 6), torch.zeros(2, dtype=torch.long)))
    # (N, 1) labels broadcast against the (N, k) predictions: a wrong count, not an error.
    with pytest.raises(ValueError, match=r"labels \(N,\), got logits \(3, 4\) and labels \(3, 1\)"):
        zero_shot_eval(model, clf, (torch.zeros(3, 6), torch.zeros(3, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="ks >= 1"):
        topk_correct(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), (0, 1))
