"""3D volume benchmarks on 2 CPU cores.

1. AdrenalMNIST3D (28³, official splits 1188 / 98 / 298): test AUC and accuracy (at the
   validation-chosen threshold and at 0.5) of the 3D CNN from scratch, the pretrained 2D
   backbone turned 3D (ACS), and 2.5D slice-MIL with mean and attention pooling, beside
   MedMNIST v2 (Yang et al. 2023). Every run is the real `wsi-mil train-volume` command,
   timed as a whole process (start-up, reading, slice features and training included; no
   cache shared between runs). ``--repeats`` rounds (seeds 0, 1, ...), interleaved.
2. Time and memory per volume as volumes grow (28³ -> 64³ -> 128³: real AdrenalMNIST3D
   volumes resampled), for a training step (batch 4, forward + backward + AdamW) and for
   inference (batch 1), each configuration in its own process (peak RSS of that process).

Results: benchmarks/results/volume.{json,md} (quoted in the README).

    .venv/bin/python benchmarks/bench_volume.py [--repeats 1] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from runs import accuracy_at_half, result_row, run_cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NPZ = ROOT.parent / "shared" / "data" / "vol3d" / "adrenalmnist3d.npz"
CACHE = HERE / ".cache" / "volume"

PUBLISHED = [("ResNet-18 + 3D, MedMNIST v2", 0.827, 0.721), ("ResNet-18 + ACS, MedMNIST v2", 0.839, 0.754),
             ("ResNet-18 + 2.5D, MedMNIST v2", 0.718, 0.772), ("auto-sklearn, MedMNIST v2", 0.828, 0.802)]

SCALING = r"""
import json, resource, sys, time
import torch
from wsi_mil.encoders.volume import build_volume_classifier
arch, size, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
torch.manual_seed(0)
model, _ = build_volume_classifier(arch, 1, width=32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n = 4 if phase == "train" else 1
x = torch.rand(n, 1, size, size, size)
times = []
if phase == "train":
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()
    for _ in range(4):
        t = time.perf_counter()
        loss = model(x).sum(); opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - t)
