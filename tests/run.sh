#!/usr/bin/env bash
# Installs the test environment (a venv in .venv, from requirements-test.txt) and runs the tests:
# the unit tests always, then the WebUI suite (one pytest run over tests/webui) against every
# host whose install is found:
#   AUTOMATIC1111  MAGICFUSION_WEBUI_DIR, default ~/stable-diffusion-webui;       build it with
#                      python3 tests/webui/setup_webui.py
#   WebUI Forge    MAGICFUSION_FORGE_DIR, default ~/stable-diffusion-webui-forge; build it with
#                      python3 tests/webui/setup_webui.py --host forge
# (see tests/webui/README.md). A missing host's tests are skipped with a banner that names the
# command (MAGICFUSION_WEBUI_REQUIRED=1 makes that an error). Arguments are passed to both pytest runs.
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

echo "== lint"
"$venv/bin/python" -m ruff check .

echo "== unit tests"
"$venv/bin/python" -m pytest tests/unit "$@"

echo "== WebUI tests"
for host in a1111 forge; do
    if [ "$host" = forge ]; then
        title="WebUI Forge"; dir="${MAGICFUSION_FORGE_DIR:-$HOME/stable-diffusion-webui-forge}"
        default="$HOME/stable-diffusion-webui-forge"; cmd="python3 tests/webui/setup_webui.py --host forge"
        size="about 7 GB, and its fixtures 4.3 GB more at the first test run"
    else
        title="AUTOMATIC1111"; dir="${MAGICFUSION_WEBUI_DIR:-$HOME/stable-diffusion-webui}"
        default="$HOME/stable-diffusion-webui"; cmd="python3 tests/webui/setup_webui.py"; size="about 7 GB"
    fi
    [ "$dir" = "$default" ] || cmd="$cmd --dir $dir"
    if "$venv/bin/python" tests/webui/setup_webui.py --host "$host" --check --quiet --no-browser; then
        echo "== host $host: $dir"
    else
        echo "!! The $host tests need the pinned $title test install at $dir,"
        echo "!! which is missing or incomplete (see above): they are skipped (or fail, where it is half"
        echo "!! there). Build or repair it"
        echo "!! (once; $size) with:"
        echo "!!     $cmd"
    fi
done
"$venv/bin/python" -m pytest tests/webui "$@"
