"""Annotations in: QuPath GeoJSON and ASAP XML (CAMELYON layout) written by hand for the real
CMU-1-Small-Region slide (2220 x 2967 level-0 pixels), read as regions and rasterised; the
masks checked pixel for pixel against matplotlib's point-in-polygon test of each grid pixel's
centre (an independent implementation), bad files refused naming the file and the feature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from wsi_mil.io.annotations import AnnotationError, read_annotations


@pytest.fixture(scope="module")
def size(cmu_slide: Path) -> tuple[int, int]:
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as s:
        return tuple(s.dimensions)  # type: ignore[return-value]


def _square(x: float, y: float, s: float) -> list[list[float]]:
    return [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]


def _inside(rings: list[list[list[float]]], shape: tuple[int, int], ds: float) -> np.ndarray:
    """Grid pixels whose centre lies in the first ring and in none of the others (matplotlib)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.c_[(xx.ravel() + 0.5) * ds, (yy.ravel() + 0.5) * ds]
    inside = MplPath(np.asarray(rings[0])).contains_points(centres)
    for hole in rings[1:]:
        inside &= ~MplPath(np.asarray(hole)).contains_points(centres)
    return inside.reshape(shape)


def test_qupath_geojson_with_holes_multipolygons_and_the_slide_edge(size, tmp_path) -> None:
    w, h = size
    tumour = [[[300.3, 400.7], [1500.1, 450.2], [1300.6, 1700.9], [350.2, 1500.4], [300.3, 400.7]],
              [[700.3, 800.1], [1000.7, 800.1], [1000.7, 1100.9], [700.3, 1100.9], [700.3, 800.1]]]  # a hole
    pen = [[_square(1800.2, 2500.6, 300.5)], [[[2000.1, 100.3], [w, 100.3], [w, 600.2], [2000.1, 600.2]]]]  # at the edge
    doc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": tumour},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": pen},
         "properties": {"objectType": "annotation", "name": "marker", "classification": {"name": "Pen"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(100.5, 2800.5, 150.0)]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [500, 500]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0.5, 0.5, 64.0)]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}},
    ]}
    path = tmp_path / "slide.geojson"
    path.write_text(json.dumps(doc))
    ann = read_annotations(path, size)
    assert ann.classes == ["Pen", "Tumor", "unclassified"]
    assert [r.cls for r in ann.regions] == ["Tumor", "Pen", "Pen", "unclassified"]
    assert ann.skipped == {"Point geometries": 1, "detection objects": 1}
    assert len(ann.regions[0].holes) == 1 and "marker" in ann.regions[1].source
    ds = 4.0
    shape = (int(np.ceil(h / ds)), int(np.ceil(w / ds)))
    got = ann.mask(["Tumor"], shape, (ds, ds))
    np.testing.assert_array_equal(got, _inside(tumour, shape, ds))
    pen_mask = ann.mask(["Pen"], shape, (ds, ds))
    want = _inside(pen[0], shape, ds) | _inside([[[2000.1, 100.3], [w + 1e-6, 100.3], [w + 1e-6, 600.2], [2000.1, 600.2]]],
                                                shape, ds)
    np.testing.assert_array_equal(pen_mask, want)
    assert pen_mask[:, -1].any()  # (the region reaching the slide's edge covers its last column)
    both = ann.mask(["Tumor", "Pen"], shape, (ds, ds))
    assert both.sum() == got.sum() + pen_mask.sum()
    # the area: the shoelace formula, the hole subtracted, against the grid's count
    assert ann.regions[0].area() == pytest.approx(got.sum() * ds * ds, rel=0.01)
    summary = ann.summary()
    assert summary["regions"] == {"Pen": 2, "Tumor": 1, "unclassified": 1} and len(summary["sha256"]) == 64


