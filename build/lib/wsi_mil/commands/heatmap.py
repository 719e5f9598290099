"""`wsi-mil heatmap`: viewer-ready attention exports from what train-mil/predict stored.

No re-tiling and no re-extraction: every export is drawn from the attention stores
(coordinates + per-instance scores) and the slide's pyramid. Per slide, in
``OUT/<slide_id>/``:

- ``overlay.png``   heatmap over the thumbnail, colour bar, prediction
- ``heatmap.tif``   pyramidal TIFF, slide's level-0 size and mpp (OpenSlide/QuPath)
- ``patches.geojson`` patch squares with attention measurements (QuPath import)
- ``gallery.jpg``   top-k and bottom-k patches with their scores
- ``heatmap.json``  what was drawn, how it was normalised, and the settings (resume key)

A run folder gives each slide its out-of-fold map: the fold ensemble's for held-out
test slides, and for the others the fold in which the slide was validation. A finer map
is a tiling choice, not a heatmap option: tile with ``--overlap 0.5`` (4× the patches,
so about 4× the extraction time), extract, ``predict``, then draw — overlapping patches
average into cells half a patch wide. ``--smooth-um`` blurs within the tissue at no
extraction cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil import choices
from wsi_mil.choices import names
from wsi_mil.commands.report import failure_message, format_table, status_counts
from wsi_mil.config import HeatmapSettings  # (the settings of this command; re-exported)
from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.io.paths import path_record

logger = logging.getLogger(__name__)

FORMATS = names(choices.HEATMAP_FORMATS)
THUMBNAIL_MAX_PX = 1200
GALLERY_PATCH_PX = 160


@dataclass
class SlideHeatmap:
    slide_id: str
    status: str  # ok | skipped (already drawn) | failed
    source: str
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""


@dataclass
class HeatmapReport:
    out_dir: Path
    outcomes: list[SlideHeatmap]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(o.status != "failed" for o in self.outcomes)

    def table(self) -> str:
        rows = [["slide", "status", "s", "note"]]
        problems = []
        for o in self.outcomes:
            rows.append([o.slide_id, o.status, f"{o.seconds:.1f}", o.message[:60]])
            if o.status == "failed":
                problems.append(f"{o.slide_id}: {o.message}")
        return format_table(rows, problems)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir.resolve()), "files_relative_to": "out_dir", "seconds": self.seconds,
                "counts": status_counts(o.status for o in self.outcomes),
                "slides": [asdict(o) for o in self.outcomes]}


def attention_sources(inputs: list[Path]) -> dict[str, Path]:
    """slide_id → attention store. A train-mil run folder gives each slide its
    out-of-fold store (ensemble for test slides, else the fold where it was validation);
    a folder of stores (``predict``'s output or one fold) or single files are taken as is."""
    from wsi_mil.io.attention import out_of_fold_stores

    found: dict[str, Path] = {}
    origin: dict[str, Path] = {}

    def add(here: dict[str, Path], inp: Path) -> None:
        for sid, h5 in here.items():  # one slide from two inputs: which map is meant cannot be guessed
            if sid in found and found[sid].resolve() != h5.resolve():
                raise ConfigError(f"slide {sid} has attention in two inputs ({origin[sid]}: {found[sid].name}; {inp}: "
                                  f"{h5.name}); give one run or prediction folder per slide")
            found[sid], origin[sid] = h5, inp

    for inp in inputs:
        if inp.is_file():
            add({inp.stem: inp}, inp)
            continue
        if (inp / "attention").is_dir():
            here = {h5.stem: h5 for h5 in sorted((inp / "attention").glob("*.h5"))}  # predict's output
            here.update(out_of_fold_stores(inp))
            if here:
                add(here, inp)
                continue
        if inp.is_dir():
            stores = sorted(inp.glob("*.h5"))
            add({h5.stem: h5 for h5 in stores}, inp)
            if stores:
                continue
        raise ConfigError(f"{inp}: no attention stores found. Give a train-mil run folder, a predict output "
                          "folder, or attention .h5 files.")
    if not found:
        raise ConfigError("no attention stores found in " + ", ".join(map(str, inputs)))
    return found


def slide_for_attention(attrs: dict[str, Any], overrides: dict[str, Path],
                        attention_store: Path | None = None) -> tuple[Path, float | None]:
    """The slide file behind an attention store (attention → feature store → patch store,
    each of which records its source absolutely and relative to itself, so this works
    from any folder and after the run's tree moved), and the mpp the tiler resolved."""
    from wsi_mil.data.bags import attention_feature_store, feature_store_attrs, source_patch_store
    from wsi_mil.io.paths import resolve_recorded

    sid = str(attrs.get("slide_id"))
    store = attention_feature_store(attrs, attention_store)
    fattrs = feature_store_attrs(store) if store is not None else None
    mpp = float(fattrs["slide_mpp"]) if fattrs and fattrs.get("slide_mpp") else None
    if sid in overrides:
        return overrides[sid], mpp
    patch_store, pattrs = source_patch_store(fattrs, store) if fattrs else (None, {})
    slide = resolve_recorded(pattrs, "slide_path", patch_store.parent) if patch_store is not None else None
    if slide is not None:
        if pattrs.get("slide_size_bytes") not in (None, slide.stat().st_size):
            raise WsiMilError(f"{slide} is not the file that was tiled (size differs from the patch store's "
                              "record). Give --slides MANIFEST.csv with the right path.")
        return slide, mpp
    if store is None:
        why = f"its feature store ({attrs.get('feature_store')}) is not there"
    elif patch_store is None:
        why = f"the patch store its features came from ({(fattrs or {}).get('source_store')}) is not there"
    else:
        why = f"the slide ({pattrs.get('slide_path')}) is not there"
    raise WsiMilError(f"cannot find the slide file of {sid}: {why}. Give --slides MANIFEST.csv with the slide's path.")


def draw_slide(h5: Path, slide_dir: Path, settings: HeatmapSettings,
               overrides: dict[str, Path]) -> tuple[dict[str, str], dict[str, Any]]:
    """All requested exports of one slide; returns ({format: file}, what heatmap.json
    records besides: the slide's call, the overlay's opacity, the top patches)."""
    from wsi_mil.data.bags import attention_patch_extent
    from wsi_mil.io.attention import check_finite_attention, read_attention
    from wsi_mil.io.slide import open_slide, resolve_mpp
    from wsi_mil.io.thumbnail import read_thumbnail
    from wsi_mil.viz.raster import score_grid
    from wsi_mil.viz.scores import call_opacity, call_with, colour_map, slide_call, store_scores

    coords, att, attrs = read_attention(h5)
    sid = str(attrs.get("slide_id", h5.stem))
    check_finite_attention(str(h5), att, attrs.get("probability"))
    scores = store_scores(h5, att, attrs, settings.normalise)  # (a store without contributions: said before the slide is opened)
    cmap = colour_map(settings.normalise, settings.cmap)
    path, mpp = slide_for_attention(attrs, overrides, h5)
    extent = attention_patch_extent(attrs, h5)
    probability = dict(zip(attrs.get("outputs") or ["positive"], attrs.get("probability") or [], strict=False))
    call = call_with(scores, slide_call(attrs))
    files: dict[str, str] = {}
    order = np.argsort(-scores.unit, kind="stable")
    top_k = [int(i) for i in order[:settings.top_k]]
    meta: dict[str, Any] = {"call": call, "overlay_opacity": call_opacity(settings.opacity, call),
                            "colours": f"{cmap} over {scores.description}, {scores.vmin:.4g} to {scores.vmax:.4g}",
                            "top_patches": [{"index": i, "x": int(coords[i][0]), "y": int(coords[i][1]),
                                             "score": float(scores.value[i])} for i in top_k]}
    with open_slide(path) as slide:
        if mpp is None:
            mpp = resolve_mpp(slide, slide_name=path.name).mpp
        w, h = slide.dimensions
        grid = score_grid(coords, scores.unit, extent_px=extent, slide_width_px=w, slide_height_px=h,
                          smooth_um=settings.smooth_um, mpp=mpp)
        from wsi_mil.tasks import kind_of

        pred = attrs.get("prediction")
        prob_txt = kind_of(str(attrs.get("task_kind") or "binary")).value_text(probability, 3)
        title = f"{sid} — prediction: {pred} ({prob_txt}) — {attrs.get('model', '')}, fold {attrs.get('fold', '')}"
        if "png" in settings.formats:
            from wsi_mil.viz.figures import overlay_png

            thumb, _, _ = read_thumbnail(slide, slide_mpp=mpp, pixel_um=mpp, max_side_px=THUMBNAIL_MAX_PX)
            files["png"] = str(overlay_png(slide_dir / "overlay.png", thumb, grid, scores, cmap=cmap,
                                           title=title, opacity=meta["overlay_opacity"], banner=call["text"],
                                           positive=call["positive"]))
        if "gallery" in settings.formats and len(coords):
            from wsi_mil.viz.figures import patch_gallery

            k = min(settings.top_k, len(order))

            def entry(i: int) -> tuple[np.ndarray, float, int, tuple[int, int]]:
                return (_patch(slide, coords[i], extent), float(scores.value[i]), int(i),
                        (int(coords[i][0]), int(coords[i][1])))

            top = [entry(i) for i in order[:k]]
            bottom = [entry(i) for i in order[::-1][:k]]
            files["gallery"] = str(patch_gallery(slide_dir / "gallery.jpg", top, bottom, method=scores.method,
                                                 title=f"{sid} - prediction: {pred}", subtitle=call["text"]))
    if "tiff" in settings.formats:
        from wsi_mil.viz.tiff import write_heatmap_tiff

        desc = (f"wsi-mil attention heatmap of {sid}; colours: {cmap} over {scores.description}, "
                f"{scores.vmin:.4g} to {scores.vmax:.4g}; white: no patch; {attrs.get('model', '')} fold "
                f"{attrs.get('fold', '')}; prediction {pred}")
        files["tiff"] = str(write_heatmap_tiff(slide_dir / "heatmap.tif", grid, cmap=cmap, mpp=mpp,
                                               description=desc))
    if "geojson" in settings.formats:
        from wsi_mil.viz.geojson import write_patch_geojson

        index = order[:settings.geojson_top_k] if settings.geojson_top_k else None
        files["geojson"] = str(write_patch_geojson(slide_dir / "patches.geojson", coords, extent, scores, att,
                                                   probability=probability, index=index))
    return files, meta


def _patch(slide: object, xy: Any, extent: float) -> np.ndarray:
    from PIL import Image

    from wsi_mil.io.slide import read_region_rgb

    level = slide.get_best_level_for_downsample(extent / GALLERY_PATCH_PX)  # type: ignore[attr-defined]
    ds = float(slide.level_downsamples[level])  # type: ignore[attr-defined]
    side = max(1, int(round(extent / ds)))
    rgb = read_region_rgb(slide, x_px=int(xy[0]), y_px=int(xy[1]), level=level, width=side, height=side)
    return np.asarray(Image.fromarray(rgb).resize((GALLERY_PATCH_PX, GALLERY_PATCH_PX), Image.Resampling.LANCZOS))


def _heatmap_output(p: Path) -> bool:
    """What a heatmap run writes in its folder: index.json, its log, and a folder per slide."""
    return p.name in ("run.json", "index.json", "heatmap.log") or (p.is_dir() and (p / "heatmap.json").is_file())


def claim_heatmap_folder(inputs: list[Path], out_dir: Path, *, overwrite: bool = False) -> str:
    """Make ``out_dir`` the heatmaps of ``inputs`` (:func:`wsi_mil.io.run_folder.claim`):
    the heatmaps of other attention (another run, another prediction) are refused, or with
    ``overwrite`` removed first. Before, drawing run B into run A's heatmap folder kept A's
    drawings of slides B does not have, which ``review`` then showed beside B's. The
    settings are not part of the identity: a slide drawn with other settings is redrawn."""
    from wsi_mil.io.run_folder import claim, file_digest, identity, read_run

    def source(p: Path) -> dict[str, Any]:  # by what it is, not where: a moved run keeps its heatmaps
        if p.is_file():
            return {"store": file_digest(p)}
        made = read_run(p)
        if made and made.get("identity"):
            return {"run": made["identity"]}
        return {"stores": sorted(h5.name for h5 in p.glob("*.h5"))}

    record = identity("heatmap", {}, {"attention": [source(Path(p)) for p in inputs]})
    return claim(out_dir, record, overwrite=overwrite, outputs=_heatmap_output,
                 legacy_marks=lambda p: p.name != "heatmap.log" and _heatmap_output(p))


#: slides drawn at once (threads)
DRAW_THREADS = 4


def attention_digest(h5: Path) -> str:
    """What a heatmap is drawn from, by content: the attention store's coordinates,
    scores and attributes (the prediction, the class, the patch geometry)."""

    from wsi_mil.io.attention import read_attention

    coords, att, attrs = read_attention(h5)
    digest = hashlib.sha256(np.ascontiguousarray(coords).tobytes() + np.ascontiguousarray(att).tobytes())
    digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def run_heatmap(inputs: list[Path], *, out_dir: Path, settings: HeatmapSettings,
                slides_manifest: Path | None = None, overwrite: bool = False, progress: bool = True,
                scheduler: str | None = None) -> HeatmapReport:
    """Draw every slide's exports; a slide that fails is reported and the rest carry on.
    A slide already drawn with the same settings from the same store is skipped.

    Slides are drawn on a few threads of this process, or with ``scheduler`` (the address
    of a Dask scheduler, as for ``tile`` / ``extract-features``) one task per slide on its
    workers, which must see the attention stores, the slides and ``out_dir`` at the same paths."""
    from tqdm import tqdm

    from wsi_mil.io.atomic import write_json

    sources = attention_sources(inputs)
    claim_heatmap_folder(inputs, out_dir, overwrite=overwrite)
    overrides: dict[str, Path] = {}
    if slides_manifest is not None:
        from wsi_mil.data.manifest import read_manifest, slide_file

        overrides = {e.slide_id: slide_file(e) for e in read_manifest(slides_manifest)}
    t0 = time.perf_counter()
    outcomes = []
    logger.info("drawing %d slide(s) into %s (%s normalisation, %s)", len(sources), out_dir, settings.normalise,
                ", ".join(settings.formats))
    def one(sid: str, h5: Path) -> SlideHeatmap:
        slide_dir = out_dir / sid
        marker = slide_dir / "heatmap.json"
        # paths are recorded relative to the slide's folder (and the source also absolutely),
        # so the exports are found from any folder and after the tree moved
        stamp = {"settings": asdict(settings), "settings_key": settings.key(),
                 **path_record("source", h5, slide_dir), "source_digest": attention_digest(h5)}
        same = ("settings_key", "source_rel", "source_digest")  # by content: a rewritten, unchanged store is not new
        done: dict[str, Any] = {}
        if marker.exists():
            try:
                done = json.loads(marker.read_text())
            except ValueError:  # a marker cut short: the slide is drawn again
                done = {}
        if not overwrite and done and all(done.get(k) == stamp[k] for k in same) and all(
                (slide_dir / f).exists() for f in done.get("files", {}).values()):
            return SlideHeatmap(sid, "skipped", str(h5), _under(out_dir, slide_dir, done["files"]), 0.0,
                                "already drawn")
        s0 = time.perf_counter()
        try:
            files, meta = draw_slide(h5, slide_dir, settings, overrides)
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            logger.warning("%s: %s", sid, failure_message(exc))
            return SlideHeatmap(sid, "failed", str(h5), {}, time.perf_counter() - s0, failure_message(exc))
        secs = time.perf_counter() - s0
        logger.debug("%s: %s drawn in %.1f s from %s (%s)", sid, ", ".join(files), secs, h5.name, meta["call"]["text"])
        names = {k: Path(v).name for k, v in files.items()}
        write_json(marker, {**stamp, "files": names, "seconds": secs, **meta})
        for old in set(done.get("files", {}).values()) - set(names.values()):  # the folder holds this drawing only
            if "/" not in old and "\\" not in old and old != marker.name:
                (slide_dir / old).unlink(missing_ok=True)
        return SlideHeatmap(sid, "ok", str(h5), _under(out_dir, slide_dir, names), secs)

    # slides are drawn on a few threads (reading, Deflate and PNG encoding release the GIL) or
    # on a cluster's workers, reported in order; each slide's files are its own
    from concurrent.futures import ThreadPoolExecutor
    from contextlib import nullcontext

    from wsi_mil.parallel import dask_client

    with (dask_client(scheduler=scheduler) if scheduler else nullcontext()) as client, \
            ThreadPoolExecutor(max(1, min(DRAW_THREADS, os.cpu_count() or 1))) as pool, \
            tqdm(total=len(sources), desc="heatmaps", unit="slide", disable=not progress) as bar:
        if client is not None:
            futures = [client.submit(one, sid, h5, key=f"wsi-mil-heatmap-{sid}-{uuid.uuid4().hex[:8]}")
                       for sid, h5 in sources.items()]
        else:
            futures = [pool.submit(one, sid, h5) for sid, h5 in sources.items()]
        for (sid, h5), fut in zip(sources.items(), futures, strict=True):
            try:
                outcomes.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its slide, not the batch
                logger.warning("%s: %s", sid, failure_message(exc))
                outcomes.append(SlideHeatmap(sid, "failed", str(h5), {}, 0.0, failure_message(exc)))
            bar.update(1)
    report = HeatmapReport(out_dir, outcomes, time.perf_counter() - t0)
    from wsi_mil.commands.report import still_reported

    if outcomes and all(o.status == "skipped" for o in outcomes) and still_reported(
            out_dir / "index.json", {o.slide_id: o.status for o in outcomes}, {"skipped": {"ok", "skipped"}}):
        logger.info("%s: up to date (every slide already drawn from the same attention): nothing written", out_dir)
    else:
        write_json(out_dir / "index.json", report.to_dict())
    return report


def _under(out_dir: Path, slide_dir: Path, names: dict[str, str]) -> dict[str, str]:
    """Export files as paths relative to the heatmap folder (as index.json lists them)."""
    return {k: (slide_dir.relative_to(out_dir) / v).as_posix() for k, v in names.items()}


def drawn_from(marker: Path, store: Path) -> bool:
    """Whether a slide's heatmap.json was drawn from the attention store ``store`` (the
    file it records, found as :func:`wsi_mil.io.paths.resolve_recorded` finds it)."""
    from wsi_mil.io.paths import resolve_recorded

    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    source = resolve_recorded(done, "source", marker.parent)
    return source is not None and source.resolve() == Path(store).resolve()


def recorded_exports(marker: Path) -> dict[str, Path]:
    """{format: file} of a slide's heatmap.json: existing files inside the slide's own
    heatmap folder only (names relative to it; an absolute path of an older version is
    taken by its name in that folder). A name that leads elsewhere — ``..``, an absolute
    path, a link out — is never offered: the review page serves what this returns."""
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (OSError, ValueError):
        return {}
    home = marker.parent.resolve()

    def inside(p: Path) -> bool:  # after resolving links: a crafted ../ or absolute name leads nowhere
        try:
            return p.resolve().is_relative_to(home) and p.is_file()
        except (OSError, RuntimeError):
            return False

    out = {k: (marker.parent / v) if not Path(v).is_absolute() else Path(v) for k, v in files.items()}
    found = {k: p for k, p in out.items() if inside(p)}
    if not found and out:  # older versions recorded absolute paths, or paths relative to the folder they ran in
        found = {k: marker.parent / Path(v).name for k, v in files.items() if inside(marker.parent / Path(v).name)}
    return found
