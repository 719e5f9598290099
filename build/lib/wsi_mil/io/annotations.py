"""Regions a pathologist drew on a slide: QuPath GeoJSON and ASAP XML, in level-0 pixels.

- **QuPath GeoJSON** (File › Export objects as GeoJSON, or a script's ``exportObjectsToGeoJson``):
  a FeatureCollection, a list of Features, one Feature or a bare geometry. Polygons and
  MultiPolygons are regions, their inner rings holes; a feature's class is
  ``properties.classification.name`` (QuPath 0.2 and later; a plain string is read too),
  ``unclassified`` when it has none. Objects that are not annotations (``objectType``
  detection, tile, cell: a classifier's output, or wsi-mil's own heatmap export) and
  geometries that enclose no area (points, lines) are left out and counted.
- **ASAP XML** (``ASAP_Annotations`` / ``Annotations`` / ``Annotation`` with ``Coordinates``),
  the CAMELYON16 / 17 layout: an annotation's class is its ``PartOfGroup``; Polygon,
  Rectangle and Spline annotations are regions (a spline by its control points), Dot and
  PointSet are left out and counted. In the CAMELYON layout the groups ``_0`` and ``_1`` are
  tumour and ``_2`` marks normal tissue inside a tumour outline: they are read as the class
  ``Tumor`` with the ``_2`` regions cut out of it.

Every vertex is checked against the slide's size (a region drawn on another slide, or
exported at another level, lands outside it): a file that cannot be read, a ring of fewer
than three points, a coordinate that is not a finite number or lies outside the slide is
an :class:`AnnotationError` naming the file and the feature; nothing is guessed."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil.errors import SlideError

UNCLASSIFIED = "unclassified"
TUMOUR = "Tumor"
#: CAMELYON16 / 17 ASAP groups: tumour outlines, and normal tissue inside them (cut out)
CAMELYON_TUMOUR_GROUPS = ("_0", "_1")
CAMELYON_EXCLUDED_GROUP = "_2"
#: a vertex this far beyond the slide's edge (level-0 pixels) is still on it (drawing tools snap to the border)
EDGE_TOLERANCE_PX = 1.0
SUFFIXES = (".geojson", ".json", ".xml")


class AnnotationError(SlideError):
    """An annotation file that cannot be read as regions of its slide (the batch continues past it)."""


@dataclass(frozen=True)
class Region:
    """One drawn region: its class, outer ring and holes ((n, 2) x, y level-0 pixels) and where it came from."""

    cls: str
    exterior: npt.NDArray[np.float64]
    holes: tuple[npt.NDArray[np.float64], ...] = ()
    source: str = ""

    def area(self) -> float:
        """Area in level-0 square pixels (the shoelace formula; holes subtracted)."""
        return _ring_area(self.exterior) - sum(_ring_area(h) for h in self.holes)


@dataclass
class Annotations:
    """The regions of one slide's annotation file."""

    path: Path
    regions: list[Region]
    skipped: dict[str, int] = field(default_factory=dict)  # what was left out, by kind
    #: regions cut out of a class (CAMELYON's ``_2``: normal tissue inside a tumour outline), by class
    cutouts: dict[str, list[Region]] = field(default_factory=dict)
    #: SHA-256 of the bytes the regions were read from (recorded as provenance)
    digest: str = ""

    @property
    def classes(self) -> list[str]:
        return sorted({r.cls for r in self.regions})

    def summary(self) -> dict[str, Any]:
        """What provenance records: the file, its hash, its classes and region counts."""
        counts = {c: sum(r.cls == c for r in self.regions) for c in self.classes}
        return {"file": self.path.name, "sha256": self.digest, "regions": counts,
                **({"left_out": dict(self.skipped)} if self.skipped else {})}

    def mask(self, classes: list[str] | tuple[str, ...], shape: tuple[int, int],
             downsample: tuple[float, float]) -> npt.NDArray[np.bool_]:
        """The union of the regions of ``classes`` (holes and cut-outs removed) on a grid of ``shape``
        (rows, columns) whose pixel covers ``downsample`` (x, y) level-0 pixels; a grid pixel is in
        when its centre is."""
        out = np.zeros(shape, bool)
        for c in classes:
            for r in self.regions:
                if r.cls == c:
                    out |= _fill(r, shape, downsample)
            for r in self.cutouts.get(c, []):
                out &= ~_fill(r, shape, downsample)
        return out


