"""Tiling benchmark: coordinates-only scaling with slide size, and pixel extraction vs a plain loop.

Slides are generated from real tissue (wsi_mil.synth) at 0.5 µm/px and cached in
benchmarks/.cache. Everything is measured side by side in one run; results go to
benchmarks/results/tile.json and tile.md (quoted in the README).

    .venv/bin/python benchmarks/bench_tile.py [--sizes 20000 50000 100000] [--pixel-size 50000]
    .venv/bin/python benchmarks/bench_tile.py --floor [--sizes 50000 100000] [--rounds 3]

``--floor`` measures coordinates-only tiling against its physical floor, side by side:
the floor is a plain single-process OpenSlide read, in bands, of the whole pyramid level
that tissue detection reads (the coarsest level at least as fine as ``--tissue-mpp``),
timed as a whole process (Python and OpenSlide start-up included) and inside it; beside it
``wsi-mil tile`` (whole process) with 1 and 2 workers (one slide: threads of the one
process, the default) and with one Dask worker process (``--executor processes``, a
cluster started per call, as before 0.2), and with 2 workers at ``--tissue-mpp 8`` (a
finer tissue mask than the default 16 µm/px, from the same level at 50k px: what the finer
mask costs). Rounds are interleaved (floor, 1 worker, 2 workers, 1 process, finer mask,
floor, …) and reported as medians with min-max; results go to
benchmarks/results/tile_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
TISSUE_MPP = 16.0  # wsi-mil tile's default --tissue-mpp (the floor reads the level it reads)


def make_slide(size: int) -> Path:
    from wsi_mil.synth.slide import SlideSpec, write_slide
    from wsi_mil.synth.textures import default_textures

    path = CACHE / f"bench-{size}.tiff"
    if not (path.exists() and path.with_suffix(".json").exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        normal, tumour = default_textures()
        write_slide(path, SlideSpec(size, size, seed=size, tissue_cover=0.35, n_pieces=3, tumour_regions=2),
                    normal=normal, tumour=tumour)
        print(f"generated {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


class RssSampler:
    """Peak RSS of a process tree (sum, and the largest single process), sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_total = self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                self.peak_total = max(self.peak_total, sum(rss))
                self.peak_single = max(self.peak_single, max(rss, default=0))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cli_process(args: list[str]) -> tuple[float, RssSampler]:
    """``wsi-mil ARGS --no-progress -q`` as its own process: (whole-process wall seconds,
    its RSS sampler, stopped); a failure raises with the end of its stderr."""
    cmd = [sys.executable, "-m", "wsi_mil.cli", *args, "--no-progress", "-q"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = RssSampler(proc.pid)
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {err.decode()[-2000:]}")
    return wall, sampler


def tile_cli(slide: Path, out: Path, *extra: str) -> dict:
    wall, sampler = cli_process(["tile", str(slide), "--out", str(out), *extra])
    report = json.loads((out / "run_report.json").read_text())
    return {"wall_s": wall, "report": report, "peak_rss_total_mb": sampler.peak_total / 2**20,
            "peak_rss_single_process_mb": sampler.peak_single / 2**20}


def plain_loop(slide: Path, store: Path, quality: int) -> tuple[int, float]:
    """Single process: read_region of the same coordinates + the same JPEG encoding."""
    import openslide

    from wsi_mil.io.store import PatchStore
    from wsi_mil.tiling.grid import PatchGeometry
    from wsi_mil.tiling.patches import encode_jpeg, read_patch

    with PatchStore(store) as s:
        coords, a = s.coords, s.attrs
    geom = PatchGeometry.from_store_attrs(a)
    slide_h = openslide.open_slide(str(slide))
    t = time.perf_counter()
    n_bytes = 0
    for x, y in coords:
        n_bytes += len(encode_jpeg(read_patch(slide_h, x_px=int(x), y_px=int(y), geometry=geom), quality=quality))
    return len(coords), time.perf_counter() - t


FLOOR_SNIPPET = r"""
import sys, time
t0 = time.perf_counter()
import numpy as np, openslide
from wsi_mil.io.slide import metadata_mpp
s = openslide.OpenSlide(sys.argv[1])
target = float(sys.argv[2]) / metadata_mpp(s)
ds = [float(d) for d in s.level_downsamples]
level = max((i for i, d in enumerate(ds) if d <= target * 1.01), key=lambda i: ds[i])
w, h = s.level_dimensions[level]
t1 = time.perf_counter()
band = max(1, (64 << 20) // (w * 4))
for y in range(0, h, band):
    np.asarray(s.read_region((0, int(y * ds[level])), level, (w, min(band, h - y))))
print(level, w, h, time.perf_counter() - t1, t1 - t0)
"""


def floor_run(slide: Path, tissue_mpp: float) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_SNIPPET, str(slide), str(tissue_mpp)], stdout=subprocess.PIPE)
    sampler = RssSampler(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop()
    level, w, h, read_s, start_s = out.decode().split()
    return {"wall_s": wall, "read_s": float(read_s), "startup_s": float(start_s), "level": int(level),
            "level_px": [int(w), int(h)], "peak_rss_mb": sampler.peak_single / 2**20}


def m(st: dict, f: str = "{:.1f}") -> str:
    """A :func:`_stat` as "median (min-max)"."""
    return f"{f.format(st['median'])} ({f.format(st['min'])}-{f.format(st['max'])})"


def _mask_um(report: dict) -> float:
    """The tissue mask's µm/px recorded in the run's store."""
    import h5py

    with h5py.File(report["slides"][0]["store"], "r") as f:
        return float(f.attrs["tissue_mask_um_per_px"])


def _stat(values: list[float]) -> dict:
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def floor_main(args: argparse.Namespace) -> None:
    """Coordinates-only tiling vs the decode floor, interleaved rounds (see the docstring)."""
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "rounds": args.rounds, "sizes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            slide = make_slide(size)
            runs: dict[str, list[dict]] = {"floor": [], "tile_1": [], "tile_2": [], "proc_1": [], "fine_2": []}
            for r in range(args.rounds):
                runs["floor"].append(floor_run(slide, TISSUE_MPP))
                for w in (1, 2):
                    runs[f"tile_{w}"].append(tile_cli(slide, Path(tmp) / f"f{size}-{w}-{r}", "--workers", str(w)))
                runs["proc_1"].append(tile_cli(slide, Path(tmp) / f"p{size}-{r}", "--workers", "1", "--executor", "processes"))
                runs["fine_2"].append(tile_cli(slide, Path(tmp) / f"c{size}-{r}", "--workers", "2", "--tissue-mpp", "8"))
                print(size, r, {k: round(v[-1]["wall_s"], 2) for k, v in runs.items()}, flush=True)
            row = {"side_px": size, "level": runs["floor"][0]["level"], "level_px": runs["floor"][0]["level_px"],
                   "floor_wall_s": _stat([x["wall_s"] for x in runs["floor"]]),
                   "floor_read_s": _stat([x["read_s"] for x in runs["floor"]]),
                   "floor_peak_rss_mb": _stat([x["peak_rss_mb"] for x in runs["floor"]])}
            for key in ("tile_1", "tile_2", "proc_1", "fine_2"):
                rr = runs[key]
                row[key] = {
                    "mask_um_per_px": _mask_um(rr[0]["report"]),
                    "executor": rr[0]["report"].get("executor"),
                    "wall_s": _stat([x["wall_s"] for x in rr]),
                    "slide_s": _stat([x["report"]["slides"][0]["seconds"] for x in rr]),
                    "phases_s": {k: _stat([x["report"].get("phase_seconds", {}).get(k, 0.0) for x in rr])
                                 for k in rr[0]["report"].get("phase_seconds", {})},
                    "slide_phases_s": {k: _stat([x["report"]["slides"][0].get("phases", {}).get(k, 0.0) for x in rr])
                                       for k in rr[0]["report"]["slides"][0].get("phases", {})},
                    "peak_rss_single_mb": _stat([x["peak_rss_single_process_mb"] for x in rr]),
                    "peak_rss_tree_mb": _stat([x["peak_rss_total_mb"] for x in rr]),
                    "patches": rr[0]["report"]["slides"][0]["n_patches"]}
            # ratios within each round (the runs of one round are seconds apart, so the machine's
            # slower and faster spells cancel): medians and ranges over the rounds
            fl, w1, w2 = ([x["wall_s"] for x in runs[k]] for k in ("floor", "tile_1", "tile_2"))
            row["paired"] = {"tile_1_x_floor": _stat([a / b for a, b in zip(w1, fl, strict=True)]),
                             "tile_2_x_floor": _stat([a / b for a, b in zip(w2, fl, strict=True)]),
                             "speedup_2_workers": _stat([a / b for a, b in zip(w1, w2, strict=True)])}
            res["sizes"].append(row)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tile_floor.json").write_text(json.dumps(res, indent=2) + "\n")

    md = [f"Coordinates-only `wsi-mil tile` against its floor, {args.rounds} interleaved rounds, medians (min-max), "
          "whole processes (start-up included); generated slides (real tissue, 0.5 µm/px).", "",
          "| slide side | level read (px) | floor: plain read, whole process (s) | of which the read (s) | tile, 1 worker (s) "
          "| × floor | tile, 2 workers (s) | × floor | 1 ÷ 2 workers | tile, 1 Dask worker process (s) "
          "| peak RSS largest process, 1 worker (MB) | floor peak RSS (MB) | mask µm/px (patches) "
          "| 2 workers, finer mask --tissue-mpp 8 (s) | × floor | its mask µm/px (patches) |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for row in res["sizes"]:
        f, t1, t2 = row["floor_wall_s"], row["tile_1"]["wall_s"], row["tile_2"]["wall_s"]
        md.append(f"| {row['side_px']:,} | {row['level_px'][0]:,}×{row['level_px'][1]:,} | {m(f)} | {m(row['floor_read_s'])} "
                  f"| {m(t1)} | {t1['median'] / f['median']:.2f} | {m(t2)} | {t2['median'] / f['median']:.2f} "
                  f"| {t1['median'] / t2['median']:.2f} | {m(row['proc_1']['wall_s'])} "
                  f"| {m(row['tile_1']['peak_rss_single_mb'], '{:.0f}')} "
                  f"| {m(row['floor_peak_rss_mb'], '{:.0f}')} "
                  f"| {row['tile_2']['mask_um_per_px']:.1f} ({row['tile_2']['patches']:,}) "
                  f"| {m(row['fine_2']['wall_s'])} | {row['fine_2']['wall_s']['median'] / f['median']:.2f} "
                  f"| {row['fine_2']['mask_um_per_px']:.1f} ({row['fine_2']['patches']:,}) |")
    md += ["", "Ratios within each round (median, min-max over the rounds): "
           + "; ".join(f"{row['side_px']:,} px: 1 worker {m(row['paired']['tile_1_x_floor'], '{:.2f}')} × floor, "
                       f"2 workers {m(row['paired']['tile_2_x_floor'], '{:.2f}')} × floor, 1 ÷ 2 workers "
                       f"{m(row['paired']['speedup_2_workers'], '{:.2f}')}" for row in res["sizes"]) + "."]
    md += ["", "Phases (median s): " + "; ".join(
        f"{row['side_px']:,} px, {key.replace('fine', 'tile --tissue-mpp 8').replace('_1', ' 1 worker').replace('_2', ' 2 workers')} "
        f"({row[key]['executor']}): "
        + ", ".join(f"{k} {v['median']:.2f}" for k, v in {**row[key]["phases_s"], **row[key]["slide_phases_s"]}.items())
        for row in res["sizes"] for key in ("tile_1", "tile_2", "proc_1", "fine_2")),
        "", f"Machine: {res['machine']['cpus']} CPUs, Python {res['machine']['python']}. "
        f"Command: `.venv/bin/python benchmarks/bench_tile.py --floor --sizes {' '.join(map(str, args.sizes))} --rounds {args.rounds}`."]
    (RESULTS / "tile_floor.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 50000, 100000])
    parser.add_argument("--pixel-size", type=int, default=50000, help="slide side for the pixel-extraction comparison")
    parser.add_argument("--floor", action="store_true", help="coordinates-only tiling against the decode floor (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians, min-max)")
    args = parser.parse_args()
    if args.floor:
        floor_main(args)
        return

    slides = {s: make_slide(s) for s in sorted(set(args.sizes) | {args.pixel_size})}
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()}, "rounds": args.rounds, "coordinates": [], "pixels": {}}
    coord_runs: dict[int, list[dict]] = {size: [] for size in args.sizes}
    loops: list[float] = []
    px_runs: dict[int, list[dict]] = {1: [], 2: []}
    slide = slides[args.pixel_size]
    with tempfile.TemporaryDirectory() as tmp:
        tile_cli(slide, Path(tmp) / "px-coords", "--workers", "1")  # the coordinates the plain loop reads
        store = Path(tmp) / "px-coords" / "patches" / f"{slide.stem}.h5"
        n = 0
        for r in range(args.rounds):  # interleaved: each configuration once per round
            for size in args.sizes:
                coord_runs[size].append(tile_cli(slides[size], Path(tmp) / f"c{size}-{r}", "--workers", "1"))
            n, loop_s = plain_loop(slide, store, quality=90)
            loops.append(loop_s)
            for workers in (1, 2):
                px_runs[workers].append(tile_cli(slide, Path(tmp) / f"px{workers}-{r}", "--workers", str(workers),
                                                 "--save-patches"))
            print(r, {size: round(v[-1]["wall_s"], 2) for size, v in coord_runs.items()}, round(loop_s, 1),
                  {w: round(v[-1]["report"]["phase_seconds"]["patch_pixels"], 1) for w, v in px_runs.items()}, flush=True)

    for size, rr in coord_runs.items():
        rows = [x["report"]["slides"][0] for x in rr]
        results["coordinates"].append({
            "side_px": size, "patches": rows[0]["n_patches"], "slide_s": _stat([x["seconds"] for x in rows]),
            "wall_s": _stat([x["wall_s"] for x in rr]),
            "patches_per_s": _stat([x["n_patches"] / x["seconds"] for x in rows]),
            "peak_rss_worker_mb": _stat([x["peak_rss_single_process_mb"] for x in rr]),
            "peak_rss_tree_mb": _stat([x["peak_rss_total_mb"] for x in rr]),
            "phases_s": {k: _stat([x.get("phases", {}).get(k, 0.0) for x in rows]) for k in rows[0].get("phases", {})},
        })
    pix: dict = {"side_px": args.pixel_size, "patches": n, "plain_loop_s": _stat(loops),
                 "plain_loop_patches_per_s": _stat([n / x for x in loops])}
    for workers, rr in px_runs.items():
        phases = [x["report"]["phase_seconds"]["patch_pixels"] for x in rr]
        pix[f"workers_{workers}"] = {
            "pixel_phase_s": _stat(phases), "patches_per_s": _stat([n / x for x in phases]),
            # within each round (the plain loop ran seconds before): median, min-max over the rounds
            "ratio_vs_plain_loop": _stat([loop / x for loop, x in zip(loops, phases, strict=True)]),
            "end_to_end_wall_s": _stat([x["wall_s"] for x in rr]), "peak_rss_tree_mb": _stat([x["peak_rss_total_mb"] for x in rr]),
        }
    results["pixels"] = pix

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tile.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"Coordinates-only `wsi-mil tile`, 1 worker, {args.rounds} interleaved rounds: medians (min-max).", "",
          "| slide side (px) | patches | whole process (s) | seconds / slide | patches/s | peak RSS, worker (MB) "
          "| peak RSS, all processes (MB) | phases, median (s) |",
          "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in results["coordinates"]:
        phases = ", ".join(f"{k} {v['median']:.2f}" for k, v in c["phases_s"].items())
        md.append(f"| {c['side_px']:,} | {c['patches']:,} | {m(c['wall_s'])} | {m(c['slide_s'])} "
                  f"| {m(c['patches_per_s'], '{:,.0f}')} | {m(c['peak_rss_worker_mb'], '{:.0f}')} "
                  f"| {m(c['peak_rss_tree_mb'], '{:.0f}')} | {phases} |")
    p = results["pixels"]
    md += ["", f"Pixel extraction (`--save-patches`, JPEG q90) on the {p['side_px']:,} px slide, {p['patches']:,} patches "
           f"({args.rounds} interleaved rounds; ratios within each round):", "",
           "| method | patches/s | ratio vs plain loop | whole process (s) | peak RSS, all processes (MB) |",
           "|---|---:|---:|---:|---:|",
           f"| plain single-process loop (read_region + encode) | {m(p['plain_loop_patches_per_s'], '{:.0f}')} | 1.00 | | |"]
    for w in (1, 2):
        q = p[f"workers_{w}"]
        md.append(f"| wsi-mil tile, {w} worker{'s' if w > 1 else ''} (pixel phase) | {m(q['patches_per_s'], '{:.0f}')} "
                  f"| {m(q['ratio_vs_plain_loop'], '{:.2f}')} | {m(q['end_to_end_wall_s'])} "
                  f"| {m(q['peak_rss_tree_mb'], '{:.0f}')} |")
    md += ["", f"Machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}. "
           f"Command: `.venv/bin/python benchmarks/bench_tile.py --rounds {args.rounds}`."]
    (RESULTS / "tile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
