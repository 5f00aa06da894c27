"""Headless-Chromium helpers for the MagicFusion browser tests and the docs screenshots.

Playwright for Python drives the system Chromium (Debian's ``/usr/bin/chromium``, or
``$MAGICFUSION_CHROMIUM``); no browser is ever downloaded (never run ``playwright install``).
Every request the page makes outside the WebUI's own ``http://127.0.0.1:<port>`` is aborted,
so the page stays offline even if it references a CDN.

The WebUI side is ``tests/webui/server.py``'s ``WebUIServer(ui=True)``; ``start_ui_server``
adds what the browser tests need on top: a private checkpoint dir (links to the cached
fixtures, so a test may add a checkpoint) and a ui-config file with small defaults
(64x64, 4 steps, fixed seed) so every click on Generate is fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
WEBUI_TESTS = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(os.path.dirname(WEBUI_TESTS))
if REPO_ROOT not in sys.path:  # for lib_magicfusion.params when run as a script
    sys.path.insert(0, REPO_ROOT)

from lib_magicfusion.params import MEMORY_METHODS, specs  # noqa: E402 - pure Python, no torch / WebUI import

ENV_CHROMIUM = "MAGICFUSION_CHROMIUM"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TABS = ("txt2img", "img2img")
UNITS = 2  # the unit tabs the accordion shows by default
SPEC = {s.name: s for s in specs(UNITS)}
CONTROL_NAMES = tuple(name for name in SPEC if name != "enabled")  # "enabled" is the accordion itself
SHOWN_BY = {"mask_memory": ("method", MEMORY_METHODS[0])}  # controls the accordion shows only for one choice of another
GEN_TIMEOUT_MS = 180_000  # a 64x64 image takes 0.1 s alone, but the 2 cores may be shared

# Small, fast generation defaults for both tabs (A1111's ui-config.json keys).
UI_DEFAULTS = {
    f"{tab}/{key}": value
    for tab in TABS
    for key, value in (("Width/value", 64), ("Height/value", 64), ("Prompt/value", "a photo of a cat"))
} | {
    f"customscript/{script}/{tab}/{key}": value
    for tab in TABS
    for script, key, value in (("sampler.py", "Sampling steps/value", 4), ("sampler.py", "Sampling method/value", "Euler a"),
                               ("seed.py", "Seed/value", 1234))
}


class BrowserUnavailable(RuntimeError):
    pass


def _load_server_module():
    """The runner module, as tests/webui/conftest.py loaded it (one module object)."""
    from tests.webui.conftest import webui_server
    return webui_server


def find_chromium() -> str:
    """The system Chromium, or BrowserUnavailable with the reason (never downloads one)."""
    path = os.environ.get(ENV_CHROMIUM) or DEFAULT_CHROMIUM
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise BrowserUnavailable(f"no Chromium at {path} (install it: apt-get install chromium; "
                                 f"or set {ENV_CHROMIUM})")
    try:
        import playwright  # noqa: F401
    except ImportError:
        raise BrowserUnavailable("the Python package playwright is not installed "
                                 "(pip install -r requirements-test.txt; do NOT run `playwright install`)") from None
    return path


@contextlib.contextmanager
def browser_session(headless: bool = True):
    """Yields a Playwright Browser on the system Chromium; closes it (and the driver) after."""
    from playwright.sync_api import sync_playwright
    chromium = find_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=headless, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# --------------------------------------------------------------------------- server

class UIServer:
    """A WebUI with its Gradio page, a private checkpoint dir and a small-defaults ui-config."""

    def __init__(self, log=print, ui_defaults: dict[str, Any] | None = None, checkpoints: str | None = None,
                 main_checkpoint: str | None = None):
        """checkpoints: a folder of checkpoints to serve instead of the test fixtures' (e.g. the
        toy world's); main_checkpoint: the one the WebUI loads at start (a name in it, no suffix)."""
        self.server_mod = _load_server_module()
        self.log = log
        self.ui_defaults = {**UI_DEFAULTS, **(ui_defaults or {})}
        self.checkpoints = checkpoints
        self.main_checkpoint = main_checkpoint
        self.tmp = None
        self.srv = None

    def start(self) -> UIServer:
        sm = self.server_mod
        webui_dir, python = sm.find_install()
        fixtures = sm.ensure_fixtures(webui_dir, python, self.log)
        self.tmp = tempfile.mkdtemp(prefix="magicfusion-browser-")
        self.ckpt_dir = os.path.join(self.tmp, "checkpoints")
        os.makedirs(self.ckpt_dir)
        src = self.checkpoints or os.path.join(fixtures, "checkpoints")
        for name in sorted(os.listdir(src)):  # links: the shared cache is never written to
            os.symlink(os.path.join(src, name), os.path.join(self.ckpt_dir, name))
        ui_config = os.path.join(self.tmp, "ui-config.json")
        with open(ui_config, "w") as f:
            json.dump(self.ui_defaults, f, indent=1)
        extra = ("--ui-config-file", ui_config)
        if self.main_checkpoint:
            extra += ("--ckpt", os.path.join(self.ckpt_dir, self.main_checkpoint + ".safetensors"))
        self.srv = sm.WebUIServer(webui_dir, python, log=self.log, ui=True, ckpt_dir=self.ckpt_dir, extra_args=extra)
        try:
            self.srv.start()
        except BaseException:
            self.stop()
            raise
        self.url = self.srv.url
        self.fixtures_dir = fixtures
        return self

    def add_checkpoint(self, source: str, new_name: str) -> str:
        """Copy the fixture checkpoint `source` (and its .yaml) into the private dir as `new_name`."""
        src = os.path.join(self.fixtures_dir, "checkpoints", source)
        for ext in (".safetensors", ".yaml"):
            shutil.copyfile(src + ext, os.path.join(self.ckpt_dir, new_name + ext))
        return new_name

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()
        if self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def log_tail(self, n: int = 40) -> str:
        return self.srv.log_tail(n) if self.srv else "(no server)"

    def __enter__(self) -> UIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- page

