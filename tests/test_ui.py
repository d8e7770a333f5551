"""The Gradio page, started for real on a free loopback port and driven from outside."""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cbir.retrieval.index import IndexConfig, build_index
from conftest import MINI, predict as _predict, serve_page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CARDINAL = sorted((MINI / "images" / "017.Cardinal").glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def server(mini_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("ui") / "run"
    shutil.copytree(mini_run, run, symlinks=True)
    build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    with serve_page(run, "det") as url:
        yield url, run


def test_binds_to_loopback_only(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1].strip("/"))
    listening = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1 only, never 0.0.0.0


def test_search_through_gradio_client(server):
    url, _ = server
    boxed, latency, choice, gallery, merged = _predict(url, CARDINAL, k=5)
    assert Image.open(boxed).size[0] > 100
    assert "query latency" in latency
    names = [c[0] for c in choice["choices"]]
    assert names == ["box 1 · whole image", "box 2 · GT box"]  # --detector none: whole photo + its GT box
    assert len(gallery) == 5 and all(" · sim " in g["caption"] for g in gallery)
    assert "Cardinal" in gallery[0]["caption"]
    assert merged["headers"] == ["rank", "image_id", "class", "similarity"] and len(merged["data"]) == 5


@pytest.mark.parametrize("make", ["rgba", "greyscale", "cmyk", "huge"])
def test_unusual_photos_are_handled(server, tmp_path, make):
    url, _ = server
    image = Image.open(CARDINAL)
    path = tmp_path / f"{make}.png"
    if make == "rgba":
        image.convert("RGBA").save(path)
    elif make == "greyscale":
        image.convert("L").save(path)
    elif make == "cmyk":
        path = tmp_path / "cmyk.jpg"
        image.convert("CMYK").save(path)
    else:
        path = tmp_path / "huge.jpg"
        image.resize((5000, 4000)).save(path, quality=60)
    boxed, latency, *_ = _predict(url, path, k=3)
    assert Image.open(boxed).mode in ("RGB", "RGBA") and "px" in latency
    if make == "huge":
        assert Image.open(boxed).size[0] * Image.open(boxed).size[1] <= 12_000_000


def test_non_image_gets_a_message_not_a_trace(server, tmp_path):
    from gradio_client.exceptions import AppError

    url, _ = server
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a photo")
    with pytest.raises(AppError) as e:
        _predict(url, bad)
    # gradio's Image component decodes before our handler: its message names the file, without a trace
    assert "cannot identify image file" in str(e.value) and "Traceback" not in str(e.value)


@pytest.mark.browser
def test_page_in_headless_chromium(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    url, _ = server
    shot = Path(os.environ.get("CBIR_UI_SCREENSHOT", tmp_path / "ui.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Search").wait_for(timeout=60_000)
        page.locator("input[type=file]").first.set_input_files(str(CARDINAL))
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Search").click()
        page.get_by_text("query latency").wait_for(timeout=60_000)
        page.get_by_text("Cardinal · sim").first.wait_for(timeout=30_000)
        assert page.get_by_text("box 2 · GT box").count() == 1
        page.get_by_text("box 2 · GT box").click()
        page.wait_for_timeout(1500)
        assert page.get_by_text(" · sim ").count() >= 10
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert Image.open(shot).size[0] >= 1400
