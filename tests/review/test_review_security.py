"""The review page serves only its run's own files: a heatmap.json crafted to name a file
outside the run (``..``, an absolute path, a link out) is never offered (before: 200 with
the file's bytes); every response carries a Content-Security-Policy that forbids framing;
``--host 0.0.0.0`` answers clients that use the machine's own name."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path

import pytest

from wsi_mil.commands.heatmap import recorded_exports
from wsi_mil.review.server import ReviewSite, allowed_hosts, make_server


def _get(srv, path: str) -> http.client.HTTPResponse:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    conn.close()
    return r


@pytest.fixture()
def crafted(attention_run, tmp_path: Path):
    """A run received from someone else: its heatmaps/ folder names files outside the run."""
    attention, manifest, _ = attention_run
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    heatmaps = tmp_path / "run" / "heatmaps"
    slide = heatmaps / "cmu-1"
    slide.mkdir(parents=True)
    (slide / "overlay.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # the one file that belongs here
    (slide / "link.txt").symlink_to(secret)  # a link out of the run
    (slide / "heatmap.json").write_text(json.dumps({"source": str(attention / "cmu-1.h5"), "files": {
        "png": "overlay.png", "a": "../../../secret.txt", "b": str(secret), "c": "link.txt"}}))
    site = ReviewSite([attention], slides_manifest=manifest, heatmaps=heatmaps)
    srv = make_server(site, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, slide, secret
    srv.shutdown()
    srv.server_close()
    site.close()


def test_a_crafted_heatmap_json_cannot_reach_files_outside_the_run(crafted) -> None:
    srv, slide, _secret = crafted
    offered = recorded_exports(slide / "heatmap.json")
    assert set(offered) == {"png"} and offered["png"].name == "overlay.png"
    for name in ("secret.txt", "link.txt"):
        r = _get(srv, f"/exports/cmu-1/{name}")
        assert r.status == 404, name
    assert _get(srv, "/exports/cmu-1/overlay.png").status == 200


def test_every_response_forbids_framing_and_foreign_scripts(crafted) -> None:
    srv, _, _ = crafted
    for path, status in (("/", 200), ("/api/slides", 200), ("/nothing", 404)):
        r = _get(srv, path)
        assert r.status == status
        csp = r.getheader("Content-Security-Policy") or ""
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "default-src 'self'" in csp


def test_listening_on_every_interface_answers_the_machines_own_name() -> None:
    hosts = allowed_hosts("0.0.0.0", 8765)
    name = socket.gethostname().lower()
    assert name in hosts and f"{name}:8765" in hosts
    assert "evil.example" not in hosts and "127.0.0.1:8765" in hosts
    assert socket.gethostname().lower() not in allowed_hosts("127.0.0.1", 8765)  # loopback stays loopback
