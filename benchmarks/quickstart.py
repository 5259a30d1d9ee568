"""The README's first command, measured as a new user meets it: a clean clone of this checkout's HEAD, the install,
then ``pgseg quickstart``; the figures it printed (read from the workflow's own files) go to
``results/quickstart.json`` with the command, commit and date, and ``python -m benchmarks.readme`` shows them.
``--seeds 1 2``: then the same quickstart again in that clone with each further seed (``train.seed`` and
``data.seed``; the default run is seed 0), each in its own working folder, for the spread over seeds.

    python -m benchmarks.quickstart [--clone-to /tmp/pgseg-quickstart] [--out results/quickstart.json] [--seeds 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKDIR = Path("outputs/quickstart")  # the quickstart experiment's workdir, relative to the clone


def readme_command() -> str:
    """The README's first command (install, then the quickstart)."""
    block = re.search(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text(), re.S).group(1)
    return block.strip().splitlines()[0]


def _timed(command: str, cwd: Path) -> int:
    start = time.perf_counter()
    subprocess.run(command, shell=True, cwd=cwd, check=True)
    return round(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clone-to", default="/tmp/pgseg-quickstart", help="a folder that does not exist yet")
    parser.add_argument("--out", default=str(REPO / "results" / "quickstart.json"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="further seeds, run after the default (0)")
    args = parser.parse_args()
    if any(seed <= 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"error: --seeds: distinct seeds > 0 (the default run is seed 0), got {args.seeds}")
    clone = Path(args.clone_to)
    if clone.exists():
        sys.exit(f"error: {clone} exists; name a new folder (nothing of yours is replaced)")
    command = readme_command()
    install, _, run = command.rpartition(" && ")
    if not run.endswith("pgseg quickstart"):
        sys.exit(f"error: the README's first command does not end with the quickstart: {command!r}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    install_s = _timed(install, clone)
    quickstart_s = _timed(run, clone)
    work = clone / WORKDIR
    results = json.loads((work / "eval" / "results.json").read_text())
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((work / ".workflow").glob("*.json"))}
    record = {"command": command, "where": f"a clean clone of {commit[:7]} in {clone}, {os.cpu_count()} CPU "
                                           f"cores; figures from {WORKDIR}/eval/results.json and .workflow/*.json",
              "commit": commit, "date": date.today().isoformat(), "install_s": install_s,
              "quickstart_s": quickstart_s,
              "stage_seconds": {k: round(v["seconds"], 1) for k, v in stages.items()},
              "train_metrics": stages.get("train", {}).get("metrics", {}), "val": results["val"]}
    record["seeds"] = [{"seed": 0, "quickstart_s": quickstart_s, "val": results["val"]}]
    for seed in args.seeds:
        folder = Path(f"outputs/quickstart-seed{seed}")
        sets = [f"--set train.{key}.seed={seed}" for key in ("train", "data")]
        again = f"{run} --workdir {folder} {' '.join(sets)}"
        seconds = _timed(again, clone)
        seeded = json.loads((clone / folder / "eval" / "results.json").read_text())
        record["seeds"].append({"seed": seed, "command": again, "quickstart_s": seconds, "val": seeded["val"]})
        print(f"seed {seed}: val mIoU {100 * seeded['val']['miou']:.2f} in {seconds} s", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"val mIoU {100 * results['val']['miou']:.2f} (all-background {100 * results['val']['all_background_miou']:.2f});"
          f" quickstart {quickstart_s} s + {install_s} s install; wrote {out}")


if __name__ == "__main__":
    main()
