"""The invariants every WebUI host must keep, run on each host found (``host_webui``: ids
``a1111`` and ``forge``), through the extension's documented HTTP API only (README.md, "HTTP
API": the named fields, the ``/magicfusion/v1/*`` routes, 422 naming ``MagicFusion <field>:``).

* the same checkpoint as the expert with the same prompt is fusion off, pixel for pixel;
* an empty window is fusion off and loads no expert;
* the expert alone (window 1 -> 1, outside "expert") is a plain generation of the expert;
* a fused image differs from both models' and is reproducible;
* bad input gets HTTP 422 naming the field;
* an Interrupt in the middle of a fused generation leaves the next one equal to a fresh one;
* two concurrent requests with different settings each equal the same request alone;
* the extension's four routes answer.

Plus a few checks of each host's test bed itself (marked with the host they are about).

Forge generates from full-size SD1.5 checkpoints on the CPU (about 3 s a step even at 64x64),
so every test here makes as few generations as it can: 64x64, the profile's steps (A1111 6,
Forge 3), one seed, and every result that two tests need is made once per host and session
(``HostWebUI.cache``). The Forge part of this file takes about 5 to 6 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
from lib_magicfusion import __version__  # noqa: E402  (pure Python)

PROMPT = "a photo of a cat, sharp focus"
SEED = 4242
NAMED_FIELDS = ("enabled", "expert_checkpoint", "expert_prompt", "k_expert", "fusion_start", "fusion_end",
                "outside_window", "show_mask")
FUSED_A: dict = {}  # the defaults: k 1 / 1, fusion over every step
FUSED_B = {"k_expert": 2.0, "fusion_end": 0.67}  # other settings: for the concurrency test


# --------------------------------------------------------------------------- helpers

def body(h, fused=None, *, seed=SEED, steps=None, sampler="Euler a", checkpoint=None, **extra) -> dict:
    """A txt2img payload for host ``h`` (its size, steps and main checkpoint); ``fused`` adds
    MagicFusion with the profile's expert and these named fields on top."""
    p = h.profile
    out = {**h.client.TXT2IMG_DEFAULTS, "prompt": PROMPT, "width": p.size, "height": p.size,
           "steps": steps or p.steps, "seed": seed, "sampler_name": sampler, "cfg_scale": p.cfg_scale,
           **h.client.checkpoint(checkpoint or p.main), **extra}
    if fused is not None:
        out["alwayson_scripts"] = {"MagicFusion": {"args": [{"enabled": True, "expert_checkpoint": p.expert,
                                                             **fused}]}}
    return out


def generate(h, fused=None, **kw):
    """The first image of a generation, as an int16 array."""
    return h.client.pixels(h.client.txt2img(**body(h, fused, **kw)))


def ref(h, fused=None, **kw):
    """``generate`` once per host and session: tests that need the same picture share it (keyed by
    the whole payload, so ``ref(h)`` and ``ref(h, sampler="Euler a")`` are one generation)."""
    key = json.dumps(["ref", body(h, fused, **kw)], sort_keys=True)
    if key not in h.cache:
        h.cache[key] = generate(h, fused, **kw)
    return h.cache[key]


def post(h, payload):
    return h.client.session.post(h.client.url + "/sdapi/v1/txt2img", json=payload, timeout=h.client.timeout)


