"""MIL on a labelled cohort built with the slide generator, and training throughput.

1. A cohort of generated slides from real tissue, tumour regions planted in a minority
   of them (some regions small), tiled and embedded with the offline encoder.
2. ``train-mil`` (attention MIL, held-out test set + 5-fold CV): slide-level AUC, and
   localisation — the AUC of instance attention against the ground-truth tumour mask,
   per unseen positive slide (out-of-fold validation and test), averaged.
3. Training throughput on CPU with bags read from disk every step (no cache): bags/s and
   the share of epoch time spent loading, HDF5 versus Zarr feature stores (the same
   features written in both formats).

Results: benchmarks/results/mil_cohort.{json,md} (quoted in the README).

    .venv/bin/python benchmarks/bench_mil_cohort.py [--slides 40] [--size 6144]
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
        c.attrs.update({k: v for k, v in cattrs.items()})
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


def main() -> None:
    from wsi_mil.runtime import prefer_passive_omp

    prefer_passive_omp()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=40)
    p.add_argument("--size", type=int, default=6144)
    p.add_argument("--positive-fraction", type=float, default=0.3)
    p.add_argument("--model", default="abmil")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--throughput-epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--thread-rounds", type=int, default=3)
    args = p.parse_args()
    from wsi_mil.commands.extract_features import run_extract
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.commands.train_mil import run_train
    from wsi_mil.config import ExtractConfig, TileConfig, TrainConfig
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.eval.localisation import unseen_localisation
    from wsi_mil.synth.cohort import make_cohort

    root = CACHE / f"cohort-{args.slides}-{args.size}-{args.seed}"
    t0 = time.perf_counter()
    manifest = make_cohort(root / "slides", n_slides=args.slides, positive_fraction=args.positive_fraction, size_px=args.size,
                           tumour_size_um=(150.0, 900.0), tumour_regions=(1, 2), seed=args.seed, progress=True)
    run_tile(read_manifest(manifest), out_dir=root / "tiles", config=TileConfig(), workers=2, progress=True)
    run_extract([root / "tiles"], out_dir=root / "tiles", config=ExtractConfig(), progress=True)
    prep_s = time.perf_counter() - t0
    feats = root / "tiles" / "features"
    run_dir = root / f"train-{args.model}"
    report = run_train(manifest, [feats], out_dir=run_dir, config=TrainConfig(model=args.model, epochs=args.epochs, seed=args.seed),
                       progress=True)
    slides = {e.slide_id: e.path for e in read_manifest(manifest)}
    per = unseen_localisation(run_dir, slides)
    m = report.metrics
    zarr_dir = root / "features-zarr"
    to_zarr(feats, zarr_dir)
    tp = {"h5": throughput(manifest, feats, args.throughput_epochs), "zarr": throughput(manifest, zarr_dir, args.throughput_epochs)}
    threads = thread_throughput(manifest, feats, args.throughput_epochs, args.thread_rounds)
    n_all = threads["default_threads"]
    threads["whole_run_seconds"] = whole_runs(manifest, feats, args.model, args.epochs, args.seed, [1, n_all, 1, n_all])
    res = {"settings": vars(args), "prep_seconds": prep_s, "n_slides": args.slides,
           "n_positive": int(sum(1 for e in read_manifest(manifest) if e.labels["label"] == "1")),
           "ensemble_test": {k: m["ensemble_test"].get(k) for k in ("auc", "auc_ci95", "n", "sensitivity", "specificity")},
           "pooled_validation_auc": m["pooled_validation"].get("auc"), "across_folds_test_auc": m["across_folds_test"].get("auc"),
           "localisation_auc_mean": float(np.mean(list(per.values()))) if per else None,
           "localisation_auc_min": float(np.min(list(per.values()))) if per else None,
           "localisation_per_slide": per, "throughput": tp, "threads": threads,
           "train_seconds": m.get("seconds"), "train_threads": m.get("threads")}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "mil_cohort.json").write_text(json.dumps(res, indent=2) + "\n")
    e = res["ensemble_test"]
    ci = e["auc_ci95"]
    af = res["across_folds_test_auc"]
    md = [f"Cohort: {args.slides} generated slides ({args.size} px, 0.5 µm/px, real tissue), {res['n_positive']} with tumour "
          f"(1-2 regions of 150-900 µm); tiled at 20x, embedded with efficientnet_lite0; `{args.model}`, held-out test set "
          "(20 % of patients) + 5-fold CV, 2-core CPU.", "",
          "| measure | value |", "|---|---|",
          f"| slide AUC, fold ensemble on the test set (n={e['n']}) | {e['auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + " |",
          f"| slide AUC, test set, across folds | {af['mean']:.3f} ± {af['sd']:.3f} |",
          f"| slide AUC, pooled out-of-fold validation | {res['pooled_validation_auc']:.3f} |",
          f"| localisation AUC (attention vs tumour patches), mean over {len(per)} unseen positive slides | {res['localisation_auc_mean']:.3f} (min {res['localisation_auc_min']:.3f}) |",
          "", "Training throughput, bags read from disk every step (abmil, CPU):", "",
          "| store | bags/s | share of epoch time loading | instances/bag |", "|---|---:|---:|---:|"]
    for fmt, t in tp.items():
        md.append(f"| {fmt} | {t['bags_per_s']:.1f} | {t['load_share']:.1%} | {t['instances_per_bag']:.0f} |")
    md += ["", f"CPU threads for training (abmil, bags in memory, {threads['epochs']} epochs per run, "
           f"{threads['rounds']} interleaved rounds; bags/s median (min-max)); 'busy' = one other process "
           "spinning on a core, as on a shared machine:", "",
           f"| machine | 1 thread | {n_all} threads (torch's default) | 1 thread ÷ {n_all} threads |", "|---|---:|---:|---:|"]
    for cond in ("idle", "busy"):
        one, many = threads["runs"][f"{cond}/1"], threads["runs"][f"{cond}/{n_all}"]
        md.append(f"| {cond} | {one['median']:.1f} ({one['min']:.1f}-{one['max']:.1f}) | {many['median']:.1f} "
                  f"({many['min']:.1f}-{many['max']:.1f}) | {one['median'] / many['median']:.2f}× |")
    whole = threads["whole_run_seconds"]
    md += ["", f"Whole `train-mil` runs (5 folds, {args.epochs} epochs at most, fresh folders, idle machine, interleaved): "
           + "; ".join(f"{k} thread(s) {', '.join(f'{v:.0f} s' for v in vs)}" for k, vs in whole.items())
           + f". By default train-mil picks {res['train_threads']} thread(s) for these bags."]
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_mil_cohort.py {' '.join(sys.argv[1:])}`".rstrip() + "."]
    (out / "mil_cohort.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
