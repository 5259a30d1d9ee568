"""README tables made from ``results/*.json`` (the files the benchmarks write), never typed in.

    python -m benchmarks.readme          # rewrites the generated blocks of README.md
    python -m benchmarks.readme --check  # exit 1 if a block differs from what its results file gives

A block sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; NAME picks the renderer below.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"


def _device_check() -> str:
    """The latest GPU device check (``results/device_check-<gpu>.json``, the newest by its date)."""
    records = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("device_check-*.json"))]
    now = max((r for r in records if r["device"].startswith("NVIDIA")), key=lambda r: r["date"])
    before = json.loads((RESULTS / "device_check_before_host_matching.json").read_text())
    p, t, m, s = now["parity"], now["training_step"], now["matching"], now["segmentation"]
    old = before["training_step"]["steps"]["pgseg_official"]
    name = f"device_check-{now['device'].split()[-1].lower()}.json"
    lines = [
        f"Measured by `{now['command']}` on one {now['device']} (torch {now['torch']}), {now['date'][:10]}, commit "
        f"`{now['commit'][:7]}` (`results/{name}`):",
        "",
        "| what | figure |",
        "|---|---|",
        f"| released fixture on the GPU, float32: zero-shot protocol | {p['segmentation_cases']} cases, "
        f"{p['labels_agree_min_percent']:.1f} % of labels agree in the worst case, probabilities within "
        f"{p['probs_max_abs_diff']:.1e} |",
        f"| released fixture on the GPU: embeddings | within {max(p['embedding_max_abs_diff'].values()):.1e} |",
    ]
    labels = {"pgseg_official": "PGSeg, NPR official", "pgseg_paper": "PGSeg, NPR paper",
              "pgseg_paper_compiled": "PGSeg, NPR paper, train.compile",
              "pgseg_paper_host_matching": "PGSeg, NPR paper, matching solved on the host (lapx after one copy)",
              "pgseg_paper_per_image_scipy": "PGSeg, NPR paper, the release's per-image SciPy matching",
              "groupvit_no_npr": "GroupViT (no NPR)"}
    rounds = f", medians of {t['rounds']} alternating rounds" if t.get("rounds") else ""
    for variant, row in t["steps"].items():
        head = (f"| training step, pgseg_vit_s, batch {t['batch']} at {t['img_size']}, {t['precision']}{rounds}: "
                f"{labels[variant]} |")
        if "error" in row:
            lines.append(f"{head} failed: {row['error'][:120]} |")
            continue
        mfu = f", MFU {100 * row['mfu']:.1f} %" if row.get("mfu") else ""
        lines.append(f"{head} {row['images_per_s']:.0f} images/s, {row['time_vs_groupvit']:.2f}× the GroupViT "
                     f"step{mfu}, {row['peak_memory_gib']:.1f} GiB |")
    profile = t.get("profile_pgseg_paper")
    if profile:
        waits = ", ".join(f"{k} {v}" for k, v in profile["host_waits"].items())
        lines.append(f"| one paper step under torch's profiler | device busy {profile['self_device_ms_total']:.0f} ms, "
                     f"host {profile['self_host_ms_total']:.0f} ms (kernel launches: "
                     f"{sum(e['calls'] for e in profile['top_by_host'] if 'aunchKernel' in e['op'])}); host waits: "
                     f"{waits} |")
    lines += [
        f"| the same, NPR official, with the earlier lock-step GPU matching (`{before['commit'][:7]}`) | "
        f"{old['images_per_s']:.0f} images/s, {old['time_vs_groupvit']:.2f}× the GroupViT step |",
        *_matching_rows(m),
    ]
    paths = {"one_window": "one window per pass", "one_image": "one image's windows together",
             "all_images_32_windows": "windows of several images, 32 per pass"}
    for path, label in paths.items():
        if path in s:
            row = s[path]
            lines.append(f"| zero-shot protocol, {s['image']}, {s['classes']} classes, random weights, {label} | "
                         f"{row['images_per_s']:.0f} images/s; labels differing from one window per pass: "
                         f"{row['pixels_differing']} of {s['pixels']} pixels |")
    if not any(path in s for path in paths):
        lines.append(f"| zero-shot protocol, {s['image']}, {s['classes']} classes, random weights | "
                     f"{1e3 * s['seconds_per_image']:.0f} ms per image |")
    return "\n".join(lines)


def _matching_rows(m: dict, on: str = "on the GPU") -> list[str]:
    if "rows" not in m:  # a device check from before benchmarks.matching.compare (one batch, our solver vs SciPy)
        return [f"| exact matching, {m['batch']} problems of {m['size']}×{m['size']} | GPU batch (solved on its host) "
                f"{1e3 * m['device_s']:.1f} ms, SciPy loop {1e3 * m['scipy_loop_s']:.1f} ms "
                f"({m['scipy_over_device']:.1f}×), same assignments: {m['device_same_as_scipy']} |"]
    lines = []
    for row in m["rows"]:
        where = "from host memory" if row.get("from_host") else on
        ratios = ", ".join(f"{name} {ratio:.1f}× ({_agreement(row, name)})"
                           for name, ratio in row["speedup_over_scipy_per_image"].items())
        lines.append(f"| exact matching, {row['batch']} problems of {row['size']}×{row['size']} {where} | SciPy per "
                     f"image {1e3 * row['seconds']['scipy_per_image']:.1f} ms; speed-up: {ratios} |")
    return lines


def _agreement(row: dict, name: str) -> str:
    same = "same" if row["same_as_scipy"][name] else "NOT the same"
    if "optimal_on_ties" not in row:
        return same
    return same + (", optimal on ±1 costs" if row["optimal_on_ties"][name] else ", NOT optimal on ±1 costs")


def _source(record: dict, name: str) -> str:
    return (f"Measured by `{record['command']}`, {record.get('machine') or record.get('device')}, "
            f"{record['date'][:10]}, commit `{record['commit'][:7]}`{' (with changes)' if record.get('dirty') else ''} "
            f"(`results/{name}`).")


def _step() -> str:
    r = json.loads((RESULTS / "step-cpu.json").read_text())
    labels = {"release_way": "our model run the release's way (written-out attention, per-image SciPy matching "
                             "with a host copy each, AdamW's loop, all 77 text columns)", "ours": "ours",
              "ours_compiled": "ours, `train.compile`", "groupvit": "GroupViT (no NPR), ours"}
    lines = [f"Training step, {r['preset']}, batch {r['batch']}, {r['precision']}, {r['threads']} threads, medians of "
             f"{r['rounds']} alternating rounds:", "", "| step | s/step | images/s |", "|---|---|---|"]
    lines += [f"| {labels.get(n, n)} | {s:.2f} | {r['images_per_s'][n]:.1f} |" for n, s in r["seconds_per_step"].items()]
    x, paired = r["ratios"], r.get("paired_ratios", {})
    lines += [""] + [f"- {text}: {x[key]:.2f}" + (f" (median of each round's own ratio: {paired[key]:.2f})"
                                                  if key in paired else "") for key, text in (
        ("release_way_over_ours", "the release's way ÷ ours (time per step)"),
        ("release_way_over_ours_compiled", "the release's way ÷ ours compiled"),
        ("npr_time_ratio", "NPR's cost: ours ÷ GroupViT (time)"),
        ("npr_flops_ratio", "ours ÷ GroupViT (FLOPs, torch's counter: the host's matching solve is not counted)"))
        if key in x]
    return "\n".join(lines + ["", _source(r, "step-cpu.json")])


def _matching() -> str:
    r = json.loads((RESULTS / "matching-cpu.json").read_text())
    lines = [f"Exact matching, one batch of random float64 cost matrices, medians of {r['repeats']} alternating rounds "
             f"({r['torch_threads']} threads):", "", "| what | figure |", "|---|---|", *_matching_rows(r, "on the CPU")]
    return "\n".join(lines + ["", _source(r, "matching-cpu.json")])


def _eval() -> str:
    r = json.loads((RESULTS / "eval-cpu.json").read_text())
    labels = {"one_window": "one window per forward pass", "one_image": "one image's windows together",
              "four_images": "four images' windows together", "ray_2_actors": f"Ray Data, 2 actors ({r['ray_includes']})"}
    lines = [f"Zero-shot segmentation, pgseg_vit_s, {r['images']} images of {r['image']}, {r['threads']} threads:", "",
             "| path | s | images/s | ÷ one window | same confusion counts |", "|---|---|---|---|---|"]
    lines += [f"| {labels.get(n, n)} | {s:.1f} | {r['images_per_s'][n]:.2f} | {r['speedup_over_one_window'][n]:.2f}× | "
              f"{r['same_confusion_counts'][n]} |" for n, s in r["seconds"].items()]
    return "\n".join(lines + ["", _source(r, "eval-cpu.json")])


def _serve() -> str:
    r = json.loads((RESULTS / "serve-cpu.json").read_text())
    labels = {"in_process": "in this process, one image after another (`pgseg segment`'s way)"}
    lines = [f"Serving, `{r['preset']}` model, {r['image_size'][0]}×{r['image_size'][1]} images, {r['classes']} "
             f"classes, one replica on {r['replica_cpus']} CPUs, batches of up to {r['max_batch_size']}:", "",
             "| path | requests/s | p50 ms | p95 ms | ÷ in-process |", "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        label = labels.get(name, f"`pgseg serve` over HTTP, {name.rsplit('_', 1)[1]} concurrent clients")
        lines.append(f"| {label} | {row['requests_per_s']:.2f} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                     f"{row['throughput_vs_in_process']:.2f}× |")
    sizes = ", ".join(f"{n} × {k}" for k, n in r["batch_sizes"].items())
    return "\n".join(lines + ["", f"Batches the replica formed (count × size): {sizes}.", "",
                              _source(r, "serve-cpu.json")])


def _storage() -> str:
    r = json.loads((RESULTS / "storage-cpu.json").read_text())
    labels = {"s3-sync": "S3, synchronous upload", "s3-async": "S3, asynchronous upload (`auto` for a URI)",
              "local-sync": "local folder, synchronous (`auto` for a folder)",
              "local-async": "local folder, asynchronous"}
    lines = [f"Checkpoints, `{r['preset']}` model, batch {r['batch']}, a checkpoint after every step, S3 = {r['server']}:",
             "", "| storage, upload | the step loop's wait per checkpoint, ms | images/s, waits included |",
             "|---|---|---|"]
    lines += [f"| {labels[m]} | {1e3 * row['checkpoint_s']:.0f} | {row['images_per_s']:.1f} |"
              for m, row in r["checkpoints"].items()]
    ingest = r["ingest_images_per_s"]
    lines += ["", f"Asynchronous upload: {r['s3_async_vs_sync_images_per_s']:.2f}× the images/s of synchronous, a "
              f"{r['s3_sync_vs_async_checkpoint_wait']:.1f}× shorter wait per checkpoint. Ingest (one pass of Ray Data's "
              f"read + preprocess over {r['images']} images): {ingest['s3']:.0f} images/s from the bucket, "
              f"{ingest['local']:.0f} from local disk ({r['ingest_s3_vs_local']:.2f}×).", "",
              _source(r, "storage-cpu.json")]
    return "\n".join(lines)


def _quickstart() -> str:
    import numpy as np

    q = json.loads((RESULTS / "quickstart.json").read_text())
    v = q["val"]
    per_class = ", ".join(f"{row['class']} {100 * row['iou']:.1f}" for row in v["table"])
    minutes, seconds = divmod(q["quickstart_s"], 60)
    lines = ["| run | val mIoU | all-background | per class IoU | wall time |", "|---|---|---|---|---|",
             f"| `pgseg quickstart` (the default) from a clean clone, commit `{q['commit'][:7]}` "
             f"(`results/quickstart.json`) | **{100 * v['miou']:.1f}** | {100 * v['all_background_miou']:.1f} | "
             f"{per_class} | {minutes} min {seconds} s (+ {q['install_s']} s install) |"]
    runs = q.get("seeds", [])
    for run in runs[1:]:
        r = run["val"]
        lines.append(f"| the same with `train.seed` = `data.seed` = {run['seed']} | {100 * r['miou']:.1f} | "
                     f"{100 * r['all_background_miou']:.1f} | "
                     + ", ".join(f"{row['class']} {100 * row['iou']:.1f}" for row in r["table"])
                     + f" | {run['quickstart_s'] // 60} min {run['quickstart_s'] % 60} s |")
    if len(runs) > 1:
        values = np.array([100 * run["val"]["miou"] for run in runs])
        lines += ["", f"Over the {len(runs)} seeds ({', '.join(str(run['seed']) for run in runs)}): val mIoU "
                      f"{values.mean():.1f} ± {values.std(ddof=1):.1f} (mean ± sample std), the final model of "
                      f"each run."]
    return "\n".join(lines)


def _quickstart_world_at(commit: str) -> dict:
    """The quickstart's shapes world as the experiment file of ``commit`` had it."""
    import yaml

    text = subprocess.run(["git", "show", f"{commit}:configs/experiments/quickstart.yaml"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(text)["sources"]["shapes"]["world"]


def _changes(record: dict) -> str:
    """What a learner-study run changed against the quickstart of its commit (world fields, config overrides)."""
    world = _quickstart_world_at(record["commit"])
    parts = [f"world.{k}={v}" for k, v in record["world"].items() if world.get(k) != v]
    if record.get("noun_vocabulary") == "built-in":  # the first runs: nouns from the built-in word list
        parts.append("nouns: built-in list")
    words = record["command"].split()
    if "--set" in words:  # the overrides given on the command line, up to the next option
        rest = words[words.index("--set") + 1:]
        parts += rest[:next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))]
    if record.get("noun_ids") and any(p.startswith("loss.group_nouns_weight") for p in parts):
        parts.append("group loss with noun ids")  # one noun's prompts are positives (from commit cd2bba1)
    return ", ".join(f"`{p}`" for p in parts) or "nothing"


