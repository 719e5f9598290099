"""The review page's OpenSeadragon ships inside the package (a wheel has no npm): the shipped files
are the release build of the version package.json pins, unchanged (their SHA-256 as recorded), the
same bytes as the npm install when a checkout has one, listed in the package data, and what the
server serves by default."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

from wsi_mil.review import vendor
from wsi_mil.review.server import openseadragon_dir

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_openseadragon_is_the_pinned_release_unchanged(monkeypatch) -> None:
    record = vendor.recorded()
    pinned = json.loads((ROOT / "wsi_mil" / "review" / "web" / "package.json").read_text())["dependencies"]["openseadragon"]
    assert record["version"] == pinned
    assert record["sha256"] == vendor.digests(vendor.OSD)  # nothing edited by hand
    assert "openseadragon.min.js" in record["sha256"] and any(k.startswith("images/") for k in record["sha256"])
    assert (vendor.OSD / "LICENSE.txt").read_text().startswith("Copyright")
    npm = vendor.NPM_BUILD / "build" / "openseadragon" / "openseadragon.min.js"
    if npm.exists():  # a checkout with the npm install: the same bytes
        assert hashlib.sha256(npm.read_bytes()).hexdigest() == record["sha256"]["openseadragon.min.js"]
    monkeypatch.delenv("WSI_MIL_OPENSEADRAGON_DIR", raising=False)
    assert openseadragon_dir() == vendor.OSD


def test_the_package_data_lists_the_shipped_files() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["wsi_mil"]
    assert "review/vendor/openseadragon/*" in data and "review/vendor/openseadragon/images/*" in data
