"""Two gloo processes on 127.0.0.1: the prototype EMA leaves identical buffers on both ranks, the image–text loss
over the global batch gives each rank the gradient of the single-process loss on the whole batch, and the whole
model's gradient averaged over the two ranks (what DDP applies) is one process's on the global batch, with the
BatchNorm statistics frozen (on CPU each rank normalises with its own batch's: README, "BatchNorm"); so does the
group-level noun loss with one group per noun (its assignments made over the gathered batch)."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgseg import distributed as D
from pgseg.config import load_config
from pgseg.losses import contrastive_loss, multi_label_loss
from pgseg.model import PGSeg
from pgseg.text import tokenize
from pgseg.train.dev_eval import frozen_replica

pytestmark = pytest.mark.distributed
WORLD = 2


def _frozen_batchnorm_model_and_batch(world: D.Collectives = D.SINGLE):
    """The tiny PGSeg (paper mode, NPR on, no Gumbel noise so both sides draw nothing at random) in training mode
    with its BatchNorms in evaluation mode, and a global batch of 8 images and captions."""
    torch.manual_seed(1)
    model = PGSeg.from_config(load_config("tiny", ["npr.mode=paper", "model.image.gumbel=false"]), world).train()
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.eval()
    torch.manual_seed(11)
    captions = ["a red circle", "a blue square", "a star", "two circles", "a green star", "a square and a star",
                "a triangle", "three stars"]
    return model, torch.randn(len(captions), 3, 64, 64), tokenize(captions, context_length=16)


def _group_noun_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global batch of 8 images' groups [8, 4, 8] and two noun prompts each [8, 2, 8], with noun ids (5 nouns,
    shared across the ranks' halves; no filler, which would leave the ranks unequal numbers of rows to average)."""
    gen = torch.Generator().manual_seed(21)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [4, 1], [2, 3], [0, 4], [1, 3], [2, 0]])
    return torch.randn(8, 4, 8, generator=gen), torch.randn(8, 2, 8, generator=gen), ids


