"""Regenerate the README screenshots in docs/ from a real WebUI page in headless Chromium.

    .venv/bin/python tests/webui/browser/screenshots.py            # writes docs/*.png
    .venv/bin/python tests/webui/browser/screenshots.py --out DIR  # elsewhere

Needs what the browser tests need (tests/webui/browser/README.md): an A1111 install, the
system Chromium and the playwright package. It starts its own WebUI (with the Gradio page, on
127.0.0.1, offline), takes the pictures and stops everything again. The pictures come from the
tiny random test checkpoints, so the generated image is noise by design; they show the
controls, the gallery with the fusion masks and the infotext. Emoji (the refresh button) need
an emoji font on the machine, e.g. Debian's fonts-noto-color-emoji.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pages  # noqa: E402

DOCS = os.path.join(pages.REPO_ROOT, "docs")
ACCORDION_PNG = "magicfusion-accordion.png"
GENERATION_PNG = "magicfusion-generation.png"
SIZE, STEPS = 256, 8

SHOT_DEFAULTS = {f"{tab}/{key}": SIZE for tab in pages.TABS for key in ("Width/value", "Height/value")} | {
    f"customscript/sampler.py/{tab}/Sampling steps/value": STEPS for tab in pages.TABS}


def take(out_dir: str, log=print) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    with pages.UIServer(log=log, ui_defaults=SHOT_DEFAULTS) as srv, pages.browser_session() as browser:
        web = pages.WebUIPage(browser, srv.url, viewport=(1400, 1100), log_tail=srv.log_tail).open()
        tab = "txt2img"
        web.set_enabled(tab, True)
        web.choose_expert(tab, "tiny-eps-b")
        web.set_value(tab, "expert_prompt", "a red ball on a table, studio light")
        web.set_value(tab, "k_expert", 2.5)
        web.set_value(tab, "show_mask", True)
        web.page.locator("body").click(position={"x": 2, "y": 2})  # no focus ring in the picture
        time.sleep(0.5)
        path = os.path.join(out_dir, ACCORDION_PNG)
        web.mf(tab, "enabled").screenshot(path=path)
        written.append(path)

        web.generate(tab, expect_images=3)
        close = web.page.locator(f"#{tab}_gallery .preview button[aria-label=Clear]")
        if close.count():
            close.first.click()  # leave the big preview: the image and both masks side by side
        web.page.locator(f"#{tab}_gallery .grid-container").wait_for(state="visible")
        web.page.wait_for_function(
            f"() => [...document.querySelectorAll('#{tab}_gallery .grid-container img')].every(i => i.complete && i.naturalWidth)")
        web.page.locator("body").click(position={"x": 2, "y": 2})
        # "Time taken" depends on the machine and its load: keep it out of the picture
        web.page.add_style_tag(content=f"#html_log_{tab} {{ display: none !important; }}")
        time.sleep(0.5)
        path = os.path.join(out_dir, GENERATION_PNG)
        web.page.locator(f"#{tab}_results").screenshot(path=path)
        written.append(path)
        web.close()
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DOCS, help=f"output folder (default: {DOCS})")
    args = ap.parse_args(argv)
    try:
        pages.find_chromium()
    except pages.BrowserUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    for path in take(args.out):
        print(path)
    print(f"done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
