"""`wsi-mil review`: a local web page to review a run's attention next to the tissue.

The slide is shown in OpenSeadragon (its release build shipped in ``wsi_mil/review/vendor``,
copied from the npm registry's package pinned in ``wsi_mil/review/web``; no CDN) from Deep Zoom tiles that OpenSlide cuts
from the slide's pyramid levels — never its label or macro image. The heatmap is a
small RGBA image of the score grid, laid over the slide at its level-0 position.

Only what is listed at start-up can be fetched: the page's own files, OpenSeadragon's
build files, and for each slide of the run its tiles, heatmap, top patches and exports.
Every request is looked up by name in those tables, so a path such as
``/static/../../etc/passwd`` matches nothing and gets 404. Served on 127.0.0.1 unless
told otherwise.

A reviewer's verdicts and drawn regions are the only writes (``wsi_mil.review.verdicts``:
into the run's ``review/`` folder and nowhere else). A write is a POST of JSON to
``/api/verdict/<slide>`` or ``/api/regions/<slide>`` that must carry the session's token
(``X-Review-Token``, handed to the page by ``/api/review``, which a page of another site
cannot read), an Origin of this server when the browser sends one, and at most 2 MB.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import numpy as np

from wsi_mil.errors import ConfigError, WsiMilError

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
OSD_DIR_ENV = "WSI_MIL_OPENSEADRAGON_DIR"
TOP_K = 12
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css",
          ".png": "image/png", ".jpeg": "image/jpeg", ".jpg": "image/jpeg", ".svg": "image/svg+xml",
          ".json": "application/json", ".map": "application/json", ".tif": "image/tiff",
          ".geojson": "application/geo+json"}


def openseadragon_dir() -> Path:
    """OpenSeadragon's release build: ``$WSI_MIL_OPENSEADRAGON_DIR`` when set, else the copy
    shipped in the package (``wsi_mil/review/vendor``, what a wheel holds), else the npm
    install of a checkout."""
    env = os.environ.get(OSD_DIR_ENV)
    candidates = [Path(env)] if env else [HERE / "vendor" / "openseadragon",
                                          HERE / "web" / "node_modules" / "openseadragon" / "build" / "openseadragon"]
    for d in candidates:
        if (d / "openseadragon.min.js").exists():
            return d
    raise ConfigError(f"OpenSeadragon is not installed ({candidates[0]} has no openseadragon.min.js). The package "
                      "ships it in wsi_mil/review/vendor: reinstall wsi-mil; in a checkout, npm ci --prefix "
                      f"wsi_mil/review/web installs it (or point {OSD_DIR_ENV} at an OpenSeadragon build folder).")


def _file_table(root: Path, prefix: str) -> dict[str, Path]:
    """URL path → file, for every regular file under ``root`` (no links followed)."""
    table = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                table[prefix + p.relative_to(root).as_posix()] = p
    return table


@dataclass
class ReviewSlide:
    slide_id: str
    attention: Path
    slide_path: Path
    mpp: float | None
    attrs: dict[str, Any]
    exports: dict[str, Path] = field(default_factory=dict)
    _dz: Any = None
    _open: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _info: dict[str, Any] | None = None
    _heat: bytes = b""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def deepzoom(self) -> Any:
        from openslide.deepzoom import DeepZoomGenerator

        from wsi_mil.io.slide import open_slide

        with self.lock:
            if self._dz is None:
                slide = self._open.enter_context(open_slide(self.slide_path))
                self._dz = DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False)
            return self._dz

    def close(self) -> None:
        self._open.close()
        self._dz = None

    def info(self, normalise: str, cmap: str) -> dict[str, Any]:
        """Geometry, prediction, heatmap placement and the top patches (computed once)."""
        from wsi_mil.io.attention import read_attention
        from wsi_mil.viz.raster import colourise, score_grid
        from wsi_mil.viz.scores import call_opacity, call_with, colour_map, slide_call, store_scores

        with self.lock:
            if self._info is not None:
                return self._info
        dz = self.deepzoom()
        w, h = dz.level_dimensions[-1]
        coords, att, attrs = read_attention(self.attention)
        scores = store_scores(self.attention, att, attrs, normalise)
        cmap = colour_map(normalise, cmap)
        from wsi_mil.data.bags import attention_patch_extent

        extent = attention_patch_extent(attrs, self.attention)
        call = call_with(scores, slide_call(attrs))
        grid = score_grid(coords, scores.unit, extent_px=extent, slide_width_px=w, slide_height_px=h)
        rgba = colourise(grid.values, cmap, alpha=255)
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
        order = np.argsort(-scores.unit, kind="stable")[:TOP_K]
        ny, nx = grid.values.shape
        stops = colourise(np.linspace(0, 1, 11), cmap)
        info = {
            "slide_id": self.slide_id, "width": int(w), "height": int(h), "mpp": self.mpp,
            "dzi": f"/dzi/{self.slide_id}.dzi",
            "heatmap": {"url": f"/heatmap/{self.slide_id}.png", "x": grid.origin_x, "y": grid.origin_y,
                        "width": nx * grid.cell_px, "height": ny * grid.cell_px},
            "normalisation": scores.description, "vmin": scores.vmin, "vmax": scores.vmax,
            "colour_stops": ["#{:02x}{:02x}{:02x}".format(*(int(c) for c in s)) for s in stops],
            "top": [{"index": int(i), "x": float(coords[i][0]), "y": float(coords[i][1]), "size": extent,
                     "score": float(scores.value[i])} for i in order],
            "n_patches": len(coords), "prediction": attrs.get("prediction"),
            "probability": dict(zip(attrs.get("outputs") or [], attrs.get("probability") or [], strict=False)),
            "model": attrs.get("model"), "fold": attrs.get("fold"), "split": attrs.get("split"),
            "exports": {k: f"/exports/{self.slide_id}/{p.name}" for k, p in self.exports.items()},
            "call": call, "opacity": call_opacity(0.5, call),
        }
        with self.lock:
            self._info, self._heat = info, buf.getvalue()
        return info

    def heatmap_png(self, normalise: str, cmap: str) -> bytes:
        self.info(normalise, cmap)  # draws the heatmap image along with the slide's information
        return self._heat


class ReviewSite:
    """Everything the page may serve, fixed at start-up."""

    def __init__(self, inputs: list[Path], *, slides_manifest: Path | None = None, heatmaps: Path | None = None,
                 normalise: str = "rank", cmap: str = "viridis", review_dir: Path | None = None,
                 reviewer: str | None = None) -> None:
        from wsi_mil.commands.heatmap import (
            HeatmapSettings,
            attention_sources,
            drawn_from,
            recorded_exports,
            slide_for_attention,
        )
        from wsi_mil.io.attention import read_attention_attrs

        HeatmapSettings(normalise=normalise, cmap=cmap).validate()
        self.normalise, self.cmap = normalise, cmap
        overrides: dict[str, Path] = {}
        if slides_manifest is not None:
            from wsi_mil.data.manifest import read_manifest, slide_file

            overrides = {e.slide_id: slide_file(e) for e in read_manifest(slides_manifest)}
        self.slides: dict[str, ReviewSlide] = {}
        self.problems: list[str] = []
        for sid, h5 in attention_sources(inputs).items():
            attrs = read_attention_attrs(h5)
            try:
                path, mpp = slide_for_attention(attrs, overrides, h5)
            except WsiMilError as exc:
                self.problems.append(f"{sid}: {exc}")
                continue
            marker = heatmaps / sid / "heatmap.json" if heatmaps else None
            exports = recorded_exports(marker) if marker is not None and marker.exists() else {}
            # another run's drawing of this slide: not this attention (exports come only with a marker)
            if exports and marker is not None and not drawn_from(marker, h5):
                self.problems.append(f"{sid}: the heatmap in {marker.parent} was drawn from other attention than "
                                     f"{h5}; its exports are not offered (redraw with wsi-mil heatmap)")
                exports = {}
            self.slides[sid] = ReviewSlide(sid, h5, path, mpp, attrs, exports)
        if not self.slides:
            shown = "\n  ".join(self.problems[:3]) + (f"\n  ... and {len(self.problems) - 3} more slide(s)"
                                                      if len(self.problems) > 3 else "")
            raise ConfigError(f"no slide of the run can be reviewed ({len(self.problems)} slide(s)):\n  {shown}")
        self.outcomes = run_outcomes(inputs)
        from wsi_mil.review.verdicts import ReviewStore

        self.review = ReviewStore(review_dir if review_dir is not None else default_review_dir(inputs),
                                  reviewer if reviewer is not None else _user(), run_label_values(inputs))
        self.token = secrets.token_urlsafe(24)  # (what a write must carry: only this server's page can read it)
        self.files = {**_file_table(STATIC_DIR, "/static/"), **_file_table(openseadragon_dir(), "/osd/")}
        self.files["/"] = STATIC_DIR / "index.html"

    def slide_list(self) -> list[dict[str, Any]]:
        """The run's slides, most suspicious first (highest positive probability), so the
        page opens on the slide a pathologist should see first."""
        from wsi_mil.viz.scores import slide_call

        out = []
        for sid, s in self.slides.items():
            a = s.attrs
            call = slide_call(a)
            out.append({"slide_id": sid, "prediction": a.get("prediction"), "model": a.get("model"),
                        "fold": a.get("fold"), "split": a.get("split"), "call": call,
                        "outcome": self.outcomes.get(sid),
                        "probability": dict(zip(a.get("outputs") or [], a.get("probability") or [], strict=False))})
        return sorted(out, key=lambda d: (-(d["call"]["p"] if d["call"]["p"] is not None else -1), d["slide_id"]))

    def close(self) -> None:
        for s in self.slides.values():
            s.close()


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # (no user name in this environment: the reviewer names themself)
        return "reviewer"


def default_review_dir(inputs: list[Path]) -> Path:
    """``review/`` in the run folder of the first input (the folder with metrics.json: the input itself or the run
    above an attention folder), else beside the first input."""
    first = inputs[0] if inputs[0].is_dir() else inputs[0].parent
    for cand in (first, first.parent, first.parent.parent):
        if (cand / "metrics.json").is_file():
            return cand / "review"
    return first / "review"


def run_label_values(inputs: list[Path]) -> list[str] | None:
    """The label values of the run's task (its metrics.json), the only corrected labels a verdict may give;
    None when the run does not say (a predict folder)."""
    folder = default_review_dir(inputs).parent
    try:
        task = json.loads((folder / "metrics.json").read_text()).get("task") or {}
    except (OSError, ValueError):
        return None
    values = task.get("values") or task.get("classes")
    return [str(v) for v in values] if values and not task.get("parts") else None


def run_outcomes(inputs: list[Path]) -> dict[str, dict[str, Any]]:
    """slide_id -> {kind: FN | FP | TP | TN, label, probability} from the audit of the run
    folder among ``inputs`` (its metrics.json, or that of the run above an attention folder):
    every error, and the most confident correct slides of each class."""
    out: dict[str, dict[str, Any]] = {}
    for inp in inputs:
        folder = inp if inp.is_dir() else inp.parent
        for cand in (folder, folder.parent, folder.parent.parent):
            metrics = cand / "metrics.json"
            if metrics.is_file():
                try:
                    errors = json.loads(metrics.read_text()).get("audit", {}).get("evaluation", {}).get("errors", {})
                except (OSError, ValueError):
                    errors = {}
                for cases in errors.values():
                    for c in cases:
                        out.setdefault(c["id"], {"kind": c["kind"], "label": c["label"], "probability": c["probability"]})
                break
    return out


_DZI = re.compile(r"^/dzi/(?P<sid>[^/]+)\.dzi$")
_TILE = re.compile(r"^/dzi/(?P<sid>[^/]+)_files/(?P<level>\d{1,3})/(?P<col>\d{1,7})_(?P<row>\d{1,7})\.jpeg$")
_ONE = re.compile(r"^/(?P<kind>api/slide|heatmap)/(?P<sid>[^/]+?)(?:\.png)?$")
_EXPORT = re.compile(r"^/exports/(?P<sid>[^/]+)/(?P<name>[^/]+)$")
_REVIEW = re.compile(r"^/api/review/(?P<sid>[^/]+)$")
_WRITE = re.compile(r"^/api/(?P<kind>verdict|regions)/(?P<sid>[^/]+)$")
MAX_BODY = 2_000_000


#: the page's own scripts, styles and images only; no framing by another site
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _own_addresses() -> set[str]:
    """This machine's names and addresses (what a client on the network puts in Host when
    the server listens on every interface)."""
    import socket

    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    for name in list(names):
        try:
            names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(name, None)}
        except OSError:
            continue
    return {n if ":" not in n else f"[{n}]" for n in names if n}


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """Host header values the server answers: the loopback names and the address it was
    bound to, with or without the port; listening on every interface (0.0.0.0 / ::), the
    machine's own names and addresses too. Anything else (a DNS-rebinding page in the
    user's browser naming its own domain) gets 400."""
    names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"}
    if host in ("0.0.0.0", "::", ""):
        names |= _own_addresses()
    return frozenset(names | {f"{n}:{port}" for n in names})


