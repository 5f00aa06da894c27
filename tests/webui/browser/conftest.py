"""pytest wiring for the browser tests: one WebUI with its Gradio page, one headless Chromium.

* Every test here gets the ``browser`` marker (and, from ``tests/webui/conftest.py``, ``webui``).
* Without the system Chromium or the playwright package, every test here is skipped at
  collection with the reason and a loud banner; ``MAGICFUSION_BROWSER_REQUIRED=1`` makes that
  an error instead (for CI that must run them). A missing WebUI install is handled by the
  parent conftest (skip, or error with ``MAGICFUSION_WEBUI_REQUIRED=1``).
* The package-scoped fixtures start the WebUI (``server.py``'s ``WebUIServer(ui=True)``) and
  the browser once for this folder, and stop both when its tests are done (before the rest
  of ``tests/webui`` runs), on failure too.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from . import pages

_HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED = os.environ.get("MAGICFUSION_BROWSER_REQUIRED") == "1"

try:
    CHROMIUM = pages.find_chromium()
    MISSING = None
except pages.BrowserUnavailable as e:
    CHROMIUM, MISSING = None, str(e)

_timings: dict[str, float] = {}


def _banner() -> str:
    bar = "!" * 78
    return "\n".join([bar, "!! BROWSER TESTS SKIPPED: " + str(MISSING),
                      "!! See tests/webui/browser/README.md.", bar])


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives the WebUI page in headless Chromium (tests/webui/browser)")
    if MISSING and not REQUIRED:
        sys.stderr.write("\n" + _banner() + "\n")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not str(getattr(item, "path", item.fspath)).startswith(_HERE + os.sep):
            continue
        item.add_marker(pytest.mark.browser)
        if MISSING and not REQUIRED:
            item.add_marker(pytest.mark.skip(reason=f"no browser: {MISSING}"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MISSING and not REQUIRED:
        terminalreporter.write_line(_banner(), red=True, bold=True)
    if _timings:
        terminalreporter.write_line("browser timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in _timings.items()),
                                    bold=True)


@pytest.fixture(scope="package")
def ui_server():
    """The WebUI with its page on 127.0.0.1 (a ``pages.UIServer``: ``.url``, ``.add_checkpoint()``)."""
    if MISSING:
        pytest.fail(f"MAGICFUSION_BROWSER_REQUIRED=1 but {MISSING}", pytrace=False)
    sm = pages._load_server_module()
    try:
        sm.find_install()
    except sm.WebUINotFound as e:
        if os.environ.get("MAGICFUSION_WEBUI_REQUIRED") == "1":
            pytest.fail(f"MAGICFUSION_WEBUI_REQUIRED=1 but no WebUI install: {e}", pytrace=False)
        pytest.skip(f"no A1111 WebUI install: {e}")
    srv = pages.UIServer(log=lambda m: sys.stderr.write(m + "\n"))
    try:
        srv.start()
        _timings["WebUI with UI: launch -> API"] = srv.srv.startup_s
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="package")
def browser():
    if MISSING:
        pytest.fail(f"MAGICFUSION_BROWSER_REQUIRED=1 but {MISSING}", pytrace=False)
    with pages.browser_session() as b:
        yield b


@pytest.fixture(scope="package")
def web(ui_server, browser):
    """One page for these tests, loaded once; a test that needs a clean page calls ``web.open()``."""
    page = pages.WebUIPage(browser, ui_server.url, log_tail=ui_server.log_tail)
    t0 = time.monotonic()
    page.open()
    _timings["first page load"] = time.monotonic() - t0
    try:
        yield page
    finally:
        page.close()
