"""Classic MIL benchmarks with the protocol of Ilse et al. 2018: 10-fold cross-validation
repeated 5 times, accuracy at threshold 0.5, mean ± standard error.

Sets (../shared/data/mil): MUSK1, Fox, Elephant (Table 1 of the paper) and the UCSB
breast-cancer bags. Models: attention (abmil) and gated attention (gated_abmil) from
the project's registry, trained with the project's loop (`wsi_mil.train.loop.fit`) for a
fixed number of epochs (no validation set inside the training folds, as in the paper's
protocol). Instance features are standardised with the training folds' statistics.

Results: benchmarks/results/mil_classic.{json,md} (quoted in the README).

    .venv/bin/python benchmarks/bench_mil_classic.py [--repeats 5] [--epochs 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = ROOT.parent / "shared" / "data" / "mil"

# Ilse et al. 2018 (arXiv:1802.04712), Table 1: mean accuracy ± s.e.
PAPER = {
    "musk1": {"abmil": "0.892 ± 0.040", "gated_abmil": "0.900 ± 0.050"},
    "fox": {"abmil": "0.615 ± 0.043", "gated_abmil": "0.603 ± 0.029"},
    "elephant": {"abmil": "0.868 ± 0.022", "gated_abmil": "0.857 ± 0.027"},
    "ucsb_breast_cancer": {"abmil": "n/a (the paper's breast-cancer experiment trains on raw image patches)",
                           "gated_abmil": "n/a"},
}


def _standardised(train, test):
    from wsi_mil.data.bags import Bag

    x = np.concatenate([b.features for b in train])
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6

    def z(bags):
        return [Bag(b.slide_id, b.patient_id, b.target, None, features=(b.features - mu) / sd, coords=b.coords) for b in bags]
    return z(train), z(test)


def run(name: str, model_name: str, args: argparse.Namespace) -> dict:
    import torch
    from sklearn.model_selection import StratifiedKFold

    from wsi_mil.data.bags import Task
    from wsi_mil.data.mil_import import load_classic
    from wsi_mil.mil import build_model
    from wsi_mil.train.loop import FitSettings, fit, predict

    torch.set_num_threads(1)
    bags = load_classic(name, DATA)
    y = np.asarray([int(b.target[0]) for b in bags])
    task = Task("binary", ("1",), ("label",), ("0", "1"))
    base = FitSettings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, bags_per_batch=args.bags_per_batch,
                       max_instances=None, imbalance="none", warmup_epochs=1)
    per_repeat, per_fold = [], []
    for r in range(args.repeats):
        correct = 0
        for k, (tr, te) in enumerate(StratifiedKFold(10, shuffle=True, random_state=r).split(np.zeros(len(y)), y)):
            train, test = _standardised([bags[i] for i in tr], [bags[i] for i in te])
            model = build_model(model_name, train[0].features.shape[1], 1, hidden=args.hidden, dropout=args.dropout)
            fit(model, train, [], task, replace(base, seed=1000 * r + k))
            pred = predict(model, test, task)
            hits = int(((pred.probs[:, 0] >= 0.5).astype(int) == y[te]).sum())
            correct += hits
            per_fold.append(hits / len(te))
        per_repeat.append(correct / len(y))
        print(f"  {name} {model_name} repeat {r}: accuracy {per_repeat[-1]:.3f}", flush=True)
    acc = np.asarray(per_repeat)
    folds = np.asarray(per_fold)
    return {"accuracy_mean": float(acc.mean()), "accuracy_se_over_repeats": float(acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else 0.0,
            "fold_accuracy_sd": float(folds.std(ddof=1)), "fold_accuracy_se": float(folds.std(ddof=1) / np.sqrt(len(folds))),
            "repeats": per_repeat, "n_bags": len(bags)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["musk1", "elephant", "fox", "ucsb_breast_cancer"])
    p.add_argument("--models", nargs="+", default=["abmil", "gated_abmil"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.25)
    p.add_argument("--bags-per-batch", type=int, default=4)
    p.add_argument("--merge", action="store_true",
                   help="keep the rows already in results/mil_classic.json (same settings) and add or replace "
                        "only the sets/models run now")
    args = p.parse_args()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    res = {"settings": dict(vars(args)), "results": {}, "seconds": {}}
    if args.merge and (out / "mil_classic.json").exists():
        old = json.loads((out / "mil_classic.json").read_text())
        same = ("repeats", "epochs", "lr", "weight_decay", "hidden", "dropout", "bags_per_batch")
        if any(old["settings"].get(k) != getattr(args, k) for k in same):
            raise SystemExit("--merge: the stored results were made with other settings; rerun without --merge")
        res["results"], res["seconds"] = old["results"], old.get("seconds", {})
        res["settings"]["sets"] = list(dict.fromkeys(old["settings"]["sets"] + args.sets))
        res["settings"]["models"] = list(dict.fromkeys(old["settings"]["models"] + args.models))
    for name in args.sets:  # results are written after every set and model, so a long run can be read early
        for m in args.models:
            t0 = time.perf_counter()
            res["results"].setdefault(name, {})[m] = run(name, m, args)
            res["seconds"][f"{name}/{m}"] = time.perf_counter() - t0
            write(res, args, out)


def write(res: dict, args: argparse.Namespace, out: Path) -> None:
    (out / "mil_classic.json").write_text(json.dumps(res, indent=2) + "\n")
    total = sum(res["seconds"].values()) / 60
    md = [f"Protocol of Ilse et al. 2018: 10-fold CV × {args.repeats} repeats, accuracy at 0.5, mean ± s.e. over repeats "
          f"(fold-level s.e. in brackets). {args.epochs} epochs, AdamW lr {args.lr}, {args.bags_per_batch} bags per step, "
          f"hidden {args.hidden}, features standardised on the training folds; 2-core CPU, {total:.0f} min in all.", "",
          "| set | bags | model | wsi-mil accuracy | paper (Table 1) |", "|---|---:|---|---|---|"]
    for name, by_model in res["results"].items():
        for m, r in by_model.items():
            md.append(f"| {name} | {r['n_bags']} | {m} | {r['accuracy_mean']:.3f} ± {r['accuracy_se_over_repeats']:.3f} "
                      f"({r['fold_accuracy_se']:.3f}) | {PAPER.get(name, {}).get(m, 'n/a')} |")
    cmd = " ".join(a for a in sys.argv[1:] if a != "--merge") if not args.merge else ""
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_mil_classic.py {cmd}`".rstrip() + "."
           + (" Rows were measured in more than one run (`--merge`) with the same settings." if args.merge else "")]
    (out / "mil_classic.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