def test_asap_xml_in_the_camelyon_layout_cuts_the_normal_islands_out_of_the_tumour(size, tmp_path) -> None:
    outline = [[400.25, 300.5], [1600.75, 350.5], [1700.5, 1900.25], [500.5, 2000.75]]
    island = [[800.5, 800.25], [1200.5, 800.25], [1200.5, 1300.75], [800.5, 1300.75]]
    second = [[1800.5, 2300.5], [2100.5, 2300.5], [2100.5, 2700.5]]

    def annotation(name: str, group: str, pts: list[list[float]], comma: bool = False) -> str:
        order = list(range(len(pts)))[::-1]  # (written out of order: Order says which comes first)
        coords = "".join(
            f'<Coordinate Order="{i}" X="{str(pts[i][0]).replace(".", ",") if comma else pts[i][0]}" Y="{pts[i][1]}" />'
            for i in order)
        return (f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
                f"<Coordinates>{coords}</Coordinates></Annotation>")

    xml = ('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
           + annotation("Annotation 0", "_0", outline) + annotation("Annotation 1", "_2", island)
           + annotation("Annotation 2", "_1", second, comma=True)
           + '<Annotation Name="dot" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="5" Y="5"/>'
           "</Coordinates></Annotation>"
           + '</Annotations><AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"/></AnnotationGroups>'
           "</ASAP_Annotations>")
    path = tmp_path / "tumor_001.xml"
    path.write_text(xml)
    ann = read_annotations(path, size)
    assert ann.classes == ["Tumor"] and len(ann.regions) == 2 and ann.skipped == {"Dot annotations": 1}
    np.testing.assert_allclose(ann.regions[1].exterior, second)  # (the decimal comma read as a point)
    ds = 8.0
    shape = (int(np.ceil(size[1] / ds)), int(np.ceil(size[0] / ds)))
    want = _inside([outline + outline[:1], island], shape, ds) | _inside([second], shape, ds)
    np.testing.assert_array_equal(ann.mask(["Tumor"], shape, (ds, ds)), want)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("outside.geojson", json.dumps({"type": "Feature", "properties": {"name": "far"}, "geometry": {
        "type": "Polygon", "coordinates": [_square(2000, 2900, 400)]}}),
     r"outside.geojson, feature 0 \('far'\), ring 0: the region spans x 2000 to 2400, y 2900 to 3300, outside the "
     r"slide's 2220 x 2967 level-0 pixels.*another level or scale"),
    ("broken.geojson", '{"type": "FeatureCollection", "features": [', r"broken.geojson: not valid JSON"),
    ("line.geojson", json.dumps([{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[10, 10], [20, 20], [10, 10]]]}}]),
     r"line.geojson, feature 0, ring 0: a region needs three points or more"),
    ("circle.geojson", json.dumps([{"type": "Feature", "properties": {}, "geometry": {"type": "Circle"}}]),
     r"circle.geojson, feature 0: geometry type 'Circle' is not a GeoJSON geometry"),
    ("noname.geojson", json.dumps([{"type": "Feature", "properties": {"classification": {"color": [1, 2, 3]}},
                                    "geometry": {"type": "Polygon", "coordinates": [_square(1, 1, 9)]}}]),
     r"noname.geojson, feature 0: classification .* has no name"),
    ("nan.geojson", '[{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": '
                    '[[[1, 1], [NaN, 5], [9, 9], [1, 1]]]}}]', r"nan.geojson, feature 0, ring 0: a coordinate is not a finite"),
    ("other.xml", "<Annotations><Annotation/></Annotations>", r"other.xml: an XML file whose root is <Annotations>"),
    ("bad.xml", '<ASAP_Annotations><Annotations><Annotation Name="A1" Type="Polygon" PartOfGroup="Tumor"><Coordinates>'
                '<Coordinate Order="0" X="12a" Y="3"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
     r"bad.xml, annotation 'A1': coordinate '12a' is not a number"),
    ("notes.txt", "tumour in the upper left", r"notes.txt: neither GeoJSON .* nor ASAP XML"),
])
def test_a_bad_annotation_file_is_refused_naming_the_file_and_the_feature(size, tmp_path, name, text, message) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_annotations(path, size)
