#!/usr/bin/env bash
# Installs the test environment (a venv in .venv, from requirements-test.txt) and runs the tests:
# the unit tests always, the WebUI suite when an AUTOMATIC1111 install is found
# (MAGICFUSION_WEBUI_DIR, default ~/stable-diffusion-webui; see tests/webui/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${MAGICFUSION_TEST_VENV:-.venv}"
python="$(command -v python3.11 || command -v python3)"
if [ ! -x "$venv/bin/python" ] || ! cmp -s requirements-test.txt "$venv/.requirements-test.txt"; then
    echo "== installing the test environment into $venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r requirements-test.txt
    cp requirements-test.txt "$venv/.requirements-test.txt"
fi

echo "== unit tests"
"$venv/bin/python" -m pytest tests/unit "$@"

echo "== WebUI tests"
"$venv/bin/python" -m pytest tests/webui "$@"
