"""Every MLflow call of the project (from the driver or rank 0 only), through one client per tracking URI — no
global MLflow state, no private MLflow helper. Default URI ``sqlite:///mlflow.db``; any MLflow server by URI.

A run that a later invocation must find again (a training run that continues, a sweep that resumes, a workflow run
again) carries a key tag: :meth:`Tracker.keyed_run` is the one find-or-create of a run by its key.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS as LOGGED_ARTIFACTS
from PIL import Image

from pgseg.analyze import Analysis
from pgseg.config import ConfigError
from pgseg.evaluate import ClassificationResult, EvalResult
from pgseg.visualize import grid

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_KEY_TAG = "pgseg.run_key"  # a training run: its storage folder and name
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # MLflow 3's kind of an experiment
# MLflow 3.17's UI shows every experiment in one of two views, GenAI (traces) or model training (runs, charts), by a
# switch of its own (kept in the browser, GenAI at first) and not by the experiment's kind: a link names the view
UI_VIEW = "workflowType=machine_learning"


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: the configured one, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``;
    a relative sqlite path made absolute, so Ray workers with another working folder find the same file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def ui_link(server: str, experiment_id: str, run_id: str | None = None, page: str = "") -> str:
    """The address of an experiment (or one of its runs, and a page of the run: ``model-metrics``,
    ``artifacts/eval/voc_iou.json``) in the MLflow UI at ``server``, in its model-training view (:data:`UI_VIEW`)."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + (f"/{page}" if page else "")
    return f"{server.rstrip('/')}/{path}?{UI_VIEW}"


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the checkout holding this code (None outside a git checkout or without git)."""
    root = Path(path) if path else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise ConfigError (key ``tracking.uri``) when an MLflow server at ``uri`` does not answer its health check
    within ``timeout`` s, or a sqlite file's folder does not exist: said before any work, not after a run."""
    hint = "start it, set tracking.uri to one that answers, or tracking.enabled=false"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as answer:
                if answer.status == 200:
                    return
                reason = f"HTTP {answer.status}"
        except (OSError, ValueError) as exc:
            reason = str(getattr(exc, "reason", exc))
        raise ConfigError(f"tracking.uri: no MLflow server answers at {uri} ({reason}): {hint}")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).parent.is_dir():
        raise ConfigError(f"tracking.uri: the folder of the sqlite file {uri} does not exist")


