#!/usr/bin/env bash
# The package as a user installs it: a wheel built from this tree, installed into a fresh
# virtual environment with the pinned constraints (no editable install, no checkout on the
# path, no npm), then `wsi-mil --help`, `python -m wsi_mil --help`, every verb's --help, a small
# demo, predict / heatmap / audit on its run and the review page's first requests (the page and
# OpenSeadragon) from that environment.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d /tmp/wsi-wheel.XXXXXX)
trap 'kill "${server:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
# built from a copy of the tracked files, so setuptools' build/ and egg-info never land in the checkout
git archive --format=tar HEAD | (mkdir -p "$work/src" && tar -x -C "$work/src")
[ -z "$(git status --porcelain --untracked-files=no)" ] || echo "note: the wheel is built from HEAD; uncommitted changes are not in it"
.venv/bin/pip wheel -q --no-deps -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/wsi_mil-*.whl)
python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["wsi_mil/review/vendor/openseadragon/openseadragon.min.js", "wsi_mil/review/static/index.html",
        "wsi_mil/__main__.py"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks {missing}"
assert not [n for n in names if "node_modules" in n], "the wheel carries node_modules"
print(f"wheel: {len(names)} files, OpenSeadragon included")
PY
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$repo/constraints.txt" "$wheel"
cd "$work"  # nothing of the checkout on the path from here
export PYTHONPATH=
venv/bin/python -c "import wsi_mil, sys; p = wsi_mil.__file__; assert '$repo' not in p, p; print('imported from', p)"
venv/bin/wsi-mil --help >/dev/null
venv/bin/python -m wsi_mil --help >/dev/null
venv/bin/wsi-mil demo --out demo --n-slides 10 --size 2048 --no-progress -q > demo.log
run_dir=$(sed -n 's/^review: *[^ ]* review \([^ ]*\) .*/\1/p' demo.log | head -1)
[ -d "$run_dir" ] || { cat demo.log; echo "the demo did not say which run to review" >&2; exit 1; }
# every verb answers --help; predict, heatmap and audit run on the demo's run from the wheel
for verb in $(venv/bin/python -c "from wsi_mil.cli import VERBS; print(' '.join(v.NAME for v in VERBS))"); do
    venv/bin/wsi-mil "$verb" --help >/dev/null
done
venv/bin/wsi-mil predict "$run_dir" demo/tiles/features --out predicted --no-progress -q
[ -s predicted/predictions.csv ]
venv/bin/wsi-mil heatmap "$run_dir" --out drawn --formats png geojson --no-progress -q
ls drawn/*/overlay.png >/dev/null
venv/bin/wsi-mil audit "$run_dir" --manifest demo/demo_manifest.csv --out audited --no-progress -q
[ -s audited/report.md ]
port=18765
venv/bin/wsi-mil review "$run_dir" --port "$port" > review.log 2>&1 &
server=$!
for _ in $(seq 60); do grep -q "open http" review.log && break; sleep 1; done
venv/bin/python - "$port" <<'PY'
import sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
page = urllib.request.urlopen(base + "/", timeout=30).read().decode()
assert "/osd/openseadragon.min.js" in page, "the page does not load OpenSeadragon"
osd = urllib.request.urlopen(base + "/osd/openseadragon.min.js", timeout=30)
assert osd.status == 200 and len(osd.read()) > 100_000
print("review page and OpenSeadragon served from the installed wheel")
PY
echo "wheel check passed"
