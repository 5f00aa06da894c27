"""pytest wiring for the real-WebUI tests.

* Registers the ``webui`` marker and puts it on every test in this directory, and the ``host``
  marker: ``@pytest.mark.host("forge")`` runs a ``host_webui`` test only on that host (it is
  skipped on the others).
* Looks for every host's install: AUTOMATIC1111 (``MAGICFUSION_WEBUI_DIR``, default
  ``~/stable-diffusion-webui``) and WebUI Forge (``MAGICFUSION_FORGE_DIR``, default
  ``~/stable-diffusion-webui-forge``). The header says which were found; a banner at the start
  and in the summary names each missing one with the exact command that builds it.
* ``MAGICFUSION_WEBUI_REQUIRED=1`` makes every missing host an error instead of a skip (for CI
  that must run these tests); ``MAGICFUSION_WEBUI_REQUIRED=a1111`` (a comma-separated list)
  requires only the hosts named.
* Fixtures:

  - ``webui`` (session): the A1111 WebUI, a ``WebUIClient``. Every test that is not about
    hosts uses it. Without an A1111 install every test here that does not ask for another
    host is skipped at collection, as before Forge was added.
  - ``forge`` (session): WebUI Forge, a ``WebUIClient``. It is started only when a test first
    needs it (about 15 s, and its first generation loads the model: about 10 s more), once, and
    stopped right after the last test that uses it (it holds 7 to 13 GB of memory).
  - ``host_webui`` (session, parametrised with ids ``a1111`` and ``forge``): a ``HostWebUI``,
    the client of one host plus its ``HostProfile`` (checkpoint names, image size, steps).

Every server is stopped at the end of the session, and on a test failure, Ctrl-C, SIGTERM or
interpreter exit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from typing import Any

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

HOSTS = webui_server.HOSTS
TITLES = {"a1111": "AUTOMATIC1111 WebUI", "forge": "WebUI Forge"}
INSTALLS: dict[str, tuple[str, str]] = {}  # host -> (install, python)
MISSING: dict[str, str] = {}  # host -> why it was not found
for _host in HOSTS:
    try:
        INSTALLS[_host] = webui_server.find_install(_host)
    except webui_server.WebUINotFound as _e:
        MISSING[_host] = str(_e)

WEBUI_DIR, WEBUI_PYTHON = INSTALLS.get("a1111", (None, None))  # the A1111 install (test_parity uses them)
NOT_FOUND = MISSING.get("a1111")


def required(host: str) -> bool:
    """Whether ``MAGICFUSION_WEBUI_REQUIRED`` makes a missing ``host`` an error."""
    value = os.environ.get("MAGICFUSION_WEBUI_REQUIRED", "").strip()
    return value == "1" or host in {v.strip() for v in value.split(",")}


REQUIRED = required("a1111")
_timings: dict = {}
_servers: dict = {}  # host -> its running WebUIServer (only forge is stopped early)
_last_forge_item: list = []  # the nodeid of the last test that uses Forge, once known


@dataclasses.dataclass(frozen=True)
class HostProfile:
    """What differs between the hosts' test beds."""

    name: str                 # "a1111" or "forge"
    main: str                 # the start-up main checkpoint (the first by name)
    expert: str               # another checkpoint of the same family, to fuse with
    third: str | None         # a third checkpoint that fuses with main (None: the host has none)
    size: int                 # width = height of the test images
    steps: int                # sampling steps of a test generation
    interrupt_steps: int      # steps of a generation long enough to interrupt in the middle
    cfg_scale: float = 5.0
    samplers: tuple = ("Euler a", "DDIM")
    seconds_per_step: float = 0.02  # the order of magnitude, for timeouts and budgets


PROFILES = {
    # the tiny random checkpoints of make_fixtures.py: milliseconds per step
    "a1111": HostProfile("a1111", main="tiny-eps-a", expert="tiny-eps-b", third="tiny-sd2-v", size=64, steps=6,
                         interrupt_steps=48),
    # full-size SD1.5 with random weights (make_forge_fixtures.py), fp32 on the CPU: about 3 s per
    # step at 64x64 on 2 cores, the expert about 2.4 s more per fused step
    "forge": HostProfile("forge", main="forge-sd15-a", expert="forge-sd15-b", third=None, size=64, steps=3,
                         interrupt_steps=8, seconds_per_step=3.0),
}


@dataclasses.dataclass
class HostWebUI:
    """One host under test: ``client`` (a ``WebUIClient``), ``profile`` (a ``HostProfile``), and
    ``cache``, a dict the tests of a module may keep results in (one per host and session)."""

    name: str
    client: Any
    profile: HostProfile
    cache: dict = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:  # short in test ids and failure reports
        return f"HostWebUI({self.name})"


def _setup_command(host: str) -> str:
    return webui_server.setup_command(host)


def _banner(lines):
    bar = "!" * 78
    return "\n".join([bar, *("!! " + line for line in lines), bar])