def assert_same(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    assert not diff.any(), f"{what}: {int((diff > 0).any(axis=-1).sum())} pixels differ (max {int(diff.max())})"


def differs(h, a, b) -> bool:
    return h.client.differs(a, b, threshold=0.5)


# --------------------------------------------------------------------------- the routes

def test_the_four_routes_answer(host_webui):
    c = host_webui.client
    r = c.get("/magicfusion/v1/version")
    assert r.status_code == 200 and r.json()["version"] == __version__, r.text
    r = c.get("/magicfusion/v1/schema")
    assert r.status_code == 200, r.text
    props = r.json()["properties"]
    assert set(NAMED_FIELDS) <= set(props), sorted(props)
    status = c.mf_status()
    assert isinstance(status["experts_loaded"], list)
    unloaded = c.mf_unload()
    assert isinstance(unloaded, dict)
    assert c.mf_status()["experts_loaded"] == []
    scripts = {s["name"] for s in c.get("/sdapi/v1/script-info").json()}
    assert "magicfusion" in scripts


# --------------------------------------------------------------------------- fusion that is no fusion

@pytest.mark.parametrize("sampler", ["Euler a", "DDIM"])
def test_the_same_checkpoint_and_prompt_as_expert_is_fusion_off(host_webui, sampler):
    h = host_webui
    plain = ref(h, sampler=sampler)
    fused = generate(h, {"expert_checkpoint": h.profile.main}, sampler=sampler)
    assert_same(fused, plain, f"{h.name} {sampler}: the main model fused with itself on the same prompt")
    assert not any(t.startswith(h.profile.main) for t in h.client.mf_status()["experts_loaded"])


def test_an_empty_window_is_fusion_off_and_loads_no_expert(host_webui):
    h = host_webui
    h.client.mf_unload()
    plain = ref(h)
    fused = generate(h, {"fusion_start": 0.5, "fusion_end": 0.5, "outside_window": "general"})
    assert_same(fused, plain, f"{h.name}: an empty window")
    assert h.client.mf_status()["experts_loaded"] == []


def test_the_expert_alone_is_a_plain_generation_of_the_expert(host_webui):
    h = host_webui
    expert_plain = ref(h, checkpoint=h.profile.expert)
    alone = generate(h, {"fusion_start": 1.0, "fusion_end": 1.0, "outside_window": "expert"})
    assert_same(alone, expert_plain, f"{h.name}: window 1 -> 1 with the expert outside")


def test_checkpoints_differ(host_webui):
    """The bed's two checkpoints make different pictures (else the tests above prove nothing)."""
    h = host_webui
    a, b = ref(h), ref(h, checkpoint=h.profile.expert)
    assert differs(h, a, b), f"{h.name}: {h.profile.main} and {h.profile.expert} give the same picture"
    assert a.std() > 10 and b.std() > 10  # real pictures, not blank frames


# --------------------------------------------------------------------------- real fusion

def fused_a(h):
    return ref(h, FUSED_A)


def test_fused_differs_from_both_models_and_is_reproducible(host_webui):
    h = host_webui
    first = fused_a(h)
    again = generate(h, FUSED_A)
    assert_same(again, first, f"{h.name}: the same fused request twice")
    plain, expert_plain = ref(h), ref(h, checkpoint=h.profile.expert)
    assert differs(h, first, plain), f"{h.name}: the fused picture is the main model's (nothing was fused)"
    assert differs(h, first, expert_plain), f"{h.name}: the fused picture is the expert's"
    loaded = h.client.mf_status()["experts_loaded"]
    assert any(t.startswith(h.profile.expert) for t in loaded), loaded


# --------------------------------------------------------------------------- bad input

BAD = [
    ({"k_expert": -1}, "k_expert"),
    ({"fusion_end": 1.5}, "fusion_end"),
    ({"outside_window": "both"}, "outside_window"),
    ({"k_exprt": 1.0}, "k_exprt"),
    ({"expert_checkpoint": "no-such-checkpoint"}, "expert_checkpoint"),
]


@pytest.mark.parametrize("fields, field", BAD, ids=[f for _, f in BAD[:-1]] + ["unknown checkpoint"])
def test_bad_input_is_a_422_naming_the_field(host_webui, fields, field):
    h = host_webui
    r = post(h, body(h, fields))
    assert r.status_code == 422, f"{h.name}: {r.status_code} {r.text[:500]}"
    errors = r.json().get("errors", "")
    assert f"MagicFusion {field}:" in errors, f"{h.name}: {errors!r} does not name MagicFusion {field}"


# --------------------------------------------------------------------------- interrupt, concurrency

def test_interrupt_mid_fusion_then_the_next_fused_generation_equals_a_fresh_one(host_webui):
    h = host_webui
    fresh = fused_a(h)
    steps = h.profile.interrupt_steps
    out = {}

    def run():
        out["response"] = post(h, body(h, FUSED_A, steps=steps, seed=SEED + 1))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60 + 4 * steps * h.profile.seconds_per_step
    state = {}
    while time.monotonic() < deadline and t.is_alive():
        state = h.client.get("/sdapi/v1/progress?skip_current_image=true", timeout=30).json()["state"]
        if state.get("sampling_step", 0) >= 1 and state.get("job_count", 0) > 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"{h.name}: the long fused generation finished or stalled before it could be interrupted")
    assert h.client.post("/sdapi/v1/interrupt", {}).status_code == 200
    t.join(120 + 2 * steps * h.profile.seconds_per_step)
    assert not t.is_alive(), f"{h.name}: the interrupted generation did not return"
    resp = out["response"]
    assert resp.status_code == 200, resp.text[:500]  # the WebUI returns what it has
    assert state["sampling_step"] < steps
    assert_same(generate(h, FUSED_A), fresh, f"{h.name}: the fused generation after an interrupt")


