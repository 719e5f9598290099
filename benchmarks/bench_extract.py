"""Feature-extraction benchmark: end to end (slide -> features on disk) vs pure forward.

Side by side in one run, with the same encoder, batch size and precision:

* the limit: the encoder's pure forward throughput on in-memory uint8 batches (normalise
  + network, as in the pipeline), measured in a fresh process between rounds of the
  end-to-end runs (each run is set against the mean of the limits either side, and the
  median over rounds is reported; this 2-core machine drifts by up to 10 %);
* end to end: ``wsi-mil extract-features`` on a generated 20k px slide (real tissue),
  reading patches from the slide by coordinates, and from the JPEG pixels the tiler
  stored; patches/s over the embedding loop, and over the whole command;
* what the CPU limit gains from glibc's heap reuse (wsi_mil/runtime.py), channels-last,
  thread settings, OpenMP's wait policy and torch.compile.

Results: benchmarks/results/extract.json and extract.md (quoted in the README).

    .venv/bin/python benchmarks/bench_extract.py [--encoder efficientnet_lite0] [--batch-size 32]
    .venv/bin/python benchmarks/bench_extract.py --device cuda --encoder resnet50 --random-init --batch-size 256 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

LIMIT_SNIPPET = r"""
import json, sys, time, torch
from wsi_mil.encoders import build_encoder
from wsi_mil.encoders.extract import RunSettings, prepare
a = json.loads(sys.argv[1])
enc = build_encoder(a["encoder"], allow_random_init=a["random_init"])
run, dev = prepare(enc, RunSettings(device=a["device"], precision=a["precision"], batch_size=a["batch_size"],
                                       channels_last=a["channels_last"], compile=a["compile"], threads=a["threads"]))
