"""The Gradio page, started for real on a free loopback port and driven from outside."""

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from cbir.retrieval.index import IndexConfig, build_index
from conftest import MINI, MOBILENET, SSD, SSD_LABELS, predict as _predict, serve_page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CARDINAL = sorted((MINI / "images" / "017.Cardinal").glob("*.jpg"))[0]
# a test photo of each class in which the SSD sees one bird at score >= 0.5 (its other boxes score below)
BUNTING = MINI / "images" / "014.Indigo_Bunting" / "Indigo_Bunting_0028_12335.jpg"


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


def test_non_image_and_tiny_photos_get_a_plain_message(server, tmp_path):
    url, _ = server
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a photo")
    tiny = tmp_path / "dot.png"
    Image.new("RGB", (1, 1)).save(tiny)
    for path, message in [(bad, "notes.png is not a photo this page can read"), (tiny, "dot.png is 1×1 px: too small")]:
        boxed, latency, choice, gallery, _ = _predict(url, path)
        assert message in latency and "Traceback" not in latency and "PIL" not in latency
        assert boxed is None and gallery == [] and choice["choices"] == []


def test_a_gallery_photo_finds_itself_and_says_so(server):
    url, _ = server
    _, latency, _, gallery, _ = _predict(url, CARDINAL, k=10)
    assert "of the gallery: it finds itself" in latency
    itself = [g["caption"] for g in gallery if g["caption"].startswith("itself: ")]
    assert len(itself) == 1 and itself[0].startswith("itself: Cardinal · sim ")


def test_the_page_serves_no_dataset_file(server):
    url, run = server
    for path in (CARDINAL, run / "dataset" / "images.parquet", Path("/etc/hostname")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=10)
        assert e.value.code in (403, 404), path


def not_a_photo(folder: Path) -> Path:
    path = folder / "notes.jpg"
    path.write_text("meeting notes, not a photo\n" * 100)
    return path


def upload_and_search(page, path: Path) -> None:
    """What a person does: clear the photo box (×) if it holds one, choose a file, press Search."""
    clear = page.get_by_role("button", name="Clear")
    if clear.count():
        clear.first.click()
        page.wait_for_timeout(500)
    page.locator("input[type=file]").first.set_input_files(str(path))
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Search").click()


@pytest.mark.browser
def test_page_in_headless_chromium(server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    url, _ = server
    shot = tmp_path / "ui.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Search").wait_for(timeout=60_000)
        upload_and_search(page, CARDINAL)
        page.get_by_text("query latency").wait_for(timeout=60_000)
        page.get_by_text("Cardinal · sim").first.wait_for(timeout=30_000)
        assert page.get_by_text("box 2 · GT box").count() == 1
        page.get_by_text("box 2 · GT box").click()
        page.wait_for_timeout(1500)
        assert page.get_by_text(" · sim ").count() >= 10
        page.screenshot(path=str(shot), full_page=True)
        upload_and_search(page, not_a_photo(tmp_path))
        page.get_by_text("notes.jpg is not a photo this page can read").wait_for(timeout=30_000)
        big = tmp_path / "big.jpg"  # over the page's 50 MB cap: refused at upload, before the model sees it
        big.write_bytes(CARDINAL.read_bytes() + bytes(51 * 2 ** 20))
        page.locator("input[type=file]").first.set_input_files(str(big))
        page.get_by_text('exceed the maximum allowed size of 50.0 Mb: "big.jpg"').wait_for(timeout=30_000)
        assert page.get_by_text("Traceback").count() == 0
        browser.close()
    assert Image.open(shot).size[0] >= 1400


@pytest.fixture(scope="module")
def detector_server(mini_run, tmp_path_factory):
    """The mini sample boxed by the real COCO-trained ONNX SSD (birds, score >= 0.5), served with it in the loop."""
    pytest.importorskip("onnxruntime")
    from cbir.detection.stage import DetectConfig, detect
    from cbir.encoders.stage import EmbedConfig, embed

    run = tmp_path_factory.mktemp("ui-detector") / "run"
    shutil.copytree(mini_run, run, symlinks=True)
    detect(DetectConfig(run=run, detector=f"onnx:{SSD}", labels=str(SSD_LABELS), categories=("bird",), score=0.5,
                        workers=0, force=True))
    embed(EmbedConfig(run=run, mode="det", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0))
    build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    with serve_page(run, "det", detector="run") as url:
        yield url, run


