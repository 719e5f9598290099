"""One slide's coordinate phase: mpp → thumbnail → tissue mask → grid → kept patches.

Runs inside a Dask worker; everything it needs travels as plain arguments and it opens
its own slide handle. Without ``save_patches`` it also writes the finished store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from wsi_mil import __version__
from wsi_mil.config import TileConfig
from wsi_mil.data.manifest import SlideEntry, slide_file
from wsi_mil.errors import NoTissueError, SlideError
from wsi_mil.io.paths import path_record
from wsi_mil.io.slide import (
    FINGERPRINT_METHOD,
    file_fingerprint,
    file_sha256,
    open_slide,
    resolve_mpp,
)
from wsi_mil.io.store import StoreFormat, StoreWriter, store_path
from wsi_mil.io.thumbnail import plan_thumbnail, read_thumbnail
from wsi_mil.tiling.grid import PatchGeometry, grid_coords, patch_geometry, tissue_fractions
from wsi_mil.tiling.qc import qc_canvas, qc_name, write_qc_png
from wsi_mil.tiling.tissue import (
    TISSUE_METHOD_VERSION,
    ColourClasses,
    TissueReport,
    inspect_tissue,
    preload_imports,
    stain_statistics,
    use_threads,
)

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
#: Settings that do not change a store's content (so changing them keeps the cache valid).
_NON_CONTENT_KEYS = {"qc", "chunk_patches", "full_hash", "encoder",  # (the encoder acts through --mpp)
                     "annotations"}  # (the folder's place: its files' content is hashed instead)


def content_settings(config: TileConfig, entry: SlideEntry) -> dict[str, Any]:
    """Everything that determines a store's content (recorded in the store as ``tile_settings``)."""
    content = {k: v for k, v in config.to_dict().items() if k not in _NON_CONTENT_KEYS
               and not (k in ("include", "exclude") and v is None)}  # (stores made before them keep their settings)
    content["manifest_mpp"] = entry.mpp
    path = slide_file(entry)
    content["slide_size_bytes"] = path.stat().st_size if path.exists() else None
    content["store_format_version"] = STORE_FORMAT_VERSION
    if config.annotations or entry.meta.get("annotations"):  # (a redrawn region changes the store: its hash is kept)
        file = annotation_file(entry, config, required=False)
        content["annotation_sha256"] = file_sha256(file) if file is not None else None
    return content


