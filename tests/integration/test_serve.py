"""`pgseg serve`'s deployment on a real Ray Serve (the session's Ray, HTTP on 127.0.0.1): concurrent requests are
batched and answered with the masks of the in-process protocol; bad requests get 4xx with the reason and the
replica keeps serving; nothing listens beyond loopback."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from mlflow_process import free_port
from near_ties import assert_labels_match_up_to_near_ties
from PIL import Image


def _post(url: str, body: bytes, kind: str = "image/jpeg", timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.loads(answer.read())


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(ray_local, trained_tiny):
    from ray import serve

    from pipelines.serve import ServeSettings, deployment, wait_until_healthy

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeSettings(str(trained_tiny), max_bytes=300_000, max_pixels=1_000_000, max_classes=8,
                             max_name_chars=20, max_batch_size=4, batch_wait_s=0.25)
    serve.run(deployment(settings, replicas=1, cpus=0.5), name="pgseg", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 300)
    yield url
    serve.shutdown()


def test_concurrent_requests_are_batched_and_give_the_in_process_masks(service, trained_tiny, shapes_data):
    from pgseg.checkpoint import load_model
    from pgseg.segment import ProtocolSettings, Segmenter, read_image

    images = sorted(shapes_data["val"].rglob("*.jpg"))
    before = _get(f"{service}/stats")
    model, config = load_model(trained_tiny)
    labels_seen = set()
    # the class list in two orders: whatever the 16-step model calls the shapes (one class everywhere, sometimes),
    # the labels differ between the orders, so the masks compared carry the service's class mapping
    for names in (list(shapes_data["world"].classes), list(reversed(shapes_data["world"].classes))):
        url = f"{service}/segment?classes={','.join(names)}&bg_thresh=0"
        with ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(lambda p: _post(url, p.read_bytes()), images))
        segmenter = Segmenter(model, names, ProtocolSettings.of(config.eval, 0.0))
        for path, (status, body) in zip(images, answers):
            assert status == 200, body
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
            # the service scored this image in a batch with others, on its replica's thread count: equal but for
            # float near-ties
            assert_labels_match_up_to_near_ties(mask, segmenter(read_image(path)))
            assert body["labels"] == ["background", *names] and sum(body["areas"].values()) == pytest.approx(1.0)
            palette = Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))).getpalette()
            assert body["colors"] == [palette[3 * i:3 * i + 3] for i in range(len(names) + 1)]  # the legend's colours
            overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
            assert overlay.width >= body["width"] and (body["width"], body["height"]) == Image.open(path).size
            labels_seen |= set(np.unique(mask).tolist())
    assert len(labels_seen) >= 2  # the masks compared are not one label everywhere
    after = _get(f"{service}/stats")
    assert after["requests"] - before["requests"] == 2 * len(images)
    assert after["largest_batch"] >= 2  # several requests went through the model together
    assert sum(int(k) * v for k, v in after["batch_sizes"].items()) - sum(
        int(k) * v for k, v in before["batch_sizes"].items()) == 2 * len(images)


def test_bad_requests_get_4xx_with_the_reason_and_the_replica_keeps_serving(service, shapes_data):
    image = sorted(shapes_data["val"].rglob("*.jpg"))[0].read_bytes()
    segment = f"{service}/segment?classes=circle,square"
    cases = [
        ((segment, image, "text/plain"), 415, "Content-Type"),
        ((segment, b"x" * 300_001, "image/png"), 413, "bytes"),
        ((segment, b"not an image at all", "image/png"), 400, "<image>"),
        ((f"{service}/segment?classes=%20,%20", image, "image/jpeg"), 400, "class list is empty"),
        ((f"{service}/segment?classes=a,b,a", image, "image/jpeg"), 400, "more than once"),
        ((f"{service}/segment?classes={','.join(f'c{i}' for i in range(9))}", image, "image/jpeg"), 400, "at most 8"),
        ((f"{service}/segment?classes={'x' * 21}", image, "image/jpeg"), 400, "longer than 20"),
        ((f"{segment}&bg_thresh=2", image, "image/jpeg"), 400, "bg_thresh"),
        ((segment, _png(1100, 1000), "image/png"), 413, "1.1 Mpx) is over the limit of 1 Mpx"),
    ]
    for (url, body, kind), status, words in cases:
        got, answer = _post(url, body, kind)
        assert got == status and words in answer.get("error", ""), (url[-40:], kind, got, answer)
    status, answer = _post(segment, image)
    assert status == 200 and answer["labels"] == ["background", "circle", "square"]
    assert _get(f"{service}/healthz")["status"] == "ok"


def test_the_page_is_served_with_the_controls_its_script_uses(service):
    """GET / is the page (a static file on the same server); the elements its script reads and the endpoint it calls
    are there. (That a browser runs its script is not checked here.)"""
    with urllib.request.urlopen(f"{service}/", timeout=30) as answer:
        kind, page = answer.headers["content-type"], answer.read().decode()
    assert kind.startswith("text/html")
    for element in ('id="file"', 'id="classes"', 'id="threshold"', 'id="go"', 'id="overlay"', 'id="legend"',
                    'id="areas"', 'id="download"', "fetch(`segment?${params}`"):
        assert element in page, element


def test_the_service_listens_on_loopback_only(service):
    """The HTTP proxy's listening sockets, read from the kernel's table: every one on 127.0.0.1."""
    from listening import listening_addresses

    listeners = listening_addresses(int(service.rsplit(":", 1)[1]))
    assert listeners and all(a == "0100007F" for a in listeners), listeners  # 127.0.0.1, little-endian hex


def test_pgseg_serve_refuses_bad_arguments_before_starting_ray(tmp_path, capsys):
    from jobs.serve import main

    assert main([str(tmp_path / "missing.safetensors")]) == 2
    assert "no such model file" in capsys.readouterr().err
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    for flags, words in ((["--autoscale", "3,1"], "MIN <= MAX"), (["--max-batch-size", "0"], "max-batch-size"),
                         (["--port", "70000"], "--port")):
        assert main([str(model), *flags]) == 2
        assert words in capsys.readouterr().err


def test_the_serve_config_for_a_cluster_builds_its_application(tmp_path):
    """infra/serve.yaml's arguments build the application `serve deploy` would run; wrong ones are refused."""
    import yaml

    from pipelines.serve import build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "infra" / "serve.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "pipelines.serve:build_app"
    built = build_app(application["args"])
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown \\['colour'\\]"):
        build_app({**application["args"], "colour": "red"})
    with pytest.raises(ValueError, match="max-batch-size must be >= 1"):
        build_app({**application["args"], "max_batch_size": "0"})
    with pytest.raises(ValueError, match="serve arguments"):
        build_app({**application["args"], "replicas": "two"})