def collage(folder: Path, left: Path, right: Path) -> Path:
    """Two CUB photos side by side: one upload, two birds."""
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    canvas = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), "white")
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    path = folder / "two_birds.jpg"
    canvas.save(path, quality=92)
    return path


def test_a_detector_in_the_loop_boxes_each_bird_of_a_new_photo(detector_server, tmp_path):
    url, _ = detector_server
    for path, birds in [(CARDINAL, 1), (collage(tmp_path, CARDINAL, BUNTING), 2)]:
        _, latency, choice, gallery, merged = _predict(url, path, k=5, score=0.5)  # the run's own threshold, the page default
        names = [c[0] for c in choice["choices"]]
        assert len(names) == birds and all(" · score " in n for n in names), names
        assert len(gallery) == 5 and "boxes from onnx (coco_ssd_mobilenet_v1_quant.onnx)" in _page_text(url)


def _page_text(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


@pytest.mark.browser
def test_page_with_a_detector_in_headless_chromium(detector_server, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    url, _ = detector_server
    shot = Path(os.environ.get("CBIR_UI_SCREENSHOT", tmp_path / "ui.png"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("button", name="Search").wait_for(timeout=60_000)
        page.get_by_text("boxes from onnx (coco_ssd_mobilenet_v1_quant.onnx)").first.wait_for(timeout=30_000)
        upload_and_search(page, CARDINAL)
        page.get_by_text("box 1 · score").wait_for(timeout=60_000)
        page.get_by_text("Cardinal · sim").first.wait_for(timeout=30_000)
        assert page.get_by_text("box 2 · ").count() == 0
        upload_and_search(page, collage(tmp_path, CARDINAL, BUNTING))
        page.get_by_text("box 2 · score").wait_for(timeout=60_000)
        assert page.get_by_text("box 3 · ").count() == 0 and page.get_by_text("box 1 · score").count() == 1
        page.get_by_text("box 2 · score").click()
        page.wait_for_timeout(1500)
        assert page.get_by_text(" · sim ").count() >= 10  # each box's neighbours, and the merged table
        page.screenshot(path=str(shot), full_page=True)
        assert page.get_by_text("Traceback").count() == 0
        browser.close()
    assert Image.open(shot).size[0] >= 1400


def test_a_page_beyond_loopback_warns_and_a_bad_login_is_refused(monkeypatch, caplog, tmp_path):
    from cbir import CbirError
    from cbir.ui import app

    def stop(*args, **kwargs):
        raise CbirError("stopped before loading")
    monkeypatch.setattr(app, "Querier", stop)
    monkeypatch.delenv(app.AUTH_VARIABLE, raising=False)
    with pytest.raises(CbirError, match="stopped"):
        app.serve(tmp_path, "det", host="0.0.0.0")
    assert "reachable from other machines" in caplog.text and "--auth USER:PASS" in caplog.text
    with pytest.raises(CbirError, match="USER:PASS"):
        app.serve(tmp_path, "det", auth="nopassword")
    assert app.parse_auth("ann:s3cret") == ("ann", "s3cret")
    monkeypatch.setenv(app.AUTH_VARIABLE, "bob:pw")
    assert app.parse_auth(None) == ("bob", "pw")


def test_neighbour_cards_are_written_once_and_bounded(tmp_path):
    from cbir.ui.app import CardFiles

    photos = sorted(MINI.rglob("*.jpg"))[:2]
    cards = CardFiles(tmp_path, limit=2)
    first = cards(photos[0], (10.0, 10.0, 50.0, 40.0), "gt", 1)
    written = Path(first).stat().st_mtime_ns
    assert cards(photos[0], (10.0, 10.0, 50.0, 40.0), "gt", 1) == first  # a recurring card is not redrawn
    assert Path(first).stat().st_mtime_ns == written
    assert cards(photos[0], (12.0, 10.0, 50.0, 40.0), "gt", 1) != first  # another box is another card
    with Image.open(first) as card:
        assert max(card.size) <= 320
    cards(photos[1], (0.0, 0.0, 30.0, 30.0), "detected", 2)  # a third card: the least recently shown goes
    assert not Path(first).exists()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".jpg", ".jpg"]  # no staged leftovers