def annotation_file(entry: SlideEntry, config: TileConfig, *, required: bool = True) -> Path | None:
    """The slide's annotation file: the manifest's ``annotations`` column (relative to the manifest), else
    ``<slide_id>.geojson``, ``.json`` or ``.xml`` in ``--annotations``; with --include / --exclude a slide without
    one is an error (``required``), never tiled as if nothing were drawn."""
    from wsi_mil.io.annotations import SUFFIXES, AnnotationError

    named = entry.meta.get("annotations", "").strip()
    if named:
        if not Path(named).is_file():
            raise AnnotationError(f"{entry.slide_id}: its annotation file {named} (the manifest's annotations "
                                  "column) is not there")
        return Path(named)
    if not config.annotations:
        if required and (config.include or config.exclude):
            raise AnnotationError(f"{entry.slide_id}: no annotation file (the manifest's annotations column is empty "
                                  "for it); --include / --exclude need one for every slide")
        return None
    folder = Path(config.annotations)
    found = [folder / f"{entry.slide_id}{s}" for s in SUFFIXES if (folder / f"{entry.slide_id}{s}").is_file()]
    if len(found) > 1:
        raise AnnotationError(f"{entry.slide_id}: several annotation files in {folder}: "
                              f"{', '.join(f.name for f in found)}; keep one")
    if not found and required and (config.include or config.exclude):
        raise AnnotationError(f"{entry.slide_id}: no annotation file in {folder} (looked for {entry.slide_id}.geojson, "
                              ".json, .xml); --include / --exclude need one for every slide (a FeatureCollection "
                              "with no features says nothing was drawn)")
    return found[0] if found else None


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """Hash of :func:`content_settings`, for cache validation."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def config_fingerprint(config: TileConfig, entry: SlideEntry) -> str:
    return settings_fingerprint(content_settings(config, entry))


def settings_change(attrs: dict[str, Any], config: TileConfig, entry: SlideEntry) -> str:
    """What differs between the settings a store was made with and ``config`` (for messages)."""
    then = attrs.get("tile_settings")  # (stores decode JSON attributes)
    if not isinstance(then, dict):
        return ("the store does not record its settings (an earlier wsi-mil); note that the default --tissue-mpp "
                "changed from 8 to 16 µm/px: stores tiled with the old default match again with --tissue-mpp 8")
    now = content_settings(config, entry)
    changed = [f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    return "changed: " + ", ".join(changed) if changed else "same settings, another wsi-mil store format"


@dataclass
class SlidePlan:
    """What the coordinate phase found for one slide."""

    slide_id: str
    slide_path: str
    geometry: PatchGeometry
    coords_px: npt.NDArray[np.int64]
    tissue_fraction: npt.NDArray[np.float32]
    root_attrs: dict[str, Any]
    clam_attrs: dict[str, Any]
    mpp: float
    mpp_source: str
    seconds: float
    qc_path: str | None = None
    store: str | None = None
    warnings: list[str] = field(default_factory=list)
    tissue: TissueReport | None = None
    phases: dict[str, float] = field(default_factory=dict)  # seconds: read, tissue, grid, qc, store
    qc_job: Future[tuple[Path, float]] | None = None  # the QC image being written on a helper thread
    #: each kept patch's share covered by each annotation class (columns: root_attrs["annotations"]["classes"])
    annotation_overlap: npt.NDArray[np.float32] | None = None
    started: float = 0.0  # perf_counter() when planning began

    def finish_qc(self) -> None:
        """Wait for the QC image written on a helper thread (its errors are raised here);
        ``phases["qc"]`` becomes its own time, ``phases["qc_wait"]`` the time waited for it."""
        if self.qc_job is not None:
            t = time.perf_counter()
            path, seconds = self.qc_job.result()
            self.qc_job = None
            self.qc_path = str(path)
            self.phases["qc"], self.phases["qc_wait"] = seconds, time.perf_counter() - t

    @property
    def n_patches(self) -> int:
        return len(self.coords_px)


def pool_width(pool: Executor | None) -> int:
    """Threads of a thread pool (1 without one)."""
    return int(getattr(pool, "_max_workers", 1)) if pool is not None else 1


def plan_slide(entry: SlideEntry, config: TileConfig, *, qc_dir: Path | None, pool: Executor | None = None) -> SlidePlan:
    """Find the tissue patches of one slide (no store written); with ``pool``, the slide's
    thumbnail is read and classified in strips on the pool's threads.

    Raises:
        SlideOpenError, MissingMppError, ResolutionError: per-slide failures.
    """
    t0 = time.perf_counter()
    path = slide_file(entry)
    preload_imports()
    width = pool_width(pool)
    use_threads(1)  # the read's bands are the parallel work: OpenCV's own threads in each band only contend (~10 %)
    helper = pool if width > 1 else None  # a thread free for side work (the QC) while this one works
    params = config.tissue_params()
    with open_slide(path) as slide:
        smpp = resolve_mpp(slide, slide_name=entry.slide_id, override_mpp=config.slide_mpp, manifest_mpp=entry.mpp)
        w0, h0 = slide.dimensions
        geometry = patch_geometry(
            slide_mpp=smpp.mpp, level_downsamples=tuple(slide.level_downsamples),
            target_mpp=config.mpp, patch_size_px=config.patch_size, stride_px=config.stride_px,
            slide_name=entry.slide_id,
        )
        t_read = time.perf_counter()
        thumb_plan = plan_thumbnail(slide, slide_mpp=smpp.mpp, pixel_um=config.tissue_mpp, whole_factor=True)
        classes = ColourClasses((thumb_plan.height, thumb_plan.width), params)  # classified band by band as decoded
        thumb, thumb_ds, thumb_um = read_thumbnail(slide, slide_mpp=smpp.mpp, pixel_um=config.tissue_mpp, pool=pool,
                                                   on_band=classes.add, plan=thumb_plan)
        level_dim = [int(v) for v in slide.level_dimensions[geometry.level]]
        level_count = int(slide.level_count)
    phases = {"open": t_read - t0, "read": time.perf_counter() - t_read}
    use_threads(width)  # labelling and the distance transform: OpenCV's threads, one per worker
    t = time.perf_counter()
    canvas = None
    if qc_dir is not None and config.qc and helper is not None:
        canvas = helper.submit(qc_canvas, thumb)  # the QC's resize overlaps tissue detection's serial parts
    mask, tissue = inspect_tissue(thumb, pixel_um=thumb_um, params=params, pool=pool, classes=classes, helper=helper)
    del classes
    phases["tissue"] = time.perf_counter() - t
    t = time.perf_counter()
    if tissue.dark_background:
        raise SlideError(
            f"{entry.slide_id}: the slide's background is dark (median brightness of its edge "
            f"{tissue.background_value:.2f} of 1): this looks like a fluorescence or dark-field scan. wsi-mil finds "
            "tissue on brightfield slides (H&E, IHC) only; leave this slide out")
    regions, keep_mask, region_warning = None, mask, None
    file = annotation_file(entry, config)
    if file is not None:  # (drawn regions restrict which patches are kept; the tissue figures stay the slide's)
        from wsi_mil.io.annotations import read_annotations

        regions = read_annotations(file, (int(w0), int(h0)))
        check_class_names(regions, config.include_list() + config.exclude_list())
        if config.include:  # (the QC image outlines the tissue inside the included regions)
            keep_mask = keep_mask & regions.mask(config.include_list(), mask.shape, thumb_ds)
        if config.exclude:
            keep_mask = keep_mask & ~regions.mask(config.exclude_list(), mask.shape, thumb_ds)
        region_warning = drawn_off_tissue(entry.slide_id, file, regions, mask, thumb_ds)
    candidates = grid_coords(width_px=w0, height_px=h0, geometry=geometry)
    fractions = tissue_fractions(mask, mask_downsample=thumb_ds, coords_px=candidates,
                                 extent_level0_px=geometry.extent_level0_px)
    keep = fractions >= config.min_tissue if config.min_tissue > 0 else np.ones(len(candidates), dtype=bool)
    if regions is not None and (config.include or config.exclude):
        # (the regions' share of each patch on a grid of an eighth of a patch: the tissue mask's cells can be as
        # large as a patch, and a patch kept must be --min-tissue inside the included regions by its own overlap)
        need, idx = max(config.min_tissue, 1e-6), np.flatnonzero(keep)
        size = (int(w0), int(h0))
        if config.include:
            inside = region_share(regions, config.include_list(), candidates[idx], geometry.extent_level0_px, size)
            keep[idx[inside < need]] = False
        if config.exclude:
            idx = np.flatnonzero(keep)
            outside = 1 - region_share(regions, config.exclude_list(), candidates[idx], geometry.extent_level0_px, size)
            keep[idx[outside < need]] = False
    coords, kept_fraction = candidates[keep], fractions[keep]
    overlap, annotation_record = None, None
    if regions is not None:
        overlap = annotation_overlap(regions, coords, geometry.extent_level0_px, (int(w0), int(h0)))
        annotation_record = {**regions.summary(), "classes": regions.classes, "include": config.include_list(),
                             "exclude": config.exclude_list()}
    phases["grid"] = time.perf_counter() - t
    t = time.perf_counter()

    qc_path = qc_job = None
    if qc_dir is not None and config.qc:
        title = f"{entry.slide_id}  {len(coords)} patches  {geometry.effective_mpp:.3f} um/px ({smpp.source} mpp)"
        qc_png = partial(write_qc_png, qc_dir / qc_name(entry.slide_id), thumbnail=thumb, mask=keep_mask,
                         thumb_downsample=thumb_ds, coords_px=coords, extent_level0_px=geometry.extent_level0_px,
                         title=title, canvas=canvas, pool=helper)
        if helper is not None:  # drawn and written on the helper while the store is written (SlidePlan.finish_qc)
            qc_job = helper.submit(_timed, qc_png)
        else:
            qc_path = str(qc_png())
    phases["qc"] = time.perf_counter() - t
    settings = content_settings(config, entry)
    root_attrs = {
        "format_version": STORE_FORMAT_VERSION,
        "wsi_mil_version": __version__,
        "created_by": "wsi-mil tile",
        "slide_id": entry.slide_id,
        "slide_file": path.name,
        "slide_path": str(path.resolve()),
        "slide_fingerprint": file_fingerprint(path),
        "slide_fingerprint_method": FINGERPRINT_METHOD,
        "slide_size_bytes": path.stat().st_size,
        "slide_mtime_ns": path.stat().st_mtime_ns,  # a change re-hashes the file (same size, new content)
        "slide_width_px": int(w0),
        "slide_height_px": int(h0),
        "slide_level_count": level_count,
        "slide_mpp": smpp.mpp,
        "mpp_source": smpp.source,
        "target_mpp": config.mpp,
        "effective_mpp": geometry.effective_mpp,
        "patch_size_px": config.patch_size,
        "stride_px": config.stride_px,
        "patch_level": geometry.level,
        "level_downsample": geometry.level_downsample,
        "read_size_px": geometry.read_size_px,
        "extent_level0_px": geometry.extent_level0_px,
        "min_tissue": config.min_tissue,
        "tissue_params": params.to_dict(),
        "tissue_method_version": TISSUE_METHOD_VERSION,
        "tissue_mask_um_per_px": thumb_um,
        "n_patches": len(coords),
        "n_grid_candidates": len(candidates),
        "tissue_area_mm2": float(mask.sum() * thumb_um * thumb_um / 1e6),
        **(stain_statistics(thumb, mask) or {}),  # nuisances a model could learn instead of the disease
        "tissue_report": asdict(tissue),
        "has_patches": bool(config.save_patches),
        "jpeg_quality": config.jpeg_quality if config.save_patches else "none",
        "config_fingerprint": settings_fingerprint(settings),
        "tile_settings": settings,
        **({"annotations": annotation_record} if annotation_record is not None else {}),
    }
    if config.full_hash:
        root_attrs["slide_sha256"] = file_sha256(path)
    clam_attrs = {
        "patch_size": geometry.read_size_px,
        "patch_level": geometry.level,
        "downsample": [geometry.level_downsample, geometry.level_downsample],
        "level_dim": level_dim,
        "downsampled_level_dim": level_dim,
        "name": entry.slide_id,
        "target_patch_size": geometry.patch_size_px,
    }
    plan = SlidePlan(
        slide_id=entry.slide_id, slide_path=str(path), geometry=geometry, coords_px=coords,
        tissue_fraction=kept_fraction, root_attrs=root_attrs, clam_attrs=clam_attrs,
        mpp=smpp.mpp, mpp_source=smpp.source, seconds=0.0, qc_path=qc_path, tissue=tissue, phases=phases,
        qc_job=qc_job, annotation_overlap=overlap,
    )
    qc_hint = f"check {qc_dir / qc_name(entry.slide_id)}" if qc_dir is not None and config.qc else "check the QC image"
    if tissue.background_not_glass:
        plan.warnings.append(
            f"{entry.slide_id}: the background is not white glass (edge brightness {tissue.background_value:.2f}, "
            f"saturation {tissue.background_saturation:.2f}): the colours may be decoded wrongly or the slide is "
            f"tinted, and the tissue mask may cover glass; {qc_hint}")
    if tissue.edge_is_tissue:  # a crop, or a region exported tissue to its edges: no glass to judge by
        logger.info("%s: tissue reaches the image's edges (the mask covers %.0f%%): no glass there to check the "
                    "colours against; %s", entry.slide_id, 100 * tissue.mask_fraction, qc_hint)
    elif tissue.mask_fraction > 0.9:
        plan.warnings.append(
            f"{entry.slide_id}: the tissue mask covers {100 * tissue.mask_fraction:.0f}% of the slide, which is rare "
            f"on a real slide (glass or background may be taken for tissue); {qc_hint}")
    for note in tissue.notes:
        logger.info("%s: %s", entry.slide_id, note)
    if region_warning:
        plan.warnings.append(region_warning)
    plan.started = t0
    return plan


def region_share(regions: Any, classes: list[str], coords: npt.NDArray[np.int64], extent: float,
                 size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Each patch's share covered by the union of ``classes``' regions, on a grid of an eighth of a patch (at most
    16384 cells a side)."""
    ds = max(extent / 8.0, max(size) / 16384.0)
    shape = (int(np.ceil(size[1] / ds)), int(np.ceil(size[0] / ds)))
    return tissue_fractions(regions.mask(classes, shape, (ds, ds)), mask_downsample=(ds, ds), coords_px=coords,
                            extent_level0_px=extent)


