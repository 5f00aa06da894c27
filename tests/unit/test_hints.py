"""javascript/magicfusion-hints.js must hold exactly the params model's hints.

The WebUI shows a control's hint as a tooltip through hints.js's `titles` map, keyed by the
label text. The JS file is written by hand, so this test ties it to the params specs: every control's
`label` maps to exactly its `hint`, and nothing else is in the map except the accordion header
"MagicFusion", which carries the hint of `enabled`, and the buttons of params.BUTTON_HINTS.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from lib_magicfusion.params import BUTTON_HINTS, GLOBAL_SPECS, MAX_UNITS, unit_specs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JS_PATH = os.path.join(REPO, "javascript", "magicfusion-hints.js")
BLOCK = re.compile(r"/\* BEGIN MAGICFUSION HINTS \*/(.*?)/\* END MAGICFUSION HINTS \*/", re.S)
ACCORDION_LABEL = "MagicFusion"  # the InputAccordion's header in lib_magicfusion/webui/ui.py


def labelled() -> list[tuple[str, str]]:
    """(label, hint) of every control: the global fields, and every unit's fields."""
    return [(s.label, s.hint) for s in GLOBAL_SPECS] + [(s.label, s.hint) for unit in range(MAX_UNITS) for s in unit_specs(unit)]


def expected() -> dict[str, str]:
    hints = dict(labelled())
    hints[ACCORDION_LABEL] = next(s for s in GLOBAL_SPECS if s.name == "enabled").hint
    hints.update(BUTTON_HINTS)
    return hints


def expected_block() -> str:
    body = ",\n".join(f"        {json.dumps(k)}: {json.dumps(v)}" for k, v in expected().items())
    return "{\n" + body + "\n    }"


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"labels listed twice in {JS_PATH}: {dup}"
    return dict(pairs)


def parsed() -> dict[str, str]:
    with open(JS_PATH, encoding="utf-8") as f:
        m = BLOCK.search(f.read())
    assert m, f"{JS_PATH} lacks the /* BEGIN/END MAGICFUSION HINTS */ markers"
    return json.loads(m.group(1), object_pairs_hook=_no_duplicates)


def test_labels_are_unique():
    labels = [label for label, _ in labelled()]
    assert len(labels) == len(set(labels)), "two fields share a label: hints.js could not tell them apart"
    assert ACCORDION_LABEL not in labels


def test_every_label_has_exactly_its_hint():
    got, want = parsed(), expected()
    wrong = {label: (got.get(label), hint) for label, hint in want.items() if got.get(label) != hint}
    extra = sorted(set(got) - set(want))
    assert not wrong and not extra, (
        f"{JS_PATH} is out of step with lib_magicfusion/params.py:\n"
        + "".join(f"  {label!r}: has {have!r}, spec says {hint!r}\n" for label, (have, hint) in wrong.items())
        + (f"  labels that no field has: {extra}\n" if extra else "")
        + "Paste this between the markers:\n" + expected_block())


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the JS is only parsed, not run")
def test_the_script_fills_the_titles_map():
    """Run the file as the WebUI does (after hints.js defined `titles`) and read the map back."""
    script = ("var titles = {'Seed': 'kept'};\n" + open(JS_PATH, encoding="utf-8").read()
              + "\nprocess.stdout.write(JSON.stringify(titles));")
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == {"Seed": "kept", **expected()}
    # Without A1111's `titles` (any other page) the script does nothing and does not throw.
    subprocess.run(["node", "-e", open(JS_PATH, encoding="utf-8").read()], capture_output=True, timeout=60, check=True)
