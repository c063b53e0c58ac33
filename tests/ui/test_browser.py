"""`supir-rt ui --tiny-random` in a real headless Chromium (Selenium): the page loads with its footer, bad
uploads get a message in the page, a 1-step restore returns a PNG of the right size with its settings,
dropping that PNG on "Reproduce" brings its settings back, Stage 1 shows its image, Cancel stops a long
run, and stopping the server leaves nothing behind (its TMPDIR, working folder and HOME stay empty).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them and sets
``SUPIR_RT_REQUIRE_BROWSER=1`` so that CI fails rather than skips); elsewhere skipped with the reason.
A screenshot of the page is kept as ``ui.png`` under the test's temporary folder; set
``SUPIR_RT_UI_SCREENSHOT=docs/images/ui.png`` to also write the README's (smaller) copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from supir_rt.images import read_metadata

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("SUPIR_RT_REQUIRE_BROWSER"):  # set by .ci/run: CI must not skip this test
        raise RuntimeError("the browser test needs chromium and chromedriver: "
                           "apt-get install -y chromium chromium-driver")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
                allow_module_level=True)

pytestmark = pytest.mark.slow
START_TIMEOUT = 120  # s: importing torch and Gradio and building the tiny model on 2 busy cores
WAIT = 60  # s: any one thing the page does


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``supir-rt ui --tiny-random`` as a subprocess with its own TMPDIR and working folder."""

    def __init__(self, root: Path) -> None:
        self.tmp, self.cwd, self.home = root / "tmp", root / "cwd", root / "home"
        for folder in (self.tmp, self.cwd, self.home):
            folder.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = root / "server.log"
        env = dict(os.environ, TMPDIR=str(self.tmp), HOME=str(self.home), XDG_CACHE_HOME=str(self.home / ".cache"),
                   PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        for own in ("ORT_DISABLE_TELEMETRY", "MPLCONFIGDIR", "GRADIO_TEMP_DIR"):  # supir-rt sets these itself
            env.pop(own, None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supir_rt.cli", "ui", "--tiny-random", "--host", "127.0.0.1",
                 "--port", str(self.port), "--max-upload-mb", "1"],
                cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"server not up after {START_TIMEOUT} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("ui-server"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()  # always: no server outlives the tests


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1360,1500", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.get(server.url)
        WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#footer"))
        yield driver
    finally:
        driver.quit()


def text_of(driver, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def wait_text(driver, selector: str, *needles: str, timeout: float = WAIT, fail_on: str | None = None) -> str:
    def ready(d):
        text = text_of(d, selector)
        if fail_on is not None and fail_on in text:
            raise AssertionError(f"{selector} shows {text!r}")
        return text if all(n in text for n in needles) else False

    try:
        return WebDriverWait(driver, timeout).until(ready)
    except WebDriverException:
        raise AssertionError(f"{selector} never showed {needles}; it shows {text_of(driver, selector)!r}") from None


def upload(driver, path: Path) -> None:
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))


def set_number(driver, knob: str, value: int) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#knob-{knob} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def number(driver, knob: str) -> float:
    return float(driver.find_element(By.CSS_SELECTOR, f"#knob-{knob} input[type=number]").get_attribute("value"))


def test_footer_and_bad_uploads_get_a_message(browser, tmp_path):
    footer = text_of(browser, "#footer")
    assert "cpu" in footer and "torch" in footer and "tiny-random" in footer, footer

    garbage = tmp_path / "holiday.png"
    garbage.write_bytes(b"this is not a PNG, just text with a .png name\n" * 20)
    upload(browser, garbage)
    message = wait_text(browser, "#status", "holiday.png", "not an image")
    assert "Traceback" not in browser.page_source and "Error" in message

    # A decompression bomb: a valid PNG header announcing 100000 x 100000 pixels, refused from the header.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    upload(browser, bomb)
    wait_text(browser, "#status", "bomb.png", "100000x100000", "decompression-bomb guard")
    assert "Traceback" not in browser.page_source

    # A file above --max-upload-mb (1 MB here): refused by the page with a message naming the file.
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1024 * 1024
    upload(browser, big)
    wait_text(browser, "body", "exceed the maximum allowed size", "big.png")
    # A caption long enough to push the quality prompt out of CLIP's 77 tokens: a warning under the caption.
    browser.find_element(By.CSS_SELECTOR, "#caption textarea").send_keys("an old street with houses " * 20)
    wait_text(browser, "#prompt-notes", "Prompt cut", "quality prompt")
    browser.refresh()  # a fresh page (no message toasts, empty caption) for the next test
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#footer"))