def annotation_overlap(regions: Any, coords: npt.NDArray[np.int64], extent: float,
                       size: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Each patch's share covered by each class of ``regions`` ((n, classes))."""
    cols = [region_share(regions, [c], coords, extent, size) for c in regions.classes]
    return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((len(coords), 0), np.float32)


def drawn_off_tissue(slide_id: str, file: Path, regions: Any, tissue: npt.NDArray[np.bool_],
                     downsample: tuple[float, float]) -> str | None:
    """A warning when the regions drawn on a slide cover almost no tissue (under 10 % of their area): a file drawn on
    another slide, or at another level or scale, can still fall inside this slide's borders."""
    if not regions.regions:
        return None
    drawn = regions.mask(regions.classes, tissue.shape, downsample)
    if drawn.sum() < 4:
        return None
    share = float((drawn & tissue).sum() / drawn.sum())
    if share >= 0.1:
        return None
    return (f"{slide_id}: the regions of {file.name} cover almost no tissue ({100 * share:.0f}% of their area is "
            "tissue): were they drawn on another slide, or at another level or scale? Check them on the QC image")


def check_class_names(regions: Any, named: list[str]) -> None:
    """A region whose class is a near miss of a class --include / --exclude names (``tumor`` for ``Tumor``,
    ``Pen mark`` for ``Pen``) would be silently kept or left out: refused, naming the file and the feature."""
    import difflib

    from wsi_mil.io.annotations import AnnotationError

    for r in regions.regions:
        if r.cls in named:
            continue
        near = [n for n in named if n.lower().strip() == r.cls.lower().strip()] or \
            difflib.get_close_matches(r.cls, named, n=1, cutoff=0.75)
        if near:
            raise AnnotationError(f"{r.source}: class {r.cls!r} is not {near[0]!r}, which --include / --exclude name; "
                                  "its regions would be silently taken for another class. Fix the class in the file "
                                  "(names are case-sensitive), or name this class too")


def check_annotation_classes(entries: list[SlideEntry], config: TileConfig) -> None:
    """Before any slide: the --annotations folder exists, and each class --include / --exclude names is in some
    slide's file (a class no file has is a typo that would tile nothing, or exclude nothing)."""
    from wsi_mil.errors import ConfigError
    from wsi_mil.io.annotations import AnnotationError, read_annotations

    column = any(e.meta.get("annotations", "").strip() for e in entries)
    if config.annotations and column:
        raise ConfigError(f"two sources of annotation files: the manifest's annotations column and --annotations "
                          f"{config.annotations}; use one (the column names each slide's file)")
    if not config.annotations and not column:
        if config.include or config.exclude:
            raise ConfigError("--include / --exclude name classes of drawn regions: give --annotations DIR with the "
                              "slides' files, or an annotations column in the manifest")
        return
    if config.annotations and not Path(config.annotations).is_dir():
        raise ConfigError(f"--annotations {config.annotations}: no such folder (it holds <slide_id>.geojson or .xml files)")
    named = config.include_list() + config.exclude_list()
    if not named:
        return
    found: set[str] = set()
    unread: list[str] = []
    for entry in entries:
        try:
            file = annotation_file(entry, config, required=False)
            if file is not None:
                found |= set(read_annotations(file, (2**40, 2**40)).classes)
        except AnnotationError as exc:
            unread.append(str(exc))  # (reported with its slide, which fails alone)
    missing = [c for c in named if c not in found]
    if missing:
        raise ConfigError(f"--include / --exclude {', '.join(missing)}: no slide's annotation file has "
                          f"{'this class' if len(missing) == 1 else 'these classes'}; the files read have "
                          f"{', '.join(sorted(found)) or 'no classes'} (names as QuPath or ASAP show them, case and all)"
                          + (f". {len(unread)} slide(s) have no readable file, e.g. {unread[0]}" if unread else ""))


def _timed(job: Callable[[], Path]) -> tuple[Path, float]:
    t = time.perf_counter()
    return job(), time.perf_counter() - t


def open_store_writer(plan: SlidePlan, *, stores_dir: Path, fmt: StoreFormat) -> StoreWriter:
    """Start a store for ``plan`` (coordinates and provenance written, not yet committed)."""
    writer = StoreWriter(store_path(stores_dir, plan.slide_id, fmt), fmt)
    # the slide's path relative to the store as well, so the tree can move (absolute: plan_slide)
    plan.root_attrs.update(path_record("slide_path", plan.root_attrs["slide_path"], stores_dir))
    try:
        writer.write_coords(plan.coords_px, plan.tissue_fraction, plan.clam_attrs)
        if plan.annotation_overlap is not None:
            writer.write_annotation_overlap(plan.annotation_overlap)
        writer.set_attrs(plan.root_attrs)
    except BaseException:
        writer.abort()
        raise
    return writer


def tile_slide_coords(entry: SlideEntry, config: TileConfig, stores_dir: Path, qc_dir: Path | None,
                      pool: Executor | None = None) -> SlidePlan:
    """Worker task: plan a slide and, unless pixels are wanted, write its finished store.

    A slide without tissue still gets a (zero-patch) store so a re-run skips it; the
    plan carries a warning instead of raising, and callers report it as ``no_tissue``.
    """
    plan = plan_slide(entry, config, qc_dir=qc_dir, pool=pool)
    if plan.n_patches == 0:
        removed = plan.tissue.ink_removed_share if plan.tissue else 0.0
        if config.reject_pen and removed > 0.5:
            advice = (f"pen-mark rejection removed {100 * removed:.0f}% of the stained area as ink; if the stain "
                      "itself is blue or green (Giemsa, IHC counterstain ...), run again with --no-reject-pen")
        elif config.include:
            found = (plan.root_attrs.get("annotations") or {}).get("classes", [])
            advice = (f"no tissue inside its --include {config.include} regions (its file has the classes "
                      f"{', '.join(found) or 'none'}); check the annotations, or the QC image")
        else:
            advice = "check the QC image, or lower --min-tissue / --saturation-min for faint stains"
        plan.warnings.append(str(NoTissueError(
            f"{entry.slide_id}: no patch reached --min-tissue {config.min_tissue}; {advice}"
        )))
    if not config.save_patches or plan.n_patches == 0:
        t = time.perf_counter()
        writer = open_store_writer(plan, stores_dir=stores_dir, fmt=config.format)  # type: ignore[arg-type]
        try:
            if config.save_patches:  # zero patches: keep the layout of a pixel store
                writer.begin_patches()
                writer.end_patches()
            store_s = time.perf_counter() - t
            # a slide is finished with its QC image: one that cannot be written (a full disk) leaves no store
            # either, so the re-run redoes the slide rather than finding it cached without its QC
            plan.finish_qc()
        except BaseException:
            writer.abort()
            raise
        t = time.perf_counter()
        plan.store = str(writer.commit())
        plan.phases["store"] = store_s + time.perf_counter() - t
    else:
        plan.finish_qc()
    plan.seconds = time.perf_counter() - plan.started
    return plan
