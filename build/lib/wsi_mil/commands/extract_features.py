"""`wsi-mil extract-features`: tiler stores -> frozen encoder -> one feature store per slide.

Slides are sharded across devices (one process per device; a single device runs in
this process). Per slide: a finished store with the same encoder and coordinates is
skipped; one from another encoder is refused unless ``--overwrite``; unfinished chunks
from an earlier run are continued. A bad slide is reported and the batch goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil import __version__
from wsi_mil.commands.report import failure_message, format_table, status_counts
from wsi_mil.config import ExtractConfig
from wsi_mil.errors import ConfigError, WsiMilError
from wsi_mil.io.atomic import write_json
from wsi_mil.io.features import FeatureWriter, coords_sha256
from wsi_mil.io.paths import path_record, resolve_recorded
from wsi_mil.io.store import SUFFIX, PatchStore, _remove, read_complete_attrs
from wsi_mil.tiling.tissue import STAIN_NAMES

logger = logging.getLogger(__name__)


@dataclass
class FeatureOutcome:
    slide_id: str
    status: str  # ok | cached | empty | failed
    n_patches: int = 0
    n_features: int = 0
    n_unreadable: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    device: str = ""
    store: str | None = None
    message: str = ""


@dataclass
class ExtractReport:
    outcomes: list[FeatureOutcome] = field(default_factory=list)
    seconds: float = 0.0
    encoder: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(o.status == "failed" for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        counts = status_counts(o.status for o in self.outcomes)
        embedded = sum(o.n_features for o in self.outcomes if o.status == "ok")
        busy = sum(o.seconds for o in self.outcomes if o.status == "ok")
        return {"ok": self.ok, "seconds": round(self.seconds, 3), "counts": counts, "encoder": self.encoder,
                "n_features": sum(o.n_features for o in self.outcomes),
                "patches_per_s": round(embedded / busy, 2) if busy else None,
                "slides": [asdict(o) for o in self.outcomes]}

    def table(self) -> str:
        rows = [("slide", "status", "patches", "features", "unreadable", "sec", "patches/s", "note")]
        for o in self.outcomes:
            rate = f"{(o.n_features - o.resumed_from) / o.seconds:.1f}" if o.status == "ok" and o.seconds else "-"
            rows.append((o.slide_id, o.status, str(o.n_patches), str(o.n_features), str(o.n_unreadable),
                         f"{o.seconds:.1f}", rate, o.message.splitlines()[0][:80] if o.message else ""))
        problems = [f"[{o.status}] {o.slide_id}: {o.message}" for o in self.outcomes if o.status == "failed" or o.n_unreadable]
        return format_table(rows, problems)


# -- inputs ---------------------------------------------------------------------------------
def find_stores(inputs: list[str | Path]) -> list[Path]:
    """Patch stores from tile run folders (``patches/`` inside), folders of stores, or store paths."""
    stores: list[Path] = []
    for item in map(Path, inputs):
        if item.suffix in (".h5", ".zarr") and item.exists():
            stores.append(item)
        elif item.is_dir():
            folder = item / "patches" if (item / "patches").is_dir() else item
            found = sorted(p for p in folder.iterdir() if p.suffix in (".h5", ".zarr") and not p.name.endswith((".partial", ".parts")))
            if not found:
                raise WsiMilError(f"{item}: no patch stores (*.h5 / *.zarr) found; run `wsi-mil tile` first")
            stores += found
        else:
            raise WsiMilError(f"{item}: not a patch store or a folder of them")
    ids = [s.stem for s in stores]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise WsiMilError(f"slide id(s) {dupes} appear in more than one input store; give each slide once")
    return stores


@dataclass(frozen=True)
class SlideSpec:
    """What a shard process needs to embed one slide (small and picklable)."""

    slide_id: str
    store: str
    out: str
    n_patches: int
    effective_mpp: float | None = None  # the patches' resolution (the encoder's is compared with it)


def warn_resolution(todo: list[SlideSpec], encoder: str) -> list[str]:
    """A warning when patches were tiled at another resolution than the encoder was trained
    at (its recipe's µm/px): the features are still made (a user may mean it), but said.
    Returns the slides concerned."""
    from wsi_mil.encoders.registry import encoder_mpp

    want = encoder_mpp(encoder)
    if want is None:
        return []
    off = [f"{s.slide_id} ({s.effective_mpp:.3g} µm/px)" for s in todo
           if s.effective_mpp is not None and abs(s.effective_mpp - want) > 0.05 * want]
    if off:
        logger.warning("encoder %s was trained at %.3g µm/px (20x) but %d slide(s) were tiled at another resolution, "
                       "e.g. %s: its features there are not what its authors measured. Tile with --mpp %g to match",
                       encoder, want, len(off), ", ".join(off[:3]), want)
    return off


def _plan(store: Path, features_dir: Path, config: ExtractConfig, encoder_fp: str,
          overwrite: bool) -> SlideSpec | FeatureOutcome:
    attrs = read_complete_attrs(store)
    sid = store.stem
    if attrs is None:
        return FeatureOutcome(sid, "failed", message=f"{store}: not a finished patch store (re-run `wsi-mil tile`)")
    n = int(attrs.get("n_patches", 0))
    out = features_dir / f"{sid}{SUFFIX[config.format]}"
    done = read_complete_attrs(out)
    if done is not None and not overwrite:
        if done.get("encoder_fingerprint") != encoder_fp:
            return FeatureOutcome(sid, "failed", n, store=str(out), message=(
                f"{out} holds features from another encoder ({done.get('encoder')}, weights "
                f"{str(done.get('weights_sha256'))[:12]}) or other settings; features of two encoders are never mixed "
                "in one store. Use --overwrite to replace them, or another --out"))
        with PatchStore(store) as s:
            if done.get("coords_sha256") != coords_sha256(s.coords):
                return FeatureOutcome(sid, "failed", n, store=str(out), message=(
                    f"{out} was computed from other patch coordinates (the slide was re-tiled); use --overwrite"))
        return FeatureOutcome(sid, "cached", n, int(done.get("n_features", 0)), int(done.get("n_unreadable", 0)),
                              store=str(out), message="already embedded (cached)")
    if overwrite:
        _remove(out)
        _remove(out.with_name(out.name + ".parts"))
    mpp = attrs.get("effective_mpp")
    return SlideSpec(sid, str(store), str(out), n, float(mpp) if isinstance(mpp, int | float) else None)


def _slide_path(attrs: dict[str, Any], sid: str, slide_dirs: list[Path], store: Path) -> str:
    recorded = attrs.get("slide_path")
    found = resolve_recorded(attrs, "slide_path", store.parent)
    if found is not None:
        return str(found)
    name = attrs.get("slide_file")
    for d in slide_dirs:
        if name and (d / name).exists():
            return str(d / name)
    raise WsiMilError(f"{sid}: the slide file {recorded or name} is not there any more; pass --slides DIR with the "
                      "slides, or tile with --save-patches and use --source store")


def _write_report(out_dir: Path, report: ExtractReport) -> None:
    """features_report.json, unless it already says what this run found (every slide
    embedded before: a re-run that changes nothing rewrites nothing)."""
    from wsi_mil.commands.report import still_reported

    if still_reported(out_dir / "features_report.json", {o.slide_id: o.status for o in report.outcomes},
                      {"cached": {"ok", "cached", "empty"}}):  # a store of no patches is found as well
        logger.info("%s: up to date (every slide already embedded with this encoder): nothing written", out_dir)
    else:
        write_json(out_dir / "features_report.json", report.to_dict())


def request_key(config: ExtractConfig) -> str:
    """What the encoder's fingerprint follows from, known without building the encoder:
    the encoder's name, its weights file's SHA-256 (the whole file), the test-time
    transforms, and this wsi-mil's version. Stores written under the same key hold features
    of the same encoder, so a re-run whose every store has it does not build one."""
    import hashlib
    import json

    from wsi_mil.io.slide import file_sha256

    weights = file_sha256(config.weights) if config.weights and Path(config.weights).is_file() else config.weights
    body = {"wsi_mil_version": __version__, "encoder": config.encoder, "weights": weights,
            "random_init": config.random_init, "tta_flips": config.tta_flips, "stain_norm": config.stain_norm}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _all_cached(stores: list[Path], features_dir: Path, config: ExtractConfig, key: str
                ) -> tuple[list[FeatureOutcome], dict[str, Any]] | None:
    """Every slide already embedded under ``key`` from its current patch coordinates: their
    outcomes and the encoder's description (from the stores), else None (the encoder is
    built and each slide planned as usual)."""
    outcomes, desc = [], None
    for store in stores:
        out = features_dir / f"{store.stem}{SUFFIX[config.format]}"
        done = read_complete_attrs(out)
        if done is None or done.get("extract_request") != key or read_complete_attrs(store) is None:
            return None
        with PatchStore(store) as s:
            if done.get("coords_sha256") != coords_sha256(s.coords):
                return None
        desc = desc or {k: done.get(k) for k in ("encoder", "dim", "weights", "weights_sha256", "preprocess",
                                                  "transforms", "tta_flips")}
        outcomes.append(FeatureOutcome(store.stem, "cached", int(done.get("n_patches", 0) or done.get("n_features", 0)),
                                       int(done.get("n_features", 0)), int(done.get("n_unreadable", 0)), store=str(out),
                                       message="already embedded (cached)"))
    return (outcomes, desc or {}) if outcomes else None


# -- one device -----------------------------------------------------------------------------
def _build(config: ExtractConfig) -> Any:
    """The encoder with the run's test-time transforms (part of its fingerprint)."""
    from wsi_mil.encoders import build_encoder
    from wsi_mil.encoders.stain import STAIN_METHODS

    encoder = build_encoder(config.encoder, weights=config.weights, allow_random_init=config.random_init)
    encoder.tta_flips = config.tta_flips
    if config.stain_norm != "none":
        encoder.add_transform(f"stain_norm:{config.stain_norm}", STAIN_METHODS[config.stain_norm])
    return encoder