def test_concurrent_requests_with_different_settings_each_equal_the_request_alone(host_webui):
    h = host_webui
    payloads = [body(h, FUSED_A), body(h, FUSED_B)]
    alone = [fused_a(h), ref(h, FUSED_B)]
    results: list = [None, None]

    def run(i):
        results[i] = post(h, payloads[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for i, r in enumerate(results):
        assert r is not None and r.status_code == 200, (h.name, i, r is not None and r.text[:300])
        assert_same(h.client.pixels(r.json()), alone[i], f"{h.name}: request {i} run concurrently")


# --------------------------------------------------------------------------- the client's hires helper

def test_hires_payload_works(host_webui):
    """WebUIClient.hires_payload: on Forge it adds what Forge's API needs (else a TypeError, or a
    second pass at CFG 1)."""
    h = host_webui
    payload = h.client.hires_payload(**body(h), hr_second_pass_steps=1)
    if h.name == "forge":
        assert payload["hr_additional_modules"] == ["Use same choices"] and payload["hr_cfg"] == payload["cfg_scale"]
    img = h.client.pixels(h.client.txt2img(**payload))
    assert img.shape == (2 * h.profile.size, 2 * h.profile.size, 3)
    assert img.std() > 10


# --------------------------------------------------------------------------- the Forge test bed itself

def _listening(port: int) -> set:
    """The local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        for row in rows:
            addr, hexport = row[1].split(":")
            if int(hexport, 16) == port and row[3] == "0A":  # TCP_LISTEN
                out.add(addr)
    return out


@pytest.mark.host("forge")
def test_forge_bed_is_local_offline_cpu_and_has_its_fixtures(host_webui):
    c = host_webui.client
    assert c.url.startswith("http://127.0.0.1:")
    port = int(c.url.rsplit(":", 1)[1])
    if os.path.exists("/proc/net/tcp"):
        assert _listening(port) == {"0100007F"}, _listening(port)  # 127.0.0.1 only, never 0.0.0.0
    # Forge's /sdapi/v1/cmd-flags answers 500 (its response model wants the port as a string), so
    # the flags are read from the server's command line.
    with open(f"/proc/{c.server.proc.pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    for flag in ("--skip-prepare-environment", "--always-cpu", "--api", "--nowebui", "--no-download-sd-model"):
        assert flag in argv, (flag, argv)
    assert argv[argv.index("--server-name") + 1] == "127.0.0.1" and "--listen" not in argv
    ckpt_dir = argv[argv.index("--ckpt-dir") + 1]
    assert os.path.realpath(ckpt_dir) == os.path.realpath(os.path.join(c.fixtures_dir, "checkpoints"))
    names = sorted(m["model_name"] for m in c.get("/sdapi/v1/sd-models").json())
    assert names == sorted(e["name"] for e in c.manifest["models"])
    assert {"forge-sd15-a", "forge-sd15-b"} <= set(names)
    opts = c.get("/sdapi/v1/options").json()
    assert opts["live_previews_enable"] is False  # nothing may be downloaded for a preview
    with open(f"/proc/{c.server.proc.pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert env.get(b"OMP_WAIT_POLICY") == b"PASSIVE" and env.get(b"HF_HUB_OFFLINE") == b"1"
    with open(c.server.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "Startup time:" in log
    assert "forge-sd15-a.safetensors" in log.split("Startup time:")[0]  # the start-up model: the first by name


@pytest.mark.host("forge")
def test_forge_fixture_manifest(host_webui):
    m = host_webui.client.manifest
    assert m["generator"] == "make_forge_fixtures.py"
    for e in m["models"]:
        path = os.path.join(host_webui.client.fixtures_dir, "checkpoints", e["name"] + ".safetensors")
        assert os.path.getsize(path) == e["bytes"]
        assert set(e["weights_sha256"]) == {"unet", "text_encoder", "vae"}
    sd15 = [e for e in m["models"] if e["family"] == "sd15"]
    assert {e["seed"] for e in sd15} >= {1001, 2002} and len({e["vae_seed"] for e in sd15}) == 1
    assert all(e["forge_guess"] == "SD15" for e in sd15)


@pytest.mark.host("forge")
def test_forge_testbed_routes(host_webui):
    """The test-bed extension's routes work in Forge (they read forge_objects there), and Forge runs
    exactly the main fixture's tensors."""
    h = host_webui
    c = h.client
    ref(h)  # the main checkpoint is loaded
    model = c.testbed("model")
    assert model["host"] == "forge" and model["is_sd1"] and not model["is_sdxl"]
    assert model["checkpoint"].startswith(h.profile.main + ".safetensors")
    assert model["unet_parameters"] > 800_000_000 and model["unet_dtype"] == "torch.float32"
    assert model["parameterization"] == "epsilon"
    weights = c.testbed("main-weights")
    expected = next(e for e in c.manifest["models"] if e["name"] == h.profile.main)["weights_sha256"]
    assert {k: weights[k]["sha256"] for k in expected} == expected
    cond = c.testbed("conditioning", prompt=PROMPT)
    assert cond["parts"]["crossattn"]["shape"] == [1, 77, 768]
    assert c.testbed("rss")["VmRSS"] > 1 << 30
    assert set(c.testbed("nested")) == {"runs", "recursion_blocked", "errors", "last"}
    assert "available" in c.testbed("loaded-networks")
