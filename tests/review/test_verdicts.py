"""Verdicts out: the review page saves a reviewer's verdict and drawn regions beside the run
(atomic files, who and when, nothing replaced unless the page asks), refuses writes without the
session's token, from another site's page or naming another host, and what it saved comes back
in: the regions as `tile --annotations` files, the corrected labels as a manifest. The whole
loop is driven in headless Chromium: a region drawn with real clicks on the viewer."""

from __future__ import annotations

import csv
import http.client
import json
import threading
from pathlib import Path

import pytest

from tests.review.test_review import _browser, _wait
from wsi_mil.review.server import ReviewSite, make_server


@pytest.fixture
def served(attention_run, tmp_path):
    attention, manifest, _ = attention_run
    site = ReviewSite([attention], slides_manifest=manifest, review_dir=tmp_path / "review", reviewer="dr-a")
    srv = make_server(site, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, site, tmp_path / "review"
    srv.shutdown()
    srv.server_close()
    site.close()


def _post(srv, path: str, body: object, *, token: str | None, origin: str | None = None, host: str | None = None,
          ctype: str = "application/json") -> tuple[int, dict]:
    h, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(h, port, timeout=30)
    headers = {"Content-Type": ctype, **({"X-Review-Token": token} if token else {}),
               **({"Origin": origin} if origin else {}), **({"Host": host} if host else {})}
    conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, {"text": data.decode()}


def _square(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def test_verdicts_and_regions_are_kept_never_silently_replaced_and_come_back_in(served, attention_run, tmp_path) -> None:
    from wsi_mil.io.annotations import read_annotations

    srv, site, folder = served
    _, port = srv.server_address[:2]
    token = site.token
    ok, saved = _post(srv, "/api/verdict/cmu-1", {"verdict": "disagree", "comment": "lesion at the lower edge",
                                                   "corrected_label": "1"}, token=token)
    assert ok == 200 and saved["saved"]["reviewer"] == "dr-a" and saved["saved"]["time"].endswith("+00:00")
    again, conflict = _post(srv, "/api/verdict/cmu-1", {"verdict": "agree"}, token=token)
    assert again == 409 and conflict["existing"]["verdict"] == "disagree"  # (the page asks before replacing)
    assert _post(srv, "/api/verdict/cmu-1", {"verdict": "agree", "replace": True}, token=token)[0] == 200
    rows = list(csv.DictReader(open(folder / "verdicts.csv")))
    assert [r["verdict"] for r in rows] == ["disagree", "agree"]  # (both kept; the latest counts)
    assert rows[0]["model_prediction"] == site.slides["cmu-1"].attrs["prediction"]
    assert site.review.current("cmu-1")["verdict"] == "agree"

    region = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(500.5, 600.5, 300)]},
              "properties": {"classification": {"name": "Tumor"}}}
    assert _post(srv, "/api/regions/cmu-1", {"features": [region]}, token=token)[0] == 200
    file = folder / "regions" / "cmu-1.geojson"
    ann = read_annotations(file, (2220, 2967))  # (what tile --annotations reads)
    assert ann.classes == ["Tumor"] and ann.regions[0].area() == pytest.approx(300 * 300)
    props = json.loads(file.read_text())["features"][0]["properties"]
    assert props["reviewer"] == "dr-a" and props["objectType"] == "annotation"
    assert _post(srv, "/api/regions/cmu-1", {"features": []}, token=token)[0] == 409
    assert read_annotations(file, (2220, 2967)).classes == ["Tumor"]  # (untouched)

    # refused: no token, a wrong one, another site's page, another host name, not JSON, off the slide, bad values
    for kw, status in (({"token": None}, 403), ({"token": "guess"}, 403),
                       ({"token": token, "origin": "http://evil.example"}, 403),
                       ({"token": token, "host": "evil.example"}, 400),
                       ({"token": token, "ctype": "text/plain"}, 415)):
        assert _post(srv, "/api/verdict/tumour-slide", {"verdict": "agree"}, **kw)[0] == status, kw
    site.slides["tumour-slide"].attrs["prediction"] = 0  # (a run whose classes are coded 0 / 1 calls class 0 so)
    assert _post(srv, "/api/verdict/tumour-slide", {"verdict": "agree"}, token=token,
                 origin=f"http://127.0.0.1:{port}")[0] == 200  # (the page's own origin)
    assert site.review.current("tumour-slide")["model_prediction"] == "0"  # (was blank)
    far = {**region, "geometry": {"type": "Polygon", "coordinates": [_square(2000, 2800, 500)]}}
    status, why = _post(srv, "/api/regions/tumour-slide", {"features": [far]}, token=token)
    assert status == 400 and "outside the slide's" in why["error"]
    wrong = {**region, "properties": {"classification": {"name": "Tumour"}}}
    assert _post(srv, "/api/regions/tumour-slide", {"features": [wrong]}, token=token)[0] == 400
    assert _post(srv, "/api/verdict/tumour-slide", {"verdict": "maybe"}, token=token)[0] == 400
    assert _post(srv, "/api/verdict/../../etc", {"verdict": "agree"}, token=token)[0] == 404
    assert not (folder / "regions" / "tumour-slide.geojson").exists()

    # corrected labels for the next run: the manifest with the latest verdict's label, the change listed
    from wsi_mil.cli import main

    _, manifest, _ = attention_run
    assert _post(srv, "/api/verdict/cmu-1", {"verdict": "disagree", "corrected_label": "1", "replace": True},
                 token=token)[0] == 200
    rows = list(csv.DictReader(open(manifest)))
    assert {r["slide_id"]: r["label"] for r in rows}["cmu-1"] == "0"
    out = tmp_path / "corrected.csv"
    assert main(["review", str(folder.parent), "--review-dir", str(folder), "--apply-verdicts", str(manifest),
                 str(out)]) == 0
    fixed = {r["slide_id"]: r["label"] for r in csv.DictReader(open(out))}
    assert fixed["cmu-1"] == "1" and fixed["tumour-slide"] == {r["slide_id"]: r["label"] for r in rows}["tumour-slide"]
    changes = list(csv.DictReader(open(tmp_path / "corrected.changes.csv")))
    assert [(c["slide_id"], c["was"], c["now"], c["reviewer"]) for c in changes] == [("cmu-1", "0", "1", "dr-a")]