def run_shard(specs: list[SlideSpec], config: ExtractConfig, device: str, slide_dirs: list[str],
              progress: bool = False, position: int = 0, encoder: Any = None) -> list[FeatureOutcome]:
    """Embed ``specs`` on ``device``; runs in this process or in a per-device process."""
    from tqdm import tqdm

    from wsi_mil.encoders.extract import embed_jobs
    from wsi_mil.encoders.loader import SlideJob
    from wsi_mil.tiling.grid import PatchGeometry

    if encoder is None:
        encoder = _build(config)
    desc = encoder.describe()
    key = request_key(config)  # lets a re-run decide before building an encoder
    settings = _settings(config, device)
    outcomes: dict[str, FeatureOutcome] = {}
    jobs, writers, finals = [], [], []
    for spec in specs:
        try:
            with PatchStore(spec.store) as s:
                attrs, coords, clam = s.attrs, s.coords, s.coords_attrs
                has_pixels = s.has_patches
            source = config.source if config.source != "auto" else ("store" if has_pixels else "slide")
            if source == "store" and not has_pixels:
                raise WsiMilError(f"{spec.slide_id}: --source store, but the store has no pixels (tile with --save-patches)")
            slide_path = _slide_path(attrs, spec.slide_id, [Path(d) for d in slide_dirs], Path(spec.store)) if source == "slide" else None
            from wsi_mil.io.slide import changed_since

            if slide_path is not None and changed_since(attrs, slide_path):
                raise WsiMilError(f"{spec.slide_id}: {slide_path} changed since it was tiled (its size or content "
                                  "differs); re-run `wsi-mil tile --overwrite` for it")
            c_sha = coords_sha256(coords)
            meta = {**desc, "dim": encoder.dim, "encoder_fingerprint": encoder.fingerprint(), "coords_sha256": c_sha,
                    "extract_request": key,
                    "fingerprint": f"{encoder.fingerprint()}-{c_sha[:16]}",
                    "chunk_patches": settings.chunk_patches, "batch_size": settings.batch_size}
            writer = FeatureWriter(Path(spec.out), config.format, meta, len(coords))  # type: ignore[arg-type]
            start = writer.start()
            geometry = PatchGeometry.from_store_attrs(attrs)
            jobs.append(SlideJob(spec.slide_id, source, slide_path, spec.store, geometry, coords, start))
            writers.append(writer)
            final_attrs: dict[str, Any] = {
                "created_by": "wsi-mil extract-features", "wsi_mil_version": __version__, "slide_id": spec.slide_id,
                **{k: attrs[k] for k in ("slide_sha256", "slide_fingerprint") if k in attrs},
                "slide_mpp": attrs.get("slide_mpp"), "mpp_source": attrs.get("mpp_source"),
                **{k: attrs[k] for k in ("tissue_area_mm2", *STAIN_NAMES) if k in attrs},  # nuisances the shortcut checks read
                "effective_mpp": attrs.get("effective_mpp"), "patch_size_px": attrs.get("patch_size_px"),
                "patch_level": attrs.get("patch_level"), **path_record("source_store", spec.store, Path(spec.out).parent),
                "extent_level0_px": geometry.extent_level0_px, "step_level0_px": geometry.step_level0_px,
                "pixel_source": source, "n_patches": len(coords), "device": device,
                "precision": config.precision, "channels_last": config.channels_last,
            }
            finals.append((coords, clam, final_attrs))
            outcomes[spec.slide_id] = FeatureOutcome(spec.slide_id, "ok", len(coords), resumed_from=start, device=device)
            if start:
                logger.info("%s: resuming after %d of %d patches", spec.slide_id, start, len(coords))
        except Exception as exc:  # noqa: BLE001 - a bad slide is reported; the batch goes on
            outcomes[spec.slide_id] = _failed(spec.slide_id, spec.n_patches, exc)

    total = sum(j.n_patches - j.start for j in jobs)
    with tqdm(total=total, desc=f"embed [{device}]", unit="patch", unit_scale=True, disable=not progress, position=position) as bar:
        try:
            for j, seconds, error in embed_jobs(jobs, writers, encoder, settings, on_batch=bar.update):
                sid = jobs[j].slide_id
                if error is not None:
                    outcomes[sid] = _failed(sid, jobs[j].n_patches, error)
                    continue
                try:
                    coords, clam, final_attrs = finals[j]
                    path, n_rows, bad = writers[j].finish(coords, clam, final_attrs)
                    o = outcomes[sid]
                    o.n_features, o.n_unreadable, o.seconds, o.store = n_rows, len(bad), seconds, str(path)
                    o.status = "ok" if o.n_features else "empty"
                    if bad:
                        o.message = (f"{len(bad)} unreadable patch(es) left out, e.g. level-0 ({bad[0]['x']}, {bad[0]['y']}): "
                                     f"{bad[0]['error']}; all listed in the store's 'unreadable_patches' attribute")
                except Exception as exc:  # noqa: BLE001
                    outcomes[sid] = _failed(sid, jobs[j].n_patches, exc)
        except Exception as exc:  # noqa: BLE001 - e.g. the device failed; unfinished slides resume next run
            for job in jobs:
                if outcomes[job.slide_id].status == "ok" and outcomes[job.slide_id].store is None:
                    outcomes[job.slide_id] = _failed(job.slide_id, job.n_patches, exc)
    return [outcomes[s.slide_id] for s in specs]


