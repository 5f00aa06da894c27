#!/usr/bin/env bash
# Installs the test environment (a venv in .venv, from requirements-test.txt) and runs the tests:
# the unit tests always, the WebUI suite when an AUTOMATIC1111 install is found
# (MAGICFUSION_WEBUI_DIR, default ~/stable-diffusion-webui). Build that install once with
#     python3 tests/webui/setup_webui.py
# (see tests/webui/README.md). Arguments are passed to both pytest runs.
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

# TODO(lint): enabled once the tree is clean
# echo "== lint"
# "$venv/bin/python" -m ruff check .

echo "== unit tests"
"$venv/bin/python" -m pytest tests/unit "$@"

echo "== WebUI tests"
webui_dir="${MAGICFUSION_WEBUI_DIR:-$HOME/stable-diffusion-webui}"
if ! "$venv/bin/python" tests/webui/setup_webui.py --check --quiet --no-browser; then
    echo "!! The WebUI tests need the pinned AUTOMATIC1111 test install at $webui_dir,"
    echo "!! which is missing or incomplete (see above). Build or repair it (once; about 7 GB) with:"
    if [ "$webui_dir" = "$HOME/stable-diffusion-webui" ]; then
        echo "!!     python3 tests/webui/setup_webui.py"
    else
        echo "!!     python3 tests/webui/setup_webui.py --dir $webui_dir"
    fi
fi
"$venv/bin/python" -m pytest tests/webui "$@"
