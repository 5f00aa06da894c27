"""pytest wiring for the real-WebUI tests.

* Registers the ``webui`` marker and puts it on every test in this directory.
* If no A1111 install is found (``MAGICFUSION_WEBUI_DIR``, default
  ``~/stable-diffusion-webui``), every test here is skipped at collection with the
  reason, and a banner says so loudly. With ``MAGICFUSION_WEBUI_REQUIRED=1`` a missing
  install is an error instead of a skip (for CI that must run these tests).
* The session fixture ``webui`` starts one WebUI for the whole session and always stops
  it (test failure, Ctrl-C, SIGTERM, or interpreter exit).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_server_module():
    name = "magicfusion_webui_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, "server.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


webui_server = _load_server_module()

try:
    WEBUI_DIR, WEBUI_PYTHON = webui_server.find_install()
    NOT_FOUND = None
except webui_server.WebUINotFound as e:
    WEBUI_DIR = WEBUI_PYTHON = None
    NOT_FOUND = str(e)

REQUIRED = os.environ.get("MAGICFUSION_WEBUI_REQUIRED") == "1"
_timings: dict = {}


def _banner(lines):
    bar = "!" * 78
    return "\n".join([bar, *("!! " + line for line in lines), bar])


def _not_found_banner():
    return _banner([
        "WEBUI TESTS SKIPPED: no AUTOMATIC1111 WebUI install found.",
        NOT_FOUND,
        f"Set {webui_server.ENV_DIR} (and optionally {webui_server.ENV_PYTHON}); see tests/webui/README.md.",
    ])


def pytest_configure(config):
    config.addinivalue_line("markers", "webui: needs a real AUTOMATIC1111 WebUI install (tests/webui)")
    if NOT_FOUND and not REQUIRED:
        # printed immediately too, so it shows even with -q or when output is captured
        sys.stderr.write("\n" + _not_found_banner() + "\n")


def pytest_report_header(config):
    if NOT_FOUND:
        return _not_found_banner().splitlines()
    return [f"webui: {WEBUI_DIR} (python {WEBUI_PYTHON})"]


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if str(getattr(it, "path", it.fspath)).startswith(_HERE + os.sep)]
    for item in mine:
        item.add_marker(pytest.mark.webui)
        if NOT_FOUND and not REQUIRED:  # when REQUIRED, the `webui` fixture fails instead
            item.add_marker(pytest.mark.skip(reason=f"no A1111 WebUI install: {NOT_FOUND}"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if NOT_FOUND and not REQUIRED:
        terminalreporter.write_line(_not_found_banner(), red=True, bold=True)
    if _timings:
        parts = [f"{k} {v:.1f} s" for k, v in _timings.items() if v is not None]
        terminalreporter.write_line("webui timings: " + ", ".join(parts), bold=True)


@pytest.fixture(scope="session")
def webui():
    """The running WebUI: a ``WebUIClient`` (``.url``, ``.txt2img()``, ``.img2img()``,
    ``.txt2img_array()``, ``.decode()``, ``.checkpoint(name)``, ``.info()``, ``.server``)."""
    if NOT_FOUND:
        if REQUIRED:
            pytest.fail(f"MAGICFUSION_WEBUI_REQUIRED=1 but no WebUI install: {NOT_FOUND}", pytrace=False)
        pytest.skip(f"no A1111 WebUI install: {NOT_FOUND}")
    with webui_server.running(WEBUI_DIR, WEBUI_PYTHON, log=lambda m: sys.stderr.write(m + "\n")) as client:
        try:
            yield client
        finally:
            _timings["startup (launch -> API)"] = client.server.startup_s
            _timings["launch -> first image"] = client.first_image_s
