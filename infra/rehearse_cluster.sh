#!/usr/bin/env bash
# The cluster path rehearsed on one machine, with the commands a real cluster takes (README, "On a cluster"):
#   - object storage: moto's S3 server on 127.0.0.1 stands in for S3 (credentials and endpoint from the environment,
#     as on a real cluster); one bucket for shards, training runs and MLflow's artifacts;
#   - a remote tracking server: `mlflow server` with its artifacts in the bucket;
#   - the cluster: a head with no CPUs (like ray_cluster.yaml's: it schedules nothing) and two worker nodes of one
#     CPU, each with its own raylet, object store and agents, all on 127.0.0.1 (infra/local_cluster.py);
#   - the job: `ray job submit` of the quickstart's workflow (a small world) with `storage: s3://…` and the remote
#     tracking URI;
#   - the checks: the job succeeded, shards, manifest and checkpoints are objects in the bucket, MLflow holds the
#     finished training run (two workers) with the final model's val mIoU and its artifacts are in the bucket,
#     nothing listened beyond 127.0.0.1 while the job ran.
# Everything it starts is stopped at the end (also on failure).
#
#   infra/rehearse_cluster.sh [WORKDIR]        (from the repository root, with .venv installed: `.[test]`;
#                                              uses curl and ss, from Debian's curl and iproute2)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" NO_ALBUMENTATIONS_UPDATE=1
WORK=$(realpath -m "${1:-$(mktemp -d /tmp/pgseg-rehearsal.XXXXXX)}")
mkdir -p "$WORK"
export PGSEG_REHEARSAL="$WORK"  # every process started from here carries it (how a check finds what outlived us)
port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() {
  touch "$WORK/job.done"
  for pid in "${PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -9 -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# object storage and the tracking server (stand-ins on this machine; on a cluster: S3 and infra/mlflow/)
S3=$(port); MLFLOW=$(port); DASH=$(port)
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3" AWS_ACCESS_KEY_ID=rehearsal AWS_SECRET_ACCESS_KEY=rehearsal \
       AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
setsid python -m moto.server -H 127.0.0.1 -p "$S3" >"$WORK/s3.log" 2>&1 & PIDS+=($!)
for _ in $(seq 60); do curl -sf "$AWS_ENDPOINT_URL/moto-api/" >/dev/null && break; sleep 0.5; done
python -c 'import boto3; boto3.client("s3").create_bucket(Bucket="pgseg")'
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server --backend-store-uri "sqlite:///$WORK/mlflow.db" \
  --artifacts-destination s3://pgseg/mlflow --host 127.0.0.1 --port "$MLFLOW" --workers 1 >"$WORK/mlflow.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$MLFLOW/health" >/dev/null && break; sleep 0.5; done

# the cluster: a head that schedules nothing and two worker nodes of 1 CPU, all on 127.0.0.1 (infra/local_cluster.py
# says why not `ray start` on one machine; on a real cluster: `ray start --head` and `ray start --address=HEAD:6379`
# on each machine, or ray_cluster.yaml / infra/kuberay)
setsid python infra/local_cluster.py --dashboard-port "$DASH" --workers 2 --cpus 1 >"$WORK/cluster.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 240); do grep -q "^cluster:" "$WORK/cluster.log" && break; sleep 0.5; done
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$DASH/api/version" >/dev/null && break; sleep 0.5; done
python - "$DASH" <<'EOF'
import sys
from ray.util.state import list_nodes
nodes = [n for n in list_nodes(address=f"http://127.0.0.1:{sys.argv[1]}") if n.state == "ALIVE"]
print(f"cluster: {len(nodes)} nodes, CPUs {sorted(n.resources_total.get('CPU', 0) for n in nodes)}, "
      f"addresses {sorted({n.node_ip for n in nodes})}")
assert len(nodes) == 3 and {n.node_ip for n in nodes} == {"127.0.0.1"}
EOF

# the job: the quickstart's workflow on a small world, shards and runs in the bucket, tracked remotely
(while [ ! -e "$WORK/job.done" ]; do ss -ltnpH >>"$WORK/listening.log"; sleep 3; done) & SAMPLER=$!
RUNTIME='{"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}, "excludes": [".venv", ".git", "outputs", "runs", "data", "mlflow.db"]}'
for _ in $(seq 12); do  # the dashboard answers before the head's job agent is up
  if ray job submit --address "http://127.0.0.1:$DASH" --working-dir . --runtime-env-json "$RUNTIME" -- \
      python -m jobs.cli run configs/experiments/quickstart.yaml --workdir "$WORK/quickstart" \
      --set storage=s3://pgseg/quickstart --set "tracking.uri=http://127.0.0.1:$MLFLOW" \
      --set sources.shapes.train_images=1024 --set sources.shapes.val_images=16 --set sources.shapes.dev_images=8 \
      --set download.number_sample_per_shard=256 --set train.schedule.epochs=1 --set train.eval.every_steps=8 \
      >"$WORK/job.log" 2>&1; then break; fi
  grep -q "No available agent to submit job" "$WORK/job.log" || { tail -50 "$WORK/job.log"; exit 1; }
  sleep 5
done
touch "$WORK/job.done"; wait "$SAMPLER"
grep -q "succeeded" "$WORK/job.log" || { tail -50 "$WORK/job.log"; exit 1; }
# every socket that listened while the job ran (sampled every 3 s), beyond 127.0.0.0/8 and ::1
LISTENING=$(awk '{print $4}' "$WORK/listening.log" | sort -u | \
  grep -v -E '^(127\.[0-9.]+|\[::1\]|\[::ffff:127\.[0-9.]+\]):' | grep -v -E '^0\.0\.0\.0:2024$' || true)
# (0.0.0.0:2024 is this machine's own agent, PID 1, not ours)

# the checks
python - "$WORK" "$MLFLOW" "$LISTENING" <<'EOF'
import json, sys
import pyarrow.fs as pafs
from mlflow.tracking import MlflowClient

work, mlflow_port, listening = sys.argv[1], sys.argv[2], sys.argv[3].split()
fs, _ = pafs.FileSystem.from_uri("s3://pgseg")
stored = [i.path for i in fs.get_file_info(pafs.FileSelector("pgseg", recursive=True))
          if i.type == pafs.FileType.File]
shards = [p for p in stored if p.startswith("pgseg/quickstart/shards/") and p.endswith(".tar")]
checkpoints = {p.split("/")[4] for p in stored if p.startswith("pgseg/quickstart/runs/quickstart/checkpoint")}
artifacts = [p for p in stored if p.startswith("pgseg/mlflow/")]
client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'quickstart'")
(run,) = runs
job = open(f"{work}/job.log").read()
checks = {
    "job succeeded": "succeeded" in job,
    "manifest in the bucket": "pgseg/quickstart/shards/manifest.json" in stored,
    "shards in the bucket": len(shards) == 4,
    "checkpoints in the bucket": len(checkpoints) >= 1,
    "nothing of the runs on the driver's disk": not __import__("os").path.exists(f"{work}/quickstart/runs"),
    "training run finished": run.info.status == "FINISHED",
    "final val mIoU logged": "eval/val/mIoU" in run.data.metrics,
    "two training workers": run.data.params.get("train.workers") == "2",
    "MLflow artifacts in the bucket": bool(artifacts),
    "only loopback listeners": not listening,
}
for name, ok in checks.items():
    print(f"{'ok ' if ok else 'NO '} {name}")
print(json.dumps({"val_mIoU": run.data.metrics.get("eval/val/mIoU"), "objects": len(stored),
                  "checkpoints": sorted(checkpoints), "listening_beyond_loopback": listening}))
sys.exit(0 if all(checks.values()) else 1)
EOF
echo "rehearsal passed; logs in $WORK"
