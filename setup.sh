#!/usr/bin/env bash
# One-step set-up on a fresh machine (offline except the package registries):
#   bash setup.sh        the package in .venv + the review page's front-end packages
#   bash setup.sh dev    the same with the test tools, plus Debian's chromium + chromedriver
#                        for the browser test (installed with apt-get when missing; needs root)
set -euo pipefail
cd "$(dirname "$0")"
extra=""
if [ "${1:-}" = "dev" ]; then
    extra="[dev]"
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        if [ "$(id -u)" = "0" ]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -q chromium chromium-driver >/dev/null \
                || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
        else
            echo "setup.sh: chromium + chromedriver are missing and this is not root: install the Debian" \
                 "packages chromium and chromium-driver, or the browser test will fail" >&2
        fi
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -c constraints.txt -e ".${extra}"
# OpenSeadragon for `wsi-mil review`, from the npm registry (pinned by package-lock.json)
npm ci --prefix wsi_mil/review/web --no-audit --no-fund --loglevel=error
