"""Parity with the released code: its small-model checkpoint, converted, must reproduce its outputs (atol 1e-4,
discrete outputs identical) and its NPR supervision functions (SPEC §7; fixture README)."""
import json

import pytest
import torch

from pgseg.model.npr import pg_loss
from pgseg.text import tokenize

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def released(fixture_dir, released_model):
    return {
        "model": released_model,
        "inputs": torch.load(fixture_dir / "inputs.pt"),
        "outputs": torch.load(fixture_dir / "outputs.pt"),
        "npr": torch.load(fixture_dir / "npr_supervision.pt"),
        "arch": json.loads((fixture_dir / "architecture.json").read_text()),
        "prompts": json.loads((fixture_dir / "prompts.json").read_text())["prompts"],
    }


def test_architecture_json_agrees_with_the_built_model(released, fixture_dir):
    arch, model = released["arch"], released["model"]
    state = torch.load(fixture_dir / "released_layout_small.pth", weights_only=True)["model"]
    mapping_text = sum(v.numel() for k, v in state.items()
                       if k.startswith("img_encoder.mapping_text.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert sum(p.numel() for p in model.parameters()) + mapping_text == arch["num_parameters"]
    assert model.img_encoder.layers[0].downsample.assign.scale == pytest.approx(arch["grouping_block"]["assign"]["scale"])


def test_tokenizer_matches_released(released):
    assert torch.equal(tokenize(released["prompts"], context_length=77), released["inputs"]["text_tokens"])


@pytest.mark.parametrize("name, key", [("img224", "images_224"), ("img448", "images_448")])
def test_image_outputs_match(released, name, key):
    model, out = released["model"], released["outputs"]
    with torch.no_grad():
        emb = model.encode_image(released["inputs"][key])

    def close(suffix, ours):
        ref = out[f"{name}.{suffix}"]
        torch.testing.assert_close(ours.reshape(ref.shape), ref, atol=ATOL, rtol=RTOL, msg=suffix)

    close("pooled", emb.out.pooled)
    close("final_tokens", emb.out.tokens)
    close("image_x", emb.x)
    close("image_x_norm", torch.nn.functional.normalize(emb.x, dim=-1))
    close("group_feat", emb.groups)
    close("group_feat_norm", torch.nn.functional.normalize(emb.groups, dim=-1))
    for s, stage in enumerate(emb.out.stages):
        close(f"stage{s}.attn_soft", stage.assignment.soft)
        close(f"stage{s}.centres", stage.assignment.centres)
        close(f"stage{s}.npr.prototypes", stage.prototypes)
        close(f"stage{s}.input_tokens", stage.input_tokens)
        hard = out[f"{name}.stage{s}.attn_hard"]
        assert torch.equal(stage.assignment.hard.reshape(hard.shape), hard), f"stage{s} hard assignment"


def test_text_outputs_and_the_every_forward_ema(released):
    model, out, tokens = released["model"], released["outputs"], released["inputs"]["text_tokens"]
    atten = model.text_encoder.Atten
    atten.mu.copy_(out["text.mu_buffer_before"])
    with torch.no_grad():
        first = model.encode_text(tokens)
        torch.testing.assert_close(atten.mu, out["text.mu_buffer_after_call1"], atol=ATOL, rtol=RTOL)
        second = model.encode_text(tokens)
    torch.testing.assert_close(first.feature, out["text.feat"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(first.x, out["text.text_x"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(first.prototypes, out["text.text_mu"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(second.prototypes, out["text.text_mu_call2"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(atten.mu, out["text.mu_buffer_after_call2"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(second.x, first.x)


@pytest.mark.parametrize("variant", ["img_g16", "img_g8", "text_g8", "text_g4"])
def test_npr_supervision_functions(released, variant):
    d = released["npr"]
    result = pg_loss(d[f"{variant}.centres"], d[f"{variant}.prototypes"], torch.tensor(float(d["scale_used"])),
                     maximize=False, hrs=True, phi=float(d["hrs_threshold"]), hrs_rule="column0", reduction="pooled")
    b, g = d[f"{variant}.centres"].shape[:2]
    assert torch.equal(result.rows.reshape(-1), torch.arange(g).repeat(b))
    assert torch.equal(result.cols.reshape(-1), d[f"{variant}.match_col_idx"])
    # the release's first mask ("gp") selects rows of Sᵀ: prototype → groups; the second ("pg") group → prototypes
    assert torch.equal(result.keep_p2g, d[f"{variant}.hrs_mask_gp"])
    assert torch.equal(result.keep_g2p, d[f"{variant}.hrs_mask_pg"])
    torch.testing.assert_close(result.logits_p2g[result.keep_p2g], d[f"{variant}.ce_logits_gp"], atol=ATOL, rtol=RTOL)
    assert result.loss.item() == pytest.approx(d[f"{variant}.closs"].item(), abs=1e-4)


def test_end_to_end_pg_loss(released):
    model, d, out = released["model"], released["npr"], released["outputs"]
    with torch.no_grad():
        emb = model.encode_image(released["inputs"]["images_224"])
    torch.testing.assert_close(emb.out.pooled, d["eval_pgloss.pooled"], atol=ATOL, rtol=RTOL)
    scale = model.pg_scale()
    kw = dict(maximize=False, hrs=True, phi=0.1, hrs_rule="column0", reduction="pooled")
    # on the fixture's own stored centres and prototypes (the end-to-end margins are tiny, see its README)
    losses = []
    for s, key in enumerate(["L1_stage0", "L2_stage1"]):
        r = pg_loss(out[f"img224.stage{s}.centres"], out[f"img224.stage{s}.npr.prototypes"], scale, **kw)
        assert torch.equal(r.cols.reshape(-1), d[f"eval_pgloss.{key}.match_col_idx"])
        assert r.loss.item() == pytest.approx(d[f"eval_pgloss.{key}"].item(), abs=1e-4)
        losses.append(r.loss)
    avg = out["img224.stage1.centres"].mean(dim=-1, keepdim=True)
    r = pg_loss(avg, d["eval_pgloss.text_mu"], scale, **kw)
    assert torch.equal(r.cols.reshape(-1), d["eval_pgloss.L3_text.match_col_idx"])
    assert r.loss.item() == pytest.approx(d["eval_pgloss.L3_text"].item(), abs=1e-4)
    total = 0.1 * losses[0] + 0.1 * losses[1] + 0.01 * r.loss  # λ = 0.1, β = 0.01: 0.1·(L1 + L2 + 0.1·L3)
    assert total.item() == pytest.approx(d["eval_pgloss.loss_pg"].item(), abs=1e-4)