def test_a_region_drawn_in_the_browser_and_a_verdict_are_saved_and_read_back(served) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from wsi_mil.io.annotations import read_annotations

    srv, _, folder = served
    host, port = srv.server_address[:2]
    driver = _browser()
    try:
        driver.get(f"http://{host}:{port}/#slide=cmu-1")
        _wait(driver, "return window.review && review.state.current === 'cmu-1' && review.state.slideLoaded "
                      "&& review.state.review && document.getElementById('verdict-status').textContent")
        driver.find_element(By.CSS_SELECTOR, "input[name=verdict][value=uncertain]").click()
        driver.find_element(By.ID, "comment").send_keys("stain too pale to call")
        driver.find_element(By.ID, "save-verdict").click()
        _wait(driver, "return document.getElementById('verdict-status').textContent.startsWith('saved uncertain')")
        # draw a triangle with three real clicks on the viewer, then Finish
        driver.find_element(By.ID, "draw").click()
        canvas = driver.find_element(By.CSS_SELECTOR, "#viewer .openseadragon-canvas")
        offsets = [(-120, -80), (100, -60), (0, 110)]
        for dx, dy in offsets:
            ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).click().perform()
        _wait(driver, "return review.state.drawing && review.state.drawing.points.length === 3")
        expected = driver.execute_script(
            "const r = document.querySelector('#viewer .openseadragon-canvas').getBoundingClientRect();"
            "return arguments[0].map(([dx, dy]) => { const p = review.viewer.world.getItemAt(0).viewerElementToImageCoordinates("
            "new OpenSeadragon.Point(r.width / 2 + dx, r.height / 2 + dy)); return [p.x, p.y]; });", offsets)
        driver.find_element(By.ID, "finish").click()
        assert driver.execute_script("return review.state.regions.length") == 1
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.regions-svg polygon")) == 1  # (drawn over the slide)
        driver.find_element(By.ID, "save-regions").click()
        _wait(driver, "return document.getElementById('region-status').textContent === '1 region(s) saved'")
        ann = read_annotations(folder / "regions" / "cmu-1.geojson", (2220, 2967))
        assert ann.classes == ["Tumor"]
        got = ann.regions[0].exterior
        assert got.shape == (3, 2) and abs(got - expected).max() < 3.0, (got, expected)  # (where the clicks were)
        # a second save of the verdict asks first: dismissed, the first verdict stands
        driver.find_element(By.CSS_SELECTOR, "input[name=verdict][value=agree]").click()
        driver.find_element(By.ID, "save-verdict").click()
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        alert = WebDriverWait(driver, 10).until(expected_conditions.alert_is_present())
        assert "Replace it?" in alert.text
        alert.dismiss()
        _wait(driver, "return document.getElementById('verdict-status').textContent.startsWith('not saved')")
        rows = list(csv.DictReader(open(folder / "verdicts.csv")))
        assert [(r["slide_id"], r["verdict"], r["comment"]) for r in rows] == [("cmu-1", "uncertain", "stain too pale to call")]
        # reloading the page shows what was saved
        driver.refresh()
        _wait(driver, "return window.review && review.state.current === 'cmu-1' && review.state.regions.length === 1")
        assert driver.execute_script("return document.querySelector('input[name=verdict]:checked').value") == "uncertain"
        # (the 409 that made the page ask is the protocol, logged by the browser as a failed load: nothing else)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
                  and "/api/verdict/cmu-1 - Failed to load resource: the server responded with a status of 409"
                  not in e["message"]]
        assert not errors, errors
    finally:
        driver.quit()


