"""`wsi-mil tile`: the batch loop over slides, on a Dask cluster, with progress and a run report.

Phase 1 (per slide, in parallel): tissue detection and the patch grid; stores without
pixels are finished here. Phase 2 (``--save-patches``): each slide's coordinates are cut
into chunks that workers read and JPEG-encode; this process appends the chunks in order
to the slide's store and publishes it atomically when the last chunk is in.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsi_mil.commands.report import failure_message, format_table, note_of, status_counts, still_reported
from wsi_mil.config import TileConfig
from wsi_mil.data.manifest import SlideEntry, slide_file
from wsi_mil.errors import ConfigError, SlideError
from wsi_mil.io.atomic import write_json
from wsi_mil.io.store import PARTIAL, read_complete_attrs, store_path
from wsi_mil.tiling.qc import qc_name
from wsi_mil.tiling.tile_slide import (
    SlidePlan,
    check_annotation_classes,
    config_fingerprint,
    open_store_writer,
    settings_change,
    tile_slide_coords,
)
from wsi_mil.tiling.tissue import TISSUE_METHOD_VERSION

logger = logging.getLogger(__name__)
#: the message of a slide found already tiled with these settings (and nothing more to say)
CACHED = "already tiled (cached)"


@dataclass
class SlideOutcome:
    """One row of the run report."""

    slide_id: str
    path: str
    status: str  # ok | cached | no_tissue | failed
    n_patches: int = 0
    seconds: float = 0.0
    mpp: float | None = None
    mpp_source: str | None = None
    store: str | None = None
    qc_png: str | None = None
    message: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds of this slide's steps (see SlidePlan)
    fingerprint: str | None = None  # the slide file's content fingerprint, as its store records it


@dataclass
class RunReport:
    outcomes: list[SlideOutcome] = field(default_factory=list)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)  # files a folder scan left out
    disk_full: dict[str, Any] | None = None  # set when the run stopped because the output disk filled up
    executor: str = ""  # threads | processes | scheduler (none when every slide was cached)

    @property
    def n_failed(self) -> int:
        return sum(o.status == "failed" for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return self.n_failed == 0

    def identical_files(self) -> list[dict[str, Any]]:
        """Groups of rows whose slide files have one content fingerprint: one slide under
        several ids (a copied file, or one path listed twice)."""
        groups: dict[str, list[SlideOutcome]] = {}
        for o in self.outcomes:
            if o.fingerprint:
                groups.setdefault(o.fingerprint, []).append(o)
        return [{"fingerprint": fp, "slides": [o.slide_id for o in group], "paths": [o.path for o in group]}
                for fp, group in groups.items() if len(group) > 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "seconds": round(self.seconds, 3), "counts": status_counts(o.status for o in self.outcomes),
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "n_patches": sum(o.n_patches for o in self.outcomes),
            "slides": [asdict(o) for o in self.outcomes],
            "skipped_inputs": self.skipped_inputs,
            "disk_full": self.disk_full,
            "executor": self.executor,
            "identical_files": self.identical_files(),
        }

    def table(self) -> str:
        rows = [("slide", "status", "patches", "sec", "mpp (source)", "note")]
        problems = []
        for o in self.outcomes:
            mpp = f"{o.mpp:.3f} ({o.mpp_source})" if o.mpp else "-"
            note, below = note_of(o.message)
            if below:
                problems.append(f"[{o.status}] {o.message}")
            rows.append((o.slide_id, o.status, str(o.n_patches), f"{o.seconds:.1f}", mpp, note))
        text = format_table(rows, problems)
        if self.skipped_inputs:
            shown = self.skipped_inputs[:10]
            text += (f"\n\n{len(self.skipped_inputs)} file(s) in the input folders are not slides and were skipped:\n"
                     + "\n".join(f"  {Path(s['path']).name}: {s['reason']}" for s in shown)
                     + ("\n  ... all listed in run_report.json" if len(self.skipped_inputs) > 10 else ""))
        same = self.identical_files()
        if same:
            n_rows = sum(len(g["slides"]) for g in same)
            text += (f"\n\n{n_rows} slide rows are {len(same)} slide file(s) under several ids (the same content "
                     "fingerprint): each is one slide, tiled once per id. Keep one row per slide (or give the copies "
                     "one patient_id); train-mil refuses copies that land on both sides of its splits:\n"
                     + "\n".join(f"  {', '.join(g['slides'][:6])}{' ...' if len(g['slides']) > 6 else ''} "
                                  f"({len(g['slides'])} ids): {Path(g['paths'][0]).name}" for g in same[:10])
                     + ("\n  ... all listed in run_report.json (identical_files)" if len(same) > 10 else ""))
        return text


def _clean_partials(stores_dir: Path) -> None:
    for leftover in stores_dir.glob(f"*{PARTIAL}"):
        logger.info("removing unfinished store from an interrupted run: %s", leftover.name)
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    shutil.rmtree(stores_dir / PLANS_DIR, ignore_errors=True)  # coordinates an interrupted run kept for its pixels


def _cached_outcome(entry: SlideEntry, config: TileConfig, stores_dir: Path, qc_dir: Path, overwrite: bool) -> SlideOutcome | str | None:
    """An outcome for a finished store, a failure message for a conflicting one, or None to (re)build."""
    final = store_path(stores_dir, entry.slide_id, config.format)  # type: ignore[arg-type]
    attrs = read_complete_attrs(final)
    if attrs is None or overwrite:
        return None
    if attrs.get("config_fingerprint") != config_fingerprint(config, entry):
        return (f"{final} exists from a run with different settings or a changed slide file "
                f"({settings_change(attrs, config, entry)}); use --overwrite to rebuild it or choose another --out")
    from wsi_mil.io.slide import changed_since

    path = slide_file(entry)
    if path.exists() and changed_since(attrs, path):
        return (f"{entry.path} changed since it was tiled (same size, other content: it was rewritten in place); its "
                f"store {final.name} describes the old file. Use --overwrite to tile it again")
    qc = qc_dir / qc_name(entry.slide_id)
    message = CACHED
    method = int(attrs.get("tissue_method_version", 1))
    if method != TISSUE_METHOD_VERSION:  # kept (re-tiling a cohort is the user's call), but said
        message += (f"; made by an earlier tissue-detection method (version {method}, now {TISSUE_METHOD_VERSION}, "
                    f"wsi-mil {attrs.get('wsi_mil_version', '?')}): its mask may differ a little from a new run's; "
                    "--overwrite re-tiles it")
        logger.warning("%s: %s", entry.slide_id, message)
    return SlideOutcome(
        entry.slide_id, str(entry.path), "cached" if attrs.get("n_patches", 0) else "no_tissue",
        n_patches=int(attrs.get("n_patches", 0)), mpp=attrs.get("slide_mpp"), mpp_source=attrs.get("mpp_source"),
        store=str(final), qc_png=str(qc) if qc.exists() else None, message=message,
        fingerprint=attrs.get("slide_fingerprint"),
    )


def _failure(entry: SlideEntry, exc: BaseException) -> SlideOutcome:
    message = str(exc) if isinstance(exc, SlideError) else f"{entry.slide_id}: {failure_message(exc)}"
    logger.error("%s", message)
    return SlideOutcome(entry.slide_id, str(entry.path), "failed", message=message)


def _outcome_from_plan(plan: SlidePlan, seconds: float) -> SlideOutcome:
    status = "ok" if plan.n_patches else "no_tissue"
    return SlideOutcome(
        plan.slide_id, plan.slide_path, status, n_patches=plan.n_patches, seconds=seconds,
        mpp=plan.mpp, mpp_source=plan.mpp_source, store=plan.store, qc_png=plan.qc_path,
        message="; ".join(plan.warnings), phases={k: round(v, 3) for k, v in plan.phases.items()},
        fingerprint=plan.root_attrs.get("slide_fingerprint"),
    )


def run_tile(
    entries: list[SlideEntry],
    *,
    out_dir: Path,
    config: TileConfig,
    workers: int = 1,
    scheduler: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    skipped_inputs: list[dict[str, str]] | None = None,
    dashboard: str | None = None,
    executor: str = "auto",
) -> RunReport:
    """Tile every slide; never stops at a bad slide. Writes ``run_report.json`` in ``out_dir``.

    ``executor``: ``processes`` runs on a local Dask cluster (or ``scheduler``), one slide
    per worker process; ``threads`` runs in this process, one slide at a time, its strips
    and patch chunks shared by ``workers`` threads (no cluster to start); ``auto`` takes
    threads when a single slide needs coordinates only and no scheduler is given, processes
    otherwise (pixel extraction ran at 1.6x a plain loop on two threads, 1.9x on two processes).
    """
    from wsi_mil.parallel import dask_client, thread_client

    if executor not in ("auto", "threads", "processes"):
        raise ConfigError(f"--executor must be auto, threads or processes, not {executor!r}")
    if executor == "threads" and scheduler:
        raise ConfigError("--executor threads runs in this process: leave out --scheduler (or use --executor processes)")

    check_annotation_classes(entries, config)  # (before any folder is made)
    t_start = time.perf_counter()
    stores_dir, qc_dir = out_dir / "patches", out_dir / "qc"
    stores_dir.mkdir(parents=True, exist_ok=True)
    qc_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(stores_dir)

    outcomes: dict[str, SlideOutcome] = {}
    todo: list[SlideEntry] = []
    for entry in entries:
        cached = _cached_outcome(entry, config, stores_dir, qc_dir, overwrite)
        if isinstance(cached, SlideOutcome):
            outcomes[entry.slide_id] = cached
        elif isinstance(cached, str):
            logger.error("%s: %s", entry.slide_id, cached)
            outcomes[entry.slide_id] = SlideOutcome(entry.slide_id, str(entry.path), "failed", message=f"{entry.slide_id}: {cached}")
        else:
            todo.append(entry)
    if len(todo) < len(entries):
        logger.info("%d of %d slides already done; processing %d", len(entries) - len(todo), len(entries), len(todo))

    phases: dict[str, float] = {}
    disk_full: dict[str, Any] | None = None
    used = ""
    if todo:
        # threads pay off for one slide's coordinates; pixel extraction (per-patch Python work) scales better on processes
        threads = not scheduler and (executor == "threads" or (executor == "auto" and len(todo) == 1 and not config.save_patches))
        t = time.perf_counter()
        start = thread_client(workers) if threads else dask_client(workers=workers, scheduler=scheduler, dashboard=dashboard)
        used = "threads" if threads else ("scheduler" if scheduler else "processes")
        with start as client:
            phases["cluster_start"] = time.perf_counter() - t
            t = time.perf_counter()
            plans = _coordinate_phase(client, todo, config, stores_dir, qc_dir, outcomes, progress)
            phases["tissue_and_grid"] = time.perf_counter() - t
            if config.save_patches and plans:
                t = time.perf_counter()
                disk_full = _pixel_phase(client, plans, config, stores_dir, outcomes, progress)
                phases["patch_pixels"] = time.perf_counter() - t
            del plans  # (their mapped arrays) before the folder they map goes
            shutil.rmtree(stores_dir / PLANS_DIR, ignore_errors=True)

    report = RunReport([outcomes[e.slide_id] for e in entries], time.perf_counter() - t_start, phases,
                       list(skipped_inputs or []), disk_full, used)
    same = report.identical_files()
    if same:
        logger.warning("%d slide file(s) are listed under more than one slide id (same content fingerprint), e.g. %s; "
                       "see the report's identical_files", len(same), " = ".join(same[0]["slides"][:4]))
    if (report.outcomes and not report.skipped_inputs and all(o.message == CACHED for o in report.outcomes)
            and still_reported(out_dir / "run_report.json", {o.slide_id: o.status for o in report.outcomes},
                               {"cached": {"ok", "cached"}, "no_tissue": {"no_tissue"}})):
        logger.info("%s: up to date (every slide already tiled with these settings): nothing written", out_dir)
        return report
    try:
        write_json(out_dir / "run_report.json", report.to_dict())
    except OSError as exc:  # a full disk must not hide the report: it is printed all the same
        logger.error("could not write %s (%s); the report is printed below", out_dir / "run_report.json", exc)
    return report


def _coordinate_phase(client: Any, todo: list[SlideEntry], config: TileConfig, stores_dir: Path,
                      qc_dir: Path, outcomes: dict[str, SlideOutcome], progress: bool) -> list[SlidePlan]:
    from wsi_mil.parallel import ThreadClient

    if isinstance(client, ThreadClient):  # one slide at a time, its strips on the threads
        return _coordinate_phase_threads(client, todo, config, stores_dir, qc_dir, outcomes, progress)
    from distributed import as_completed
    from tqdm import tqdm

    by_future = {client.submit(tile_slide_coords, e, config, stores_dir, qc_dir, pure=False): e for e in todo}
    plans: list[SlidePlan] = []
    with tqdm(total=len(todo), desc="tissue + grid", unit="slide", disable=not progress) as bar:
        for future in as_completed(by_future):
            entry = by_future[future]
            try:
                plan: SlidePlan = future.result()
            except Exception as exc:  # noqa: BLE001 - every slide failure is reported, none stops the batch
                outcomes[entry.slide_id] = _failure(entry, exc)
            else:
                _accept_plan(plan, config, outcomes, plans, stores_dir)
            bar.update(1)
    order = {e.slide_id: i for i, e in enumerate(todo)}
    return sorted(plans, key=lambda p: order[p.slide_id])


#: the folder (under the stores) where the driver keeps the coordinates of slides waiting for their pixels
PLANS_DIR = ".plans"


def _spill(plan: SlidePlan, stores_dir: Path) -> None:
    """Keep a plan's per-patch arrays on disk, mapped (the pixel phase reads them chunk by
    chunk): the driver held every slide's coordinates until the end (about 20 bytes a patch:
    2 GB for 10,000 slides of 10,000 patches)."""
    import numpy as np

    folder = stores_dir / PLANS_DIR
    folder.mkdir(exist_ok=True)
    for name in ("coords_px", "tissue_fraction"):
        path = folder / f"{plan.slide_id}.{name}.npy"
        np.save(path, getattr(plan, name))
        setattr(plan, name, np.load(path, mmap_mode="r"))


def _accept_plan(plan: SlidePlan, config: TileConfig, outcomes: dict[str, SlideOutcome], plans: list[SlidePlan],
                 stores_dir: Path) -> None:
    for warning in plan.warnings:
        logger.warning("%s", warning)
    if config.save_patches and plan.n_patches:
        _spill(plan, stores_dir)
        plans.append(plan)
    outcomes[plan.slide_id] = _outcome_from_plan(plan, plan.seconds)


def _coordinate_phase_threads(client: Any, todo: list[SlideEntry], config: TileConfig, stores_dir: Path,
                              qc_dir: Path, outcomes: dict[str, SlideOutcome], progress: bool) -> list[SlidePlan]:
    plans: list[SlidePlan] = []
    slides: Iterable[SlideEntry] = todo
    if progress:  # (tqdm is imported only when shown: a tenth of a one-slide run's start-up)
        from tqdm import tqdm

        slides = tqdm(todo, desc="tissue + grid", unit="slide")
    for entry in slides:
        try:
            plan = tile_slide_coords(entry, config, stores_dir, qc_dir, pool=client.pool)
        except Exception as exc:  # noqa: BLE001 - every slide failure is reported, none stops the batch
            outcomes[entry.slide_id] = _failure(entry, exc)
        else:
            _accept_plan(plan, config, outcomes, plans, stores_dir)
    return plans


def _chunks(plans: list[SlidePlan], size: int) -> Iterator[tuple[SlidePlan, int, int, bool]]:
    for plan in plans:
        n = plan.n_patches
        for start in range(0, n, size):
            yield plan, start, min(n, start + size), start + size >= n


def _pixel_phase(client: Any, plans: list[SlidePlan], config: TileConfig, stores_dir: Path,
                 outcomes: dict[str, SlideOutcome], progress: bool) -> dict[str, Any] | None:
    """Stream chunks through the workers, at most a few per worker in flight, written in order.

    When the output disk fills up the phase stops cleanly: finished stores stay, the slide
    being written is left as ``.partial`` (a re-run redoes it), slides not started are
    reported as not written, and the space still needed is estimated and returned."""
    import numpy as np
    from tqdm import tqdm

    from wsi_mil.errors import DiskFullError
    from wsi_mil.io.atomic import free_bytes, is_disk_full
    from wsi_mil.parallel import worker_count
    from wsi_mil.tiling.patches import extract_jpeg_chunk

    window = 3 * worker_count(client)
    pending: deque[tuple[Any, SlidePlan, int, bool]] = deque()
    chunk_iter = _chunks(plans, config.chunk_patches)
    writers: dict[str, Any] = {}
    started: dict[str, float] = {}
    failed: set[str] = set()

    def submit_next() -> bool:
        for plan, a, b, last in chunk_iter:
            if plan.slide_id in failed:
                continue
            fut = client.submit(extract_jpeg_chunk, plan.slide_path, np.array(plan.coords_px[a:b]), plan.geometry,
                                config.jpeg_quality, pure=False)
            pending.append((fut, plan, b - a, last))
            return True
        return False

    total = sum(p.n_patches for p in plans)
    full: str | None = None
    written_bytes, written_patches = 0, 0
    with tqdm(total=total, desc="patch pixels", unit="patch", unit_scale=True, disable=not progress) as bar:
        while len(pending) < window and submit_next():
            pass
        while pending:
            fut, plan, n, last = pending.popleft()
            sid = plan.slide_id
            try:
                flat, lengths = fut.result()
                if sid in failed:
                    continue
                if sid not in writers:
                    started[sid] = time.perf_counter()
                    writers[sid] = open_store_writer(plan, stores_dir=stores_dir, fmt=config.format)  # type: ignore[arg-type]
                    writers[sid].begin_patches()
                writers[sid].append_patches(flat, lengths)
                written_bytes += len(flat)
                written_patches += len(lengths)
                if last:
                    writer = writers.pop(sid)
                    writer.end_patches()
                    store = str(writer.commit())
                    plan.store = store
                    outcomes[sid] = _outcome_from_plan(plan, plan.seconds + time.perf_counter() - started[sid])
            except Exception as exc:  # noqa: BLE001 - a failing slide must not stop the others
                failed.add(sid)
                disk = isinstance(exc, DiskFullError) or is_disk_full(exc)
                if sid in writers:
                    writers.pop(sid).abort(keep_partial=disk)
                entry = SlideEntry(sid, Path(plan.slide_path))
                outcomes[sid] = _failure(entry, exc)
                if disk and full is None:
                    full = str(exc) if isinstance(exc, DiskFullError) else f"the disk is full ({exc})"
                    for item in pending:
                        item[0].cancel()
            finally:
                bar.update(n)
                while full is None and len(pending) < window and submit_next():
                    pass
            if full is not None:
                break
    if full is None:
        return None
    # what was not written: every slide not published (its outcome gets a store on commit)
    left = [p for p in plans if outcomes[p.slide_id].store is None]
    for w in writers.values():
        w.abort(keep_partial=True)
    for p in left:
        if outcomes[p.slide_id].status != "failed":
            outcomes[p.slide_id] = SlideOutcome(p.slide_id, p.slide_path, "failed", n_patches=p.n_patches,
                                                message=f"{p.slide_id}: not written: the output disk is full")
    per_patch = written_bytes / written_patches if written_patches else 40_000.0
    needed = int(per_patch * sum(p.n_patches for p in left) * 1.05)
    logger.error("stopped: %s. Finished stores are kept; about %.0f MB more are needed for the %d slide(s) left "
                 "(estimated from %d patches written); free space and re-run to finish them",
                 full, needed / 1e6, len(left), written_patches)
    return {"message": full, "needed_bytes": needed, "free_bytes": free_bytes(stores_dir),
            "slides_left": [p.slide_id for p in left]}
