"""The Gradio demo as users meet it: `python -m rn50.demo` in a subprocess, driven by headless
Chromium (Playwright) and called through its HTTP API. Nothing leaves 127.0.0.1."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tools.local_servers import free_ports, log_tail
from tests.browser import launch
from tests.model_helpers import digits_config, random_image, write_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NAMES = [f"digit {d}" for d in range(10)]


@pytest.fixture(scope="module")
def demo(module_tmp):
    """The demo of a random-weight digits checkpoint; yields its base URL."""
    root = module_tmp
    checkpoint = write_checkpoint(root / "run" / "checkpoint_0", digits_config(root / "digits"),
                                  extra={"class_names": NAMES})
    (port,) = free_ports(1)
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_TEMP_DIR": str(root / "tmp"),
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    log = root / "demo.log"
    with open(log, "wb") as out:  # the run directory, not the checkpoint: newest is found
        process = subprocess.Popen([sys.executable, "-m", "rn50.serve.demo", "--checkpoint",
                                    str(checkpoint.parent)], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo exited with {process.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the demo did not answer within {timeout_s:.0f} s:\n{log_tail(log)}")


def _upload(url: str, path: Path) -> str:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{url}/gradio_api/upload", data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())[0]


def _classify(url: str, path: Path) -> tuple[str, object]:
    """POST the upload to /classify and read the event stream: ("complete"|"error", data)."""
    payload = {"data": [{"path": _upload(url, path), "meta": {"_type": "gradio.FileData"}}]}
    request = urllib.request.Request(f"{url}/gradio_api/call/classify",
                                     data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/classify/{event_id}",
                                timeout=120) as response:
        lines = response.read().decode().splitlines()
    event = next(line.split(": ", 1)[1] for line in lines if line.startswith("event: "))
    data = next(line.split(": ", 1)[1] for line in lines if line.startswith("data: "))
    return event, json.loads(data)


def test_http_api_returns_five_named_classes_and_a_heatmap(demo, tmp_path):
    event, (labels, heatmap, notes) = _classify(demo, random_image(tmp_path / "x.png"))
    assert event == "complete"
    assert len(labels["confidences"]) == 5
    assert {c["label"] for c in labels["confidences"]} <= set(NAMES)
    assert labels["label"] == labels["confidences"][0]["label"] and notes == ""
    with urllib.request.urlopen(heatmap["url"], timeout=30) as response:
        (tmp_path / "heatmap.png").write_bytes(response.read())
    assert Image.open(tmp_path / "heatmap.png").size == (256, 256)


@pytest.mark.parametrize("mode, suffix, word", [("L", ".png", "grayscale"),
                                                ("CMYK", ".jpg", "CMYK")])
def test_http_api_converts_other_colour_modes_and_says_so(demo, tmp_path, mode, suffix, word):
    event, (labels, _, notes) = _classify(demo, random_image(tmp_path / f"x{suffix}", mode=mode))
    assert event == "complete" and len(labels["confidences"]) == 5
    assert word in notes and "converted to RGB" in notes


def test_http_api_refuses_a_non_image_with_a_clear_message(demo, tmp_path):
    (tmp_path / "report.png").write_text("quarterly numbers, not pixels")
    event, data = _classify(demo, tmp_path / "report.png")
    assert event == "error" and "not an image" in data["error"]


def test_oversized_uploads_are_refused_by_the_server(demo, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(26 * 1024 * 1024))
    with pytest.raises(urllib.error.HTTPError) as refused:
        _upload(demo, big)
    assert refused.value.code == 413


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_browser_upload_shows_five_labels_and_a_heatmap(demo, page, tmp_path):
    outside = []
    page.on("request", lambda r: outside.append(r.url)
            if not r.url.startswith((demo, "data:", "blob:")) else None)
    page.goto(demo, wait_until="networkidle")
    page.set_input_files("#upload input[type=file]", str(random_image(tmp_path / "up.png")))
    page.wait_for_selector("#gradcam img", timeout=90_000)
    rows = page.locator("#top5 [data-testid$='-confidence-set']")
    rows.first.wait_for(timeout=30_000)
    assert rows.count() == 5
    assert {rows.nth(i).get_attribute("data-testid")[:-len("-confidence-set")]
            for i in range(5)} <= set(NAMES)
    heatmap = page.locator("#gradcam img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap
                           .element_handle(), timeout=30_000)
    assert heatmap.evaluate("img => img.naturalWidth") == 256
    assert outside == [], f"the page reached outside the demo: {outside}"


def test_browser_shows_the_message_for_a_bad_upload(demo, page, tmp_path):
    (tmp_path / "bad.png").write_text("not pixels")
    page.goto(demo, wait_until="networkidle")
    page.set_input_files("#upload input[type=file]", str(tmp_path / "bad.png"))
    page.get_by_text("not an image Pillow can read").first.wait_for(timeout=60_000)
