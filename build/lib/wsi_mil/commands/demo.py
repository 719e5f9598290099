"""`wsi-mil demo`: the README's main command — the whole pipeline on the built-in sample.

Generate a small labelled cohort from the bundled real tissue (tumour planted in half
the slides), tile it together with the bundled real slide (CMU-1-Small-Region), embed
every patch with the offline pretrained encoder (ImageNet EfficientNet-Lite0), train and
evaluate attention MIL (patient-level held-out test set + cross-validation), measure how
well the attention finds the planted tumour (localisation AUC), and draw every slide's
heatmaps for review. Seeded: the same seed gives the same cohort and the same figures.
"""

from __future__ import annotations

import csv
import logging
import shutil
import sys
from pathlib import Path

from wsi_mil.config import ExtractConfig, TileConfig, write_settings
from wsi_mil.data.manifest import read_manifest, slide_file, write_manifest
from wsi_mil.logs import step_log

logger = logging.getLogger(__name__)

DEMO_SLIDES = 40
#: two sites whose stains differ (site B: darker, bluer hematoxylin), for the audit's per-site table
DEMO_SITES = {"A": (1.0, 1.0, 1.0), "B": (1.15, 1.1, 0.9)}
DEMO_SIZE_PX = 5120
DEMO_TUMOUR_UM = (300.0, 900.0)
DEMO_PRESET = "easy"
DEMO_PRESET_NOTE = ("one mirror-tiled tissue source with tumour in its own colours: a check that the pipeline "
                    "works end to end, which attention MIL solves almost perfectly; the figures say nothing about "
                    "histology. `wsi-mil synth --preset hard` and benchmarks/bench_mil_cohort.py give the harder cohort.")


CLASSES = "normal,tumour"


