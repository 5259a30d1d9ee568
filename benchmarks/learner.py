"""The learner study on the shapes world, in one process and without Ray (issue 17): the project's training step
(``pgseg.train.TrainStep``) on a world's images prepared the ingest's way (JPEG, ``Preprocess``: captions, noun
prompts), for a given number of epochs; the curve (train loss, dev mIoU, dev oracle-group mIoU) every few steps,
and the *final* model's val mIoU and oracle mIoU. One run per call; the record goes to ``results/learner/``.

    python -m benchmarks.learner NAME [--set KEY=VALUE ...] [--world KEY=VALUE ...] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

from benchmarks.record import commit_state, write_record

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "experiments" / "quickstart.yaml"
BG_THRESHOLDS = (0.5, 0.8, 0.9, 0.95)


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def quickstart_parts() -> tuple[dict, dict]:
    """The quickstart experiment's world and its training overrides (as written in the experiment file)."""
    import yaml

    raw = yaml.safe_load(QUICKSTART.read_text())
    return raw["sources"]["shapes"], raw["train"]


def rescore(records: Path, models: Path) -> None:
    """``--rescore``: the saved final model of every record in ``records`` that lacks them scored again on its
    world's val set (:func:`final_scores`: at each of BG_THRESHOLDS and per class); the figures are added to the
    record with the command that measured them."""
    import torch

    from pgseg.checkpoint import load_model
    from pgseg.datasets import voc
    from pgseg.segment import ProtocolSettings, background_threshold
    from pipelines.data.shapes_world import ShapesWorld, write_voc_val

    torch.set_num_threads(1)
    command = " ".join([Path(sys.executable).name, "-m", "benchmarks.learner", *sys.argv[1:]])
    for path in sorted(records.glob("*_seed*.json")):
        record = json.loads(path.read_text())
        model_file = models / f"{record['name']}_seed{record['seed']}.safetensors"
        if ("miou_by_bg_thresh" in record["val"] and "iou_by_class" in record["val"]) or not model_file.is_file():
            continue
        model, config = load_model(model_file)
        val = voc(write_voc_val(ShapesWorld(**record["world"]), Path(tempfile.mkdtemp()) / "val",
                                record["val_images"], "val"))
        settings = ProtocolSettings.of(config.eval, background_threshold(None, config.eval, val.bg_thresh))
        scores = final_scores(model, val, settings)
        record["val"].update({k: scores[k] for k in ("miou_by_bg_thresh", "iou_by_class", "oracle_iou_by_class")})
        record["rescored_by"] = command
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(path.name, {k: round(100 * v, 1) for k, v in record["val"]["miou_by_bg_thresh"].items()},
              {k: round(100 * v, 1) for k, v in record["val"]["iou_by_class"].items()}, flush=True)


