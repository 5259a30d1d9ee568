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


def test_group_level_multi_label_scores_each_noun_by_its_best_group():
    gen = torch.Generator().manual_seed(0)
    nouns = F.normalize(torch.randn(4, 2, 16, generator=gen), dim=-1)  # 4 images, 2 nouns each
    scale = torch.tensor(10.0)
    # one group: the same loss as the image-level one
    pooled = torch.randn(4, 16, generator=gen)
    assert multi_label_loss(pooled[:, None], nouns, scale) == pytest.approx(float(multi_label_loss(pooled, nouns, scale)))
    # each of an image's two groups is one of its nouns: every noun has a group that matches it exactly
    split = torch.cat([nouns, torch.randn(4, 3, 16, generator=gen) * 1e-3], dim=1)  # + 3 near-empty groups
    own = multi_label_loss(split, nouns, scale)
    # the same information averaged into one embedding (what the image-level loss sees) scores worse per group
    assert own < multi_label_loss(nouns.mean(dim=1)[:, None], nouns, scale)
    # the groups of another image: every noun's best group belongs to the wrong image
    assert own < multi_label_loss(split.roll(1, dims=0), nouns, scale)
    # gradients reach only each image's best-matching groups for the nouns (and the noun side)
    groups = split.clone().requires_grad_()
    multi_label_loss(groups, nouns, scale).backward()
    assert groups.grad[:, :2].abs().sum() > 0


def test_exclusive_matching_gives_each_noun_of_a_caption_its_own_group():
    from pgseg.losses import noun_groups

    gen = torch.Generator().manual_seed(3)
    nouns = F.normalize(torch.randn(4, 2, 16, generator=gen), dim=-1)  # 4 images, 2 nouns each
    ids = torch.arange(8).reshape(4, 2)
    scale = torch.tensor(10.0)
    # each noun has a group of its own that matches it best: the exclusive loss is the max one
    split = torch.cat([nouns, torch.randn(4, 3, 16, generator=gen) * 1e-3], dim=1)
    assert noun_groups(split, nouns, ids).tolist() == [[0, 1]] * 4
    assert multi_label_loss(split, nouns, scale, ids=ids, exclusive=True) == pytest.approx(
        float(multi_label_loss(split, nouns, scale, ids=ids)), rel=1e-6)
    # one group holding both nouns (their mean) is every noun's best match: with max it carries both, exclusive
    # scores the second noun by another group, so a merged group costs more than under max
    both = F.normalize(nouns.mean(dim=1, keepdim=True), dim=-1)
    merged = torch.cat([both, split[:, 2:]], dim=1)  # [4, 4, 16]: the merged group and 3 near-empty ones
    carriers = noun_groups(merged, nouns, ids)
    assert (carriers[:, 0] != carriers[:, 1]).all() and ((carriers == 0).sum(dim=1) == 1).all()
    assert multi_label_loss(merged, nouns, scale, ids=ids, exclusive=True) > multi_label_loss(
        merged, nouns, scale, ids=ids) + 0.1
    # the separated groups are what the exclusive loss prefers to the merged one (max hardly tells them apart)
    assert multi_label_loss(split, nouns, scale, ids=ids, exclusive=True) < multi_label_loss(
        merged, nouns, scale, ids=ids, exclusive=True)
    # a filler (the caption standing in for a noun) never takes a noun's group
    fill = ids.clone()
    fill[:, 0] = -1
    filler_first = torch.stack([nouns[:, 1], nouns[:, 1]], dim=1)  # the filler matches noun 1's group best too
    assert noun_groups(split, filler_first, fill)[:, 1].tolist() == [1] * 4


def test_prompts_left_out_of_the_multi_label_loss_change_nothing():
    gen = torch.Generator().manual_seed(1)
    groups, nouns = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)
    scale = torch.tensor(10.0)
    distinct = torch.arange(6).reshape(3, 2)  # every prompt its own noun: GroupViT's loss
    assert multi_label_loss(groups, nouns, scale, ids=distinct) == pytest.approx(float(multi_label_loss(groups, nouns, scale)))
    ids = distinct.clone()
    ids[1, 1] = -1  # image 1's second prompt (its caption, standing in for a noun) takes no part
    before = multi_label_loss(groups, nouns, scale, ids=ids)
    moved = nouns.clone()
    moved[1, 1] = torch.randn(16, generator=gen) * 5
    assert multi_label_loss(groups, moved, scale, ids=ids) == pytest.approx(float(before))
    assert multi_label_loss(groups, moved, scale) != pytest.approx(float(multi_label_loss(groups, nouns, scale)))


def test_prompts_of_one_noun_are_positives_not_negatives():
    """Two images with a circle, each caption's circle prompt in its own template: with noun ids both prompts are
    the circle for both images, so swapping them changes nothing; GroupViT's loss holds each image to its own
    prompt and counts the other image's circle prompt against it."""
    gen = torch.Generator().manual_seed(2)
    groups = torch.randn(2, 3, 16, generator=gen)
    circle_a, circle_b, square, star = torch.randn(4, 16, generator=gen)
    nouns = torch.stack([torch.stack([circle_a, square]), torch.stack([circle_b, star])])  # [2, 2, 16]
    swapped = torch.stack([torch.stack([circle_b, square]), torch.stack([circle_a, star])])
    ids = torch.tensor([[7, 8], [7, 9]])  # circle, square | circle, star
    scale = torch.tensor(10.0)
    assert multi_label_loss(groups, swapped, scale, ids=ids) == pytest.approx(
        float(multi_label_loss(groups, nouns, scale, ids=ids)), rel=1e-6)
    assert multi_label_loss(groups, swapped, scale) != pytest.approx(float(multi_label_loss(groups, nouns, scale)),
                                                                     rel=1e-3)


def test_the_model_leaves_caption_fillers_out_of_the_group_loss():
    from pgseg.config import load_config
    from pgseg.model import PGSeg

    config = load_config("tiny", ["loss.multi_label=2", "loss.group_nouns_weight=1.0", "npr.enabled=false",
                                  "npr.i_npr=false", "npr.t_npr=false", "npr.hrs=false"])
    model = PGSeg.from_config(config).eval()  # eval: no Gumbel noise, BatchNorm fixed: two calls agree
    captions = ["a red circle on the grass", "a square"]
    tokens = tokenize(captions, context_length=16)
    nouns = tokenize(["a photo of a circle.", "a photo of a grass.", "a photo of a square.", "a square"],
                     context_length=16).reshape(2, 2, 16)  # the second image's second prompt is its caption
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        groups = model.encode_image(images).groups
        prompts = model.encode_text(nouns.reshape(4, 16)).x.reshape(2, 2, -1)
        scale = model._clamped(model.multi_label_logit_scale)
        expected = torch.tensor([[0, 1], [2, -1]])
        without_ids = model(images, tokens, nouns).terms["group_nouns"]  # fillers found by their tokens
        assert without_ids == pytest.approx(float(multi_label_loss(groups, prompts, scale, ids=expected)), rel=1e-5)
        assert without_ids != pytest.approx(float(multi_label_loss(groups, prompts, scale)), rel=1e-5)
        given = torch.tensor([[5, 6], [5, -1]])  # as the ingest gives them: the second image's noun is the first's
        with_ids = model(images, tokens, nouns, noun_ids=given).terms["group_nouns"]
        assert with_ids == pytest.approx(float(multi_label_loss(groups, prompts, scale, ids=given)), rel=1e-5)
    with pytest.raises(Exception, match="needs noun prompts"):
        load_config("tiny", ["loss.group_nouns_weight=1.0"])
