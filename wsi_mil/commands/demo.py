"""`wsi-mil demo`: the README's main command — the whole pipeline so far on the built-in sample.

Today the pipeline is: generate a small labelled cohort from the bundled real tissue,
tile it together with the bundled real slide (CMU-1-Small-Region), then embed every
patch with the offline pretrained encoder (ImageNet EfficientNet-Lite0).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from wsi_mil.config import ExtractConfig, TileConfig
from wsi_mil.data.manifest import read_manifest, write_manifest

logger = logging.getLogger(__name__)

DEMO_SLIDES = 6
DEMO_SIZE_PX = 6144


def _demo_manifest(out_dir: Path, cohort_manifest: Path) -> Path:
    """The generated cohort plus the real bundled slide, in one manifest."""
    from wsi_mil.synth.textures import NORMAL_SOURCE, sample_path

    with open(cohort_manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["path"] = str((cohort_manifest.parent / row["path"]).resolve())
    rows.append({"slide_id": "cmu-1-small-region", "path": str(sample_path(NORMAL_SOURCE)),
                 "patient_id": "cmu-1", "label": "0"})
    return write_manifest(out_dir / "demo_manifest.csv", rows)


def run_demo(*, out_dir: Path, workers: int, seed: int, progress: bool) -> int:
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.synth.cohort import make_cohort

    print(f"[1/3] generating {DEMO_SLIDES} slides ({DEMO_SIZE_PX} px, real H&E tissue, tumour in half) ...")
    cohort = make_cohort(out_dir / "slides", n_slides=DEMO_SLIDES, positive_fraction=0.5, size_px=DEMO_SIZE_PX,
                         tumour_size_um=(400.0, 1200.0), seed=seed, progress=progress)
    manifest = _demo_manifest(out_dir, cohort)
    print(f"[2/3] tiling {DEMO_SLIDES + 1} slides at 0.5 µm/px (20x), 256 px patches ...")
    report = run_tile(read_manifest(manifest), out_dir=out_dir / "tiles", config=TileConfig(),
                      workers=workers, progress=progress)
    print()
    print(report.table())
    d = report.to_dict()
    print(f"\n{d['n_patches']} patches from {len(report.outcomes)} slides in {report.seconds:.1f} s: {d['counts']}")
    print(f"manifest:    {manifest}")
    print(f"stores:      {out_dir / 'tiles' / 'patches'}")
    print(f"QC images:   {out_dir / 'tiles' / 'qc'}  (e.g. {report.outcomes[-1].qc_png})")
    print(f"run report:  {out_dir / 'tiles' / 'run_report.json'}")

    from wsi_mil.commands.extract_features import run_extract

    config = ExtractConfig()
    print(f"\n[3/3] embedding {d['n_patches']} patches with {config.encoder} (offline ImageNet weights, CPU) ...")
    features = run_extract([out_dir / "tiles"], out_dir=out_dir / "tiles", config=config, progress=progress)
    print()
    print(features.table())
    f = features.to_dict()
    rate = f", {f['patches_per_s']:.1f} patches/s" if f["patches_per_s"] else ""
    print(f"\n{f['n_features']} features ({features.encoder['dim']}-d) in {features.seconds:.1f} s{rate}: {f['counts']}")
    print(f"feature stores: {out_dir / 'tiles' / 'features'}")
    print(f"report:         {out_dir / 'tiles' / 'features_report.json'}")
    return 0 if report.ok and features.ok else 1