def wsi_mil_command() -> str:
    """How to run wsi-mil here: ``wsi-mil`` when that is on PATH and is this one, else the
    path of the running script (``.venv/bin/wsi-mil``) or ``python -m wsi_mil.cli``."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    on_path = shutil.which("wsi-mil")
    if argv0 is not None and argv0.name == "wsi-mil":
        if on_path and Path(on_path).resolve() == argv0.resolve():
            return "wsi-mil"
        return str(argv0)
    if on_path:
        return "wsi-mil"
    return f"{sys.executable} -m wsi_mil.cli"


def _demo_manifest(out_dir: Path, cohort_manifest: Path) -> Path:
    """The generated cohort plus the real bundled slide, in one manifest."""
    from wsi_mil.synth.textures import NORMAL_SOURCE, sample_path

    with open(cohort_manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["path"] = str((cohort_manifest.parent / row["path"]).resolve())
    rows.append({"slide_id": "cmu-1-small-region", "path": str(sample_path(NORMAL_SOURCE)),
                 "patient_id": "cmu-1", "label": "0", "site": "cmu"})
    path = write_manifest(out_dir / "demo_manifest.csv", rows)
    # name the classes in the manifest itself, so reports, overlays and the review page say them
    from wsi_mil.io.atomic import write_text

    write_text(path, f"# classes: {CLASSES}\n" + path.read_text(encoding="utf-8"))
    return path


def run_demo(*, out_dir: Path, workers: int, seed: int, progress: bool, n_slides: int = DEMO_SLIDES,
             size_px: int = DEMO_SIZE_PX) -> int:
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.synth.cohort import make_cohort

    print(f"[1/6] generating {n_slides} slides ({size_px} px, real H&E tissue, tumour in half) ...")
    cohort = make_cohort(out_dir / "slides", n_slides=n_slides, preset=DEMO_PRESET, positive_fraction=0.5, size_px=size_px,
                         tumour_size_um=DEMO_TUMOUR_UM, tumour_regions=(1, 2), seed=seed, progress=progress,
                         sites=DEMO_SITES)
    manifest = _demo_manifest(out_dir, cohort)
    print(f"[2/6] tiling {n_slides + 1} slides at 0.5 µm/px (20x), 256 px patches ...")
    tile_config = TileConfig()
    write_settings(out_dir / "tiles" / "tile_config.yaml", "tile (from wsi-mil demo)", [manifest], "tile",
                   tile_config.to_dict(), {"workers": workers})
    with step_log(out_dir / "tiles" / "tile.log"):
        report = run_tile(read_manifest(manifest), out_dir=out_dir / "tiles", config=tile_config,
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
    print(f"\n[3/6] embedding {d['n_patches']} patches with {config.encoder} (offline ImageNet weights, CPU) ...")
    write_settings(out_dir / "tiles" / "extract_config.yaml", "extract-features (from wsi-mil demo)",
                   [out_dir / "tiles"], "extract_features", config.to_dict())
    with step_log(out_dir / "tiles" / "extract.log"):
        features = run_extract([out_dir / "tiles"], out_dir=out_dir / "tiles", config=config, progress=progress)
    print()
    print(features.table())
    f = features.to_dict()
    rate = f", {f['patches_per_s']:.1f} patches/s" if f["patches_per_s"] else ""
    print(f"\n{f['n_features']} features ({features.encoder['dim']}-d) in {features.seconds:.1f} s{rate}: {f['counts']}")
    print(f"feature stores: {out_dir / 'tiles' / 'features'}")
    print(f"report:         {out_dir / 'tiles' / 'features_report.json'}")
    if not (report.ok and features.ok):
        return 1
    return _train_and_evaluate(out_dir, manifest, seed=seed, progress=progress)


def _train_and_evaluate(out_dir: Path, manifest: Path, *, seed: int, progress: bool) -> int:
    from wsi_mil.commands.train_mil import run_train, summary_text
    from wsi_mil.config import TrainConfig
    from wsi_mil.eval.localisation import unseen_localisation
    from wsi_mil.io.atomic import write_json

    config = TrainConfig(model="abmil", folds=4, test_fraction=0.25, epochs=30, patience=10, seed=seed,
                         classes=CLASSES, subgroups="site")
    print(f"\n[4/6] training attention MIL ({config.model}) on slide labels: patient-level held-out test set "
          f"+ {config.folds}-fold cross-validation ...")
    run_dir = out_dir / "train"
    features = [out_dir / "tiles" / "features"]
    write_settings(run_dir / "train_config.yaml", "train-mil (from wsi-mil demo)", [manifest], "train_mil",
                   config.to_dict(), {"features": [str(f) for f in features]})
    with step_log(run_dir / "train.log"):
        report = run_train(manifest, features, out_dir=run_dir, config=config, progress=progress)
    print(summary_text(report))
    slides = {e.slide_id: slide_file(e) for e in read_manifest(manifest)}
    # localisation on every positive slide the models did not train on
    per_slide = unseen_localisation(run_dir, slides)
    loc = sum(per_slide.values()) / len(per_slide) if per_slide else None
    from wsi_mil.eval.metrics import auc_text
    from wsi_mil.train.runner import SET_NAMES, headline_set

    head = report.headline()
    key = headline_set(report.metrics)
    summary_out = {"cohort_preset": DEMO_PRESET, "slide_auc": head.get("auc"), "slide_auc_text": auc_text(head),
                   "slide_auc_set": SET_NAMES.get(key, key), "headline_why": report.metrics.get("headline", {}).get("why"),
                   "n": head.get("n"), "pooled_validation_auc": report.metrics["pooled_validation"].get("auc"),
                   "failed_folds": report.metrics.get("fold_health", {}).get("failed", []),
                   "localisation_auc": loc, "localisation_per_slide": per_slide}
    write_json(out_dir / "demo_summary.json", summary_out)
    print(f"\nslide-level AUC: {summary_out['slide_auc_text']} ({summary_out['slide_auc_set']}, n = {head.get('n')})")
    print(f"cohort: the {DEMO_PRESET!r} preset — {DEMO_PRESET_NOTE}")
    print(f"localisation AUC of attention vs the planted tumour: {_f(loc)} (mean over {len(per_slide)} unseen positive slides)")
    print(f"training run: {run_dir}  (report.md, metrics.json, roc.png, attention/)")
    print(f"summary:      {out_dir / 'demo_summary.json'}")
    return _heatmaps(out_dir, run_dir, progress=progress)


def _heatmaps(out_dir: Path, run_dir: Path, *, progress: bool) -> int:
    from wsi_mil.commands.heatmap import HeatmapSettings, run_heatmap

    print("\n[5/6] heatmaps of every slide's out-of-fold attention (PNG overlay, pyramidal TIFF, QuPath GeoJSON, gallery) ...")
    with step_log(run_dir / "heatmaps" / "heatmap.log"):
        report = run_heatmap([run_dir], out_dir=run_dir / "heatmaps", settings=HeatmapSettings(), progress=progress)
    counts = report.to_dict()["counts"]
    print(f"{len(report.outcomes)} slides in {report.seconds:.1f} s: {counts}")
    example = next((o for o in report.outcomes if o.status != "failed"), None)
    print(f"heatmaps:   {run_dir / 'heatmaps'}  (per slide: overlay.png, heatmap.tif, patches.geojson, gallery.jpg)")
    if example is not None and example.files.get("png"):
        print(f"            e.g. {run_dir / 'heatmaps' / example.files['png']}")
    print("            QuPath: open the slide, then File > Import objects > patches.geojson (colour by a measurement:")
    print("            Measure > Show measurement maps); heatmap.tif opens as an image aligned to the slide.")
    print(f"review:     {wsi_mil_command()} review {run_dir}   then open http://127.0.0.1:8765/")
    cxr = _chest_xray(out_dir, progress=progress)
    return 0 if report.ok and cxr == 0 else 1


def _chest_xray(out_dir: Path, *, progress: bool) -> int:
    """A short chest-X-ray run on the same stack: a linear probe of the offline backbone on
    a bundled PneumoniaMNIST sample (official splits), then Grad-CAM maps of test images."""
    import numpy as np

    from wsi_mil.commands.predict_image import run_predict_image
    from wsi_mil.commands.train_image import run_train_image
    from wsi_mil.config import ImageTrainConfig
    from wsi_mil.train.runner import summary_text

    sample = Path(__file__).resolve().parents[1] / "sample" / "pneumoniamnist_sample.npz"
    print("\n[6/6] chest X-ray on the same stack: linear probe of EfficientNet-Lite0 on a PneumoniaMNIST sample "
          "(1000 / 200 / 300 images, official splits), then Grad-CAM maps ...")
    config = ImageTrainConfig(mode="linear", image_size=64, epochs=40, lr=3e-3, classes="normal,pneumonia")
    run_dir = out_dir / "cxr"
    write_settings(run_dir / "train_config.yaml", "train-image (from wsi-mil demo)", [sample], "train_image", config.to_dict())
    with step_log(run_dir / "train.log"):
        report = run_train_image(sample, out_dir=run_dir, config=config, progress=progress)
    print(summary_text(report))
    # Grad-CAM of four test radiographs: the bundled sample's first test images
    data = np.load(sample)
    pick = out_dir / "cxr" / "cam_examples.npz"
    np.savez(pick, test_images=data["test_images"][:4], test_labels=data["test_labels"][:4])
    with step_log(run_dir / "maps" / "predict.log"):
        run_predict_image(run_dir, pick, out_dir=run_dir / "maps", cam="gradcam", progress=progress)
    print(f"chest X-ray run: {run_dir}  (report.md, reliability.png); Grad-CAM maps: {run_dir / 'maps' / 'cam'}")
    print("figures on the full PneumoniaMNIST and the NIH sample: benchmarks/results/cxr.md")
    return 0


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"