class Tracker:
    """One tracking server (``uri`` resolved by :func:`resolve_uri`)."""

    def __init__(self, uri: str | None, *, check: bool = False):
        self.uri = resolve_uri(uri)
        if check:
            check_uri(self.uri)
        self.client = MlflowClient(self.uri)

    # ------------------------------------------------------------------------------------------------ runs
    def experiment_id(self, name: str) -> str:
        """The experiment ``name``, created as a model-training one (its kind tag; one of ours that has no kind yet
        gets it, a kind someone set stays). MLflow 3.17's UI opens it in the view :func:`ui_link` names."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, tags={KIND_TAG: MODEL_TRAINING})
        if KIND_TAG not in experiment.tags:
            self.client.set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None,
                   params: dict[str, Any] | None = None) -> str:
        """A new run with ``tags``, the commit of this checkout and ``params`` (in batches: MLflow takes at most
        100 per call). Returns its id."""
        commit = git_commit()
        run_id = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags={
            **(tags or {}), **({"mlflow.source.git.commit": commit} if commit else {})}).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in sorted((params or {}).items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])
        return run_id

    def keyed_run(self, experiment: str, tag: str, key: str, run_name: str, *, tags: dict[str, str] | None = None,
                  params: dict[str, Any] | None = None, resume: bool = True) -> tuple[str, bool]:
        """The run whose ``tag`` is ``key``: found again and marked running when ``resume``; else (or when there
        is none) a new one, and older runs of the key lose it (and end, if they were left running). Returns
        (run id, whether it was found again)."""
        found = self.client.search_runs([self.experiment_id(experiment)], filter_string=f"tags.`{tag}` = '{key}'")
        if found and resume:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id, True
        for old in found:
            self.client.set_tag(old.info.run_id, tag, f"{key} (started over)")
            if old.info.status == "RUNNING":
                self.client.set_terminated(old.info.run_id, "KILLED")
        return self.create_run(experiment, run_name, {**(tags or {}), tag: key}, params), False

    def children(self, experiment: str, parent: str) -> list[Run]:
        exp = self.client.get_experiment_by_name(experiment)
        return self.client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def end(self, run_id: str, status: str, tags: dict[str, str] | None = None,
            artifacts: list[str | Path] = ()) -> None:
        self.set_tags(run_id, tags or {})
        for path in artifacts:
            self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id, status)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of ``key``, by step (the last value logged at a step wins)."""
        by_step = {}
        for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            by_step[m.step] = m.value
        return sorted(by_step.items())

    # ------------------------------------------------------------------------------------------------ content
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_dict(self, run_id: str, value: Any, path: str) -> None:
        self.client.log_dict(run_id, value, path)

    def log_table(self, run_id: str, table: list[dict[str, Any]] | dict[str, list[Any]], path: str) -> None:
        """``table`` as an MLflow table (``path`` ending in .json: the UI's table view); logged again at the same path
        it *replaces* the earlier one, where ``MlflowClient.log_table`` would append its rows (a sweep run again
        after a failed trial would show every trial twice)."""
        if not path.endswith(".json"):
            raise ValueError(f"log_table: {path!r} must end in .json")
        folder, name = os.path.split(path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            pd.DataFrame(table).to_json(local, orient="split", index=False, date_format="iso")  # MLflow's layout
            self.client.log_artifact(run_id, str(local), folder or None)
        logged = json.loads(self.client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
        if {"path": path, "type": "table"} not in logged:  # the tag that makes the UI show it as a table
            self.client.set_tag(run_id, LOGGED_ARTIFACTS, json.dumps([*logged, {"path": path, "type": "table"}]))

    def log_artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def log_image(self, run_id: str, image: Image.Image, path: str) -> None:
        self.client.log_image(run_id, image, path)


# ------------------------------------------------------------------------------------------------ training runs
def start_training_run(tracker: Tracker, experiment: str, run_name: str, run_key: str, params: dict[str, Any],
                       config_yaml: str, tags: dict[str, str] | None = None, resume: bool = True) -> tuple[str, bool]:
    """The MLflow run of a training run: found again by its key (storage folder + name) when the run continues,
    created otherwise with the flattened config as params, ``tags`` (e.g. ``mlflow.parentRunId``) and the resolved
    config as an artifact. Returns (run id, whether it was resumed)."""
    run_id, resumed = tracker.keyed_run(experiment, RUN_KEY_TAG, run_key, run_name, tags=tags, params=params,
                                        resume=resume)
    if not resumed:
        tracker.log_text(run_id, config_yaml, "config.yaml")
    return run_id, resumed


class MetricLogger:
    """Rank 0's metric stream into one MLflow run, sent by a background thread so that no step waits for the
    tracking server. While the server is away, values wait in a bounded buffer (``capacity`` values; past it the
    oldest are dropped, and counted) and go when it answers again. After a restart, the steps the run already holds
    (up to the highest step of ``watch``) are not logged again: one value per step on every curve; values of
    :meth:`event` are exempt (one per call). :meth:`close` says what was sent, dropped and never sent."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 10, watch: str = "loss",
                 capacity: int = 200_000, retry_s: float = 2.0):
        # each request fails fast and this thread tries again, instead of MLflow's minutes of backoff per call
        # (read per request from the environment of this process: a training worker, whose only MLflow user this is)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client, self.run_id, self.flush_every, self.watch = MlflowClient(uri), run_id, flush_every, watch
        self.capacity, self.retry_s = capacity, retry_s
        self.floor: int | None = None  # steps <= floor are already logged; known once the server has answered
        self.pending: deque[tuple[Metric, bool]] = deque()  # (value, whether the floor applies)
        self.in_flight = 0
        self.sent = self.dropped = self.failures = 0
        self.down = False  # the latest attempt failed
        self.closing = False
        self.report: dict[str, float] | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def _put(self, metrics: list[Metric], floored: bool) -> None:
        with self.cond:
            self.pending.extend((m, floored) for m in metrics)
            while len(self.pending) > self.capacity:
                self.pending.popleft()
                self.dropped += 1
            self.cond.notify_all()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.floor is not None and step <= self.floor:
            return
        now = int(time.time() * 1000)
        self._put([Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))], True)

    def event(self, key: str, value: float, step: int) -> None:
        self._put([Metric(key, float(value), int(time.time() * 1000), step)], False)

    def _batch(self) -> list[Metric]:
        """Up to 1000 pending values, the floor applied (called with the lock held)."""
        out: list[Metric] = []
        while self.pending and len(out) < 1000:
            metric, floored = self.pending.popleft()
            if not (floored and metric.step <= self.floor):
                out.append(metric)
        self.in_flight = len(out)
        return out

    def _send_loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                if not self.pending:
                    return
            try:
                if self.floor is None:
                    history = self.client.get_metric_history(self.run_id, self.watch)
                    self.floor = max((m.step for m in history), default=-1)
                with self.cond:
                    chunk = self._batch()
                if chunk:
                    self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as exc:  # noqa: BLE001 - tracking must not stop training: kept, sent again later
                with self.cond:
                    if self.in_flight:
                        self.pending.extendleft((m, False) for m in reversed(chunk))
                    self.in_flight, self.failures = 0, self.failures + 1
                    if not self.down:
                        log.warning("MLflow at %s does not answer (%s): metrics are kept and sent when it does",
                                    self.client.tracking_uri, str(exc).splitlines()[0][:200])
                    self.down = True
                    self.cond.notify_all()
                    self.cond.wait(self.retry_s)
                continue
            with self.cond:
                if self.down:
                    log.warning("MLflow at %s answers again", self.client.tracking_uri)
                self.sent, self.in_flight, self.down = self.sent + len(chunk), 0, False
                self.cond.notify_all()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every pending value is sent (not while the server is away; at most ``timeout`` s).
        Returns whether nothing is left to send."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.cond.notify_all()
            while (self.pending or self.in_flight) and not self.down and time.monotonic() < deadline:
                self.cond.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            return not (self.pending or self.in_flight)

    def close(self, timeout: float = 60.0) -> dict[str, float]:
        """Send what is pending (trying for at most ``timeout`` s, the server away or not) and stop. Returns
        ``tracking/sent``, ``tracking/dropped`` (past the buffer), ``tracking/unsent`` (never sent) and
        ``tracking/failed_sends``; the same on a second call."""
        if self.report is not None:
            return self.report
        deadline = time.monotonic() + timeout
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            while (self.pending or self.in_flight) and time.monotonic() < deadline:
                self.cond.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            unsent = len(self.pending) + self.in_flight
            self.pending.clear()  # the thread ends at its next look
            self.cond.notify_all()
        self.report = {"tracking/sent": self.sent, "tracking/dropped": self.dropped, "tracking/unsent": unsent,
                       "tracking/failed_sends": self.failures}
        if unsent or self.dropped:
            log.warning("MLflow: %d metric values never sent, %d dropped past the buffer", unsent, self.dropped)
        return self.report


# ------------------------------------------------------------------------------------------------ data and evaluation
def log_manifest(manifest: dict[str, Any], *, uri: str, experiment: str = "pgseg-data",
                 run_name: str = "download", params: dict[str, Any] | None = None) -> str:
    """One MLflow run for a download: the manifest's figures as metrics, the manifest itself as an artifact."""
    tracker = Tracker(uri)
    run_id = tracker.create_run(experiment, run_name, params={k: str(v)[:500] for k, v in (params or {}).items()})
    metrics = {"samples": manifest["samples"], "attempted": manifest["attempted"],
               "success_rate": manifest["success_rate"], "shards": manifest["num_shards"]}
    metrics.update({f"failures.{k.replace(':', '_').replace(' ', '_')[:200]}": v
                    for k, v in manifest["failures"].items()})
    tracker.log_metrics(run_id, metrics)
    tracker.log_dict(run_id, manifest, "manifest.json")
    tracker.end(run_id, "FINISHED")
    return run_id


def log_eval(result: EvalResult, uri: str, *, run_id: str | None = None, experiment: str = "pgseg-eval",
             run_name: str | None = None, step: int | None = None) -> str:
    """mIoU / mAcc / aAcc, the per-class table (log_table, and a Markdown copy), the settings and a grid of
    overlays; into ``run_id`` (e.g. the training run), or a new run of its own (ended when logged)."""
    tracker = Tracker(uri)
    own = run_id is None
    if run_id is None:
        run_id = tracker.create_run(experiment, run_name or f"eval-{result.dataset}")
    name, s = result.dataset, result.scores
    metrics = {f"eval/{name}/mIoU": s.miou, f"eval/{name}/mAcc": s.macc, f"eval/{name}/aAcc": s.aacc}
    if not math.isnan(result.baseline_miou):
        metrics[f"eval/{name}/all_background_mIoU"] = result.baseline_miou
    tracker.log_metrics(run_id, metrics, step or 0)
    rows = s.table()
    tracker.log_table(run_id, {"class": [r["class"] for r in rows], "iou": [r["iou"] for r in rows],
                               "accuracy": [r["accuracy"] for r in rows]}, f"eval/{name}_iou.json")
    tracker.log_text(run_id, result.table_text(), f"eval/{name}_iou.md")
    tracker.log_dict(run_id, {**asdict(result.settings), "images": result.images}, f"eval/{name}_settings.json")
    if result.overlays:
        pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in result.overlays]
        tracker.log_image(run_id, grid(pictures), f"eval/{name}_overlays.png")
    if own:
        tracker.end(run_id, "FINISHED")
    return run_id


def log_analysis(results: list[Analysis], uri: str, *, run_id: str | None = None,
                 experiment: str = "pgseg-eval") -> str:
    """``pgseg analyze``'s figures per set: scalars as metrics, the figures as a table and JSON, the Markdown and
    the pictures; into ``run_id`` or a new run of its own (ended when logged)."""
    tracker = Tracker(uri)
    own = run_id is None
    if run_id is None:
        run_id = tracker.create_run(experiment, "analyze-" + "-".join(r.dataset for r in results))
    for result in results:
        name = result.dataset
        tracker.log_metrics(run_id, result.metrics())
        figures = result.figures()
        tracker.log_table(run_id, figures["classes"], f"analyze/{name}_classes.json")
        tracker.log_dict(run_id, figures, f"analyze/{name}_analysis.json")
        tracker.log_text(run_id, result.text(), f"analyze/{name}_analysis.md")
        for picture, png in result.pictures.items():
            tracker.log_image(run_id, Image.open(io.BytesIO(png)).convert("RGB"), f"analyze/{name}_{picture}")
    if own:
        tracker.end(run_id, "FINISHED")
    return run_id


def log_classification(result: ClassificationResult, uri: str, *, run_id: str | None = None,
                       experiment: str = "pgseg-eval") -> str:
    tracker = Tracker(uri)
    own = run_id is None
    if run_id is None:
        run_id = tracker.create_run(experiment, f"eval-{result.dataset}")
    tracker.log_metrics(run_id, {f"eval/{result.dataset}/top1": result.top1, f"eval/{result.dataset}/top5": result.top5})
    tracker.log_text(run_id, result.table_text(), f"eval/{result.dataset}_classification.txt")
    if own:
        tracker.end(run_id, "FINISHED")
    return run_id