def test_what_a_stranger_fed_the_review_loop_is_kept_true(attention_run, tmp_path) -> None:
    """A call of class 0 is recorded as 0 (was blank); a corrected label outside the run's classes is refused at
    the page and at --apply-verdicts (was written into the manifest); the corrected manifest's relative paths
    still find the slides from another folder (were copied as they were); text coordinates are refused and
    numbers are written (text was saved); a comment that a spreadsheet would run as a formula is quoted."""
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.errors import ManifestError
    from wsi_mil.review.verdicts import ReviewStore, corrected_manifest

    store = ReviewStore(tmp_path / "review", "dr-b", ["normal", "tumour"])
    row = store.save_verdict("s1", {"verdict": "agree", "comment": "=HYPERLINK(1)"}, "0")
    assert row["model_prediction"] == "0" and row["comment"] == "'=HYPERLINK(1)"
    with pytest.raises(ValueError, match="'banana' is not one of the run's labels"):
        store.save_verdict("s2", {"verdict": "disagree", "corrected_label": "banana"}, "1")
    with pytest.raises(ValueError, match="a coordinate is not a number"):
        store.save_regions("s1", {"features": [{"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                                                "geometry": {"type": "Polygon",
                                                             "coordinates": [[["1", "1"], ["5", "5"], ["9", "1"]]]}}]},
                           (100, 100))
    saved = store.save_regions("s1", {"features": [{"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
                                                    "geometry": {"type": "Polygon",
                                                                 "coordinates": [[[1, 1], [5, 5], [9, 1]]]}}]}, (100, 100))
    assert saved[0]["geometry"]["coordinates"] == [[[1.0, 1.0], [5.0, 5.0], [9.0, 1.0], [1.0, 1.0]]]

    _, manifest, _ = attention_run
    rows = list(csv.DictReader(open(manifest)))
    local = tmp_path / "cohort" / "manifest.csv"  # (a manifest with relative paths, as users keep them)
    local.parent.mkdir()
    for r in rows:
        target = local.parent / Path(r["path"]).name
        if not target.exists():
            target.symlink_to(Path(r["path"]))
    with open(local, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "path": Path(r["path"]).name} for r in rows])
    verdicts = tmp_path / "verdicts.csv"
    values = sorted({r["label"] for r in rows})
    other = {r["slide_id"]: next(v for v in values if v != r["label"]) for r in rows}
    verdicts.write_text("slide_id,reviewer,verdict,corrected_label,comment,model_prediction,time\n"
                        f"cmu-1,dr-a,disagree,{other['cmu-1']},,,2026-12-07T10:00:00+00:00\n")
    out = tmp_path / "elsewhere" / "corrected.csv"
    out.parent.mkdir()
    assert len(corrected_manifest(local, verdicts, out)) == 1
    assert all(e.path is not None and e.path.exists() for e in read_manifest(out))  # (found from its own folder)
    verdicts.write_text(verdicts.read_text().replace(f",{other['cmu-1']},", ",banana,"))
    with pytest.raises(ManifestError, match="corrected its label to 'banana', which is not a value of 'label'"):
        corrected_manifest(local, verdicts, out)
