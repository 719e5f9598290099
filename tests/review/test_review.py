"""`wsi-mil review`: the server serves only the run's slides (no traversal, no label or
macro image), and the page works in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.viz.conftest import source_identity_strings
from wsi_mil.review.server import ReviewSite, make_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(attention_run, tmp_path_factory):
    from wsi_mil.commands.heatmap import HeatmapSettings, run_heatmap

    attention, manifest, made = attention_run
    heatmaps = tmp_path_factory.mktemp("review-heatmaps")
    run_heatmap([attention], out_dir=heatmaps, settings=HeatmapSettings(formats=("tiff", "geojson")),
                slides_manifest=manifest, progress=False)
    # the run's audit (metrics.json beside attention/): cmu-1 a missed positive, the tumour slide a confident hit
    errors = {"false_negatives": [{"id": "cmu-1", "patient_id": "p1", "label": 1, "probability": 0.12, "kind": "FN"}],
              "false_positives": [], "confident_true_negatives": [],
              "confident_true_positives": [{"id": "tumour-slide", "patient_id": "p2", "label": 1, "probability": 0.91,
                                            "kind": "TP"}]}
    (attention.parent / "metrics.json").write_text(json.dumps({"audit": {"evaluation": {"errors": errors}}}))
    site = ReviewSite([attention], slides_manifest=manifest, heatmaps=heatmaps)
    srv = make_server(site, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, made
    srv.shutdown()
    srv.server_close()
    site.close()


def get(srv, raw_path: str) -> tuple[int, bytes, str]:
    """GET with the path sent exactly as given (http.client does not normalise it)."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", raw_path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body, r.getheader("Content-Type") or ""


def test_listens_on_loopback_by_default(server) -> None:
    srv, _ = server
    assert srv.server_address[0] == "127.0.0.1"


def test_serves_the_page_the_viewer_the_slides_and_their_tiles(server) -> None:
    from PIL import Image

    srv, made = server
    status, body, ctype = get(srv, "/")
    assert status == 200 and b"openseadragon.min.js" in body and ctype.startswith("text/html")
    assert get(srv, "/osd/openseadragon.min.js")[0] == 200 and get(srv, "/static/review.js")[0] == 200
    slides = json.loads(get(srv, "/api/slides")[1])["slides"]
    assert {s["slide_id"] for s in slides} == set(made)
    outcome = {s["slide_id"]: (s["outcome"] or {}).get("kind") for s in slides}  # from the run's audit
    assert outcome == {"cmu-1": "FN", "tumour-slide": "TP"}
    info = json.loads(get(srv, "/api/slide/tumour-slide")[1])
    coords, att, _ = made["tumour-slide"]
    assert (info["width"], info["height"]) == (4096, 3072) and info["n_patches"] == len(coords)
    assert info["top"][0]["index"] == int(np.argmax(att)) and len(info["top"]) == 12
    assert info["exports"] == {"tiff": "/exports/tumour-slide/heatmap.tif", "geojson": "/exports/tumour-slide/patches.geojson"}
    assert get(srv, info["exports"]["tiff"])[0] == 200
    dzi = get(srv, "/dzi/tumour-slide.dzi")[1].decode()
    assert 'Width="4096"' in dzi and 'Height="3072"' in dzi
    status, tile, ctype = get(srv, "/dzi/tumour-slide_files/12/0_0.jpeg")
    assert status == 200 and ctype == "image/jpeg" and Image.open(io.BytesIO(tile)).size == (255, 255)
    heat = Image.open(io.BytesIO(get(srv, "/heatmap/tumour-slide.png")[1]))
    assert heat.mode == "RGBA" and heat.width * 256 == pytest.approx(info["heatmap"]["width"])
    assert get(srv, "/dzi/tumour-slide_files/12/99_99.jpeg")[0] == 404


