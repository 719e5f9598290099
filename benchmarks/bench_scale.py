"""The road at cohort scale: every stage's whole-process cost as the cohort grows, and the
cost of re-running it unchanged.

For cohorts of 20, 200 and 1,000 generated slides (the `balanced` preset, small slides of
real tissue: the per-slide work is small on purpose, so what grows with the cohort shows),
each stage runs as a user runs it, one CLI process: `tile`, `extract-features`,
`train-mil` (3 folds, 5 epochs: the per-slide costs around training — checks, evaluation,
attention stores, plots — not the optimiser) and `heatmap`. For each: wall time, time per
slide, peak RSS of the largest process (psutil, sampled every 20 ms), and the same command
run again on the unchanged inputs (it should do and write nothing). The near-duplicate
audit (`wsi_mil.data.duplicates.slide_pairs`, which every train-mil runs) is timed alone at
1,000 slides on the real features, and at 10,000 slides by simulation (stated as such):
features generated per slide on the fly from the cohort's real ones (rows resampled and
perturbed) with 10 planted copies, never all held at once.

    .venv/bin/python benchmarks/bench_scale.py [--cohorts 20 200 1000] [--size 2048]

Results: benchmarks/results/scale.{json,md} (quoted in the README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_tile import cli_process  # noqa: E402

CACHE = HERE / ".cache" / "scale"
RESULTS = HERE / "results"


def run(args: list[str]) -> dict:
    """One CLI command as its own process: wall time and peak RSS."""
    wall, sampler = cli_process(args)
    return {"wall_s": wall, "peak_rss_single_mb": sampler.peak_single / 2**20}


def files_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name != ".wsi-mil.lock" and not p.name.endswith(".log")}


def cohort(n: int, size: int) -> dict:
    root = CACHE / f"c{n}"
    shutil.rmtree(root, ignore_errors=True)  # whole fresh runs
    root.mkdir(parents=True)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wsi_mil.cli", "synth", "--preset", "balanced", "--n-slides", str(n), "--size",
                    str(size), "--out", str(root / "slides"), "--no-progress", "-q"], check=True)
    synth_s = time.perf_counter() - t
    manifest = root / "slides" / "manifest.csv"
    stages = {
        "tile": ["tile", str(manifest), "--out", str(root / "tiles"), "--workers", "2"],
        "extract-features": ["extract-features", str(root / "tiles"), "--out", str(root / "tiles")],
        "train-mil": ["train-mil", str(manifest), "--features", str(root / "tiles" / "features"), "--out",
                      str(root / "run"), "--folds", "3", "--epochs", "5", "--bootstrap", "200", "--threads", "2",
                      "--allow-missing"],  # a generated slide can come out without tissue patches
        "heatmap": ["heatmap", str(root / "run"), "--out", str(root / "heatmaps")],
    }
    rows = {}
    for name, args in stages.items():
        first = run(args)
        before = files_state(root)
        again = run(args)
        after = files_state(root)
        rewritten = sum(1 for k in before.keys() & after.keys() if before[k] != after[k]) + len(after.keys() - before.keys())
        rows[name] = {**first, "per_slide_ms": 1000 * first["wall_s"] / n, "rerun_wall_s": again["wall_s"],
                      "rerun_files_written": rewritten}
        print(json.dumps({"cohort": n, "stage": name, **rows[name]}), flush=True)
    n_patches = int(json.loads((root / "tiles" / "run_report.json").read_text())["n_patches"])
    return {"n_slides": n, "slide_px": size, "n_patches": n_patches, "synth_s": synth_s, "stages": rows}


def load_features(root: Path) -> list[np.ndarray]:
    from wsi_mil.io.features import FeatureStore

    out = []
    for store in sorted((root / "tiles" / "features").glob("*.h5")):
        with FeatureStore(store) as fs:
            out.append(np.asarray(fs.features, dtype=np.float32))
    return out


def audit(n: int, real: list[np.ndarray], simulated: bool) -> dict:
    """slide_pairs on ``n`` slides: the real ones, or (``simulated``) slides made on the fly
    from them, plus 10 planted copies; wall time, peak traced memory, copies found."""
    import tracemalloc

    from wsi_mil.data.duplicates import slide_pairs

    base = len(real)
    total = n + 10 if simulated else base
    planted = {total - 10 + k: (k * 97) % n for k in range(10)} if simulated else {}

    def features(i: int) -> np.ndarray:
        if i in planted:
            f = features(planted[i])
            return f + np.random.default_rng(10_000 + i).normal(0, 1e-3, f.shape).astype(np.float32)
        if not simulated:
            return real[i]
        rng = np.random.default_rng(i)
        src = real[i % base]
        rows = src[rng.integers(0, len(src), len(src))]
        return rows + rng.normal(0, 0.05, rows.shape).astype(np.float32)

    ids = [f"s{i}" for i in range(total)]
    tracemalloc.start()
    t = time.perf_counter()
    pairs, _ = slide_pairs(ids, ids, features)
    wall = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    found = {(p.a, p.b) for p in pairs}
    hit = sum((f"s{min(a, b)}", f"s{max(a, b)}") in found for a, b in planted.items())
    return {"n_slides": total, "simulated": simulated, "wall_s": wall, "peak_traced_mb": peak, "pairs": len(pairs),
            "planted_copies": len(planted), "planted_found": hit}


def markdown(res: dict) -> str:
    lines = ["# The road at cohort scale", "",
             (f"Generated `balanced` cohorts of real tissue ({res['cohorts'][0]['slide_px']} px slides, small on "
              "purpose: what grows with the cohort shows); each stage one CLI process as a user runs it; "
              f"{res['machine']['cpus']} CPU cores, Python {res['machine']['python']}. Re-run: the same command again on "
              "unchanged inputs (files written: outputs whose size or time changed; logs and lock files aside)."), "",
             "| slides | patches | stage | wall (s) | per slide (ms) | peak RSS, largest process (MB) | re-run (s) "
             "| re-run files written |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for c in res["cohorts"]:
        for name, r in c["stages"].items():
            lines.append(f"| {c['n_slides']:,} | {c['n_patches']:,} | {name} | {r['wall_s']:.1f} | {r['per_slide_ms']:.0f} "
                         f"| {r['peak_rss_single_mb']:.0f} | {r['rerun_wall_s']:.1f} | {r['rerun_files_written']} |")
    lines += ["", "Near-duplicate audit (`slide_pairs`, inside every train-mil), alone:", "",
              "| slides | features | wall (s) | peak traced memory (MB) | pairs | planted copies found |",
              "|---:|---|---:|---:|---:|---:|"]
    for a in res["audit"]:
        what = "simulated from the largest cohort's (on the fly)" if a["simulated"] else "the largest cohort's (real)"
        found = f"{a['planted_found']} of {a['planted_copies']}" if a["planted_copies"] else "–"
        lines.append(f"| {a['n_slides']:,} | {what} | {a['wall_s']:.1f} | {a['peak_traced_mb']:.0f} | {a['pairs']} "
                     f"| {found} |")
    lines += ["", f"Command: `{res['command']}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohorts", nargs="+", type=int, default=[20, 200, 1000])
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--simulate", type=int, default=10_000, help="slides of the simulated audit (0: none)")
    args = p.parse_args()
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]), "cohorts": [], "audit": []}
    for n in args.cohorts:
        res["cohorts"].append(cohort(n, args.size))
    biggest = CACHE / f"c{max(args.cohorts)}"
    real = load_features(biggest)
    res["audit"].append(audit(len(real), real, simulated=False))
    print(json.dumps(res["audit"][-1]), flush=True)
    if args.simulate:
        res["audit"].append(audit(args.simulate, real, simulated=True))
        print(json.dumps(res["audit"][-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
