"""MIL on a labelled cohort built with the slide generator, and training throughput.

1. A cohort of generated slides (the ``hard`` preset by default: several real tissue
   sources per slide, stain varied per slide, colour-matched tumour regions down to one
   patch), tiled and embedded with the offline encoder.
2. ``train-mil`` with every registered model and its defaults (held-out test set + 5-fold
   CV): pooled out-of-fold AUC with its CI, test AUC across folds and of the fold
   ensemble, failed folds, localisation (AUC of instance attention against the
   ground-truth tumour mask per unseen positive slide) and wall time.
3. Training throughput on CPU with bags read from disk every step (no cache): bags/s and
   the share of epoch time spent loading, HDF5 versus Zarr feature stores (the same
   features written in both formats).

Results: benchmarks/results/mil_cohort.{json,md} (quoted in the README).

    .venv/bin/python benchmarks/bench_mil_cohort.py [--preset hard] [--models abmil,transmil] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"


def to_zarr(h5_dir: Path, zarr_dir: Path) -> None:
    import zarr

    from wsi_mil.io.features import FeatureStore

    zarr_dir.mkdir(parents=True, exist_ok=True)
    for p in sorted(h5_dir.glob("*.h5")):
        with FeatureStore(p) as fs:
            feats, coords, attrs, cattrs = fs.features, fs.coords, fs.attrs, fs.coords_attrs
        root = zarr.open_group(str(zarr_dir / f"{p.stem}.zarr"), mode="w")
        f = root.create_array("features", shape=feats.shape, dtype=np.float32, chunks=(max(1, min(len(feats), 1024)), feats.shape[1]))
        f[...] = feats
        c = root.create_array("coords", shape=coords.shape, dtype=np.int64, chunks=(max(1, len(coords)), 2))
        c[...] = coords
        c.attrs.update(dict(cattrs.items()))
        root.attrs.update({k: (v if not isinstance(v, np.generic) else v.item()) for k, v in attrs.items()})


def throughput(manifest: Path, features: Path, epochs: int) -> dict:
    from wsi_mil.data.bags import bags_from_manifest, infer_task
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.mil import build_model
    from wsi_mil.train.loop import FitSettings, fit

    entries = read_manifest(manifest)
    task = infer_task(entries)
    bags, _ = bags_from_manifest(entries, [features], task)
    dim = bags[0].load()[0].shape[1]
    model = build_model("abmil", dim, 1)
    res = fit(model, bags, [], task, FitSettings(epochs=epochs, max_instances=4096))
    h = res.history[1:]  # first epoch warms the file cache
    return {"bags_per_s": float(np.mean([x["bags_per_s"] for x in h])),
            "load_share": float(np.sum([x["load_seconds"] for x in h]) / np.sum([x["train_seconds"] for x in h])),
            "epochs_measured": len(h), "n_bags": len(bags),
            "instances_per_bag": float(np.mean([len(b.load()[0]) for b in bags]))}


def thread_throughput(manifest: Path, features: Path, epochs: int, rounds: int) -> dict:
    """Training bags/s of abmil with 1 CPU thread and with all cores (torch's default),
    on an idle machine and with one competing busy process (a shared or busy machine),
    rounds interleaved; bags held in memory so that only compute is measured."""
    import subprocess

    import torch

    from wsi_mil.data.bags import bags_from_manifest, infer_task
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.mil import build_model
    from wsi_mil.train.loop import FitSettings, fit

    entries = read_manifest(manifest)
    task = infer_task(entries)
    bags, _ = bags_from_manifest(entries, [features], task, cache=True)
    dim = bags[0].load()[0].shape[1]
    import os

    default = os.cpu_count() or 1
    saved = torch.get_num_threads()
    runs: dict[str, list[float]] = {}
    for condition in ("idle", "busy"):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            for _ in range(rounds):
                for threads in (1, default):
                    torch.set_num_threads(threads)
                    model = build_model("abmil", dim, 1)
                    res = fit(model, bags, [], task, FitSettings(epochs=epochs, max_instances=4096))
                    rate = float(np.median([x["bags_per_s"] for x in res.history[1:]]))
                    runs.setdefault(f"{condition}/{threads}", []).append(rate)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    torch.set_num_threads(saved)
    return {"default_threads": default, "rounds": rounds, "epochs": epochs,
            "runs": {k: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v)), "all": v}
                     for k, v in runs.items()}}


def whole_runs(manifest: Path, features: Path, model: str, epochs: int, seed: int, threads: list[int]) -> dict:
    """Wall time of whole train-mil runs (5 folds, fresh output folders) at each thread
    count, in the order given (interleave by repeating it)."""
    import shutil
    import tempfile

    from wsi_mil.commands.train_mil import run_train
    from wsi_mil.config import TrainConfig

    out: dict[str, list[float]] = {}
    for n in threads:
        tmp = Path(tempfile.mkdtemp(prefix="wsi-mil-threads-"))
        try:
            t = time.perf_counter()
            run_train(manifest, [features], out_dir=tmp / "run", progress=False,
                      config=TrainConfig(model=model, epochs=epochs, seed=seed, threads=n))
            out.setdefault(str(n), []).append(time.perf_counter() - t)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_row(manifest: Path, feats: Path, run_dir: Path, model: str, epochs: int, seed: int) -> dict:
    """One whole train-mil run of ``model`` with its defaults: the figures of the table."""
    import shutil

    from wsi_mil.commands.train_mil import run_train
    from wsi_mil.config import TrainConfig
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.eval.localisation import unseen_localisation
    from wsi_mil.eval.metrics import auc_text

    shutil.rmtree(run_dir, ignore_errors=True)  # a whole fresh run: nothing resumed, the wall time is all of it
    t = time.perf_counter()
    report = run_train(manifest, [feats], out_dir=run_dir, config=TrainConfig(model=model, epochs=epochs, seed=seed),
                       progress=False)
    wall = time.perf_counter() - t
    slides = {e.slide_id: e.path for e in read_manifest(manifest)}
    per = unseen_localisation(run_dir, slides)
    m = report.metrics
    af = m["across_folds_test"]["auc"]
    return {"model": model, "wall_seconds": wall, "train_seconds": m.get("seconds"),
            "across_folds_test_auc": af, "fold_test_aucs": [f["test"].get("auc") for f in m["folds"]],
            "fold_val_aucs": [f["val"].get("auc") for f in m["folds"]],
            "pooled_oof": {k: m["pooled_validation"].get(k) for k in ("auc", "auc_ci95", "auc_ci_note", "n", "n_positive")},
            "pooled_oof_text": auc_text(m["pooled_validation"]),
            "ensemble_test": {k: m["ensemble_test"].get(k) for k in ("auc", "auc_ci95", "auc_ci_note", "n", "n_positive")},
            "ensemble_test_text": auc_text(m["ensemble_test"]),
            "failed_folds": m["fold_health"]["failed"], "headline": m["headline"],
            "localisation_auc_mean": float(np.mean(list(per.values()))) if per else None,
            "localisation_auc_min": float(np.min(list(per.values()))) if per else None,
            "localisation_per_slide": per}


MODELS = ("abmil", "gated_abmil", "clam_sb", "transmil", "mean", "max")


def main() -> None:
    from wsi_mil.runtime import prefer_passive_omp

    prefer_passive_omp()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=80)
    p.add_argument("--size", type=int, default=6144)
    p.add_argument("--preset", choices=("hard", "easy"), default="hard")
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated registered models")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--throughput-epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--thread-rounds", type=int, default=3)
    p.add_argument("--skip-throughput", action="store_true", help="only the model table")
    args = p.parse_args()
    from wsi_mil.commands.extract_features import run_extract
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import ExtractConfig, TileConfig
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.synth.cohort import PRESETS, make_cohort

    preset = PRESETS[args.preset]
    lo, hi = preset["tumour_size_um"]
    root = CACHE / f"{args.preset}-{args.slides}-{args.size}-{args.seed}-t{lo:.0f}-{hi:.0f}-r{preset['tumour_regions'][1]}"
    t0 = time.perf_counter()
    manifest = make_cohort(root / "slides", n_slides=args.slides, preset=args.preset, positive_fraction=args.positive_fraction,
                           size_px=args.size, seed=args.seed, progress=True)
    run_tile(read_manifest(manifest), out_dir=root / "tiles", config=TileConfig(), workers=2, progress=True)
    run_extract([root / "tiles"], out_dir=root / "tiles", config=ExtractConfig(), progress=True)
    prep_s = time.perf_counter() - t0
    feats = root / "tiles" / "features"
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    old = json.loads((out / "mil_cohort.json").read_text()) if (out / "mil_cohort.json").exists() else {}
    same = old.get("cohort") == root.name and old.get("settings", {}).get("epochs") == args.epochs
    rows = {r["model"]: r for r in old.get("models", [])} if same else {}
    for model in args.models.split(","):
        print(f"--- {model}", flush=True)
        rows[model] = model_row(manifest, feats, root / f"train-{model}", model, args.epochs, args.seed)
        print(json.dumps({k: rows[model][k] for k in ("across_folds_test_auc", "pooled_oof_text", "failed_folds",
                                                       "localisation_auc_mean", "wall_seconds")}), flush=True)
    res: dict = {"settings": vars(args), "cohort": root.name, "prep_seconds": prep_s, "n_slides": args.slides,
                 "n_positive": int(sum(1 for e in read_manifest(manifest) if e.labels["label"] == "1")),
                 "models": [rows[m] for m in MODELS if m in rows] + [r for k, r in rows.items() if k not in MODELS]}
    if not args.skip_throughput:
        zarr_dir = root / "features-zarr"
        to_zarr(feats, zarr_dir)
        res["throughput"] = {"h5": throughput(manifest, feats, args.throughput_epochs),
                             "zarr": throughput(manifest, zarr_dir, args.throughput_epochs)}
        threads = thread_throughput(manifest, feats, args.throughput_epochs, args.thread_rounds)
        threads["whole_run_seconds"] = whole_runs(manifest, feats, "abmil", args.epochs, args.seed,
                                                  [1, threads["default_threads"]] * 2)
        res["threads"] = threads
        res["throughput_cohort"] = root.name
    elif old.get("throughput"):
        res["throughput"], res["threads"] = old["throughput"], old.get("threads")
        res["throughput_cohort"] = old.get("throughput_cohort", "the easy preset, 40 slides of 6144 px, 151 instances per bag")
    (out / "mil_cohort.json").write_text(json.dumps(res, indent=2) + "\n")
    what = ("normal tissue a mosaic of 2-3 of 7 real sources per slide, stain varied per slide, tumour (one of 3 real "
            "sources) colour-matched to the slide" if args.preset == "hard" else "one mirror-tiled normal source, tumour in its own colours")
    md = [f"Cohort (`{args.preset}` preset): {args.slides} generated slides ({args.size} px, 0.5 µm/px; {what}), "
          f"{res['n_positive']} with tumour ({preset['tumour_regions'][0]}-{preset['tumour_regions'][1]} regions of "
          f"{lo:.0f}-{hi:.0f} µm; a 20x patch is 128 µm); tiled at 20x, embedded with efficientnet_lite0; every model "
          "with its defaults, held-out test set (20 % of patients) + 5-fold CV, 2-core CPU.", "",
          f"| model | pooled out-of-fold AUC (95% CI), n = {res['models'][0]['pooled_oof']['n']} | test AUC across folds, mean ± sd "
          f"| test AUC, fold ensemble (n = {res['models'][0]['ensemble_test']['n']}) "
          "| failed folds | localisation AUC mean (min) | wall |", "|---|---|---|---|---|---|---:|"]
    for r in res["models"]:
        af = r["across_folds_test_auc"]
        failed = ", ".join(f"{f['fold']} ({f['why']})" for f in r["failed_folds"]) or "none"
        loc = (f"{r['localisation_auc_mean']:.3f} ({r['localisation_auc_min']:.3f})" if r["localisation_auc_mean"] is not None
               else "–")
        md.append(f"| {r['model']} | {r['pooled_oof_text']} | {af['mean']:.3f} ± {af['sd']:.3f} | {r['ensemble_test_text']} "
                  f"| {failed} | {loc} | {r['wall_seconds']:.0f} s |")
    md += ["", ("Pooled out-of-fold AUC is the headline: every cross-validation slide, each predicted by the fold model that did not train "
                "on it (its epoch chosen on those slides, so slightly optimistic). The held-out test set is small "
                f"({res['models'][0]['ensemble_test']['n']} slides; the across-fold sd shows how much one fold's model "
                "varies on it): where its slides are perfectly separated the bootstrap interval collapses and is reported "
                "as not informative. Localisation: AUC of instance attention (max pooling: instance score) against "
                "the ground-truth tumour patches, per unseen positive slide.")]
    tp, threads = res.get("throughput"), res.get("threads")
    if tp:
        kept = "" if res.get("throughput_cohort") == root.name else f" (kept from an earlier run on {res['throughput_cohort']})"
        md += ["", f"Training throughput, bags read from disk every step (abmil, CPU){kept}:", "",
               "| store | bags/s | share of epoch time loading | instances/bag |", "|---|---:|---:|---:|"]
        for fmt, t in tp.items():
            md.append(f"| {fmt} | {t['bags_per_s']:.1f} | {t['load_share']:.1%} | {t['instances_per_bag']:.0f} |")
    if threads:
        n_all = threads["default_threads"]
        md += ["", f"CPU threads for training (abmil, bags in memory, {threads['epochs']} epochs per run, "
               f"{threads['rounds']} interleaved rounds; bags/s median (min-max)); 'busy' = one other process "
               "spinning on a core, as on a shared machine:", "",
               f"| machine | 1 thread | {n_all} threads (torch's default) | 1 thread ÷ {n_all} threads |", "|---|---:|---:|---:|"]
        for cond in ("idle", "busy"):
            one, many = threads["runs"][f"{cond}/1"], threads["runs"][f"{cond}/{n_all}"]
            md.append(f"| {cond} | {one['median']:.1f} ({one['min']:.1f}-{one['max']:.1f}) | {many['median']:.1f} "
                      f"({many['min']:.1f}-{many['max']:.1f}) | {one['median'] / many['median']:.2f}× |")
        whole = threads["whole_run_seconds"]
        md += ["", "Whole `train-mil` runs (abmil, 5 folds, fresh folders, idle machine, interleaved): "
               + "; ".join(f"{k} thread(s) {', '.join(f'{v:.0f} s' for v in vs)}" for k, vs in whole.items()) + "."]
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_mil_cohort.py {' '.join(sys.argv[1:])}`".rstrip() + "."
           + (" Rows of models not named in `--models` are kept from earlier runs of the same preset and settings."
              if set(rows) - set(args.models.split(",")) else "")]
    (out / "mil_cohort.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
