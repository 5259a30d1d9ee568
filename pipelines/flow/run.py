"""Workflows: ``pgseg run EXPERIMENT.yaml`` chains the stages an experiment names — sources → download → train →
evaluate → analyze — in that order, in one working folder.

Each finished stage writes its manifest (``pipelines.flow.manifest``). A stage is skipped when that manifest
matches and its outputs are still there, and as long as no stage before it ran in this invocation; otherwise it
runs, and so does every stage after it. A stage's manifest is removed before it starts, so a failed stage is redone
by the next run (training continues from its latest checkpoint, a download keeps its finished shards; when the
stage's inputs changed instead, its earlier folder is moved aside, kept, and the stage starts over). One MLflow run per
workflow links the stages' runs: the training run is its child, the evaluation and the analysis log into the training
run and their figures are copied onto the workflow run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import yaml

from pgseg.config import ConfigError, to_dict
from pipelines.digest import value_digest
from pipelines.flow.experiment import Experiment, training_config
from pipelines.flow.manifest import STATE_DIR, StageRecord, manifest_path, outputs_present, read_record, write_record
from pipelines.flow.stages import RUNNERS, Context, stage_section
from pipelines.runtime import check_address
from pipelines.tracking import Tracker

WORKFLOW_KEY_TAG = "pgseg.workflow_key"


@dataclass
class StageOutcome:
    stage: str
    status: Literal["ran", "skipped", "failed"]
    seconds: float
    record: StageRecord | None = None
    error: str | None = None


@dataclass
class WorkflowResult:
    experiment: str
    root: Path
    outcomes: list[StageOutcome]
    run_id: str | None

    @property
    def ok(self) -> bool:
        return all(o.status != "failed" for o in self.outcomes)

    def table_text(self) -> str:
        lines = [f"workflow {self.experiment} in {self.root}", f"{'stage':<10}{'status':<9}{'seconds':>9}"]
        for o in self.outcomes:
            lines.append(f"{o.stage:<10}{o.status:<9}{o.seconds:9.1f}" + (f"  {o.error}" if o.error else ""))
        return "\n".join(lines)


def run_workflow(experiment: Experiment, *, redo: list[str] = (), printer: Callable[[str], None] = print
                 ) -> WorkflowResult:
    """Run the experiment's stages in order, skipping those whose manifest matches (see the module docs).
    ``redo``: stages to run even when their manifest matches (the stages after them follow)."""
    unknown = sorted(set(redo) - set(experiment.stages))
    if unknown:
        raise ConfigError(f"redo: {', '.join(unknown)} not a stage of this experiment ({', '.join(experiment.stages)})")
    check_address(experiment.address)  # a cluster that does not answer is said before any stage, not after one
    tracker = Tracker(experiment.tracking.uri, check=True) if experiment.tracking.enabled else None
    root = experiment.root
    (root / STATE_DIR).mkdir(parents=True, exist_ok=True)
    ctx = Context(experiment, root, tracker, _start_workflow_run(tracker, experiment) if tracker else None,
                  printer=printer,
                  train_config=training_config(experiment) if experiment.train is not None else None)
    outcomes: list[StageOutcome] = []
    upstream: list[str] = []
    ran_before = False
    for stage in experiment.stages:
        input_hash = value_digest({"stage": stage, "section": stage_section(experiment, stage, ctx.train_config),
                            "upstream": upstream})
        record = read_record(root, stage)
        if (not ran_before and stage not in redo and record is not None and record.input_hash == input_hash
                and outputs_present(record)):
            ctx.records[stage] = record
            upstream.append(record.digest)
            outcomes.append(StageOutcome(stage, "skipped", 0.0, record))
            printer(f"[{stage}] skipped: finished before with the same inputs ({manifest_path(root, stage)})")
            continue
        ran_before = True
        manifest_path(root, stage).unlink(missing_ok=True)
        printer(f"[{stage}] running")
        start = time.perf_counter()
        ctx.input_hash = input_hash
        try:
            record = RUNNERS[stage](ctx)
        except Exception as exc:  # noqa: BLE001 - reported, recorded on the workflow run, and re-raised by the caller
            seconds = time.perf_counter() - start
            outcomes.append(StageOutcome(stage, "failed", seconds, error=f"{type(exc).__name__}: {exc}"))
            printer(f"[{stage}] failed after {seconds:.1f} s: {exc}")
            _finish(ctx, outcomes, "FAILED")
            result = WorkflowResult(experiment.name, root, outcomes, ctx.workflow_run)
            raise WorkflowError(stage, result) from exc
        record.input_hash, record.seconds = input_hash, time.perf_counter() - start
        write_record(root, record)
        ctx.records[stage] = record
        upstream.append(record.digest)
        outcomes.append(StageOutcome(stage, "ran", record.seconds, record))
        printer(f"[{stage}] done in {record.seconds:.1f} s")
    _finish(ctx, outcomes, "FINISHED")
    return WorkflowResult(experiment.name, root, outcomes, ctx.workflow_run)


def _finish(ctx: Context, outcomes: list[StageOutcome], status: str) -> None:
    if not ctx.workflow_run:
        return
    tags, metrics = {}, {}
    for o in outcomes:
        tags[f"stage.{o.stage}"] = o.status
        if o.record is not None and o.record.run_id:
            tags[f"stage.{o.stage}.run_id"] = o.record.run_id
        if o.status != "skipped":
            metrics[f"stage_seconds/{o.stage}"] = o.seconds
        if o.status == "ran":  # a skipped stage's figures are on this run from the time it ran
            metrics.update(o.record.metrics)
    if metrics:
        ctx.tracker.log_metrics(ctx.workflow_run, metrics)
    ctx.tracker.end(ctx.workflow_run, status, tags)


def _start_workflow_run(tracker: Tracker, experiment: Experiment) -> str:
    """The workflow's MLflow run, found again by its key (workdir and name) on every invocation."""
    run_id, found = tracker.keyed_run(experiment.tracking.experiment, WORKFLOW_KEY_TAG,
                                      f"workflow:{experiment.root}:{experiment.name}", f"workflow-{experiment.name}",
                                      tags={"pgseg.workflow": experiment.name})
    if not found:
        tracker.log_text(run_id, yaml.safe_dump(to_dict(experiment), sort_keys=False), "experiment.yaml")
    return run_id


class WorkflowError(RuntimeError):
    def __init__(self, stage: str, result: WorkflowResult):
        self.stage, self.result = stage, result
        super().__init__(f"stage {stage} failed: {result.outcomes[-1].error}")