def _per_class(runs: list[dict]) -> str:
    """Each class's IoU (and oracle-group IoU) averaged over the runs that recorded it."""
    scored = [r["val"] for r in runs if "iou_by_class" in r["val"]]
    if not scored:
        return "–"

    def mean(key: str, name: str) -> float:
        return statistics.mean(100 * v[key][name] for v in scored)

    return ", ".join(f"{name} {mean('iou_by_class', name):.0f} ({mean('oracle_iou_by_class', name):.0f})"
                     for name in scored[0]["iou_by_class"])


def _learner() -> str:
    records = [json.loads(p.read_text()) for p in sorted((RESULTS / "learner").glob("*.json"))]
    by_name: dict[str, list[dict]] = {}
    for r in records:
        by_name.setdefault(r["name"], []).append(r)
    lines = ["| run | against the quickstart of | changed | seeds | final val mIoU at bg 0.5 | at bg 0.95 | "
             "at bg 0.95: mean ± std | final val oracle-group mIoU | per class at bg 0.95, mean over seeds "
             "(oracle-group) | steps | train time |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in by_name.items():
        runs.sort(key=lambda r: r["seed"])

        def at(threshold: str) -> str:  # (the first runs scored at 0.5 only, before --rescore)
            return ", ".join(f"{100 * r['val']['miou_by_bg_thresh'][threshold]:.1f}"
                             if threshold in r["val"].get("miou_by_bg_thresh", {})
                             else f"{100 * r['val']['miou']:.1f}" if threshold == "0.5" else "–" for r in runs)

        oracle = ", ".join(f"{100 * r['val']['oracle_miou']:.1f}" for r in runs)
        seconds = ", ".join(f"{r['train_s'] / 60:.0f} min" for r in runs)
        high = [100 * r["val"]["miou_by_bg_thresh"]["0.95"] for r in runs
                if "0.95" in r["val"].get("miou_by_bg_thresh", {})]
        spread = (f"{statistics.mean(high):.1f} ± {statistics.stdev(high):.1f}" if len(high) > 1 else "–")
        commit = f"`{runs[0]['commit'][:7]}`" + (" + uncommitted changes" if any(r.get("dirty") for r in runs) else "")
        lines.append(f"| {name} | {commit} | {_changes(runs[0])} | "
                     f"{', '.join(str(r['seed']) for r in runs)} | {at('0.5')} | {at('0.95')} | {spread} | {oracle} | "
                     f"{_per_class(runs)} | {runs[0]['steps']} | {seconds} |")
    first = records[0] if records else {}
    lines.append("")
    lines.append(f"Measured by `python -m benchmarks.learner NAME ...` ({len(records)} runs, `results/learner/`; "
                 f"{first.get('machine', '')}, two runs at a time), val = the world's 200 val images; the final "
                 f"model at background thresholds 0.5 and 0.95 (VOC's, the protocol's default for a set with a "
                 f"background class; `--rescore` for the first runs).")
    return "\n".join(lines)


def _table4() -> str:
    t = json.loads((RESULTS / "table4_tiny.json").read_text())
    metric = t["metric"].split("/")[1] + " mIoU"

    def num(value, sign: bool = False) -> str:
        return "–" if value is None or value != value else (f"{value:+.1f}" if sign else f"{value:.1f}")

    lines = [f"| variant | runs (diverged) | {metric}: mean ± std | 95 % CI | Δ vs {t['statistics'][0]['variant']}, "
             f"paired by seed | Δ 95 % CI | p |", "|---|---|---|---|---|---|---|"]
    for row in t["statistics"]:
        mean, p = row[f"{metric} mean"], row["p"]
        low, high = row["Δ CI95 low"], row["Δ CI95 high"]
        delta = "–" if low is None else f"[{num(low, True)}, {num(high, True)}]"
        lines.append(f"| {row['variant']} | {row['runs']} ({row['diverged']}) | {num(mean)} ± {num(row['std'])} | "
                     f"[{num(row['CI95 low'])}, {num(row['CI95 high'])}] | {num(row['Δ mean'], True)} | {delta} | "
                     f"{'–' if p is None or p != p else f'{p:.2f}'} |")
    lines += ["", *[f"- {v}" for v in t["verdicts"]], "",
              f"Measured by `{t['command']}` (`{t['sweep_command']}`: seeds {t['seeds']}, the final model's "
              f"{metric}), {t['machine']}, {t['date']}, commit `{t['commit'][:7]}`, "
              + ("resumed after an interruption" if t.get("resumed") else f"{t['wall_s'] / 60:.0f} min")
              + " (`results/table4_tiny.json`)."]
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[], str]] = {"device_check": _device_check, "quickstart": _quickstart,
                                           "learner": _learner, "table4": _table4, "step": _step,
                                           "matching": _matching, "eval": _eval, "serve": _serve,
                                           "storage": _storage}
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end: \2 -->)", re.S)


def render(text: str) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(2)
        if name not in RENDERERS:
            raise KeyError(f"README block {name!r}: no renderer (known: {sorted(RENDERERS)})")
        return f"{match.group(1)}{RENDERERS[name]()}\n{match.group(4)}"

    return BLOCK.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme = REPO / "README.md"
    text = readme.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md: a generated block differs from its results file; run python -m benchmarks.readme",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
