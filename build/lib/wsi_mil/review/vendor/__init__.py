"""The review page's front-end files shipped with the package (OpenSeadragon's release build,
its licence and ``VERSION.json``: version, source and the files' SHA-256), so an installed
wheel serves the page with no npm. ``python -m wsi_mil.review.vendor`` copies them again from
the npm install (``wsi_mil/review/web/node_modules``, pinned by its package-lock.json)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
OSD = HERE / "openseadragon"
NPM_BUILD = HERE.parent / "web" / "node_modules" / "openseadragon"


def recorded() -> dict[str, object]:
    return dict(json.loads((OSD / "VERSION.json").read_text()))


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "VERSION.json"}


def refresh() -> Path:
    """Copy the npm install's release build (minified script, images, licence) here."""
    build = NPM_BUILD / "build" / "openseadragon"
    if not (build / "openseadragon.min.js").exists():
        raise SystemExit(f"{build} has no openseadragon.min.js: run npm ci --prefix {HERE.parent / 'web'} first")
    version = json.loads((NPM_BUILD / "package.json").read_text())["version"]
    shutil.rmtree(OSD, ignore_errors=True)
    (OSD / "images").mkdir(parents=True)
    shutil.copy2(build / "openseadragon.min.js", OSD / "openseadragon.min.js")
    for p in sorted((build / "images").iterdir()):
        shutil.copy2(p, OSD / "images" / p.name)
    shutil.copy2(NPM_BUILD / "LICENSE.txt", OSD / "LICENSE.txt")
    record = {**recorded_default(version), "sha256": digests(OSD)}
    (OSD / "VERSION.json").write_text(json.dumps(record, indent=2) + "\n")
    return OSD


def recorded_default(version: str) -> dict[str, object]:
    return {"package": "openseadragon", "version": version, "licence": "BSD-3-Clause (LICENSE.txt)",
            "source": f"npm registry: openseadragon@{version} (wsi_mil/review/web/package-lock.json), "
                      "build/openseadragon/: openseadragon.min.js and images/",
            "update": "bump the version in wsi_mil/review/web/package.json, npm install --prefix wsi_mil/review/web, "
                      "then python -m wsi_mil.review.vendor (copies the build here and rewrites this file)"}


if __name__ == "__main__":
    print(f"OpenSeadragon copied to {refresh()}")