class _Handler(BaseHTTPRequestHandler):
    site: ReviewSite
    hosts: frozenset[str] = frozenset()
    server_version = "wsi-mil-review"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, body: bytes, ctype: str, status: int = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any) -> None:
        self._send(json.dumps(data).encode(), "application/json")

    def _not_found(self) -> None:
        self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

    def do_HEAD(self) -> None:
        self.do_GET()

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.hosts:
            self._send(b"bad request: unexpected Host header; this server answers only the names it was "
                       b"started with (loopback, the --host address and, with --host 0.0.0.0, this machine's "
                       b"own names and addresses): start wsi-mil review with --host set to the name or address "
                       b"that clients use\n", "text/plain", HTTPStatus.BAD_REQUEST)
            return False
        return True

    def _refuse(self, status: int, why: str) -> None:
        self._send(json.dumps({"error": why}).encode(), "application/json", status)

    def do_POST(self) -> None:
        """A verdict or a slide's regions (see the module docstring for what a write must carry)."""
        from wsi_mil.review.verdicts import Conflict

        if not self._host_ok():
            return None
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() not in self.hosts:
            return self._refuse(HTTPStatus.FORBIDDEN, "a write from another site's page")
        if not secrets.compare_digest((self.headers.get("X-Review-Token") or "").encode(), self.site.token.encode()):
            return self._refuse(HTTPStatus.FORBIDDEN, "no or a wrong review token (reload the page)")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON")
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            return self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a body of 0 to {MAX_BODY} bytes")
        path = unquote(urlsplit(self.path).path)
        m = _WRITE.match(path)
        if m is None or m["sid"] not in self.site.slides:
            return self._not_found()
        slide = self.site.slides[m["sid"]]
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("a JSON object")
            if m["kind"] == "verdict":
                prediction = slide.attrs.get("prediction")  # (class 0 is a call: never read as "no call")
                saved: Any = self.site.review.save_verdict(
                    slide.slide_id, body, ";".join(map(str, prediction)) if isinstance(prediction, list)
                    else "" if prediction is None else str(prediction))
            else:
                w, h = slide.deepzoom().level_dimensions[-1]
                saved = self.site.review.save_regions(slide.slide_id, body, (int(w), int(h)))
        except Conflict as c:
            return self._send(json.dumps({"conflict": True, "existing": c.existing}).encode(), "application/json",
                              HTTPStatus.CONFLICT)
        except ValueError as exc:  # (bad JSON too: json.JSONDecodeError is one)
            return self._refuse(HTTPStatus.BAD_REQUEST, str(exc)[:500])
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the server
            logger.warning("%s: %s: %s", path[:200], type(exc).__name__, exc)
            return self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, "not saved (see the server's log)")
        logger.info("%s saved the %s of %s", self.site.review.reviewer, m["kind"], slide.slide_id)
        return self._json({"saved": saved})

    def do_GET(self) -> None:
        if not self._host_ok():
            return None
        path = unquote(urlsplit(self.path).path)
        site = self.site
        try:
            if path in site.files:
                f = site.files[path]
                self._send(f.read_bytes(), _TYPES.get(f.suffix, "application/octet-stream"))
            elif path == "/api/slides":
                self._json({"slides": site.slide_list(), "problems": site.problems})
            elif path == "/api/review":
                from wsi_mil.review.verdicts import REGION_CLASSES, VERDICTS

                self._json({"reviewer": site.review.reviewer, "token": site.token, "verdicts": list(VERDICTS),
                            "region_classes": list(REGION_CLASSES)})
            elif (m := _REVIEW.match(path)) and m["sid"] in site.slides:
                self._json({"verdict": site.review.current(m["sid"]), "regions": site.review.regions(m["sid"])})
            elif (m := _TILE.match(path)) and m["sid"] in site.slides:
                self._tile(site.slides[m["sid"]], int(m["level"]), int(m["col"]), int(m["row"]))
            elif (m := _DZI.match(path)) and m["sid"] in site.slides:
                self._send(site.slides[m["sid"]].deepzoom().get_dzi("jpeg").encode(), "application/xml")
            elif (m := _ONE.match(path)) and m["sid"] in site.slides:
                s = site.slides[m["sid"]]
                if m["kind"] == "heatmap":
                    self._send(s.heatmap_png(site.normalise, site.cmap), "image/png")
                else:
                    self._json(s.info(site.normalise, site.cmap))
            elif (m := _EXPORT.match(path)) and m["sid"] in site.slides:
                files = {p.name: p for p in site.slides[m["sid"]].exports.values()}
                if m["name"] not in files:
                    return self._not_found()
                f = files[m["name"]]
                self._send(f.read_bytes(), _TYPES.get(f.suffix, "application/octet-stream"))
            else:
                self._not_found()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - one bad request never stops the server
            logger.warning("%s: %s: %s", path[:200], type(exc).__name__, exc)  # the details stay in the log
            self._send(b"internal error (see the server's log)\n", "text/plain", HTTPStatus.INTERNAL_SERVER_ERROR)

    def _tile(self, slide: ReviewSlide, level: int, col: int, row: int) -> None:
        dz = slide.deepzoom()
        if level >= dz.level_count or col >= dz.level_tiles[level][0] or row >= dz.level_tiles[level][1]:
            return self._not_found()
        img = dz.get_tile(level, (col, row)).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        self._send(buf.getvalue(), "image/jpeg")


def make_server(site: ReviewSite, *, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    handler = cast("type[_Handler]", type("ReviewHandler", (_Handler,), {"site": site}))  # a subclass, one per server
    server = ThreadingHTTPServer((host, port), handler)
    handler.hosts = allowed_hosts(host.lower(), server.server_address[1])
    server.daemon_threads = True
    return server
