import math

import pytest
import torch

from pgseg.config import load_config
from pgseg.model import PGSeg
from pgseg.text import tokenize

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", ".mu")


def _released_entries(reference_dir):
    rows = []
    for line in (reference_dir / "official_pgseg_state_dict_keys.tsv").read_text().splitlines():
        name, shape, _ = line.split("\t")
        dims = [int(d) for d in shape.strip("()").split(",") if d.strip()]
        rows.append((name, math.prod(dims)))
    return rows


def test_parameter_count_equals_release_less_the_unused_mapping_text(reference_dir):
    entries = _released_entries(reference_dir)
    released_params = sum(n for name, n in entries if not name.endswith(BUFFER_SUFFIXES))
    assert released_params == 64_677_394  # SPEC §2.1, from the released key list
    mapping_text = sum(n for name, n in entries if name.startswith("img_encoder.mapping_text.")
                       and not name.endswith(BUFFER_SUFFIXES))
    model = PGSeg.from_config(load_config("pgseg_vit_s"))
    ours = sum(p.numel() for p in model.parameters())
    assert ours == released_params - mapping_text  # mapping_text: built by the release, never called
    names = {k for k, _ in entries if not k.startswith("img_encoder.mapping_text.")}
    assert set(model.state_dict()) == names  # the released layout, key for key
    groupvit = PGSeg.from_config(load_config("groupvit_vit_s"))
    pg_only = [k for k in names if "downsample_spatial" in k or k in ("img_encoder.logit_scale", "text_encoder.Atten.mu")]
    assert set(groupvit.state_dict()) == names - set(pg_only)


def _tiny(*overrides):
    return PGSeg.from_config(load_config("tiny", list(overrides)))


def _batch(b=4, size=64, length=16):
    captions = ["a red circle and a blue square", "a green triangle", "two yellow stars", "a circle on grass"][:b]
    return torch.randn(b, 3, size, size), tokenize(captions, context_length=length)