def _ring_area(ring: npt.NDArray[np.float64]) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _fill(region: Region, shape: tuple[int, int], downsample: tuple[float, float]) -> npt.NDArray[np.bool_]:
    from skimage.draw import polygon

    def rc(ring: npt.NDArray[np.float64]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        # (a grid pixel's centre is at (i + 0.5) * downsample in level-0 pixels)
        rr, cc = polygon(ring[:, 1] / downsample[1] - 0.5, ring[:, 0] / downsample[0] - 0.5, shape)
        return rr, cc

    m = np.zeros(shape, bool)
    m[rc(region.exterior)] = True
    for h in region.holes:
        m[rc(h)] = False
    return m


def _number(text: str, where: str) -> float:
    """A coordinate: a number, a decimal comma read as a point (ASAP files saved in such locales)."""
    t = text.strip()
    if "," in t and "." not in t and t.count(",") == 1:
        t = t.replace(",", ".")
    try:
        v = float(t)
    except ValueError:
        raise AnnotationError(f"{where}: coordinate {text!r} is not a number") from None
    if not math.isfinite(v):
        raise AnnotationError(f"{where}: coordinate {text!r} is not a finite number")
    return v


def _ring(points: Any, where: str, size: tuple[int, int]) -> npt.NDArray[np.float64]:
    """An (n, 2) ring, checked: a list of [x, y] pairs, at least three distinct points, on the slide."""
    if not isinstance(points, list) or not all(isinstance(p, list | tuple) and len(p) >= 2 for p in points):
        raise AnnotationError(f"{where}: a ring is a list of [x, y] pairs; found {str(points)[:80]}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for p in points for v in p[:2]):
        raise AnnotationError(f"{where}: a coordinate is not a number ({str(points)[:80]}): GeoJSON coordinates are "
                              "numbers, not text")
    ring = np.asarray([[float(p[0]), float(p[1])] for p in points], np.float64)
    return _checked(ring, where, size)


def _checked(ring: npt.NDArray[np.float64], where: str, size: tuple[int, int]) -> npt.NDArray[np.float64]:
    if not np.isfinite(ring).all():
        raise AnnotationError(f"{where}: a coordinate is not a finite number")
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]  # (GeoJSON closes its rings; the fill does not need it)
    if len(np.unique(ring, axis=0)) < 3:
        raise AnnotationError(f"{where}: a region needs three points or more; this ring has {len(ring)}")
    w, h = size
    low, high = ring.min(axis=0), ring.max(axis=0)
    if (low < -EDGE_TOLERANCE_PX).any() or high[0] > w + EDGE_TOLERANCE_PX or high[1] > h + EDGE_TOLERANCE_PX:
        raise AnnotationError(
            f"{where}: the region spans x {low[0]:.0f} to {high[0]:.0f}, y {low[1]:.0f} to {high[1]:.0f}, outside the "
            f"slide's {w} x {h} level-0 pixels. Annotations must be in level-0 pixels of this slide: was it drawn on "
            "another slide, or exported at another level or scale?")
    return np.clip(ring, 0, [w, h])


def read_annotations(path: str | Path, size: tuple[int, int]) -> Annotations:
    """The regions of a QuPath GeoJSON or ASAP XML file drawn on a slide of ``size`` (width, height)
    level-0 pixels (see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read the annotation file ({exc.strerror or exc})") from None
    head = data.lstrip()[:1]
    if path.suffix.lower() == ".xml" or head == b"<":
        return _read_asap(path, data, size)
    if head in (b"{", b"["):
        return read_geojson(path, data, size)
    raise AnnotationError(f"{path}: neither GeoJSON (QuPath's export) nor ASAP XML; export the annotations from "
                          "QuPath as GeoJSON (File > Export objects as GeoJSON) or save them from ASAP")


# ---- QuPath GeoJSON

def read_geojson(path: Path, data: bytes, size: tuple[int, int]) -> Annotations:
    """The regions of GeoJSON ``data`` (``path`` names it in messages; see the module docstring)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: a FeatureCollection without a 'features' list")
    elif isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and "coordinates" in doc:
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise AnnotationError(f"{path}: no GeoJSON features (a FeatureCollection, a list of Features or a Feature)")
    out = Annotations(path, [], digest=hashlib.sha256(data).hexdigest())
    for i, f in enumerate(features):
        where = f"{path.name}, feature {i}"
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise AnnotationError(f"{where}: not a GeoJSON Feature ({str(f)[:80]})")
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{where}: 'properties' is not an object")
        name = props.get("name")
        if isinstance(name, str) and name.strip():
            where += f" ({name.strip()!r})"
        kind = props.get("objectType", "annotation")
        if kind not in ("annotation", None):
            out.skipped[f"{kind} objects"] = out.skipped.get(f"{kind} objects", 0) + 1
            continue
        cls = _qupath_class(props.get("classification"), where)
        for polygon in _polygons(f.get("geometry"), where, out):
            rings = [_ring(r, f"{where}, ring {k}", size) for k, r in enumerate(polygon)]
            out.regions.append(Region(cls, rings[0], tuple(rings[1:]), where))
    return out


def _qupath_class(value: Any, where: str) -> str:
    if value is None:
        return UNCLASSIFIED
    if isinstance(value, str):
        return value.strip() or UNCLASSIFIED
    if isinstance(value, dict):
        name = value.get("name")
        if isinstance(name, str) and name.strip():
            return name.strip()
        names = value.get("names")  # (QuPath 0.5's derived classes: a list of names)
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(n.strip() for n in names)
    raise AnnotationError(f"{where}: classification {str(value)[:80]} has no name")


def _polygons(geometry: Any, where: str, out: Annotations) -> list[list[Any]]:
    """The polygons (lists of rings) of a geometry; what encloses no area is counted in ``out.skipped``."""
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise AnnotationError(f"{where}: no geometry")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _polygons(g, where, out)]
    coords = geometry.get("coordinates")
    if kind == "Polygon":
        if not isinstance(coords, list) or not coords:
            raise AnnotationError(f"{where}: a Polygon without rings")
        return [coords]
    if kind == "MultiPolygon":
        if not isinstance(coords, list) or not coords or not all(isinstance(p, list) and p for p in coords):
            raise AnnotationError(f"{where}: a MultiPolygon without polygons")
        return list(coords)
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        out.skipped[f"{kind} geometries"] = out.skipped.get(f"{kind} geometries", 0) + 1
        return []
    raise AnnotationError(f"{where}: geometry type {kind!r} is not a GeoJSON geometry")


