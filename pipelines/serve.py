"""The zero-shot protocol behind an HTTP API on Ray Serve: one deployment, ``SegmentationService``, with request
batching (the windows of every image of a batch that share a class list go through the model together) and a
replica count or autoscaling bounds.

    POST /segment?classes=cat,grass,sky[&bg_thresh=0.5]   body: the image file's bytes, Content-Type image/*
        → 200 {"labels": [names by id], "areas": {name: fraction}, "mask_png": base64 palette PNG (value = id),
               "overlay_png": base64 PNG with a legend, "width", "height"}
        → 4xx {"error": what is wrong}: 415 not an image type, 413 too many bytes or pixels, 400 an unreadable
          image, a bad class list or threshold. A bad request never takes the replica down.
    GET /healthz → {"status": "ok", "model": ..., "step": ...};  GET /stats → requests, batches, largest batch
    GET / → a page to try it: drop an image, type class names, see the overlay with its legend and the areas,
        download the mask (a static page on the same server: no other service, the same limits;
        ``pipelines/serve_page.html``)

``build_app`` is also the entry of ``serve run pipelines.serve:build_app model=...`` and of a ``serve deploy`` config
(``infra/serve.yaml``). (No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations as
objects, and through Ray Serve's ingress a string annotation is not resolved, so ``request`` would become a query
parameter.)"""
import base64
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServeSettings:
    model: str  # a pgseg model file (.safetensors) or an MLflow model URI (models:/NAME@champion, runs:/...)
    device: str = "cpu"
    tracking_uri: str | None = None  # where an MLflow model URI is looked up (else $MLFLOW_TRACKING_URI)
    max_bytes: int = 20 * 2**20  # a request body larger than this is refused unread
    max_pixels: int = 40_000_000  # an image with more pixels is refused before decoding
    max_classes: int = 64
    max_name_chars: int = 64
    max_batch_size: int = 8
    batch_wait_s: float = 0.02
    fetched: str | None = None  # ``model`` already fetched to a file every replica can read (an embedded Ray)

    def check(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_classes", "max_name_chars", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_wait_s <= 10:
            raise ValueError(f"batch wait must be in [0, 10] s, got {self.batch_wait_s:g}")


class RequestError(ValueError):
    """A bad request: its HTTP status and what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def model_file(source: str, tracking_uri: str | None = None) -> Path:
    """A local model file as given, or the model file inside an MLflow model's artifacts."""
    if "://" in source or source.startswith(("models:/", "runs:/")):
        from pipelines.models import download_model_file

        return download_model_file(source, tracking_uri)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no such model file (a .safetensors file or an MLflow model URI)")
    return path


def parse_classes(text: str, settings: ServeSettings) -> list[str]:
    from pgseg.segment import clean_class_names

    names = clean_class_names(text)  # (ValueError: empty, repeated)
    if len(names) > settings.max_classes:
        raise ValueError(f"{len(names)} class names: at most {settings.max_classes}")
    long = [n for n in names if len(n) > settings.max_name_chars]
    if long:
        raise ValueError(f"class name {long[0][:80]!r}: longer than {settings.max_name_chars} characters")
    return names


def answer(image: Any, work: tuple[Any, Any], labels: Any, names: list[str]) -> dict[str, Any]:
    """The JSON of one segmented image (the overlay drawn at the size segmented)."""
    from pgseg.segment import label_areas
    from pgseg.visualize import PALETTE_RGB, overlay, palette_mask, png_bytes

    def png(picture: Any) -> str:
        return base64.b64encode(png_bytes(picture)).decode()

    colors = PALETTE_RGB[: len(names)].tolist()
    return {"labels": names, "areas": label_areas(labels, names), "width": image.width, "height": image.height,
            "colors": colors, "mask_png": png(palette_mask(labels)),
            "overlay_png": png(overlay(work[0], work[1], names))}


app = FastAPI(title="pgseg", docs_url=None, redoc_url=None)


@serve.deployment(name="pgseg", ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class SegmentationService:
    def __init__(self, settings: ServeSettings):
        from pgseg.checkpoint import load_model, model_step
        from pgseg.device import resolve_device

        self.settings = settings
        path = Path(settings.fetched) if settings.fetched else model_file(settings.model, settings.tracking_uri)
        self.model, self.config = load_model(path, resolve_device(settings.device))
        self.step = model_step(path)
        self.segment_batch.set_max_batch_size(settings.max_batch_size)
        self.segment_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        self.requests, self.batch_sizes = 0, Counter()
        self.page_html = (resources.files("pipelines") / "serve_page.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        """The page: drop an image, type class names, see the overlay, its legend and the areas, download the mask."""
        return self.page_html

    @app.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.settings.model, "step": self.step}

    @app.get("/stats")
    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": sum(self.batch_sizes.values()),
                "largest_batch": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "settings": asdict(self.settings)}

    @app.post("/segment")
    async def segment(self, request: Request, classes: str = "", bg_thresh: float | None = None) -> JSONResponse:
        self.requests += 1
        try:
            image, names = await self._read(request, classes, bg_thresh)
            labels, names_out, work = await self.segment_batch((image, tuple(names), bg_thresh))
            return JSONResponse(answer(image, work, labels, names_out))
        except RequestError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        except Exception as exc:  # noqa: BLE001 - whatever one request does, the replica keeps serving
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    async def _read(self, request: Request, classes: str, bg_thresh: Optional[float]) -> tuple:
        from pgseg.segment import read_image

        s = self.settings
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if not kind.startswith("image/") and kind != "application/octet-stream":
            raise RequestError(415, f"Content-Type {kind or '(none)'}: send the image file's bytes as image/*")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > s.max_bytes:
            raise RequestError(413, f"{int(declared)} bytes: at most {s.max_bytes}")
        body = bytearray()
        async for chunk in request.stream():  # bounded: a body without a length is cut off at the limit
            body += chunk
            if len(body) > s.max_bytes:
                raise RequestError(413, f"more than {s.max_bytes} bytes")
        names = parse_classes(classes, s)
        if bg_thresh is not None and not 0 <= bg_thresh <= 1:
            raise ValueError(f"bg_thresh must be in [0, 1], got {bg_thresh:g}")
        try:
            return read_image(bytes(body), s.max_pixels, s.max_bytes), names
        except ValueError as exc:
            status = 413 if "over the limit" in str(exc) else 400  # (read_image's words for bytes and pixels)
            raise RequestError(status, str(exc)) from None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def segment_batch(self, items: list) -> list:
        """The images of a batch, those with one class list and threshold together (their windows in shared
        forward passes): each (labels at the image's size, label names, the image segmented)."""
        from pgseg.segment import ProtocolSettings, Segmenter, background_threshold, segment_images

        self.batch_sizes[len(items)] += 1
        out: list[Any] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (_, names, bg) in enumerate(items):
            groups.setdefault((names, bg), []).append(i)
        for (names, bg), members in groups.items():
            settings = ProtocolSettings.of(self.config.eval, background_threshold(bg, self.config.eval))
            segmenter = Segmenter(self.model, list(names), settings, batch=self.settings.max_batch_size * 2)
            for i, (labels, result, work) in zip(members, segment_images(segmenter, [items[i][0] for i in members])):
                out[i] = (labels, result.names, (work, result.labels))
        return out


def deployment(settings: ServeSettings, replicas: int | None = 1, autoscale: tuple[int, int] | None = None,
               cpus: float = 1.0, gpus: float = 0.0) -> Any:
    """The bound application: ``replicas`` fixed, or ``autoscale`` (min, max) by ongoing requests."""
    settings.check()
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
                               "max_ongoing_requests": max(2 * settings.max_batch_size, 8)}
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": settings.max_batch_size}
    else:
        options["num_replicas"] = replicas
    return SegmentationService.options(**options).bind(settings)


NUMBERS = {"max_bytes": int, "max_pixels": int, "max_classes": int, "max_name_chars": int, "max_batch_size": int,
           "batch_wait_s": float}


def build_app(args: dict[str, str]) -> Any:
    """``serve run pipelines.serve:build_app model=PATH_OR_URI [tracking_uri=…] [device=cpu] [max_batch_size=8] …
    [replicas=1] [cpus=1] [gpus=0]``: the application from text arguments (a ``serve deploy`` config's ``args``)."""
    fields = set(ServeSettings.__dataclass_fields__)
    unknown = sorted(set(args) - fields - {"replicas", "cpus", "gpus"})
    if unknown or "model" not in args:
        raise ValueError(f"serve arguments: need model=PATH_OR_URI; unknown {unknown} (known: "
                         f"{', '.join(sorted(fields | {'replicas', 'cpus', 'gpus'}))})")
    try:
        values = {k: NUMBERS.get(k, str)(v) for k, v in args.items() if k in fields}
        scale = {"replicas": int(args.get("replicas", 1)), "cpus": float(args.get("cpus", 1)),
                 "gpus": float(args.get("gpus", 0))}
    except (TypeError, ValueError) as exc:
        raise ValueError(f"serve arguments: {exc}") from None
    return deployment(ServeSettings(**values), **scale)


def wait_until_healthy(url: str, seconds: float = 300.0) -> None:
    """Poll ``url``/healthz until the deployment answers (bounded)."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not become healthy within {seconds:g} s")
        time.sleep(0.5)
