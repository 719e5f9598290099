"""Weak supervision at low witness rates: small lesions (100-250 µm, about 1 % of the
tissue) on balanced generated cohorts of 60 and 120 slides, every registered model, and
a confounded cohort on which the shortcut check must fire (and on the balanced ones must
not).

1. ``prep``: a balanced cohort of 120 slides (``balanced`` preset: every normal source
   shown by as many slides of each class; 6144 px at 0.5 µm/px), tiled at 20x and
   embedded with the offline encoder; the 60-slide cohort is the first 30 slides of each
   of its classes (balanced the same way); a 40-slide ``confounded`` cohort (site-B, with
   its own stain, holds 80 % of positives and 20 % of negatives).
2. ``train``: ``train-mil`` with every registered model and its defaults on each cohort
   (held-out test set of 20 % of patients + 5-fold CV): test AUC across folds (mean ± sd),
   the fold ensemble on the test set, localisation AUC (attention against the lesion
   masks, slides the models did not train on) mean / min, failed folds, the shortcut
   warnings of the run, whole wall time on this machine's CPU cores.

Results: benchmarks/results/mil_small_lesions.{json,md} (quoted in the README).

    .venv/bin/python benchmarks/bench_mil_small.py [--phase prep|train|all] [--models abmil,dsmil] [--cohorts 60,120,confounded]
    (rows of models not named are kept from earlier runs; the results list every command)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "small-lesions"
RESULTS = HERE / "results"
SIZE = 6144
SEED = 11


def prep(n_slides: int, preset: str, name: str) -> Path:
    """Generate, tile and embed a cohort (cached: each step resumes)."""
    from wsi_mil.commands.extract_features import run_extract
    from wsi_mil.commands.tile import run_tile
    from wsi_mil.config import ExtractConfig, TileConfig
    from wsi_mil.data.manifest import read_manifest
    from wsi_mil.synth.cohort import make_cohort

    root = CACHE / name
    t0 = time.perf_counter()
    manifest = make_cohort(root / "slides", n_slides=n_slides, preset=preset, size_px=SIZE, seed=SEED, progress=True)
    run_tile(read_manifest(manifest), out_dir=root / "tiles", config=TileConfig(), workers=2, progress=True)
    run_extract([root / "tiles"], out_dir=root / "tiles", config=ExtractConfig(), progress=True)
    (root / "prep_seconds.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    return manifest


def class_subset(manifest: Path, per_class: int, out: Path) -> Path:
    """A manifest of the first ``per_class`` slides of each class of a balanced cohort
    (the cohort balances its normal sources within +-1 in any such first k), paths absolute."""
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for label in ("0", "1") for r in [x for x in rows if x["label"] == label][:per_class]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in kept:
            w.writerow({**r, "path": str((manifest.parent / r["path"]).resolve())})
    return out


def cohorts() -> dict[str, Path]:
    big = CACHE / "balanced-120" / "slides" / "manifest.csv"
    return {"120": big, "60": CACHE / "balanced-60.csv", "confounded": CACHE / "confounded-40" / "slides" / "manifest.csv"}


def test_ceiling(run_dir: Path) -> dict:
    """What a perfect patch detector could reach on the run's test set: a positive slide
    none of whose tiled patches holds tumour (the lesion was planted where no patch was
    kept) is label noise for any model; scoring each test slide by "some patch holds
    tumour" gives the ceiling AUC. Also: positives with a lesion patch (at least half
    tumour), the patches localisation is scored on."""
    from wsi_mil.commands.heatmap import slide_for_attention
    from wsi_mil.data.bags import attention_patch_extent
    from wsi_mil.eval.localisation import patch_tumour_share
    from wsi_mil.eval.metrics import auc
    from wsi_mil.io.attention import read_attention
    from wsi_mil.synth.slide import read_truth_mask

    y, best = [], []
    for h5 in sorted((run_dir / "attention" / "ensemble").glob("*.h5")):
        coords, _, attrs = read_attention(h5)
        path, _ = slide_for_attention(attrs, {}, h5)
        y.append(int(json.loads(path.with_name(path.stem + ".json").read_text())["label"]) == 1)
        share = 0.0
        if path.with_name(path.stem + ".tumour.png").exists():
            mask, ds = read_truth_mask(path)
            share = float(patch_tumour_share(coords, attention_patch_extent(attrs, h5), mask, ds).max(initial=0.0))
        best.append(share)
    pos = [b for t, b in zip(y, best, strict=False) if t]
    return {"n_positive": len(pos), "positive_with_tumour_patch": sum(b > 0 for b in pos),
            "positive_with_lesion_patch": sum(b >= 0.5 for b in pos),
            "ceiling_auc": auc([int(t) for t in y], [float(b > 0) for b in best])}


def model_row(manifest: Path, feats: Path, run_dir: Path, model: str, seed: int) -> dict:
    """One whole train-mil run of ``model`` with its defaults: the figures of the table."""
    from wsi_mil.commands.train_mil import run_train
    from wsi_mil.config import TrainConfig
    from wsi_mil.eval.metrics import auc_text
    from wsi_mil.eval.shortcuts import notes_of, warnings_of

    shutil.rmtree(run_dir, ignore_errors=True)  # a whole fresh run: nothing resumed
    t = time.perf_counter()
    report = run_train(manifest, [feats], out_dir=run_dir, config=TrainConfig(model=model, seed=seed), progress=False)
    wall = time.perf_counter() - t
    m = report.metrics
    sc = m["audit"].get("shortcuts", {})
    loc = sc.get("localisation") or {}
    return {"model": model, "wall_seconds": wall, "across_folds_test_auc": m["across_folds_test"]["auc"],
            "fold_test_aucs": [f["test"].get("auc") for f in m["folds"]],
            "best_epochs": [f.get("best_epoch") for f in m["folds"]],
            "ensemble_test": {k: m["ensemble_test"].get(k) for k in ("auc", "auc_ci95", "auc_ci_note", "n", "n_positive")},
            "ensemble_test_text": auc_text(m["ensemble_test"]),
            "pooled_oof_text": auc_text(m["pooled_validation"]),
            "failed_folds": m["fold_health"]["failed"], "headline": m["headline"],
            "localisation_auc_mean": loc.get("mean"), "localisation_auc_min": loc.get("min"),
            "shortcut_warnings": warnings_of(sc), "shortcut_notes": notes_of(sc), "selection": m.get("model_selection"),
            "test_ceiling": test_ceiling(run_dir)}


def markdown(res: dict) -> str:
    lines = ["# Small lesions, weak supervision (generated cohorts of real tissue)", "",
             (f"Cohorts: the `balanced` preset ({SIZE} px slides at 0.5 µm/px, 1-2 lesions of 100-250 µm per positive "
             "slide, about 1 % of the tissue; every normal source shown by as many slides of each class), 120 slides "
             "and the first 30 of each of its classes (60 slides); the `confounded` preset (40 slides; a site whose stain comes with "
             "the label: 80 % of positives, 20 % of negatives). Tiled at 20x (256 px patches), embedded with the offline "
             "efficientnet_lite0; every model with its defaults; held-out test set (20 % of patients) and 5-fold CV; "
             f"{res.get('cpus', '?')} CPU cores."), ""]
    for name, rows in res["cohorts"].items():
        if not rows:
            continue
        first = next(iter(rows.values()))
        ceil = next((r["test_ceiling"] for r in rows.values() if r.get("test_ceiling")), None)
        ceiling = (f"; {ceil['positive_with_tumour_patch']} of them with tumour in a tiled patch, "
                   f"{ceil['positive_with_lesion_patch']} with a lesion patch (at least half tumour): a perfect patch "
                   f"detector reaches test AUC {ceil['ceiling_auc']:.3f}" if ceil else "")
        lines += [f"## Cohort {name}", "", (f"Test set: {first['ensemble_test']['n']} slides "
                  f"({first['ensemble_test']['n_positive']} positive{ceiling})."), "",
                  ("| model | test AUC across folds, mean ± sd | test AUC, fold ensemble (95% CI) | failed folds "
                  "| localisation AUC mean (min) | epochs kept | shortcut warnings | wall |"),
                  "|---|---|---|---|---|---|---|---:|"]
        for r in rows.values():
            af = r["across_folds_test_auc"]
            failed = ", ".join(f"{f['fold']}" for f in r["failed_folds"]) or "none"
            loc = (f"{r['localisation_auc_mean']:.3f} ({r['localisation_auc_min']:.3f})"
                   if r["localisation_auc_mean"] is not None else "–")
            colours = sorted({m for n in r.get("shortcut_notes", []) for m in re.findall(r"(?:follow the|^the) (.+?) of the tissue", n)})
            warn = "; ".join([w.split(" (")[0] for w in r["shortcut_warnings"]]
                             + ([f"note: tissue colour ({', '.join(colours)})"] if colours else [])) or "none"
            epochs = ("averaged over " + r["selection"].split("over epochs ")[1].split(" ")[0]
                      if str(r.get("selection", "")).startswith("swa") else ", ".join(str(e) for e in r["best_epochs"]))
            lines.append(f"| {r['model']} | {af['mean']:.3f} ± {af['sd']:.3f} | {r['ensemble_test_text']} | {failed} "
                         f"| {loc} | {epochs} | {warn} | {r['wall_seconds']:.0f} s |")
        lines.append("")
    lines += [("Test AUC across folds: each fold's model on the held-out test set (the sd shows how much one fold's model "
              "varies). Localisation: AUC of instance attention against the lesion patches (at least half of the patch "
              "inside the mask), per positive slide a model did not train on. A failed fold has a validation or test "
              "AUC at or below 0.5. Shortcut warnings: what the run's report says (wsi_mil.eval.shortcuts); a note on "
              "the tissue colour: the predictions (or the label) follow a colour statistic of the thumbnails, which "
              "a stain or the lesions' own colour can cause (reported, not warned). Epochs kept: the best validation "
              "epoch per fold, or the epochs whose weights were averaged (a fixed schedule). `transmil`: its class-token "
              "readout (the default since training revision 5, as the paper)."), "",
              "Commands (rows of models a later command names are replaced by it): "
              + "; ".join(f"`{c}`" for c in res.get("commands", [])) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    from wsi_mil.mil import available
    from wsi_mil.runtime import prefer_passive_omp

    prefer_passive_omp()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("prep", "train", "all"), default="all")
    p.add_argument("--models", default=",".join(available()), help="comma-separated registered models")
    p.add_argument("--cohorts", default="60,120,confounded")
    p.add_argument("--confounded-models", default="abmil", help="models run on the confounded cohort")
    args = p.parse_args()
    if args.phase in ("prep", "all"):
        big = prep(120, "balanced", "balanced-120")
        class_subset(big, 30, cohorts()["60"])
        prep(40, "confounded", "confounded-40")
    if args.phase == "prep":
        return
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "mil_small_lesions.json"
    res = json.loads(out.read_text()) if out.exists() else {"cohorts": {}}
    res["cpus"] = os.cpu_count()
    command = "python benchmarks/bench_mil_small.py --phase train " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "phase")
    res["commands"] = [*[c for c in res.get("commands", []) if c != command], command]
    feats = {"120": CACHE / "balanced-120" / "tiles" / "features", "60": CACHE / "balanced-120" / "tiles" / "features",
             "confounded": CACHE / "confounded-40" / "tiles" / "features"}
    for name in args.cohorts.split(","):
        models = args.confounded_models.split(",") if name == "confounded" else args.models.split(",")
        rows = res["cohorts"].setdefault(name, {})
        for model in models:
            print(f"--- cohort {name}, {model}", flush=True)
            rows[model] = model_row(cohorts()[name], feats[name], CACHE / "runs" / f"{name}-{model}", model, SEED)
            r = rows[model]
            print(json.dumps({k: r[k] for k in ("across_folds_test_auc", "ensemble_test_text", "failed_folds",
                                                "localisation_auc_mean", "shortcut_warnings", "wall_seconds")}),
                  flush=True)
            out.write_text(json.dumps(res, indent=2) + "\n")
            (RESULTS / "mil_small_lesions.md").write_text(markdown(res))


if __name__ == "__main__":
    main()
