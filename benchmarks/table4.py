"""Table 4 on the shapes world, measured as a user runs it: ``pgseg sweep`` on
``configs/sweeps/table4_modules_tiny.yaml`` (every variant × seed trained to the end, the final model's val mIoU) in
a fresh working folder; the sweep's own statistics (per variant mean ± std and 95 % interval over the seeds, the
difference from GroupViT paired by seed with its interval, the verdict sentences) and every trial's figure go to
``results/table4_tiny.json`` with the command, commit, machine and date; ``python -m benchmarks.readme`` shows them.

    python -m benchmarks.table4 [--workdir /tmp/pgseg-table4] [--out results/table4_tiny.json] [--set KEY=VALUE ...]
    python -m benchmarks.table4 --workdir /tmp/pgseg-table4 --resume   # after an interruption: finished trials kept
    python -m benchmarks.table4 --address 127.0.0.1:6379 --set train.workers=1 ...  # on a cluster started for it

A resumed measurement records no wall time (part of the work was done before), only that it was resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.record import commit_state, write_record

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs" / "sweeps" / "table4_modules_tiny.yaml"


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/pgseg-table4", help="a folder that does not exist yet")
    parser.add_argument("--sweep", default=str(SWEEP))
    parser.add_argument("--out", default=str(REPO / "results" / "table4_tiny.json"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the trials' config, passed to pgseg sweep (recorded)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --workdir (interrupted)")
    parser.add_argument("--address", help="a running Ray cluster for the sweep (e.g. one started with more logical "
                                          "CPUs, so that one-worker trials run side by side); recorded")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    import yaml

    name = yaml.safe_load(Path(args.sweep).read_text())["name"]
    if args.resume and not (workdir / "sweeps" / name / "sweep.json").is_file():
        _refuse(f"--resume: {workdir} holds no sweep {name!r} to continue")
    if workdir.exists() and not args.resume:
        _refuse(f"{workdir} exists; name a new folder, or --resume the sweep in it (nothing of yours is replaced)")
    command = [sys.executable, "-m", "jobs.cli", "sweep", "--config", args.sweep, "--workdir", str(workdir),
               *[f"--set={kv}" for kv in args.set], *(["--address", args.address] if args.address else [])]
    commit, dirty = commit_state()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    wall = time.perf_counter() - start
    root = workdir / "sweeps" / name
    if code != 0 or not (root / "summary_seeds.json").is_file():
        sys.exit(f"error: pgseg sweep exited {code}; {root} has no summary_seeds.json (nothing recorded)")
    seeds = json.loads((root / "summary_seeds.json").read_text())
    record = {"command": " ".join(["python", "-m", "benchmarks.table4", *sys.argv[1:]]),
              "sweep_command": " ".join(["pgseg", *command[3:]]), "sweep": str(Path(args.sweep).relative_to(REPO))
              if Path(args.sweep).resolve().is_relative_to(REPO) else args.sweep,
              "commit": commit, "dirty": dirty, "date": str(date.today()), "machine": f"{os.cpu_count()} cores",
              "wall_s": None if args.resume else round(wall), "resumed": args.resume, "seeds": seeds["seeds"],
              "metric": seeds["metric"],
              "statistics": seeds["statistics"], "verdicts": seeds["verdicts"],
              "trials": json.loads((root / "summary.json").read_text())}
    write_record(args.out, record)


if __name__ == "__main__":
    main()
