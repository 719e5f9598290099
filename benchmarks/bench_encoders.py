"""Foundation-encoder benchmark: patches/s of each named encoder against its pure-forward limit.

For every encoder of ``wsi_mil.encoders.foundation`` (and the CNN baselines), in a fresh
process each (random initialisation: the speed does not depend on the weights):

* the limit: the network alone on an in-memory float batch already at its input size and
  normalised (what no pipeline can beat);
* the pipeline: what extract-features runs per batch of 256-px uint8 patches as the tiler
  stores them: the recipe's resize (and crop), normalisation, the network, the pooling;

median of 3 timed rounds after a warm-up, with the model's parameters and the process's peak
RSS. CPU by default (``--device cuda --precision bf16`` where a GPU is lent).

Results: benchmarks/results/encoders.{json,md}.

    .venv/bin/python benchmarks/bench_encoders.py [--encoders uni virchow2 ...] [--batch-size 8] [--seconds 6]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

ONE = r"""
import json, resource, statistics, sys, time, torch
from wsi_mil.encoders import build_encoder
from wsi_mil.encoders.extract import RunSettings, prepare
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
enc = build_encoder(a["encoder"], allow_random_init=True)
built = time.perf_counter() - t0
run, dev = prepare(enc, RunSettings(device=a["device"], precision=a["precision"], batch_size=a["batch_size"],
                                       channels_last=True, compile=False, threads=None))
s, b = enc.preprocess.input_size, a["batch_size"]
g = torch.Generator().manual_seed(0)
patches = torch.randint(0, 256, (b, 256, 256, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
normed = enc.normalise(enc.preprocess.resize_batch(patches).to(dev))
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()
def rate(fn):
    fn(); sync()
    out = []
    for _ in range(3):
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < a["seconds"] or n < b:
            fn(); n += b
        sync(); out.append(n / (time.perf_counter() - t))
    return statistics.median(out), min(out), max(out)
with torch.inference_mode():
    limit = rate(lambda: enc.forward_normalised(normed))
    pipe = rate(lambda: run(enc.preprocess.resize_batch(patches).to(dev)))
print(json.dumps({"encoder": a["encoder"], "dim": enc.dim, "params_m": sum(p.numel() for p in enc.model.parameters()) / 1e6,
                  "build_s": built, "limit": limit, "pipeline": pipe,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    from wsi_mil.encoders.foundation import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=[*RECIPES, "resnet50_trunc", "efficientnet_lite0"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seconds", type=float, default=6.0, help="per timed round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--merge", action="store_true", help="keep the rows of encoders not measured this time (a re-run "
                                                        "of some encoders, e.g. ones disturbed by another process)")
    a = p.parse_args()
    rows = []
    for name in a.encoders:
        args = {"encoder": name, "batch_size": a.batch_size, "seconds": a.seconds, "device": a.device,
                "precision": a.precision}
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", ONE, json.dumps(args)], capture_output=True, text=True, timeout=3600)
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-1500:]}", file=sys.stderr)
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t}
        print(f"{name}: limit {row['limit'][0]:.2f}, pipeline {row['pipeline'][0]:.2f} patches/s", flush=True)
        rows.append(row)
    machine = f"{a.device}; {platform.processor() or platform.machine()}, Python {platform.python_version()}"
    if a.merge and (RESULTS / "encoders.json").exists():
        old = json.loads((RESULTS / "encoders.json").read_text())
        if old.get("batch_size") != a.batch_size:
            sys.exit(f"--merge: the earlier rows were measured at batch size {old.get('batch_size')}, not {a.batch_size}")
        new = {r["encoder"]: r for r in rows}
        order = [*RECIPES, "resnet50_trunc", "efficientnet_lite0"]
        kept = {r["encoder"]: r for r in old["rows"]} | new
        rows = sorted(kept.values(), key=lambda r: order.index(r["encoder"]) if r["encoder"] in order else len(order))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "encoders.json").write_text(json.dumps({"machine": machine, "batch_size": a.batch_size, "rows": rows},
                                                      indent=2) + "\n")
    lines = ["# Foundation encoders: patches/s against the pure-forward limit", "",
             (f"Random initialisation (speed does not depend on the weights); batches of {a.batch_size} 256-px uint8 "
              f"patches; median (min-max) of 3 rounds of {a.seconds:g} s after a warm-up; each encoder in its own "
              f"process. Machine: {machine}. Command: `python benchmarks/bench_encoders.py {' '.join(sys.argv[1:])}`."), "",
             "| encoder | dim | params (M) | pure forward (patches/s) | pipeline: resize, normalise, forward, pool "
             "(patches/s) | pipeline / limit | build (s) | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lim, pipe = r["limit"], r["pipeline"]
        lines.append(f"| `{r['encoder']}` | {r['dim']} | {r['params_m']:.0f} | {lim[0]:.2f} ({lim[1]:.2f}-{lim[2]:.2f}) "
                     f"| {pipe[0]:.2f} ({pipe[1]:.2f}-{pipe[2]:.2f}) | {pipe[0] / lim[0]:.2f} | {r['build_s']:.1f} "
                     f"| {r['peak_rss_mb']:.0f} |")
    lines += ["", "No GPU was lent to this session: GPU figures (bf16, ViT-L / ViT-H / ViT-g) are still to be measured.", ""]
    (RESULTS / "encoders.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