def final_scores(model, dataset, settings) -> dict:
    """The final model on ``dataset``: mIoU and oracle-group mIoU (each group named by its majority class), each
    class's IoU under both (which classes the naming loses, and which the grouping already does), and the mIoU at
    each of BG_THRESHOLDS (the protocol's background threshold is the dataset's setting, not the model's). Each
    confusion matrix is computed once."""
    import torch

    from pgseg.analyze import oracle_confusion
    from pgseg.evaluate import confusion_in_process

    def by_class(scores) -> dict[str, float]:
        return {row["class"]: row["iou"] for row in scores.table()}

    model.eval()
    with torch.no_grad():
        protocol = confusion_in_process(model, dataset, settings).scores()
        oracle = oracle_confusion(model, dataset, settings).scores()
        by_threshold = {str(t): protocol.miou if t == settings.bg_thresh else
                        confusion_in_process(model, dataset, replace(settings, bg_thresh=t)).scores().miou
                        for t in BG_THRESHOLDS}
    return {"miou": protocol.miou, "oracle_miou": oracle.miou, "miou_by_bg_thresh": by_threshold,
            "iou_by_class": by_class(protocol), "oracle_iou_by_class": by_class(oracle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", default=None)
    parser.add_argument("--rescore", action="store_true",
                        help="score the saved final models of the records in --out again at several background "
                             "thresholds and per class (needs --model-out)")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides KEY=VALUE (after the quickstart's)")
    parser.add_argument("--world", nargs="*", default=[], help="shapes-world fields KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="train.seed and data.seed")
    parser.add_argument("--images", type=int, default=None, help="training images (default: the quickstart's)")
    parser.add_argument("--batch", type=int, default=64, help="the global batch (the quickstart: 2 workers x 32)")
    parser.add_argument("--curve-every", type=int, default=50, help="steps between curve points (0: none)")
    parser.add_argument("--dev", type=int, default=50, help="dev images scored for each curve point")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "results" / "learner"))
    parser.add_argument("--model-out", default=None, metavar="DIR", help="also save the final model file here")
    args = parser.parse_args()
    if args.rescore:
        if not args.model_out:
            parser.error("--rescore needs --model-out (where the final models were saved)")
        return rescore(Path(args.out), Path(args.model_out))
    if args.name is None:
        parser.error("give the run's NAME")

    import numpy as np
    import pandas as pd
    import torch

    from pgseg.analyze import oracle_confusion
    from pgseg.config import load_config
    from pgseg.datasets import voc
    from pgseg.evaluate import confusion_in_process
    from pgseg.segment import ProtocolSettings, background_threshold
    from pgseg.train import TrainStep
    from pipelines.data.ingest import Preprocess
    from pipelines.data.shapes_world import ShapesWorld, write_voc_val

    torch.set_num_threads(args.threads)
    commit, dirty = commit_state()
    world_spec, train_spec = quickstart_parts()
    world_fields = {**world_spec["world"], **{k: _value(v) for k, v in (kv.split("=", 1) for kv in args.world)}}
    world = ShapesWorld(**world_fields)
    images = args.images or world_spec["train_images"]
    base = str((QUICKSTART.parent / train_spec["base"]).resolve())
    overrides = [f"schedule.epochs={train_spec['schedule']['epochs']}",
                 f"schedule.warmup_epochs={train_spec['schedule']['warmup_epochs']}",
                 "data.augment=false", f"data.batch_size={args.batch}", "train.workers=1",
                 f"train.seed={args.seed}", f"data.seed={args.seed}", "tracking.enabled=false"]
    work = Path(tempfile.mkdtemp(prefix="pgseg-learner-"))
    (work / "nouns.txt").write_text("\n".join(world.nouns) + "\n")  # as the quickstart's sources stage writes it
    config = load_config(base, [*overrides, f"loss.noun_vocabulary={work / 'nouns.txt'}", *args.set])
    steps_per_epoch = images // args.batch
    total = steps_per_epoch * config.schedule.epochs

    t0 = time.perf_counter()
    jpegs, captions = [], []
    for i in range(images):
        sample = world.sample("train", i)
        buf = io.BytesIO()
        sample.image.save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
        captions.append(world.caption("train", i, sample.names).encode())
    dev = voc(write_voc_val(world, work / "dev", args.dev, "dev"))
    val = voc(write_voc_val(world, work / "val", args.val, "val"))
    prepare_s = time.perf_counter() - t0
    e = config.eval
    settings = ProtocolSettings.of(e, background_threshold(None, e, dev.bg_thresh))
    prep = Preprocess(config.data.img_size, config.model.text.context_length, config.data.min_scale, None,
                      train=False, multi_label=config.loss.multi_label, noun_vocabulary=config.loss.noun_vocabulary,
                      seed=(args.seed, 0))
    trainer = TrainStep(config, steps_per_epoch, init=False)

    def score(dataset) -> dict[str, float]:
        trainer.model.eval()
        with torch.no_grad():
            miou = confusion_in_process(trainer.model, dataset, settings).scores().miou
            oracle = oracle_confusion(trainer.model, dataset, settings).scores().miou
        return {"miou": miou, "oracle_miou": oracle}

    curve: list[dict] = []
    losses: list[float] = []
    terms: list[dict[str, float]] = []
    start = time.perf_counter()
    step = 0
    for epoch in range(config.schedule.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(images)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            prep.seed = (args.seed, epoch, b)
            batch = prep(pd.DataFrame({"jpg": [jpegs[i] for i in idx], "txt": [captions[i] for i in idx]}))
            result = trainer({k: torch.from_numpy(v) for k, v in batch.items()}, step)
            losses.append(result.losses["loss"] if result.finite else float("nan"))
            terms.append(result.losses)
            step += 1
            if args.curve_every and (step % args.curve_every == 0 or step == total):
                recent = terms[-args.curve_every:]
                point = {"step": step, "loss": float(np.nanmean(losses[-args.curve_every:])),
                         **{k: round(float(np.nanmean([t[k] for t in recent])), 4) for k in recent[-1]
                            if k != "loss"}, **score(dev),
                         "itc_scale": float(result.metrics["itc_scale"])}
                curve.append(point)
                print(json.dumps(point), flush=True)
    train_s = time.perf_counter() - start
    final = final_scores(trainer.model, val, settings)
    if args.model_out:
        from pgseg.checkpoint import save_model

        Path(args.model_out).mkdir(parents=True, exist_ok=True)
        save_model(trainer.model, config, str(Path(args.model_out) / f"{args.name}_seed{args.seed}.safetensors"))
    record = {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.learner", *sys.argv[1:]]),
              "commit": commit, "dirty": dirty, "noun_vocabulary": "world", "noun_ids": True, "date": str(date.today()),
              "machine": f"{os.cpu_count()} cores, {args.threads} thread(s)",
              "name": args.name, "seed": args.seed, "world": world_fields, "overrides": overrides,
              "images": images, "steps": total, "prepare_s": round(prepare_s, 1), "train_s": round(train_s, 1),
              "val": final, "val_images": args.val, "curve": curve}
    print(json.dumps({"name": args.name, "seed": args.seed, **final, "train_s": round(train_s, 1)}))
    write_record(Path(args.out) / f"{args.name}_seed{args.seed}.json", record)


if __name__ == "__main__":
    main()