def _settings(config: ExtractConfig, device: str) -> Any:
    from wsi_mil.encoders.extract import RunSettings

    return RunSettings(device=device, precision=config.precision, batch_size=config.batch_size, num_workers=config.readers,
                       prefetch=config.prefetch, channels_last=config.channels_last, compile=config.compile,
                       threads=config.threads, chunk_batches=config.chunk_batches)


def _failed(slide_id: str, n_patches: int, exc: BaseException) -> FeatureOutcome:
    message = failure_message(exc)
    logger.error("%s: %s", slide_id, message)
    return FeatureOutcome(slide_id, "failed", n_patches, message=message)


# -- sharding ---------------------------------------------------------------------------------
def shard(specs: list[SlideSpec], n_devices: int) -> list[list[SlideSpec]]:
    """Balance slides over devices by patch count (largest first onto the least loaded)."""
    shards: list[list[SlideSpec]] = [[] for _ in range(n_devices)]
    load = [0] * n_devices
    for spec in sorted(specs, key=lambda s: (-s.n_patches, s.slide_id)):
        k = min(range(n_devices), key=lambda i: (load[i], i))
        shards[k].append(spec)
        load[k] += spec.n_patches
    return shards


def cluster_plan(workers: dict[str, Any], devices: str) -> tuple[int, str, dict[str, float] | None]:
    """(number of shards, device, Dask resources per shard) on an existing cluster: one shard
    per GPU worker (claimed with the ``GPU`` resource, so a GPU never runs two shards) when
    the workers advertise GPUs (``dask worker --resources GPU=1``) and ``--devices`` allows,
    else one per CPU worker."""
    gpus = sum(1 for w in workers.values() if (w.get("resources") or {}).get("GPU", 0) >= 1)
    want = devices.strip().lower()
    if want.startswith("cuda") or (want == "auto" and gpus):
        if not gpus:
            raise ConfigError(f"--devices {devices}: no worker of the Dask cluster advertises a GPU; start GPU workers with "
                              "`dask worker ADDRESS --resources GPU=1` (one per GPU), or use --devices cpu")
        return gpus, "cuda", {"GPU": 1}
    if want not in ("auto", "cpu"):
        raise ConfigError(f"--devices {devices}: on a Dask cluster use auto, cpu or cuda (each GPU worker uses its own GPU)")
    return max(1, len(workers)), "cpu", None


