"""Regenerate the README screenshots in docs/ from a real WebUI page in headless Chromium.

    .venv/bin/python tests/webui/browser/screenshots.py            # writes docs/*.png
    .venv/bin/python tests/webui/browser/screenshots.py --out DIR  # elsewhere

Needs what the browser tests need (tests/webui/browser/README.md): an A1111 install, the
system Chromium and the playwright package. It starts its own WebUI (with the Gradio page, on
127.0.0.1, offline) serving the trained toy world of bench/quality/ (assembled into the fixture
cache), takes the pictures and stops everything again: the general toy model as the main
checkpoint asked for a ball in the snow, the fine-grained toy expert asked for a blue striped
ball, the default (official) settings, DDIM, the seed of SHOT below. Emoji (the refresh button)
need an emoji font on the machine, e.g. Debian's fonts-noto-color-emoji.
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
# The fine-grained application of the toy world: the scene from the general model, the ball from
# the expert. The seed is one where the default (official) method gets both right in the quality
# bench's harness (python bench/quality.py harness), which gives the WebUI's pixels on DDIM.
SHOT = {"prompt": "a photo of a ball in the snow", "expert": "toy-fine", "expert_prompt": "a photo of a blue striped ball",
        "seed": 1003}
SIZE, STEPS, CFG = 128, 25, 7

SHOT_DEFAULTS = {f"{tab}/{key}": SIZE for tab in pages.TABS for key in ("Width/value", "Height/value")} | {
    f"{tab}/CFG Scale/value": CFG for tab in pages.TABS} | {f"{tab}/Prompt/value": SHOT["prompt"] for tab in pages.TABS} | {
    f"customscript/sampler.py/{tab}/Sampling steps/value": STEPS for tab in pages.TABS} | {
    f"customscript/sampler.py/{tab}/Sampling method/value": "DDIM" for tab in pages.TABS} | {
    f"customscript/seed.py/{tab}/Seed/value": SHOT["seed"] for tab in pages.TABS}


def take(out_dir: str, log=print) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    server_mod = pages._load_server_module()
    _, python = server_mod.find_install()
    checkpoints = server_mod.toy_world_checkpoints(python, log)
    with pages.UIServer(log=log, ui_defaults=SHOT_DEFAULTS, checkpoints=checkpoints, main_checkpoint="toy-general") as srv, \
            pages.browser_session() as browser:
        web = pages.WebUIPage(browser, srv.url, viewport=(1400, 1100), log_tail=srv.log_tail).open()
        tab = "txt2img"
        web.set_enabled(tab, True)
        web.choose_expert(tab, SHOT["expert"])
        web.set_value(tab, "expert_prompt", SHOT["expert_prompt"])
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