s = enc.preprocess.input_size
g = torch.Generator().manual_seed(0)
x = torch.randint(0, 256, (a["batch_size"], s, s, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2).to(dev)
t = time.perf_counter()
for _ in range(2):
    run(x)
warm = time.perf_counter() - t
def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()
sync(); n = 0; t = time.perf_counter()
while time.perf_counter() - t < a["seconds"] or n < 3 * a["batch_size"]:
    run(x); n += a["batch_size"]
sync()
el = time.perf_counter() - t
print(json.dumps({"patches_per_s": n / el, "patches": n, "warmup_s": warm, "threads": torch.get_num_threads()}))
"""


def _env(omp_wait: str | None, glibc_default: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("WSI_MIL_GLIBC_MMAP", None)
    if omp_wait:
        env["OMP_WAIT_POLICY"] = omp_wait
    if glibc_default:
        env["WSI_MIL_GLIBC_MMAP"] = "default"
    return env


def limit(args: argparse.Namespace, *, channels_last: bool = True, threads: int | None = None,
          omp_wait: str | None = "", compile: bool = False, glibc_default: bool = False,
          seconds: float = 20.0) -> dict:
    env = _env(omp_wait if omp_wait != "" else args.omp_wait, glibc_default)
    spec = {"encoder": args.encoder, "random_init": args.random_init, "device": args.device, "precision": args.precision,
            "batch_size": args.batch_size, "channels_last": channels_last, "compile": compile, "threads": threads,
            "seconds": seconds}
    res = subprocess.run([sys.executable, "-c", LIMIT_SNIPPET, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        return {"error": res.stderr[-800:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def end_to_end(args: argparse.Namespace, tiles: Path, out: Path, source: str) -> dict:
    cmd = [sys.executable, "-m", "wsi_mil.cli", "extract-features", str(tiles), "--out", str(out), "--source", source,
           "--encoder", args.encoder, "--batch-size", str(args.batch_size), "--precision", args.precision,
           "--devices", args.device, "--readers", str(args.readers), "--no-progress", "-q"]
    if args.random_init:
        cmd.append("--random-init")
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=_env(args.omp_wait))
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(res.stdout[-1500:] + res.stderr[-1500:])
    rep = json.loads((out / "features_report.json").read_text())
    row = rep["slides"][0]
    return {"source": source, "patches": row["n_features"], "embed_s": row["seconds"],
            "patches_per_s": row["n_features"] / row["seconds"], "command_wall_s": wall,
            "command_patches_per_s": row["n_features"] / wall}


def main() -> None:
    from bench_tile import make_slide

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--random-init", action="store_true", help="random weights (speed only; e.g. for timm models offline)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--readers", type=int, default=1)
    p.add_argument("--size", type=int, default=20000, help="side of the generated slide")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the end-to-end runs")
    p.add_argument("--skip-variants", action="store_true", help="skip the CPU-limit variants")
    p.add_argument("--omp-wait", default="PASSIVE", help="OMP_WAIT_POLICY for all runs (the CLI's default is PASSIVE)")
    p.add_argument("--tag", default="", help="suffix of the results files (e.g. _h100)")
    args = p.parse_args()

    slide = make_slide(args.size)
    res: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
                 "settings": vars(args)}
    if args.device.startswith("cuda"):
        import torch
        res["machine"]["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        tiles = Path(tmp) / "tiles"
        subprocess.run([sys.executable, "-m", "wsi_mil.cli", "tile", str(slide), "--out", str(tiles), "--save-patches",
                        "--workers", "2", "--no-progress", "-q"], check=True, capture_output=True)
        # interleaved rounds: limit, slide, store, limit, slide, store, ..., limit; the
        # machine's speed drifts, so each end-to-end run is set against its neighbouring limits
        limits = [limit(args)]
        print("limit", limits[-1], flush=True)
        runs: dict[str, list[dict]] = {"slide": [], "store": []}
        for rnd in range(args.rounds):
            for src in ("slide", "store"):
                runs[src].append(end_to_end(args, tiles, Path(tmp) / f"f-{src}-{rnd}", src))
                print("end to end", runs[src][-1], flush=True)
            limits.append(limit(args))
            print("limit", limits[-1], flush=True)
            for src in ("slide", "store"):  # against the mean of the limits either side
                r = runs[src][-1]
                r["ratio_vs_limit"] = r["patches_per_s"] / ((limits[-2]["patches_per_s"] + limits[-1]["patches_per_s"]) / 2)
    rates = [x["patches_per_s"] for x in limits]
    ref = statistics.mean(rates)
    res["limit"] = {"runs": limits, "mean_patches_per_s": ref}
    e2e = []
    for src, rs in runs.items():
        e2e.append({"source": src, "patches": rs[0]["patches"], "runs": rs,
                    "patches_per_s": statistics.median(r["patches_per_s"] for r in rs),
                    "ratio_vs_limit": statistics.median(r["ratio_vs_limit"] for r in rs),
                    "command_patches_per_s": statistics.median(r["command_patches_per_s"] for r in rs)})
    res["end_to_end"] = e2e
    if not args.skip_variants and args.device == "cpu":
        variants = {
            f"reference: channels-last, OMP {args.omp_wait.lower()} wait, glibc heap reuse, default threads": {},
            "glibc's default mmap for large blocks (page faults every batch)": {"glibc_default": True},
            "contiguous (NCHW) instead of channels-last": {"channels_last": False},
            "1 thread": {"threads": 1},
            "OpenMP passive wait": {"omp_wait": "PASSIVE"},
            "OpenMP active (spin) wait": {"omp_wait": "ACTIVE"},
            "torch.compile": {"compile": True},
        }
        res["cpu_limit_variants"] = {}
        for name, kw in variants.items():
            r = limit(args, seconds=15.0, **kw)
            res["cpu_limit_variants"][name] = r
            print(name, r, flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"extract{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    dev = res["machine"].get("gpu", f"{res['machine']['cpus']}-core CPU")
    md = [f"Encoder `{args.encoder}`, batch {args.batch_size}, {args.precision}, {args.readers} reader(s), on {dev}; "
          f"{e2e[0]['patches']:,} patches of a generated {args.size:,} px slide (real tissue).", "",
          "| run | patches/s | × pure-forward limit |", "|---|---:|---:|",
          f"| pure forward, in-memory batches (limit; mean of {len(rates)} runs interleaved with the others: {' / '.join(f'{v:.1f}' for v in rates)}) | {ref:.1f} | 1.00 |"]
    for r in res["end_to_end"]:
        each = ", ".join(f"{x['ratio_vs_limit']:.2f}" for x in r["runs"])
        md.append(f"| end to end, pixels from the {'slide (read by coordinates)' if r['source'] == 'slide' else 'stored JPEGs'} "
                  f"(median of {len(r['runs'])}; each vs its neighbouring limits: {each}) | {r['patches_per_s']:.1f} | {r['ratio_vs_limit']:.2f} |")
    for r in res["end_to_end"]:
        md.append(f"| whole command incl. start-up and writing ({r['source']}) | {r['command_patches_per_s']:.1f} | {r['command_patches_per_s'] / ref:.2f} |")
    if "cpu_limit_variants" in res:
        base = next(iter(res["cpu_limit_variants"].values())).get("patches_per_s")
        md += ["", "What the CPU limit gains from each setting (pure forward, fresh process each):", "",
               "| setting | patches/s | × reference |", "|---|---:|---:|"]
        for name, r in res["cpu_limit_variants"].items():
            if "error" in r:
                md.append(f"| {name} | failed: {r['error'].strip().splitlines()[-1][:80]} | - |")
            else:
                extra = f" (warm-up {r['warmup_s']:.0f} s)" if name == "torch.compile" else ""
                md.append(f"| {name}{extra} | {r['patches_per_s']:.1f} | {r['patches_per_s'] / base:.2f} |")
    md += ["", f"Command: `.venv/bin/python benchmarks/bench_extract.py {' '.join(sys.argv[1:])}`".rstrip() + "."]
    (RESULTS / f"extract{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