def _run_on_cluster(todo: list[SlideSpec], config: ExtractConfig, dirs: list[str], scheduler: str,
                    progress: bool) -> list[FeatureOutcome]:
    """``run_shard`` on the workers of an existing Dask cluster (files on a shared disk)."""
    from tqdm import tqdm

    from wsi_mil.parallel import dask_client

    outcomes: list[FeatureOutcome] = []
    with dask_client(workers=1, scheduler=scheduler) as client:
        n, device, resources = cluster_plan(client.scheduler_info().get("workers", {}), config.devices)
        logger.info("embedding %d slide(s) on %d %s worker(s) of %s", len(todo), n, device.upper(), scheduler)
        parts = [p for p in shard(todo, n) if p]
        futures = [client.submit(run_shard, part, config, device, dirs, False, i, resources=resources, pure=False,
                                 key=f"wsi-mil-extract-{i}-{part[0].slide_id}") for i, part in enumerate(parts)]
        bar = tqdm(total=sum(len(p) for p in parts), desc="embed [cluster]", unit="slide", disable=not progress)
        for fut, part in zip(futures, parts, strict=True):
            try:
                outs = fut.result()
            except Exception as exc:  # noqa: BLE001 - a lost worker fails its slides only; a re-run resumes them
                outs = [_failed(s.slide_id, s.n_patches, exc) for s in part]
            outcomes += outs
            bar.update(len(part))
        bar.close()
    return outcomes