def test_train_forward_terms_and_gradients_reach_what_spec_says():
    model = _tiny("npr.mode=paper").train()
    images, tokens = _batch()
    out = model(images, tokens)
    assert set(out.terms) == {"itc", "pg_stage0", "pg_stage1", "pg_text"}
    assert torch.isclose(out.loss, sum(out.terms.values()))
    assert 0 < out.metrics["hrs_kept_stage0"] <= 1 and "tnpr_grad_norm" in out.metrics
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("logit_scale", "img_encoder.patch_embed.proj.weight", "img_encoder.layers.0.group_token",
                 "img_encoder.layers.0.downsample_spatial.mapping_x.linear_out.weight",
                 "img_encoder.layers.1.downsample.assign.q_proj.weight", "text_encoder.token_embedding.weight",
                 "img_projector.linear_out.weight", "text_projector.linear_out.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # paper: fixed PG temperature; the prototypes are buffers and never get gradients
    assert not model.img_encoder.logit_scale.requires_grad
    assert all(not b.requires_grad for n, b in model.named_buffers() if n.endswith(".mu"))


def test_official_pg_temperature_is_learnable_and_gets_gradient():
    model = _tiny("npr.mode=official").train()
    out = model(*_batch())
    out.loss.backward()
    assert model.img_encoder.logit_scale.grad is not None
    assert model.pg_scale().item() == pytest.approx(10.0)


def test_pg_losses_start_at_the_configured_step():
    model = _tiny("npr.start_step=5", "npr.start_epoch=1").train()
    assert set(model(*_batch(), step=4, epoch=1).terms) == {"itc"}
    assert set(model(*_batch(), step=5, epoch=0).terms) == {"itc"}
    assert "pg_stage0" in model(*_batch(), step=5, epoch=1).terms


def test_prototype_ema_paper_vs_official_quirks():
    images, tokens = _batch()
    paper = _tiny("npr.mode=paper").train()
    mu0 = paper.img_encoder.layers[0].downsample_spatial.mu.clone()
    t0 = paper.text_encoder.Atten.mu.clone()
    out = paper(images, tokens)
    assert torch.equal(paper.text_encoder.Atten.mu, t0)  # paper: nothing moves during the forward
    paper.ema_step(out.prototypes)
    expected = 0.9 * mu0 + 0.1 * out.prototypes["stage0"].mean(0, keepdim=True)
    torch.testing.assert_close(paper.img_encoder.layers[0].downsample_spatial.mu, expected)
    assert not torch.equal(paper.text_encoder.Atten.mu, t0)

    official = _tiny("npr.mode=official").eval()
    mu0 = official.img_encoder.layers[0].downsample_spatial.mu.clone()
    t0 = official.text_encoder.Atten.mu.clone()
    with torch.no_grad():
        emb = official.encode_text(tokens)  # evaluation forward: the released text EMA still runs
    torch.testing.assert_close(official.text_encoder.Atten.mu, 0.9 * t0 + 0.1 * emb.prototypes.mean(0, keepdim=True))
    official.train()
    out = official(images, tokens)
    official.ema_step(out.prototypes)
    assert torch.equal(official.img_encoder.layers[0].downsample_spatial.mu, mu0)  # image EMA never runs


def test_groupvit_baseline_has_no_npr_and_reconstruction_changes_features():
    base = _tiny("npr.enabled=false", "npr.i_npr=false", "npr.t_npr=false").train()
    out = base(*_batch())
    assert set(out.terms) == {"itc"} and out.prototypes == {}
    model = _tiny().eval()
    images, _ = _batch()
    with torch.no_grad():
        before = model.encode_image(images).x
        for layer in model.img_encoder.layers:
            if layer.downsample_spatial is not None:
                layer.downsample_spatial.mu.copy_(torch.nn.functional.normalize(torch.randn_like(layer.downsample_spatial.mu), dim=2))
        after = model.encode_image(images).x
    assert (before - after).abs().max() > 1e-4  # the stored mu matters at inference (SPEC §3.2)


def test_eval_is_deterministic_train_uses_gumbel_noise():
    model = _tiny().eval()
    images, _ = _batch()
    with torch.no_grad():
        a, b = model.encode_image(images), model.encode_image(images)
    assert torch.equal(a.x, b.x)
    st = a.out.stages[0].assignment
    assert torch.equal(st.hard.sum(dim=1), torch.ones_like(st.hard.sum(dim=1)))  # one-hot over groups
    assert torch.equal(st.hard.argmax(1), st.soft.argmax(1))
    model.train()
    hard = [model.encode_image(images).out.stages[0].assignment.hard.argmax(1) for _ in range(2)]
    assert not torch.equal(hard[0], hard[1])


def test_multi_label_loss_term_and_class_embeddings():
    model = _tiny("loss.multi_label=3").train()
    images, tokens = _batch()
    nouns = tokenize([f"a photo of a {w}." for w in ["circle", "square", "star"] * 4], context_length=16).reshape(4, 3, 16)
    out = model(images, tokens, noun_tokens=nouns)
    assert "multi_label" in out.terms and torch.isfinite(out.terms["multi_label"])
    model.eval()
    emb = model.class_embeddings(tokenize(["a photo of a cat.", "itap of a cat.", "a photo of a dog.", "itap of a dog."],
                                          context_length=16).reshape(2, 2, 16))
    assert emb.shape == (2, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_text_tokens_longer_than_context_are_refused():
    model = _tiny()
    with pytest.raises(ValueError, match="L <= 16"):
        model.encode_text(torch.zeros(2, 77, dtype=torch.long))


def test_the_text_tower_stops_after_the_last_eot_and_its_features_do_not_change():
    from pgseg.model import text_encoder

    torch.manual_seed(0)
    config = load_config("tiny", ["model.text.context_length=77"])
    model = PGSeg.from_config(config).eval()
    tokens = tokenize(["a cat", "a red bus on a wet street at night", "dog"], 77)
    last = int((tokens == tokens.max()).nonzero()[:, 1].max())  # the longest caption's EOT column
    assert text_encoder.used_columns(tokens) == -(-(last + 1) // 8) * 8 < 77
    assert text_encoder.used_columns(tokens[:, :last + 1]) == last + 1  # never more columns than given
    seen = []
    hook = model.text_encoder.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        cut = model.encode_text(tokens).x
        saved, text_encoder.used_columns = text_encoder.used_columns, lambda t: t.shape[1]
        try:
            full = model.encode_text(tokens).x
        finally:
            text_encoder.used_columns = saved
    hook.remove()
    assert seen == [text_encoder.used_columns(tokens), 77]
    assert torch.allclose(cut, full, atol=1e-5) and not torch.allclose(cut[0], cut[2], atol=1e-3)


def test_prototype_count_may_differ_from_group_count():
    model = _tiny("npr.num_prototypes=[24, 4]").train()
    out = model(*_batch())
    assert out.prototypes["stage0"].shape[1] == 24 and out.prototypes["stage1"].shape[1] == 4
    assert torch.isfinite(out.loss) and "pg_stage1" in out.terms


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_projector_batchnorm_moves_once_per_step_on_the_pooled_feature_as_in_the_release(mode):
    """The release projects only the pooled feature in training; its running statistics after N steps are those
    of one BatchNorm update per step with that step's pooled features."""
    import copy

    model = _tiny(f"npr.mode={mode}").train()
    reference = copy.deepcopy(model.img_projector).train()
    pooled = []
    model.img_encoder.register_forward_hook(lambda module, args, out: pooled.append(out.pooled.detach()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    images, tokens = _batch()
    for step in range(3):
        reference.load_state_dict({k: v for k, v in model.img_projector.state_dict().items()
                                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))},
                                  strict=False)  # this step's weights, the statistics of its own history
        out = model(images, tokens, step=step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        with torch.no_grad():
            reference(pooled[-1])
    assert len(pooled) == 3
    ours, theirs = model.img_projector.linear_hidden[1], reference.linear_hidden[1]
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-5)


def test_sync_batchnorm_only_in_the_projectors_as_in_the_release():
    model = _tiny("npr.mode=official")
    model.sync_batchnorm()
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    synced = {n for n, k in kinds.items() if k is torch.nn.SyncBatchNorm}
    assert synced == {"img_projector.linear_hidden.1", "text_projector.linear_hidden.1"}
    assert {n for n in kinds if "mapping_x" in n} and all(kinds[n] is torch.nn.BatchNorm1d for n in kinds
                                                         if "mapping_x" in n)