class WebUIPage:
    """The WebUI page in one browser tab, with the MagicFusion controls addressed by field name."""

    def __init__(self, browser, url: str, viewport=(1400, 1000), log_tail=None):
        self.url = url
        self.log_tail = log_tail or (lambda n=40: "")
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                           accept_downloads=False)
        self.blocked: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.console_errors.append(f"pageerror: {e}"))
        # Gradio events in flight: queued ones ride a websocket each, the others an HTTP POST.
        # A set, not a counter: a reload drops the old page's sockets and requests without
        # always reporting their end, so open() forgets them (a counter would stay above zero).
        self.in_flight: set = set()
        self.page.on("websocket", self._track_websocket)
        self.page.on("request", lambda r: self._track_post(r, True))
        self.page.on("requestfinished", lambda r: self._track_post(r, False))
        self.page.on("requestfailed", lambda r: self._track_post(r, False))

    def _track_websocket(self, ws) -> None:
        if "/queue/join" not in ws.url:
            return
        self.in_flight.add(ws)
        ws.on("close", lambda _ws: self.in_flight.discard(ws))
        ws.on("socketerror", lambda _err: self.in_flight.discard(ws))

    def _track_post(self, request, started: bool) -> None:
        if request.method == "POST" and ("/run/" in request.url or "/api/predict" in request.url):
            if started:
                self.in_flight.add(request)
            else:
                self.in_flight.discard(request)

    def settle(self, quiet_ms: int = 300, timeout_ms: int = 30_000) -> None:
        """Wait until no Gradio event has been in flight for `quiet_ms`: an event still running
        (say, the change handler of a dropdown) may overwrite what is typed next."""
        waited = quiet = 0
        while quiet < quiet_ms:
            if waited > timeout_ms:
                urls = sorted(getattr(x, "url", "?") for x in self.in_flight)
                raise AssertionError(f"Gradio events still in flight after {timeout_ms} ms: {urls}")
            self.page.wait_for_timeout(50)
            waited += 50
            quiet = quiet + 50 if not self.in_flight else 0

    def _route(self, route):
        url = route.request.url
        if url.startswith((self.url + "/", "data:", "blob:")) or url == self.url:
            return route.continue_()
        self.blocked.append(url)
        return route.abort()

    def close(self) -> None:
        self.context.close()

    # ---- navigation
    def open(self) -> WebUIPage:
        """(Re)load the page and wait until A1111's onUiLoaded hooks ran (accordions set up)."""
        self.in_flight.clear()  # what the old page had running ends with it
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=120_000)
        for tab in TABS:
            self.page.wait_for_selector(f"#magicfusion_{tab}_enabled-visible-checkbox", state="attached", timeout=120_000)
        return self

    def switch_tab(self, label: str) -> None:
        """Click a top-level tab by its label: 'txt2img', 'img2img', 'PNG Info', ..."""
        self.page.locator("#tabs > .tab-nav > button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).click()
        tab_id = {"txt2img": "tab_txt2img", "img2img": "tab_img2img", "PNG Info": "tab_pnginfo"}.get(label)
        if tab_id:
            self.page.locator(f"#{tab_id}").wait_for(state="visible")

    # ---- MagicFusion controls
    def mf(self, tab: str, name: str):
        return self.page.locator(f"#magicfusion_{tab}_{name}")

    def accordion_checkbox(self, tab: str):
        return self.page.locator(f"#magicfusion_{tab}_enabled-visible-checkbox")

    def is_open(self, tab: str) -> bool:
        return self.mf(tab, "enabled").locator(".label-wrap").evaluate("e => e.classList.contains('open')")

    def open_accordion(self, tab: str) -> None:
        """Unfold the accordion with a click on its header (beside the checkbox). Like every A1111
        InputAccordion, that also ticks the box, unless the box was clicked before."""
        if not self.is_open(tab):
            self.mf(tab, "enabled").locator(".label-wrap").click(position={"x": 200, "y": 10})
        self.mf(tab, "method").wait_for(state="visible")
        self.show_unit(tab, "expert_checkpoint")

    def set_enabled(self, tab: str, on: bool = True) -> None:
        box = self.accordion_checkbox(tab)
        if box.is_checked() != on:
            box.click()
        assert box.is_checked() == on
        self.open_accordion(tab)

    def enabled(self, tab: str) -> bool:
        return self.accordion_checkbox(tab).is_checked()

    def label_span(self, tab: str, name: str):
        """The element that shows the control's label (what the user hovers)."""
        return self.mf(tab, name).locator("span[data-testid='block-info']").first

    def show_unit(self, tab: str, name: str) -> None:
        """Bring control `name` into view: the unit tab that holds it to the front; a control shown
        only for one choice of another (SHOWN_BY) gets that choice."""
        if name in SHOWN_BY:
            other, value = SHOWN_BY[name]
            if self.get_value(tab, other) != value:
                self.set_value(tab, other, value)
            self.mf(tab, name).wait_for(state="visible")
            return
        unit = SPEC[name].unit
        if unit is None:
            return
        button = self.page.locator(f"#magicfusion_{tab}_units > .tab-nav > button",
                                   has_text=re.compile(rf"^\s*Expert {unit + 1}\s*$"))
        button.click()
        self.mf(tab, name).wait_for(state="visible")

    def choose_expert(self, tab: str, prefix: str, name: str = "expert_checkpoint") -> str:
        """Pick the dropdown entry whose title starts with `prefix`, as a user would; returns it."""
        self.show_unit(tab, name)
        box = self.mf(tab, name)
        box.locator("input").click()
        item = box.locator(f"ul.options li[data-value^={json.dumps(prefix)}]")
        item.first.wait_for(state="visible")
        title = item.first.get_attribute("data-value")
        item.first.click()
        self.page.wait_for_function(
            "([sel, v]) => document.querySelector(sel).value === v",
            arg=[f"#magicfusion_{tab}_{name} input", title])
        return title

    def select(self, selector: str, value: str) -> None:
        """Pick `value` in the Gradio dropdown at `selector`, with clicks."""
        box = self.page.locator(selector)
        box.locator("input").click()
        box.locator(f"ul.options li[data-value={json.dumps(value)}]").click()
        self.page.wait_for_function("([sel, v]) => document.querySelector(sel + ' input').value === v",
                                    arg=[selector, value])
        self.settle()

    def fill(self, selector: str, text: str) -> None:
        """Type `text` into the text box at `selector` once the page is idle, and check it stays."""
        self.settle()
        box = self.page.locator(selector).locator("textarea, input").first
        box.fill(text)
        self.settle()
        assert box.input_value() == text, f"{selector}: typed {text!r}, the page shows {box.input_value()!r}"

    def expert_choices(self, tab: str) -> list[str]:
        box = self.mf(tab, "expert_checkpoint")
        box.locator("input").click()
        box.locator("ul.options li").first.wait_for(state="visible")
        values = box.locator("ul.options li").evaluate_all("els => els.map(e => e.dataset.value)")
        box.locator("input").press("Escape")
        self.page.locator("body").click(position={"x": 5, "y": 5})  # close the list
        return values

    def set_value(self, tab: str, name: str, value: Any) -> None:
        kind = SPEC[name].kind
        self.show_unit(tab, name)
        box = self.mf(tab, name)
        if SPEC[name].attr == "checkpoint":
            self.choose_expert(tab, value, name)
        elif kind == "bool":
            box.locator("input[type=checkbox]").set_checked(bool(value))
        elif kind == "choice":
            box.locator(f"input[type=radio][value='{value}']").check()
        elif kind == "str":
            box.locator("textarea").fill(str(value))
        else:  # a slider: type into its number box, as a user would
            num = box.locator("input[type=number]")
            num.fill(str(value))
            num.blur()

    def get_value(self, tab: str, name: str) -> Any:
        kind = SPEC[name].kind
        box = self.mf(tab, name)
        if SPEC[name].attr == "checkpoint":
            return box.locator("input").input_value()
        if kind == "bool":
            return box.locator("input[type=checkbox]").is_checked()
        if kind == "choice":
            checked = box.locator("input[type=radio]:checked")
            return checked.get_attribute("value") if checked.count() else None
        if kind == "str":
            return box.locator("textarea").input_value()
        text = box.locator("input[type=number]").input_value()
        return int(float(text)) if kind == "int" else float(text)

    # ---- generation
    def generate(self, tab: str = "txt2img", expect_images: int = 1, timeout_ms: int = GEN_TIMEOUT_MS, after_click=None) -> str:
        """Click Generate and wait until the gallery holds `expect_images` new pictures (or an
        error shows); returns the infotext under the image. `after_click()` runs right after the click."""
        self.settle()  # a control's change handler still running could answer after the click
        before = self.gallery_urls(tab)
        self.page.locator(f"#{tab}_generate").click()
        if after_click is not None:
            after_click()
        try:
            self.page.wait_for_function(
                """([tab, n, before]) => {
                    const err = document.querySelector(`#html_log_${tab} .error`);
                    if (err && err.textContent.trim()) return true;
                    const busy = document.querySelector(`#${tab}_interrupt`)?.offsetParent;
                    const urls = [...document.querySelectorAll(`#${tab}_gallery .grid-container > .thumbnail-item img`)]
                        .map(e => e.src);
                    const info = document.querySelector(`#html_info_${tab}`).textContent.trim();
                    return !busy && info.length > 0 && urls.length >= n && urls.every(u => !before.includes(u));
                }""", arg=[tab, expect_images, before], timeout=timeout_ms, polling=200)
        except Exception as e:  # noqa: BLE001 - re-raised with the page's and the server's view
            raise AssertionError(f"generation in {tab} did not finish: {e}\n--- html_log ---\n"
                                 f"{self.page.locator(f'#html_log_{tab}').first.inner_text()}\n"
                                 f"--- webui log ---\n{self.log_tail(40)}") from None
        err = self.page.locator(f"#html_log_{tab} .error")
        if err.count() and err.first.inner_text().strip():
            raise AssertionError(f"generation in {tab} failed: {err.first.inner_text()}\n"
                                 f"--- webui log ---\n{self.log_tail(40)}")
        return self.page.locator(f"#html_info_{tab}").first.inner_text()

    def gallery_urls(self, tab: str = "txt2img") -> list[str]:
        """The image URLs in the result gallery, in order (thumbnails; one preview if alone)."""
        # Gradio 3.41 renders the list twice (preview strip and grid); the grid has every item once.
        return self.page.locator(f"#{tab}_gallery .grid-container > .thumbnail-item img").evaluate_all(
            "els => els.map(e => e.src)")

    def fetch(self, url: str) -> bytes:
        r = self.context.request.get(url)
        assert r.ok, f"GET {url} -> {r.status}"
        return r.body()