def run_extract(inputs: list[str | Path], *, out_dir: Path, config: ExtractConfig, overwrite: bool = False,
                slide_dirs: list[Path] | None = None, progress: bool = True, scheduler: str | None = None) -> ExtractReport:
    """Embed every slide of ``inputs``; writes ``features/`` and ``features_report.json`` in ``out_dir``.

    Slides are sharded over the local devices, or with ``scheduler`` (``tcp://host:8786``)
    over the workers of that Dask cluster, which must see the same files (paths are made
    absolute)."""
    t0 = time.perf_counter()
    stores = [s.resolve() for s in find_stores(inputs)]
    out_dir = Path(out_dir).resolve()
    devices = config.device_list() if scheduler is None else [f"Dask cluster {scheduler}"]
    slide_dirs = [Path(d).resolve() for d in slide_dirs or []]
    features_dir = out_dir / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    key = request_key(config)
    cached = None if overwrite else _all_cached(stores, features_dir, config, key)
    if cached is not None:  # decided before building the encoder (seconds with a large one)
        report = ExtractReport(cached[0], time.perf_counter() - t0, cached[1])
        _write_report(out_dir, report)
        return report
    probe = _build(config)
    encoder_fp, encoder_desc = probe.fingerprint(), probe.describe()
    planned = [_plan(s, features_dir, config, encoder_fp, overwrite) for s in stores]
    todo = [p for p in planned if isinstance(p, SlideSpec)]
    warn_resolution(todo, config.encoder)
    results: dict[str, FeatureOutcome] = {p.slide_id: p for p in planned if isinstance(p, FeatureOutcome)}
    for o in results.values():
        if o.status == "failed":
            logger.error("%s: %s", o.slide_id, o.message)
    dirs = [str(d) for d in slide_dirs or []]
    if todo:
        logger.info("embedding %d slide(s) with %s on %s", len(todo), config.encoder, ", ".join(devices))
        if scheduler is not None:
            for o in _run_on_cluster(todo, config, dirs, scheduler, progress):
                results[o.slide_id] = o
        elif len(devices) == 1:
            for o in run_shard(todo, config, devices[0], dirs, progress, encoder=probe):
                results[o.slide_id] = o
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            shards = shard(todo, len(devices))
            with ProcessPoolExecutor(len(devices), mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(run_shard, part, config, dev, dirs, progress, i)
                           for i, (part, dev) in enumerate(zip(shards, devices, strict=True)) if part]
                for fut, part in zip(futures, [p for p in shards if p], strict=True):
                    try:
                        outs = fut.result()
                    except Exception as exc:  # noqa: BLE001 - a crashed device process fails its slides only
                        outs = [_failed(s.slide_id, s.n_patches, exc) for s in part]
                    for o in outs:
                        results[o.slide_id] = o
    report = ExtractReport([results[s.stem] for s in stores], time.perf_counter() - t0, encoder_desc)
    _write_report(out_dir, report)
    return report