# ---- ASAP XML

def _read_asap(path: Path, data: bytes, size: tuple[int, int]) -> Annotations:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: not valid XML ({exc})") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: an XML file whose root is <{root.tag}>, not ASAP's <ASAP_Annotations>")
    out = Annotations(path, [], digest=hashlib.sha256(data).hexdigest())
    items = root.findall("./Annotations/Annotation")
    groups = {(a.get("PartOfGroup") or "").strip() for a in items}
    numbered = {*CAMELYON_TUMOUR_GROUPS, CAMELYON_EXCLUDED_GROUP}
    camelyon = bool(groups & numbered) and groups <= numbered | {TUMOUR}
    for i, a in enumerate(items):
        name = a.get("Name") or f"#{i}"
        where = f"{path.name}, annotation {name!r}"
        kind = (a.get("Type") or "Polygon").strip()
        if kind in ("Dot", "PointSet", "Measurement"):
            out.skipped[f"{kind} annotations"] = out.skipped.get(f"{kind} annotations", 0) + 1
            continue
        if kind not in ("Polygon", "Rectangle", "Spline"):
            raise AnnotationError(f"{where}: type {kind!r} is not one ASAP draws (Polygon, Rectangle, Spline, Dot, "
                                  "PointSet)")
        points: list[tuple[int, float, float]] = []
        for c in a.findall("./Coordinates/Coordinate"):
            x, y = c.get("X"), c.get("Y")
            if x is None or y is None:
                raise AnnotationError(f"{where}: a Coordinate without X or Y")
            order = c.get("Order")
            points.append((int(order) if order is not None and order.strip().isdigit() else len(points),
                           _number(x, where), _number(y, where)))
        if not points:
            raise AnnotationError(f"{where}: no Coordinates")
        points.sort(key=lambda p: p[0])
        ring = _checked(np.asarray([[p[1], p[2]] for p in points], np.float64), where, size)
        group = (a.get("PartOfGroup") or "").strip()
        group = UNCLASSIFIED if group in ("", "None") else group  # (ASAP writes None for an annotation in no group)
        if camelyon and group == CAMELYON_EXCLUDED_GROUP:
            out.cutouts.setdefault(TUMOUR, []).append(Region(TUMOUR, ring, (), where))
            continue
        out.regions.append(Region(TUMOUR if camelyon else group, ring, (), where))
    return out


# ---- regions out

def mask_features(mask: npt.NDArray[np.bool_], downsample: float, cls: str,
                  properties: dict[str, Any] | None = None, size: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """QuPath GeoJSON annotation Features (level-0 pixels) of a binary mask whose pixel covers
    ``downsample`` level-0 pixels: one Polygon per connected piece, its holes as inner rings
    (OpenCV's two-level contours, traced through the centres of the edge pixels at twice the
    resolution: each ring lies a quarter of a mask pixel inside the pixels' outer edges). ``size``
    (the slide's width, height) clips the rings to the slide: a mask whose last row or column
    reaches past its edge (the grid rounded up) draws nothing outside it."""
    import cv2

    grown = cv2.resize(np.ascontiguousarray(mask, np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(grown, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    features: list[dict[str, Any]] = []
    if hierarchy is None:
        return features

    def ring(c: npt.NDArray[Any]) -> list[list[float]]:
        # (a doubled pixel's index + 0.5 is its centre; halved, in mask pixels, times the downsample)
        pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0 * downsample
        if size is not None:
            pts = np.clip(pts, 0, size)
        out = [[round(float(x), 2), round(float(y), 2)] for x, y in pts]
        return out + out[:1]

    for i, (c, h) in enumerate(zip(contours, hierarchy[0], strict=True)):
        if h[3] != -1 or len(c) < 3:
            continue  # (a hole: added to its parent below)
        rings = [ring(c)]
        child = h[2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(ring(contours[child]))
            child = hierarchy[0][child][0]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
                         "properties": {"objectType": "annotation", "classification": {"name": cls},
                                        **(properties or {})}, "id": f"{cls}-{i}"})
    return features


def write_geojson(path: str | Path, features: list[dict[str, Any]]) -> Path:
    """A FeatureCollection QuPath imports (File > Import objects), written atomically."""
    from wsi_mil.io.atomic import write_text

    return write_text(Path(path), json.dumps({"type": "FeatureCollection", "features": features}))
