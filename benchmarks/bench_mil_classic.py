"""Classic MIL benchmarks with the protocol of Ilse et al. 2018: 10-fold cross-validation
repeated 5 times, accuracy at threshold 0.5, mean ± standard error.

Sets (../shared/data/mil): MUSK1, Fox, Elephant (Table 1 of the paper) and the UCSB
breast-cancer bags. Models: attention (abmil) and gated attention (gated_abmil) from
the project's registry, trained with the project's loop (`wsi_mil.train.loop.fit`), and a
non-MIL baseline: each bag's instances mean- and max-pooled, then logistic regression.

One recipe for every set, nothing tuned per set, and every choice made on inner
validation folds only (never on the test fold): the MIL models pick their number of epochs
(at most the largest of ``--epoch-candidates``) by early stopping on a stratified inner validation fold (a fifth of
the training bags) and are then refitted on all training bags for that many; the baseline picks its regularisation by 5-fold inner cross-validation
(``LogisticRegressionCV``). Instance features are standardised with the training folds'
statistics.

The ± is the fold-level standard error: the standard deviation of the 50 fold accuracies
over √10, the standard error of one 10-fold cross-validation, comparable with the paper's;
the standard error over the 5 repeats (much smaller: repeats share the data) is in brackets.

Results: benchmarks/results/mil_classic.{json,md} (quoted in the README).

    .venv/bin/python benchmarks/bench_mil_classic.py [--repeats 5] [--epoch-candidates 20 40 80]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
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


BASELINE = "mean+max → logistic regression"


def pooled(bags) -> np.ndarray:
    """Each bag as the concatenation of its instances' mean and max (a non-MIL baseline)."""
    return np.stack([np.concatenate([b.features.mean(axis=0), b.features.max(axis=0)]) for b in bags])