_CANVAS_PIXELS = """
const img = document.getElementById(arguments[0]);
const canvas = document.createElement("canvas");
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext("2d");
context.drawImage(img, 0, 0);
const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
let text = "";
for (let i = 0; i < data.length; i += 32768) text += String.fromCharCode.apply(null, data.subarray(i, i + 32768));
return [canvas.width, canvas.height, btoa(text)];
"""


def _shown_pixels(page, element: str) -> np.ndarray:
    """The picture an <img> shows, as the browser decoded it (drawn on a canvas): RGBA [H, W, 4]."""
    width, height, data = page.execute_script(_CANVAS_PIXELS, element)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)


def test_the_page_segments_an_image_in_a_real_browser(service, trained_tiny, shapes_data, tmp_path):
    """In headless Chromium, as a person would: choose a shapes-world image, type the classes, move the threshold,
    press Segment; the overlay the page shows is, pixel for pixel, the one drawn from the model's own labels; the
    legend, the areas and the downloadable mask are the model's; an empty class list shows the service's reason."""
    from browser import open_browser, page_text, screenshot, wait_until
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    import torch

    from pgseg.checkpoint import load_model
    from pgseg.segment import ProtocolSettings, Segmenter, label_areas, read_image, segment_image
    from pgseg.visualize import PALETTE_RGB, overlay

    names = list(shapes_data["world"].classes)
    model, config = load_model(trained_tiny)
    segmenter = Segmenter(model, names, ProtocolSettings.of(config.eval, 0.0))  # the slider's first step: 0.00
    for source in sorted(shapes_data["val"].rglob("*.jpg")):  # an image the model finds something in
        upload = tmp_path / "shapes.png"  # enlarged, so the page (and its screenshot) shows it at a readable size
        Image.open(source).convert("RGB").resize((256, 256), Image.NEAREST).save(upload)
        labels, result, work = segment_image(segmenter, read_image(upload))
        if len(np.unique(labels.numpy())) >= 2:
            break
    all_names = ["background", *names]

    page = open_browser()
    try:
        page.get(f"{service}/")
        page.find_element(By.ID, "file").send_keys(str(upload))
        page.find_element(By.ID, "classes").send_keys(", ".join(names))
        page.find_element(By.ID, "threshold").send_keys(Keys.ARROW_RIGHT)  # "default" → 0.00
        assert page.find_element(By.ID, "threshold-value").text == "0.00"
        page.find_element(By.ID, "go").click()
        state = wait_until(lambda: page.execute_script("return document.body.dataset.state") in ("done", "failed")
                           and page.execute_script("return document.body.dataset.state"), 120, "the answer", page)
        assert state == "done", page.find_element(By.ID, "error").text
        wait_until(lambda: page.execute_script("const i = document.getElementById('overlay');"
                                               "return i.complete && i.naturalWidth > 0"), 30, "the overlay", page)
        href = page.find_element(By.ID, "download").get_attribute("href")
        assert href.startswith("data:image/png;base64,")
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))))
        # the mask to download: the model's labels at the image's size (near-ties aside: the replica runs on its own
        # thread count)
        assert_labels_match_up_to_near_ties(mask, result)
        shown = _shown_pixels(page, "overlay")
        assert (shown[..., 3] == 255).all()
        # what a person sees is the model's answer, drawn pixel for pixel
        np.testing.assert_array_equal(shown[..., :3], np.asarray(overlay(work, mask, all_names)))

        entries = page.find_elements(By.CSS_SELECTOR, "#legend .entry")
        assert [e.text for e in entries] == all_names
        swatches = [e.find_element(By.CSS_SELECTOR, ".swatch").value_of_css_property("background-color")
                    for e in entries]
        assert swatches == [f"rgba({r}, {g}, {b}, 1)" for r, g, b in PALETTE_RGB[:len(all_names)].tolist()]
        rows = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                for r in page.find_elements(By.CSS_SELECTOR, "#areas tbody tr")]
        areas = label_areas(torch.from_numpy(mask.astype(np.int64)), all_names)
        assert sorted(rows) == sorted([name, f"{100 * share:.1f} %"] for name, share in areas.items())
        picture = screenshot(page, "serve-page.png", tmp_path)
        assert Image.open(picture).size[0] > 0

        classes = page.find_element(By.ID, "classes")
        classes.clear()
        classes.send_keys(" , ")
        page.find_element(By.ID, "go").click()
        wait_until(lambda: page.execute_script("return document.body.dataset.state") == "failed", 60,
                   "the refusal", page)
        assert "class list is empty" in page.find_element(By.ID, "error").text
        assert "Segment an image with any words" in page_text(page)
    finally:
        page.quit()