def _worker(rank: int, out_dir: str) -> None:
    # the rendezvous in a file (a TCP store would listen on every interface) and gloo's links on the loopback device
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=__import__("datetime").timedelta(seconds=60))
    try:
        # 1. prototype EMA: every rank starts from the same model and sees different images
        torch.manual_seed(0)
        world = D.Collectives.from_process_group()
        assert world == D.Collectives(rank, WORLD)
        model = PGSeg.from_config(load_config("tiny", ["npr.mode=paper"]), world).train()
        torch.manual_seed(100 + rank)
        images = torch.randn(3, 3, 64, 64)
        tokens = tokenize(["a red circle", "a blue square", "a star"], context_length=16)
        out = model(images, tokens)
        model.ema_step(out.prototypes)
        buffers = {k: v.clone() for k, v in model.named_buffers() if k.endswith(".mu")}
        local = {k: v.mean(0, keepdim=True) for k, v in out.prototypes.items()}
        # 2. ITC over the global batch: features of this rank's half of a fixed global batch
        torch.manual_seed(7)
        img_all = torch.randn(WORLD * 4, 8)
        txt_all = torch.randn(WORLD * 4, 8)
        img = img_all[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        txt = txt_all[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
        loss = contrastive_loss(img, txt, torch.tensor(10.0), world)
        loss.backward()
        # 3. the whole model on this rank's half of a global batch, BatchNorm frozen
        model, images, tokens = _frozen_batchnorm_model_and_batch(world)
        half = slice(rank * len(images) // WORLD, (rank + 1) * len(images) // WORLD)
        model_loss = model(images[half], tokens[half]).loss
        model_loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        # 4. the dev evaluation's copy of a model whose ranks ran a training forward on their own images (BatchNorm
        # statistics of their own batch, as after DDP's last step)
        torch.manual_seed(0)
        model = PGSeg.from_config(load_config("tiny"), world).train()
        torch.manual_seed(200 + rank)
        model(torch.randn(4, 3, 64, 64), tokenize(["a star", "a circle", "a square", "two stars"], context_length=16))
        own = {k: v.clone() for k, v in model.named_buffers()}
        replica = frozen_replica(model, world)
        scored = {k: v.clone() for k, v in replica.named_buffers()}
        assert not replica.training and replica.world == D.SINGLE and model.training and model.world == world
        # 5. the group-level noun loss, one group per noun: this rank's half of a fixed global batch
        groups, nouns, ids = _group_noun_batch()
        mine = slice(rank * 4, (rank + 1) * 4)
        g, n = groups[mine].clone().requires_grad_(True), nouns[mine].clone().requires_grad_(True)
        exclusive = multi_label_loss(g, n, torch.tensor(10.0), world, ids=ids[mine], exclusive=True)
        exclusive.backward()
        torch.save({"exclusive": exclusive.detach(), "exclusive_grads": (g.grad, n.grad), "own_buffers": own, "scored_buffers": scored,"buffers": buffers, "local_means": local, "loss": loss.detach(),
                    "img_grad": img.grad, "txt_grad": txt.grad, "model_loss": model_loss.detach(), "grads": grads},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(out_dir,), nprocs=WORLD, join=True, start_method="spawn")
        yield [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def test_prototype_ema_identical_across_ranks(results):
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in PGSeg.from_config(load_config("tiny", ["npr.mode=paper"])).named_buffers()
               if k.endswith(".mu")}
    a, b = results[0]["buffers"], results[1]["buffers"]
    assert a.keys() == b.keys() and len(a) == 3
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], initial[name]), name  # it moved
    # and it moved by the mean over the global batch (both ranks' local means)
    key = "img_encoder.layers.0.downsample_spatial.mu"
    global_mean = (results[0]["local_means"]["stage0"] + results[1]["local_means"]["stage0"]) / 2
    torch.testing.assert_close(a[key], 0.9 * initial[key] + 0.1 * global_mean, atol=1e-6, rtol=1e-5)


def test_every_rank_scores_rank0s_model_in_dev_evaluation(results):
    own = [r["own_buffers"] for r in results]
    scored = [r["scored_buffers"] for r in results]
    differ = {k for k in own[0] if not torch.equal(own[0][k], own[1][k])}  # the images differ, the captions not
    assert "img_projector.linear_hidden.1.running_mean" in differ and "text_projector.linear_hidden.1.running_mean" \
        not in differ
    assert own[0].keys() == scored[0].keys() == scored[1].keys()
    for name in own[0]:
        assert torch.equal(scored[0][name], own[0][name]) and torch.equal(scored[1][name], own[0][name]), name


def test_itc_uses_the_global_batch(results):
    torch.manual_seed(7)
    img_all = torch.randn(WORLD * 4, 8, requires_grad=True)
    txt_all = torch.randn(WORLD * 4, 8, requires_grad=True)
    loss = contrastive_loss(img_all, txt_all, torch.tensor(10.0))
    loss.backward()
    # each rank's loss is its share of the global loss; summed gradients (what DDP all-reduces, before its
    # division by the world size) equal the global loss's gradient ×W
    mean_loss = sum(r["loss"] for r in results) / WORLD
    assert mean_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    img_grad = torch.cat([r["img_grad"] for r in results]) / WORLD
    txt_grad = torch.cat([r["txt_grad"] for r in results]) / WORLD
    torch.testing.assert_close(img_grad, img_all.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(txt_grad, txt_all.grad, atol=1e-6, rtol=1e-4)
    local_only = contrastive_loss(img_all[:4], txt_all[:4], torch.tensor(10.0))
    assert abs(local_only.item() - results[0]["loss"].item()) > 1e-3  # it is not the local-batch loss


def test_two_ranks_apply_the_gradient_of_one_process_on_the_global_batch(results):
    torch.set_num_threads(1)
    model, images, tokens = _frozen_batchnorm_model_and_batch()
    loss = model(images, tokens).loss
    loss.backward()
    assert sum(r["model_loss"] for r in results).item() / WORLD == pytest.approx(loss.item(), rel=1e-5)
    single = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert single.keys() == results[0]["grads"].keys() == results[1]["grads"].keys()
    averaged = torch.cat([((results[0]["grads"][k] + results[1]["grads"][k]) / WORLD).flatten() for k in single])
    reference = torch.cat([g.flatten() for g in single.values()])
    assert ((averaged - reference).norm() / reference.norm()).item() < 1e-4
    # and not by luck: one rank's own gradient is far from it
    alone = torch.cat([results[0]["grads"][k].flatten() for k in single])
    assert ((alone - reference).norm() / reference.norm()).item() > 1e-2


def test_the_exclusive_group_noun_loss_is_the_global_batch_loss(results):
    groups, nouns, ids = _group_noun_batch()
    groups.requires_grad_(True)
    nouns.requires_grad_(True)
    loss = multi_label_loss(groups, nouns, torch.tensor(10.0), ids=ids, exclusive=True)
    loss.backward()
    assert sum(r["exclusive"] for r in results).item() / WORLD == pytest.approx(loss.item(), rel=1e-5)
    for i, reference in enumerate((groups.grad, nouns.grad)):
        summed = torch.cat([r["exclusive_grads"][i] for r in results]) / WORLD
        torch.testing.assert_close(summed, reference, atol=1e-6, rtol=1e-4)
    assert loss.item() != pytest.approx(multi_label_loss(groups, nouns, torch.tensor(10.0), ids=ids).item(), rel=1e-3)