def _baseline_probs(train, test, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray([int(b.target[0]) for b in train])
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")
    clf = LogisticRegressionCV(Cs=np.logspace(-3, 2, 11), cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                               scoring="accuracy", max_iter=5000)
    return clf.fit(pooled(train), y).predict_proba(pooled(test))[:, 1]


def _mil_probs(model_name: str, train, test, seed: int, args: argparse.Namespace, epochs: int) -> np.ndarray:
    from wsi_mil.data.bags import Task
    from wsi_mil.mil import build_model
    from wsi_mil.train.loop import FitSettings, fit, predict

    task = Task("binary", ("1",), ("label",), ("0", "1"))
    s = FitSettings(epochs=epochs, lr=args.lr, weight_decay=args.weight_decay, bags_per_batch=args.bags_per_batch,
                    max_instances=None, imbalance="none", warmup_epochs=1, seed=seed)
    model = build_model(model_name, train[0].features.shape[1], 1, hidden=args.hidden, dropout=args.dropout)
    fit(model, train, [], task, s)
    return predict(model, test, task).probs[:, 0]


def choose_recipe(sets: list[str], args: argparse.Namespace) -> dict:
    """The one recipe (number of epochs) for every set and model, chosen on inner validation
    splits only: for each set and each outer training fold of repeat 0, a stratified fifth
    of the training bags is held out and abmil is trained on the rest with each candidate;
    the candidate with the best inner accuracy pooled over all sets and folds wins (ties:
    fewer epochs). No test fold is scored."""
    import torch
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    from wsi_mil.data.mil_import import load_classic

    torch.set_num_threads(1)
    hits = dict.fromkeys(args.epoch_candidates, 0)
    total = 0
    for name in sets:
        bags = load_classic(name, DATA)
        y = np.asarray([int(b.target[0]) for b in bags])
        for k, (tr, _) in enumerate(StratifiedKFold(10, shuffle=True, random_state=0).split(np.zeros(len(y)), y)):
            inner, val = next(StratifiedShuffleSplit(1, test_size=0.2, random_state=k).split(np.zeros(len(tr)), y[tr]))
            train, held = _standardised([bags[tr[i]] for i in inner], [bags[tr[i]] for i in val])
            for c in args.epoch_candidates:
                probs = _mil_probs("abmil", train, held, 10_000 + k, args, c)
                hits[c] += int(((probs >= 0.5).astype(int) == y[tr][val]).sum())
            total += len(val)
        print(f"  recipe: inner accuracy after {name}: " + ", ".join(f"{c} epochs {h / total:.3f}" for c, h in hits.items()), flush=True)
    acc = {c: h / total for c, h in hits.items()}
    best = max(args.epoch_candidates, key=lambda c: (round(acc[c], 6), -c))
    return {"epochs": best, "inner_accuracy": {str(c): a for c, a in acc.items()}, "n_inner_validation_bags": total}


def run(name: str, model_name: str, args: argparse.Namespace) -> dict:
    import torch
    from sklearn.model_selection import StratifiedKFold

    from wsi_mil.data.mil_import import load_classic

    torch.set_num_threads(1)
    bags = load_classic(name, DATA)
    y = np.asarray([int(b.target[0]) for b in bags])
    per_repeat, per_fold = [], []
    for r in range(args.repeats):
        correct = 0
        for k, (tr, te) in enumerate(StratifiedKFold(10, shuffle=True, random_state=r).split(np.zeros(len(y)), y)):
            train, test = _standardised([bags[i] for i in tr], [bags[i] for i in te])
            seed = 1000 * r + k
            probs = (_baseline_probs(train, test, seed) if model_name == BASELINE
                     else _mil_probs(model_name, train, test, seed, args, args.chosen_epochs))
            hits = int(((probs >= 0.5).astype(int) == y[te]).sum())
            correct += hits
            per_fold.append(hits / len(te))
        per_repeat.append(correct / len(y))
        print(f"  {name} {model_name} repeat {r}: accuracy {per_repeat[-1]:.3f}", flush=True)
    acc = np.asarray(per_repeat)
    folds = np.asarray(per_fold)
    return {"accuracy_mean": float(acc.mean()), "accuracy_se_over_repeats": float(acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else 0.0,
            "fold_accuracy_sd": float(folds.std(ddof=1)), "fold_accuracy_se": float(folds.std(ddof=1) / np.sqrt(10)),
            "repeats": per_repeat, "n_bags": len(bags)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["musk1", "elephant", "fox", "ucsb_breast_cancer"])
    p.add_argument("--models", nargs="+", default=["abmil", "gated_abmil", BASELINE])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epoch-candidates", type=int, nargs="+", default=[20, 40, 80],
                   help="the recipe's epoch count is chosen among these on inner validation splits")
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
        same = ("repeats", "epoch_candidates", "lr", "weight_decay", "hidden", "dropout", "bags_per_batch")
        if any(old["settings"].get(k) != getattr(args, k) for k in same):
            raise SystemExit("--merge: the stored results were made with other settings; rerun without --merge")
        res["results"], res["seconds"], res["recipe"] = old["results"], old.get("seconds", {}), old["recipe"]
        res["settings"]["sets"] = list(dict.fromkeys(old["settings"]["sets"] + args.sets))
        res["settings"]["models"] = list(dict.fromkeys(old["settings"]["models"] + args.models))
    if "recipe" not in res:
        t0 = time.perf_counter()
        res["recipe"] = choose_recipe(args.sets, args)
        res["seconds"]["recipe"] = time.perf_counter() - t0
    args.chosen_epochs = res["recipe"]["epochs"]
    for name in args.sets:  # results are written after every set and model, so a long run can be read early
        for m in args.models:
            t0 = time.perf_counter()
            res["results"].setdefault(name, {})[m] = run(name, m, args)
            res["seconds"][f"{name}/{m}"] = time.perf_counter() - t0
            write(res, args, out)


def write(res: dict, args: argparse.Namespace, out: Path) -> None:
    (out / "mil_classic.json").write_text(json.dumps(res, indent=2) + "\n")
    total = sum(res["seconds"].values()) / 60
    md = [f"Protocol of Ilse et al. 2018: 10-fold CV × {args.repeats} repeats, accuracy at 0.5. ± is the fold-level "
          "standard error (sd of the fold accuracies / √10, the s.e. of one 10-fold CV, comparable with the paper's); "
          "the s.e. over repeats is in brackets. One recipe for every set and model, chosen on inner validation splits "
          f"only: {res['recipe']['epochs']} epochs, picked among {args.epoch_candidates} by abmil's accuracy on a held-out fifth "
          "of each outer training fold of repeat 0, pooled over the sets ("
          + ", ".join(f"{c}: {a:.3f}" for c, a in res["recipe"]["inner_accuracy"].items())
          + f", {res['recipe']['n_inner_validation_bags']} inner bags; one fold's test bags are another's training bags, "
          f"so the choice is not nested per fold); AdamW lr {args.lr}, {args.bags_per_batch} bags per step, hidden {args.hidden}; the baseline "
          "(bag = mean and max of its instances, logistic regression) picks its regularisation by inner 5-fold CV. "
          f"Features standardised on the training folds; 2-core CPU, {total:.0f} min in all.", "",
          "| set | bags | model | wsi-mil accuracy | paper (Table 1) |", "|---|---:|---|---|---|"]
    for name, by_model in res["results"].items():
        for m, r in by_model.items():
            md.append(f"| {name} | {r['n_bags']} | {m} | {r['accuracy_mean']:.3f} ± {r['fold_accuracy_se']:.3f} "
                      f"({r['accuracy_se_over_repeats']:.3f}) | {PAPER.get(name, {}).get(m, 'n/a')} |")
    cmd = " ".join(a for a in sys.argv[1:] if a != "--merge") if not args.merge else ""
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_mil_classic.py {cmd}`".rstrip() + "."
           + (" Rows were measured in more than one run (`--merge`) with the same settings." if args.merge else "")]
    (out / "mil_classic.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