def test_upload_restore_one_step_and_download_the_png(browser, server, tmp_path):
    photo = tmp_path / "street.png"
    street_scene(192, 144).save(photo)
    upload(browser, photo)
    # tiny defaults: min size 256 -> the short side 144 scales to 256, 192 -> 341.3 -> snapped to 320
    wait_text(browser, "#sizes", "192×144", "320×256", "output 192×144")
    set_number(browser, "num_steps", 1)
    set_number(browser, "seed", 77)
    browser.find_element(By.CSS_SELECTOR, "#run-btn").click()
    status = wait_text(browser, "#status", "Done in", timeout=120, fail_on="Error")
    assert "seed 77" in status and "1 steps" in status and "192×144" in status

    link = WebDriverWait(browser, WAIT).until(
        lambda d: [a for a in d.find_elements(By.CSS_SELECTOR, "#download a[href]")
                   if ".png" in a.get_attribute("href")])
    href = link[0].get_attribute("href")
    assert href.startswith(server.url), href
    png = tmp_path / "downloaded.png"
    with urllib.request.urlopen(href, timeout=WAIT) as r:
        png.write_bytes(r.read())
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (192, 144)
    meta = read_metadata(png)
    assert meta["settings"]["num_steps"] == 1 and meta["settings"]["seed"] == 77
    assert meta["source"] == "street.png" and meta["runtime"]["model"] == "tiny-random"
    assert meta["processing_size"] == [320, 256] and meta["output_size"] == [192, 144]

    compare = browser.find_elements(By.CSS_SELECTOR, "#compare img")
    assert len(compare) >= 2, "the before/after slider shows both images"
    # the restore filled the Stage 1 panel too (before, it stayed empty until the Stage 1 button)
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stage1 img"))

    # Reproduce: change the knobs, drop the downloaded PNG, the knobs come back
    set_number(browser, "num_steps", 5)
    set_number(browser, "seed", 3)
    browser.find_element(By.CSS_SELECTOR, "#reproduce input[type=file]").send_keys(str(png))
    wait_text(browser, "#status", "Settings of", "street.png", "seed 77", fail_on="Error")
    assert number(browser, "num_steps") == 1 and number(browser, "seed") == 77

    browser.find_element(By.CSS_SELECTOR, "#stage1-btn").click()
    wait_text(browser, "#status", "Stage 1 done", fail_on="Error")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stage1 img"))

    browser.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "ui.png"
    browser.save_screenshot(str(shot))
    keep_screenshot(shot)
    assert "Traceback" not in browser.page_source


def test_cancel_stops_a_running_job(browser):
    set_number(browser, "num_steps", 300)
    browser.find_element(By.CSS_SELECTOR, "#run-btn").click()
    wait_text(browser, "#compare", "sampling: step", fail_on="Error")  # the progress bar over the steps
    browser.find_element(By.CSS_SELECTOR, "#cancel-btn").click()
    status = wait_text(browser, "#status", "Cancelled.")
    assert "Error" not in status and "Error" not in text_of(browser, "#compare")
    set_number(browser, "num_steps", 1)  # the server is free again
    browser.find_element(By.CSS_SELECTOR, "#run-btn").click()
    wait_text(browser, "#status", "Done in", fail_on="Error")


def test_stopping_the_server_removes_every_file_it_wrote(server):
    assert server.stop() == 0, server.log.read_text()
    assert list(server.tmp.iterdir()) == [], "the server's temporary folder is removed at exit"
    assert list(server.cwd.iterdir()) == [], "nothing is written into the working folder"
    assert [str(p) for p in server.home.rglob("*")] == [], "nothing is written into the home folder"


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR chunk for ``width`` x ``height`` 8-bit RGB, and IEND (no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def keep_screenshot(shot: Path) -> None:
    """Copy the screenshot to $SUPIR_RT_UI_SCREENSHOT (the README's picture), as a small palette PNG."""
    target = os.environ.get("SUPIR_RT_UI_SCREENSHOT")
    if not target:
        return
    with Image.open(shot) as img:
        small = img.convert("RGB").crop((0, 0, img.width, min(img.height, 1000)))  # photo, buttons, results
        small = small.resize((small.width * 3 // 4, small.height * 3 // 4), Image.Resampling.LANCZOS)
        small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def street_scene(width: int, height: int) -> Image.Image:
    """A small synthetic picture (sky, sun, houses, road) for the page and its screenshot."""
    from PIL import ImageDraw

    y = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array([90, 150, 230]) * (1 - y) + np.array([250, 200, 160]) * y).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((width * 0.7, height * 0.1, width * 0.85, height * 0.3), fill=(255, 230, 120))
    for i, colour in enumerate([(180, 70, 60), (220, 200, 150), (90, 110, 140)]):
        x0 = width * (0.05 + 0.3 * i)
        draw.rectangle((x0, height * 0.45, x0 + width * 0.25, height * 0.8), fill=colour)
        draw.polygon([(x0, height * 0.45), (x0 + width * 0.125, height * 0.3), (x0 + width * 0.25, height * 0.45)],
                     fill=(100, 50, 40))
    draw.rectangle((0, height * 0.8, width, height), fill=(70, 70, 75))
    return img
