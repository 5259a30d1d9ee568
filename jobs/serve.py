"""``pgseg serve MODEL`` / ``python -m jobs.serve``: the zero-shot protocol behind an HTTP API on Ray Serve
(``POST /segment?classes=…`` with the image's bytes, ``GET /healthz``, ``GET /stats``), on 127.0.0.1 unless
``--host`` says otherwise, until Ctrl+C. MODEL is a pgseg model file (.safetensors) or an MLflow model URI
(``models:/pgseg@champion``, looked up at $MLFLOW_TRACKING_URI or ``--tracking-uri``). On a cluster:
``--address``, or ``serve run pipelines.serve:build_app model=…`` / ``serve deploy infra/serve.yaml``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .runtime import add_ray_options, user_error


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pgseg.device import DEVICE_HELP

    p.add_argument("model", help="a pgseg model file (.safetensors) or an MLflow model URI (models:/NAME@champion)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy listens on")
    p.add_argument("--port", type=int, default=8000, help="the HTTP proxy's port")
    p.add_argument("--tracking-uri", default=None, help="MLflow server for a model URI (default: "
                                                         "$MLFLOW_TRACKING_URI)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="a fixed number of replicas")
    scale.add_argument("--autoscale", default=None, metavar="MIN,MAX", help="replicas between MIN and MAX, scaled "
                                                                           "on ongoing requests")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves (with "
                                                                       "--device cuda)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests segmented together")
    p.add_argument("--batch-wait-ms", type=float, default=20.0, help="how long a batch waits to fill")
    p.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (checked before decoding)")
    p.add_argument("--max-classes", type=int, default=64, help="most class names in one request")
    p.add_argument("--max-name-chars", type=int, default=64, help="longest class name")
    add_ray_options(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve segmentation over HTTP on Ray Serve (batching, replicas)",
                       description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)


def _autoscale(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--autoscale {text!r}: expected MIN,MAX (two integers)") from None
    if not 0 <= low <= high or high < 1:
        raise ValueError(f"--autoscale {text!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def run(args: argparse.Namespace) -> int:
    from pipelines.serve import ServeSettings, deployment, model_file, wait_until_healthy

    try:
        settings = ServeSettings(args.model, args.device, args.tracking_uri, args.max_bytes, args.max_pixels,
                                 args.max_classes, args.max_name_chars, args.max_batch_size, args.batch_wait_ms / 1e3)
        settings.check()
        autoscale = _autoscale(args.autoscale)
        if args.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        from pgseg.device import resolve_device

        resolve_device(args.device)
        fetched = model_file(args.model, args.tracking_uri)  # here first: a missing model is said before Ray starts
    except (ValueError, FileNotFoundError) as exc:
        return user_error(exc)
    from dataclasses import replace

    from pipelines.runtime import named_address

    if not named_address(args.address):  # the replicas run on this machine: they read the file fetched here
        settings = replace(settings, fetched=str(fetched))
    from ray import serve

    from pipelines.runtime import quiet_logs, start_ray

    start_ray(args.address or os.environ.get("RAY_ADDRESS"), verbose=args.verbose)
    quiet_logs(args.verbose)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(deployment(settings, args.replicas, autoscale, args.cpus_per_replica, args.gpus_per_replica),
              name="pgseg", route_prefix="/", blocking=False)
    url = f"http://{args.host}:{args.port}"
    wait_until_healthy(url)
    print(f"serving {args.model} at {url}  (POST {url}/segment?classes=cat,grass,sky with an image; Ctrl+C stops)",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    from .runtime import entrypoint

    return entrypoint("python -m jobs.serve", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
