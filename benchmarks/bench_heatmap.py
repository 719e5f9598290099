"""Heatmap benchmark: seconds per slide for every export at about 1k, 10k and 100k patches.

`wsi-mil heatmap` draws from the stored coordinates and attention — nothing is tiled or
embedded again. Slides are generated from real tissue (wsi_mil.synth, cached in
benchmarks/.cache, shared with bench_tile.py); coordinates come from `wsi-mil tile`
(coordinates only) with the stride chosen to land near each patch count; attention
follows the planted tumour (with noise), written the way train-mil writes it. For
scale, the table also gives what re-extracting the features (the way CLAM-style
heatmap scripts work) would cost at this machine's measured extraction rate
(results/extract.json).

    .venv/bin/python benchmarks/bench_heatmap.py

Results: benchmarks/results/heatmap.{json,md} (quoted in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_tile import CACHE, RESULTS, RssSampler, make_slide, tile_cli  # noqa: E402 - found through sys.path above

# (slide side px, tiling stride px at 0.5 µm/px, 256-px patches) → about 1k, 10k, 100k patches
CASES = {"1k": (15000, 256), "10k": (50000, 286), "100k": (100000, 176)}


def attention_store(slide: Path, tiles: Path, out: Path) -> tuple[Path, int]:
    from wsi_mil.eval.localisation import patch_tumour_share
    from wsi_mil.io.attention import write_attention
    from wsi_mil.io.store import PatchStore
    from wsi_mil.synth.slide import read_truth_mask

    store = next((tiles / "patches").glob("*.h5"))
    with PatchStore(store) as ps:
        coords = ps.coords
        extent = float(ps.attrs["extent_level0_px"])
    mask, ds = read_truth_mask(slide)
    rng = np.random.default_rng(0)
    logits = 3.0 * patch_tumour_share(coords, extent, mask, ds) + rng.normal(0, 0.5, len(coords))
    att = np.exp(logits - logits.max())
    h5 = out / f"{slide.stem}.h5"
    write_attention(h5, coords=coords, attention=(att / att.sum()).astype(np.float32), attrs={
        "slide_id": slide.stem, "fold": "ensemble", "split": "test", "model": "abmil", "outputs": ["tumour"],
        "probability": [0.9], "prediction": 1, "feature_store": "", "patch_extent_level0_px": extent,
        "attention_kind": "normalised attention (sums to 1)"})
    return h5, len(coords)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    from wsi_mil.commands.heatmap import HeatmapSettings, draw_slide
    from wsi_mil.review.server import ReviewSlide

    extract = json.loads((RESULTS / "extract.json").read_text()) if (RESULTS / "extract.json").exists() else {}
    slide_runs = [r for r in extract.get("end_to_end", []) if r.get("source") == "slide"]
    rate = slide_runs[0]["patches_per_s"] if slide_runs else None  # median of its rounds
    rows = []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        for case in args.cases:
            size, stride = CASES[case]
            slide = make_slide(size)
            tiles = tmp / f"tiles-{case}"
            tile_cli(slide, tiles, "--stride", str(stride))
            h5, n = attention_store(slide, tiles, tmp)
            manifest = {slide.stem: slide}
            if not rows:  # warm-up: first imports (matplotlib, fonts) are not a per-slide cost
                draw_slide(h5, tmp / "warm-up", HeatmapSettings(), manifest)
            row = {"case": case, "slide_side_px": size, "patches": n, "seconds": {}}
            for fmt in ("png", "tiff", "geojson", "gallery"):
                out = tmp / f"out-{case}-{fmt}"
                t = time.perf_counter()
                files, _ = draw_slide(h5, out, HeatmapSettings(formats=(fmt,)), manifest)
                row["seconds"][fmt] = time.perf_counter() - t
                row.setdefault("bytes", {})[fmt] = Path(files[fmt]).stat().st_size
            out = tmp / f"out-{case}-all"
            sampler = RssSampler(os.getpid())
            t = time.perf_counter()
            draw_slide(h5, out, HeatmapSettings(), manifest)
            row["seconds"]["all four"] = time.perf_counter() - t
            sampler.stop()
            row["peak_rss_mb"] = sampler.peak_total / 2**20
            rs = ReviewSlide(slide.stem, h5, slide, 0.5, {})
            t = time.perf_counter()
            rs.info("rank", "viridis")
            row["seconds"]["review page: first open"] = time.perf_counter() - t
            rs.close()
            if rate:
                row["reextraction_estimate_s"] = n / rate
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "heatmap.json").write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                                      "extraction_rate_patches_per_s": rate, "rows": rows}, indent=2) + "\n")
    md = ["| patches | slide side (px) | PNG overlay (s) | pyramidal TIFF (s) | GeoJSON (s) | gallery (s) | all four (s) "
          "| review page, first open (s) | TIFF / GeoJSON size (MB) | peak RSS (MB) | re-extracting instead (s, est.) |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["seconds"]
        est = f"{r['reextraction_estimate_s']:.0f}" if r.get("reextraction_estimate_s") else "n/a"
        md.append(f"| {r['patches']:,} | {r['slide_side_px']:,} | {s['png']:.2f} | {s['tiff']:.2f} | {s['geojson']:.2f} | "
                  f"{s['gallery']:.2f} | {s['all four']:.2f} | {s['review page: first open']:.2f} | "
                  f"{r['bytes']['tiff'] / 1e6:.1f} / {r['bytes']['geojson'] / 1e6:.1f} | {r['peak_rss_mb']:.0f} | {est} |")
    md += ["", f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}. Command: "
           "`.venv/bin/python benchmarks/bench_heatmap.py`."
           + (" Re-extraction estimate: patches ÷ the end-to-end CPU extraction rate measured by bench_extract.py "
              f"({rate:.1f} patches/s)." if rate else "")]
    (RESULTS / "heatmap.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
