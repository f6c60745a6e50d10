"""The demo page in a real browser: headless Chromium, driven over the WebDriver protocol, against a real server.

Skipped with a reason where Chromium and its driver are not installed (`make test` installs them
where it can: `apt-get install -y chromium chromium-driver`).
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import free_port, start_server, wait_ready

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key


class Browser:
    """The few WebDriver commands the test needs, over plain HTTP."""

    def __init__(self, driver_url: str, profile: Path) -> None:
        self.http = httpx.Client(base_url=driver_url, timeout=60)
        args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={profile}",
            "--window-size=1280,1500",
        ]
        caps = {
            "capabilities": {
                "alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
            }
        }
        self.session = self._call("POST", "/session", caps)["sessionId"]
        # element look-ups wait for the page (a loaded machine may run find before the demo's script has drawn it)
        self.command("POST", "/timeouts", {"implicit": 15_000})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.http.request(method, path, json=body)
        assert r.status_code == 200, r.text[:500]
        return r.json()["value"]

    def command(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def script(self, source: str) -> Any:
        return self.command("POST", "/execute/sync", {"script": source, "args": []})

    def wait(self, source: str, timeout: float = 60) -> Any:
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.script(source)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"never true in the page: {source}")

    def screenshot(self, path: Path) -> Image.Image:
        path.write_bytes(base64.b64decode(self.command("GET", "/screenshot")))
        return Image.open(path)

    def close(self) -> None:
        self.http.delete(f"/session/{self.session}")
        self.http.close()


@pytest.fixture(scope="module")
def page(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Browser, str]]:
    port, driver_port = free_port(), free_port()
    server = start_server(weights, tmp_path_factory.mktemp("demo-data"), port, OAML_API_KEYS="demo-key")
    driver = subprocess.Popen(
        [str(DRIVER), f"--port={driver_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    browser: Browser | None = None
    try:
        wait_ready(server, port)
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{driver_port}/status", timeout=1).json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        browser = Browser(f"http://127.0.0.1:{driver_port}", tmp_path_factory.mktemp("chromium-profile"))
        yield browser, f"http://127.0.0.1:{port}"
    finally:
        if browser is not None:
            browser.close()
        driver.kill()
        server.kill()
        driver.wait()
        server.wait()


@pytest.fixture(scope="module")
def photo_files(astronaut: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    out = {"a": folder / "astronaut.png", "b": folder / "astronaut-640.jpg", "none": folder / "coffee.jpg"}
    Image.fromarray(astronaut).save(out["a"])
    Image.fromarray(cv2.resize(astronaut, (640, 480))).save(out["b"], quality=85)
    Image.fromarray(np.ascontiguousarray(data.coffee())).save(out["none"], quality=85)
    return out


def submit_verify(browser: Browser, url: str, a: Path, b: Path) -> None:
    """Open the page, enter the key, choose two photos and press verify."""
    browser.open(f"{url}/demo/")
    browser.type("#key", "demo-key")
    browser.type("#verify-a", str(a))
    browser.type("#verify-b", str(b))
    browser.click("#verify-go")


def test_verify_shows_the_decision_the_numbers_and_the_picture(
    page: tuple[Browser, str], photo_files: dict[str, Path], tmp_path: Path
) -> None:
    browser, url = page
    submit_verify(browser, url, photo_files["a"], photo_files["b"])
    browser.wait("return !document.querySelector('#verify-result').hidden")
    width = browser.wait("const i = document.querySelector('#verify-picture'); return i.complete && i.naturalWidth")
    assert width == 2 * 112 * 3 + 60
    decision = browser.script("return document.querySelector('#verify-decision').textContent")
    assert decision in ("Same person (match)", "Not the same person (no match)")
    numbers = browser.script("return document.querySelector('#verify-numbers').innerText")
    assert "fused score" in numbers and "probability" in numbers and "a match needs more than" in numbers
    shot = browser.screenshot(tmp_path / "demo-verify.png")
    assert shot.size[0] >= 1000 and shot.size[1] >= 800


def test_the_api_error_reaches_the_page(page: tuple[Browser, str], photo_files: dict[str, Path]) -> None:
    browser, url = page
    submit_verify(browser, url, photo_files["none"], photo_files["a"])
    text = browser.wait("const e = document.querySelector('#error'); return !e.hidden && e.textContent")
    assert text.startswith("NO_FACE: image_a")
    browser.open(f"{url}/demo/")  # a wrong key: the API's own code shows
    browser.type("#key", "wrong")
    browser.click("nav button[data-tab=gallery]")
    assert browser.wait("const e = document.querySelector('#error'); return !e.hidden && e.textContent").startswith(
        "UNAUTHORIZED"
    )


def test_enrol_list_identify_and_delete(page: tuple[Browser, str], photo_files: dict[str, Path]) -> None:
    browser, url = page
    browser.open(f"{url}/demo/")
    browser.type("#key", "demo-key")
    browser.click("nav button[data-tab=enrol]")
    browser.type("#enrol-form input[name=subject]", "eileen")
    browser.type("#enrol-form input[name=name]", "Eileen Collins")
    browser.type("#enrol-images", f"{photo_files['a']}\n{photo_files['none']}")
    browser.click("#enrol-form button[type=submit]")
    result = browser.wait("const r = document.querySelector('#enrol-result'); return !r.hidden && r.innerText")
    assert "1 face(s) enrolled" in result and "rejected: NO_FACE" in result
    browser.click("nav button[data-tab=identify]")
    browser.type("#identify-image", str(photo_files["b"]))
    browser.click("#identify-form button[type=submit]")
    found = browser.wait("const r = document.querySelector('#identify-result'); return !r.hidden && r.innerText")
    assert "eileen" in found and "strangers matched to someone" in found  # the decision's FPIR, stated
    browser.click("nav button[data-tab=gallery]")
    listed = browser.wait("const t = document.querySelector('#gallery-list'); return t.rows.length > 1 && t.innerText")
    assert "Eileen Collins" in listed
    browser.click("#gallery-list button")
    browser.wait("return document.querySelector('#gallery-list').rows.length === 1")
    image = Image.open(io.BytesIO(base64.b64decode(browser.command("GET", "/screenshot"))))
    assert image.size[0] >= 1000


def test_the_review_finds_a_person_enrolled_twice_and_merges_them(
    page: tuple[Browser, str], photo_files: dict[str, Path]
) -> None:
    browser, url = page
    headers = {"X-API-Key": "demo-key"}
    for subject, photo in (("eileen", photo_files["a"]), ("eileen-2", photo_files["b"])):
        r = httpx.post(
            f"{url}/gallery",
            data={"subject": subject},
            files={"images": (photo.name, photo.read_bytes())},
            headers=headers,
            timeout=120,
        )
        assert r.status_code == 201, r.text
    browser.open(f"{url}/demo/")
    browser.type("#key", "demo-key")
    browser.click("nav button[data-tab=review]")
    browser.click("#review-go")
    found = browser.wait("const r = document.querySelector('#review-result'); return !r.hidden && r.innerText")
    assert "1 suspected duplicate(s)" in found and "eileen-2" in found, found
    browser.click("#review-pairs button")
    browser.wait("return document.querySelector('#review-result').innerText.includes('No suspected duplicates')")
    faces = {s: httpx.get(f"{url}/gallery/{s}", headers=headers).json().get("faces") for s in ("eileen", "eileen-2")}
    assert sorted(faces.values(), key=str) == [2, None]  # one holds both faces, the other is gone
