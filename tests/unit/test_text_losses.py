import random

import pytest
import torch
import torch.nn.functional as F

from pgseg.losses import contrastive_loss, multi_label_loss
from pgseg.text import NounVocabulary, fill_templates, noun_prompts, tokenize


def test_nouns_from_captions_without_a_tagger(tmp_path):
    vocab = NounVocabulary.from_file()
    assert vocab.nouns_in("Two Dogs and a puppy chase the red BALLS across the grass, dogs everywhere!") == ["dog", "ball", "grass"]
    assert vocab.nouns_in("strawberries on boxes") == ["strawberry", "box"]
    prompts = noun_prompts("a dog on the grass", vocab, 3, ["a photo of a {}."], random.Random(0))
    assert sorted(prompts[:2]) == ["a photo of a dog.", "a photo of a grass."] and prompts[2] == "a dog on the grass"
    (tmp_path / "v.txt").write_text("# comment\n\n")
    with pytest.raises(ValueError, match="empty"):
        NounVocabulary.from_file(tmp_path / "v.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        NounVocabulary.from_file(tmp_path / "missing.txt")


def test_templates_refuse_empty_class_lists():
    assert fill_templates(["cat"], ["a photo of a {}.", "itap of a {}."]) == [["a photo of a cat.", "itap of a cat."]]
    with pytest.raises(ValueError, match="empty"):
        fill_templates([], ["{}"])
    with pytest.raises(ValueError, match="#1 is empty"):
        fill_templates(["cat", "  "], ["{}"])
    assert tokenize("a cat", context_length=8).shape == (1, 8)


def test_losses_against_direct_formulas():
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    s = torch.tensor(7.0)
    logits = s * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    assert contrastive_loss(img, txt, s).item() == pytest.approx(ref.item(), rel=1e-6)
    nouns = torch.randn(5, 3, 8)
    n = F.normalize(nouns, dim=-1).reshape(15, 8)
    i = F.normalize(img, dim=-1)
    loss_img = sum(-(torch.log_softmax(s * i[b] @ n.t(), 0)[b * 3:(b + 1) * 3]).mean() for b in range(5)) / 5
    loss_txt = sum(F.cross_entropy((s * n[r] @ i.t())[None], torch.tensor([r // 3])) for r in range(15)) / 15
    assert multi_label_loss(img, nouns, s).item() == pytest.approx(0.5 * (loss_img + loss_txt).item(), rel=1e-5)