@pytest.mark.parametrize("path", [
    "/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/osd/..%2f..%2f..%2fpackage.json",
    "/osd/../../../../../../etc/hostname", "/../pyproject.toml", "/dzi/..%2f..%2fetc%2fpasswd.dzi",
    "/exports/tumour-slide/..%2fheatmap.json", "/exports/tumour-slide/../../manifest.csv",
    "/heatmap/..%2f..%2ftumour-slide.png", "/api/slide/..%2fcmu-1", "/api/slide/not-a-slide",
    "/dzi/cmu-1_files/../../../../../../etc/passwd", "//etc/passwd", "/static//etc/passwd",
])
def test_path_traversal_and_unknown_paths_are_refused(server, path) -> None:
    srv, _ = server
    status, body, _ = get(srv, path)
    assert status == 404 and body == b"not found\n"


def test_no_label_macro_or_slide_metadata_is_reachable(server, cmu_slide) -> None:
    """Tiles come from the pyramid levels only; nothing of the Aperio description leaks."""
    import openslide

    srv, _ = server
    for path in ("/dzi/cmu-1_files/label.jpeg", "/associated/label", "/label", "/macro", "/api/slide/cmu-1/label"):
        assert get(srv, path)[0] == 404
    info_raw = get(srv, "/api/slide/cmu-1")[1] + get(srv, "/api/slides")[1] + get(srv, "/dzi/cmu-1.dzi")[1]
    for secret in source_identity_strings(cmu_slide):
        assert secret.encode() not in info_raw
    info = json.loads(get(srv, "/api/slide/cmu-1")[1])
    assert not {"label", "macro", "properties", "associated_images"} & set(info)
    # the most zoomed-out-but-one level is the slide's own pixels, not its label or macro
    with openslide.OpenSlide(str(cmu_slide)) as s:
        from openslide.deepzoom import DeepZoomGenerator

        dz = DeepZoomGenerator(s, tile_size=254, overlap=1, limit_bounds=False)
        level = dz.level_count - 3
        expected = np.asarray(dz.get_tile(level, (0, 0)).convert("RGB"), float)
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(get(srv, f"/dzi/cmu-1_files/{level}/0_0.jpeg")[1])).convert("RGB"), float)
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 4  # JPEG re-encoding only


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("WSI_MIL_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
        pytest.skip("no chromium + chromedriver on this machine (CI installs them and requires this test)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _wait(driver, script: str, timeout: float = 30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def test_review_page_in_headless_chromium(server) -> None:
    """The page loads the slide and the overlay, the opacity control works, a click on a
    top patch moves the view onto it, the slide switcher works; screenshots are kept in
    test-artifacts/."""
    from selenium.webdriver.common.by import By

    srv, _ = server
    host, port = srv.server_address[:2]
    artifacts = Path(os.environ.get("WSI_MIL_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    driver = _browser()
    try:
        driver.get(f"http://{host}:{port}/")  # no slide named: the page opens on the most suspicious one
        _wait(driver, "return window.review && review.state.slideLoaded && review.state.overlayLoaded")
        assert driver.execute_script("return review.state.current") == "tumour-slide"
        assert driver.execute_script("return review.viewer.world.getItemCount()") == 2
        assert "prediction: tumour" in driver.find_element(By.ID, "prediction").text
        assert driver.find_element(By.ID, "call").text.startswith("POSITIVE call: tumour")
        driver.save_screenshot(str(artifacts / "review-overview.png"))
        # the overlay really is drawn: the screenshot holds viridis-yellow pixels over the tumour
        from PIL import Image

        shot = np.asarray(Image.open(artifacts / "review-overview.png").convert("RGB")).astype(int)
        yellowish = (shot[..., 0] > 150) & (shot[..., 1] > 150) & (shot[..., 2] < 110)
        assert yellowish.sum() > 200
        # opacity control
        driver.execute_script("const s = document.getElementById('opacity'); s.value = 20;"
                              "s.dispatchEvent(new Event('input'));")
        assert driver.execute_script("return review.state.overlay.getOpacity()") == pytest.approx(0.2)
        zoom0 = driver.execute_script("return review.viewer.viewport.getZoom(true)")
        items = driver.find_elements(By.CSS_SELECTOR, "#top-list li")
        assert len(items) == 12
        items[2].click()
        # the view animates for 0.6 s; wait until the viewport's current and target centres agree
        _wait(driver, "const v = review.viewer.viewport; return review.state.lastPatch === 2 && "
                      "v.getCenter(true).distanceTo(v.getCenter(false)) < 1e-6 && "
                      "Math.abs(v.getZoom(true) - v.getZoom(false)) < 1e-6", timeout=15)
        centre = driver.execute_script("const c = review.viewer.viewport.getCenter(true); return [c.x, c.y]")
        zoom1 = driver.execute_script("return review.viewer.viewport.getZoom(true)")
        info = driver.execute_script("return review.state.info")
        p = info["top"][2]
        assert centre[0] == pytest.approx((p["x"] + p["size"] / 2) / info["width"], abs=0.01)
        assert centre[1] == pytest.approx((p["y"] + p["size"] / 2) / info["width"], abs=0.01)
        # zoomed in onto the patch: the view is a few patches wide and holds the whole patch
        b = driver.execute_script("const b = review.viewer.viewport.getBounds(true); return [b.x, b.y, b.width, b.height]")
        x0, y0, side = p["x"] / info["width"], p["y"] / info["width"], p["size"] / info["width"]
        assert b[0] <= x0 and b[1] <= y0 and x0 + side <= b[0] + b[2] and y0 + side <= b[1] + b[3]
        assert b[2] < 6 * side and zoom1 > 2.5 * zoom0
        driver.save_screenshot(str(artifacts / "review-top-patch.png"))
        # move to the other slide of the run
        driver.find_element(By.ID, "next").click()
        _wait(driver, "return review.state.current !== 'tumour-slide' && review.state.slideLoaded && review.state.overlayLoaded")
        assert driver.execute_script("return review.state.info.slide_id") == "cmu-1"
        # a slide called negative says so above the viewer, and its heatmap starts faint
        assert driver.find_element(By.ID, "call").text.startswith("NEGATIVE call: normal")
        assert driver.execute_script("return review.state.overlay.getOpacity()") < 0.25
        driver.save_screenshot(str(artifacts / "review-negative-slide.png"))
        # the error filter: only the run's false negatives are listed and reviewed
        driver.execute_script("const f = document.getElementById('filter'); f.value = 'FP';"
                              "f.dispatchEvent(new Event('change'));")
        assert driver.execute_script("return review.state.slides.length") == 0
        assert "no slide of this kind" in driver.find_element(By.ID, "slide-select").text
        driver.execute_script("const f = document.getElementById('filter'); f.value = 'FN';"
                              "f.dispatchEvent(new Event('change'));")
        _wait(driver, "return review.state.current === 'cmu-1' && review.state.slideLoaded")
        assert driver.execute_script("return review.state.slides.map(s => s.slide_id)") == ["cmu-1"]
        assert "[FN]" in driver.find_element(By.ID, "slide-select").text and "filter=FN" in driver.current_url
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def test_review_without_the_npm_packages_says_how_to_install_them(attention_run, tmp_path) -> None:
    import subprocess

    from tests.conftest import WSI_MIL

    attention, manifest, _ = attention_run
    env = {**os.environ, "WSI_MIL_OPENSEADRAGON_DIR": str(tmp_path)}
    res = subprocess.run(WSI_MIL + ["review", str(attention), "--slides", str(manifest), "--port", "0"],
                         capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert res.returncode == 2 and "npm ci --prefix wsi_mil/review/web" in res.stderr


def _get_with_host(srv, path: str, host: str | None) -> tuple[int, bytes]:
    h, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(h, port, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def test_only_the_bound_host_names_are_answered(server) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    srv, _ = server
    port = srv.server_address[1]
    for good in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"localhost:{port}", f"[::1]:{port}"):
        assert _get_with_host(srv, "/api/slides", good)[0] == 200, good
    for bad in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "", None):
        status, body = _get_with_host(srv, "/api/slides", bad)
        assert status == 400 and b"slide" not in body, bad


def test_absurd_tile_numbers_get_404_and_no_internals(server) -> None:
    srv, _ = server
    status, body, _ = get(srv, "/dzi/cmu-1_files/" + "9" * 5000 + "/0_0.jpeg")
    assert status == 404 and b"Traceback" not in body and b"int" not in body
    status, body, _ = get(srv, "/dzi/cmu-1_files/3/" + "1" * 40 + "_0.jpeg")
    assert status == 404 and len(body) < 100