def _missing_banner():
    lines = []
    for host, why in MISSING.items():
        what = "ERROR (MAGICFUSION_WEBUI_REQUIRED)" if required(host) else "its tests are SKIPPED"
        lines += [f"WEBUI HOST MISSING: {TITLES[host]} ({host}): {what}.", f"   {why}",
                  f"   Build it with:  {_setup_command(host)}"]
    if NOT_FOUND and not REQUIRED:
        lines.append("Without the A1111 install every test here except the host tests is skipped.")
    return _banner(lines)


def pytest_configure(config):
    config.addinivalue_line("markers", "webui: needs a real WebUI install (tests/webui)")
    config.addinivalue_line("markers", "host(*names): a host_webui test that runs only on these hosts (a1111, forge)")
    if MISSING:
        # printed immediately too, so it shows even with -q or when output is captured
        sys.stderr.write("\n" + _missing_banner() + "\n")


def pytest_report_header(config):
    lines = [f"webui host {h}: {INSTALLS[h][0]} (python {INSTALLS[h][1]})" for h in HOSTS if h in INSTALLS]
    lines += [f"webui host {h}: MISSING ({_setup_command(h)})" for h in HOSTS if h in MISSING]
    return lines


def pytest_generate_tests(metafunc):
    if "host_webui" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("host")
    only = set(marker.args) if marker else None
    params = []
    for host in HOSTS:
        marks = []
        if only is not None and host not in only:
            marks.append(pytest.mark.skip(reason=f"only on {', '.join(sorted(only))}"))
        elif host in MISSING and not required(host):
            marks.append(pytest.mark.skip(reason=f"no {TITLES[host]} install ({MISSING[host]}); build it with: "
                                                 f"{_setup_command(host)}"))
        params.append(pytest.param(host, id=host, marks=marks))
    metafunc.parametrize("host_webui", params, indirect=True, scope="session")


def pytest_collection_modifyitems(config, items):
    mine = [it for it in items if str(getattr(it, "path", it.fspath)).startswith(_HERE + os.sep)]
    for item in mine:
        item.add_marker(pytest.mark.webui)
        other_host = {"host_webui", "forge"} & set(getattr(item, "fixturenames", ()))
        if NOT_FOUND and not REQUIRED and not other_host:  # when REQUIRED, the `webui` fixture fails instead
            item.add_marker(pytest.mark.skip(reason=f"no A1111 WebUI install: {NOT_FOUND}; build it with: "
                                                    f"{_setup_command('a1111')}"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MISSING:
        terminalreporter.write_line(_missing_banner(), red=True, bold=True)
    if _timings:
        parts = [f"{k} {v:.1f} s" for k, v in _timings.items() if v is not None]
        terminalreporter.write_line("webui timings: " + ", ".join(parts), bold=True)


def _uses_forge(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return "forge" in getattr(item, "fixturenames", ()) or bool(
        callspec and callspec.params.get("host_webui") == "forge")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop Forge right after the last test that uses it (it holds 7 to 13 GB), not at the end
    of the session; after pytest's own teardown, so that the test's fixtures still reach it."""
    if "forge" not in _servers:
        return
    if not _last_forge_item:  # the final order is known now
        _last_forge_item.append(next((it.nodeid for it in reversed(item.session.items) if _uses_forge(it)), None))
    if item.nodeid == _last_forge_item[0] or nextitem is None:
        _servers.pop("forge").stop()
        _log("[webui] forge stopped after its last test")


def _log(message: str) -> None:
    sys.stderr.write(message + "\n")


def _absent(host: str):
    why = f"no {TITLES[host]} install: {MISSING[host]}; build it with: {_setup_command(host)}"
    if required(host):
        pytest.fail(f"MAGICFUSION_WEBUI_REQUIRED but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def webui():
    """The running A1111 WebUI: a ``WebUIClient`` (``.url``, ``.txt2img()``, ``.img2img()``,
    ``.txt2img_array()``, ``.decode()``, ``.checkpoint(name)``, ``.info()``, ``.server``)."""
    if NOT_FOUND:
        _absent("a1111")
    with webui_server.running(WEBUI_DIR, WEBUI_PYTHON, log=_log) as client:
        try:
            yield client
        finally:
            _timings["startup (launch -> API)"] = client.server.startup_s
            _timings["launch -> first image"] = client.first_image_s


@pytest.fixture(scope="session")
def forge():
    """WebUI Forge, started the first time a test asks for it (once per session): a ``WebUIClient``
    whose ``host`` is "forge"."""
    if "forge" in MISSING:
        _absent("forge")
    forge_dir, forge_python = INSTALLS["forge"]
    with webui_server.running(forge_dir, forge_python, host="forge", log=_log) as client:
        _servers["forge"] = client.server
        try:
            yield client
        finally:
            _timings["forge startup (launch -> ready)"] = client.server.startup_s
            _timings["forge launch -> first image"] = client.first_image_s
            _timings[f"forge generations ({client.generations})"] = client.generation_s
            _servers.pop("forge", None)


@pytest.fixture(scope="session")
def host_webui(request):
    """One host under test (parametrised: ids "a1111" and "forge"): a ``HostWebUI`` with
    ``.client``, ``.profile`` and ``.cache``."""
    host = request.param
    client = request.getfixturevalue("webui" if host == "a1111" else "forge")
    return HostWebUI(host, client, PROFILES[host])