else:
    model.eval()
    with torch.no_grad():
        for _ in range(4):
            t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"s_per_volume": sorted(times[1:])[1] / n, "peak_rss_mb": peak, "model_rss_mb": before}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--skip-cohort", action="store_true", help="only the scaling measurements")
    ap.add_argument("--md-only", action="store_true", help="rewrite volume.md from volume.json")
    ap.add_argument("--only", type=int, nargs="*", default=None,
                    help="run only these cohort configurations (0-based, in table order), keeping the others' results")
    ap.add_argument("--skip-scaling", action="store_true")
    a = ap.parse_args()
    if a.md_only:
        write_md(json.loads((HERE / "results" / "volume.json").read_text()))
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    common = ["--bootstrap", "1000", "--threads", "2", "--epochs", str(a.epochs)]
    runs = {
        "3D CNN from scratch (resnet18_3d, width 32, 28³)": ["--mode", "cnn", "--arch", "resnet18_3d", "--volume-size", "28"],
        "3D CNN, ImageNet EfficientNet-Lite0 as ACS (32³)": ["--mode", "cnn", "--arch", "acs", "--volume-size", "32"],
        "2.5D slice-MIL, mean pooling (64-px slices)": ["--mode", "slices", "--mil-model", "mean", "--volume-size", "28"],
        "2.5D slice-MIL, attention (abmil, 64-px slices)": ["--mode", "slices", "--mil-model", "abmil", "--volume-size", "28"],
    }
    path = HERE / "results" / "volume.json"
    keep = a.skip_cohort or a.only is not None or a.skip_scaling
    results: dict = json.loads(path.read_text()) if keep and path.exists() else {}
    results["settings"] = {k: v for k, v in vars(a).items() if k in ("repeats", "epochs")}
    if not a.skip_cohort:
        chosen = [n for i, n in enumerate(runs) if a.only is None or i in a.only]
        results["adrenal"] = {name: [] if name in chosen else results.get("adrenal", {}).get(name, [])
                              for name in runs}
        for rep in range(a.repeats):
            for name, extra in runs.items():
                if name not in chosen:
                    continue
                out = CACHE / f"run{list(runs).index(name)}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                seconds = run_cli(["train-volume", str(NPZ), *common, *extra, "--seed", str(rep)], out)
                m = json.loads((out / "metrics.json").read_text())["ensemble_test"]
                row = {"seed": rep, "auc": m["auc"], "auc_ci95": m["auc_ci95"], "accuracy": m["accuracy"],
                       "accuracy_at_0.5": accuracy_at_half(out, "1"), "sensitivity": m["sensitivity"],
                       "specificity": m["specificity"], "ece": m["ece"], "wall_s": seconds}
                results["adrenal"][name].append(row)
                print(name, row, flush=True)
    if not a.skip_scaling:
        results["scaling"] = []
    for arch in ("resnet18_3d", "acs") if not a.skip_scaling else ():
        for size in (28, 64, 128):
            for phase in ("train", "infer"):
                res = subprocess.run([sys.executable, "-c", SCALING, arch, str(size), phase], check=True, cwd=ROOT,
                                     capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                row = {"arch": arch, "size": size, "phase": phase, **json.loads(res.stdout.strip().splitlines()[-1])}
                results["scaling"].append(row)
                print(row, flush=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    write_md(results)


def _test_positives() -> int:
    """Positives of the official test split, counted from the file (not written by hand)."""
    import numpy as np

    return int(np.load(NPZ)["test_labels"].sum())


def write_md(r: dict) -> None:
    lines = ["# Volume benchmarks (2 CPU cores)", "",
             f"AdrenalMNIST3D, official splits (1188 / 98 / 298), 28³; test set of 298 volumes ({_test_positives()} "
             "positive). Accuracy "
             "at the threshold chosen on validation and at 0.5. Rows run more than once (seeds 0, 1, ...) give the "
             "median with min–max (the 'runs' column); the 95 % CI is the bootstrap interval of the first run; a "
             "single run is one seed: read the CI, not the third decimal. Whole-process wall time, start-up included.",
             "Command: `.venv/bin/python benchmarks/bench_volume.py`", "",
             "| model | runs | test AUC | 95% CI | accuracy (val. threshold) | accuracy at 0.5 | sensitivity | specificity | ECE | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    for name, rows in r.get("adrenal", {}).items():
        if rows:
            lines.append(result_row(name, rows).replace(" | ", f" | {len(rows)} | ", 1))
    for name, auc, acc in PUBLISHED:
        lines.append(f"| {name} | | {auc:.3f} | | {acc:.3f} | | | | | |")
    lines += ["", ("Time and memory per volume as the volume grows (inputs of each size: the compute does not "
               "depend on the content; training: batch 4, forward + backward + AdamW step; inference: batch 1; "
               "median of 3 steps after a warm-up; peak RSS of a process doing only that, Python and torch "
               "included):"), "",
              "| model | side | training s / volume | training peak RSS | inference s / volume | inference peak RSS |",
              "|---|---|---|---|---|---|"]
    by = {(x["arch"], x["size"], x["phase"]): x for x in r.get("scaling", [])}
    for arch in ("resnet18_3d", "acs"):
        for size in (28, 64, 128):
            t, i = by.get((arch, size, "train")), by.get((arch, size, "infer"))
            if t and i:
                lines.append(f"| {arch} | {size}³ | {t['s_per_volume']:.3f} | {t['peak_rss_mb']:.0f} MB | "
                             f"{i['s_per_volume']:.3f} | {i['peak_rss_mb']:.0f} MB |")
    growth = []
    for arch in ("resnet18_3d", "acs"):
        t = {s: by.get((arch, s, "train")) for s in (28, 64, 128)}
        if all(t.values()):
            growth.append(f"{arch} training time × {t[64]['s_per_volume'] / t[28]['s_per_volume']:.1f} from 28³ to 64³ "
                          f"and × {t[128]['s_per_volume'] / t[64]['s_per_volume']:.1f} from 64³ to 128³")
    lines += ["", ("Voxels grow × 11.9 from 28³ to 64³ and × 8 from 64³ to 128³; measured: " + "; ".join(growth)
               + ". The weights are fixed (resnet18_3d width 32: 8.3 M parameters; the ACS EfficientNet-Lite0: "
               "3.4 M).")]
    (HERE / "results" / "volume.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
