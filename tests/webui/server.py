"""Start and stop a real WebUI for the sd-webui-magicfusion tests: AUTOMATIC1111 (the host
``"a1111"``, the default) or WebUI Forge (``"forge"``).

Used as pytest session fixtures (see ``conftest.py``) and as a command-line tool::

    python tests/webui/server.py            # start, print the URL, serve until Ctrl-C
    python tests/webui/server.py --smoke    # start, make one 64x64 image, stop
    python tests/webui/server.py --fixtures # only (re)build the checkpoints; print their dir
    python tests/webui/server.py --ui       # serve the Gradio page too (for a browser)
    python tests/webui/server.py --host forge [--smoke|--fixtures|--ui]   # the same with Forge

Any Python >= 3.9 runs this file (stdlib only; the client helpers also need requests,
numpy and Pillow). The WebUI itself and the fixture generator run under the WebUI's
own Python.

Environment variables:

``MAGICFUSION_WEBUI_DIR``
    the A1111 install (default ``~/stable-diffusion-webui``).
``MAGICFUSION_WEBUI_PYTHON``
    its Python (default ``$MAGICFUSION_WEBUI_DIR/venv/bin/python``).
``MAGICFUSION_WEBUI_CACHE``
    where generated fixtures are cached (default
    ``${XDG_CACHE_HOME:-~/.cache}/sd-webui-magicfusion/webui-fixtures``).
``MAGICFUSION_WEBUI_STARTUP_TIMEOUT``
    seconds to wait for the API (default 300).
``MAGICFUSION_WEBUI_KEEP``
    set to 1 to keep the private data dir (with ``webui.log``) after stopping.
``MAGICFUSION_FORGE_DIR``, ``MAGICFUSION_FORGE_PYTHON``, ``MAGICFUSION_FORGE_CACHE``
    the same three for Forge (default ``~/stable-diffusion-webui-forge``, its ``venv/bin/python``,
    ``${XDG_CACHE_HOME:-~/.cache}/sd-webui-magicfusion/forge-fixtures``).
``MAGICFUSION_FORGE_SDXL``
    set to 1 to build (and list) the Forge SDXL fixture too (6.9 GB; it does not fit beside an
    SD1.5 expert in 24 GB on the CPU).

Forge runs with ``--always-cpu`` (fp32 on the CPU) and full-size SD1.5 fixtures with random
weights (``make_forge_fixtures.py``): Forge recognises checkpoints by their tensors, so the tiny
A1111 fixtures are not models to it. Forge answers ``/sdapi/v1/*`` before its start-up has
finished, and a generation sent then can leave wrong default script arguments cached for every
later request, so it counts as ready only after its ``Startup time:`` line AND the API answering.

The server always runs offline (``--skip-prepare-environment``, ``HF_HUB_OFFLINE=1``,
``TRANSFORMERS_OFFLINE=1``, a private ``HF_HOME``), bound to 127.0.0.1 on a free port,
with a private ``--data-dir``. The repo is linked into that data dir's ``extensions/``
(A1111 reads extensions from ``<data-dir>/extensions``), so the install is not modified, and
the test bed's helper extension (``testbed_extension/``: the fixtures' open_clip config, a
nested-generation script and inspection routes) is installed next to it.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, ClassVar

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
EXTENSION_NAME = "sd-webui-magicfusion"
TESTBED_NAME = "magicfusion-testbed"
TESTBED_SOURCE = os.path.join(HERE, "testbed_extension")
TESTBED_MARKER = ".magicfusion-testbed-copy"  # marks a copy that install_testbed may replace
GENERATOR = os.path.join(HERE, "make_fixtures.py")
FORGE_GENERATOR = os.path.join(HERE, "make_forge_fixtures.py")
HOSTS = ("a1111", "forge")

ENV_DIR = "MAGICFUSION_WEBUI_DIR"
ENV_PYTHON = "MAGICFUSION_WEBUI_PYTHON"
ENV_CACHE = "MAGICFUSION_WEBUI_CACHE"
ENV_TIMEOUT = "MAGICFUSION_WEBUI_STARTUP_TIMEOUT"
ENV_KEEP = "MAGICFUSION_WEBUI_KEEP"
ENV_FORGE_DIR = "MAGICFUSION_FORGE_DIR"
ENV_FORGE_PYTHON = "MAGICFUSION_FORGE_PYTHON"
ENV_FORGE_CACHE = "MAGICFUSION_FORGE_CACHE"
ENV_FORGE_SDXL = "MAGICFUSION_FORGE_SDXL"

DEFAULT_STARTUP_TIMEOUT = 300.0  # a cold start on a 2-core machine takes ~10 s; be generous
FIXTURE_TIMEOUT = 900.0
FORGE_FIXTURE_TIMEOUT = 1800.0  # two full SD1.5 checkpoints: ~2 min on 2 idle cores
CHECKPOINTS = ("tiny-eps-a", "tiny-eps-b", "tiny-eps-b-vae2", "tiny-sd2-v", "tiny-v", "tiny-xl-a", "tiny-xl-b",
               "tiny-zz-big")
MAIN_CHECKPOINT = "tiny-eps-a"  # the one the WebUI starts with: the first by name
FORGE_CHECKPOINTS = ("forge-sd15-a", "forge-sd15-b")  # (+ "forge-sdxl-a" with MAGICFUSION_FORGE_SDXL=1)
FORGE_MAIN_CHECKPOINT = "forge-sd15-a"

WEBUI_FLAGS = [
    "--skip-prepare-environment",  # no git clones / pip installs: required offline
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--use-cpu", "all",
    "--no-half", "--no-half-vae", "--precision", "full",
    "--api", "--nowebui",
    "--no-download-sd-model",
    "--server-name", "127.0.0.1",  # without it --nowebui binds 0.0.0.0 (uvicorn host=None)
]

# Settings the test bed starts with (<data-dir>/config.json). Live previews stay on, but
# with the built-in cheap approximation: "Approx NN" downloads its SDXL weights on first use,
# and the test bed has no network.
WEBUI_SETTINGS = {"show_progress_type": "Approx cheap"}

FORGE_FLAGS = [
    "--skip-prepare-environment",  # no git clones / pip installs: required offline
    "--skip-python-version-check",  # Forge asks for 3.10; the pinned install is 3.11
    "--skip-torch-cuda-test",
    "--skip-version-check",
    "--no-download-sd-model",
    "--always-cpu",  # every device the CPU, fp32 (Forge has no --use-cpu/--no-half/--precision)
    "--api", "--nowebui",
    "--server-name", "127.0.0.1",
]
# Forge's live previews ("Approx NN" by default) download vaeapprox-sdxl.pt for an SDXL model, and
# a preview is not needed: off, so nothing is ever downloaded.
FORGE_SETTINGS = {"live_previews_enable": False}


class WebUINotFound(RuntimeError):
    pass


class WebUIStartError(RuntimeError):
    pass


# --------------------------------------------------------------------------- install

def find_install(host: str = "a1111") -> tuple[str, str]:
    """Return (webui_dir, python) of ``host`` ("a1111" or "forge"), or raise WebUINotFound with
    the reason and the setup command."""
    if host == "forge":
        return _find_forge()
    if host != "a1111":
        raise ValueError(f"unknown host {host!r} (known: {', '.join(HOSTS)})")
    root = os.path.abspath(os.path.expanduser(os.environ.get(ENV_DIR) or "~/stable-diffusion-webui"))
    src = f"${ENV_DIR}" if os.environ.get(ENV_DIR) else "the default"
    if not os.path.isfile(os.path.join(root, "launch.py")):
        raise WebUINotFound(f"no A1111 WebUI at {root} ({src}): {root}/launch.py is missing. "
                            f"Set {ENV_DIR} to an A1111 1.10.x install.")
    if not os.path.isdir(os.path.join(root, "repositories", "stable-diffusion-stability-ai", "ldm")):
        raise WebUINotFound(f"{root}/repositories/stable-diffusion-stability-ai is missing "
                            f"(the install's repositories/ are not set up; see tests/webui/README.md)")
    py = os.environ.get(ENV_PYTHON) or os.path.join(root, "venv", "bin", "python")
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
        raise WebUINotFound(f"the WebUI's Python {py} does not exist or is not executable "
                            f"(set {ENV_PYTHON})")
    return root, py


def _find_forge() -> tuple[str, str]:
    root = os.path.abspath(os.path.expanduser(os.environ.get(ENV_FORGE_DIR) or "~/stable-diffusion-webui-forge"))
    src = f"${ENV_FORGE_DIR}" if os.environ.get(ENV_FORGE_DIR) else "the default"
    if not os.path.isfile(os.path.join(root, "modules_forge", "forge_version.py")):
        raise WebUINotFound(f"no WebUI Forge at {root} ({src}): {root}/modules_forge/forge_version.py is missing. "
                            f"Set {ENV_FORGE_DIR} to a Forge install.")
    if not os.path.isdir(os.path.join(root, "repositories", "huggingface_guess", "huggingface_guess")):
        raise WebUINotFound(f"{root}/repositories/huggingface_guess is missing (the install's repositories/ are "
                            f"not set up)")
    py = os.environ.get(ENV_FORGE_PYTHON) or os.path.join(root, "venv", "bin", "python")
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
        raise WebUINotFound(f"Forge's Python {py} does not exist or is not executable (set {ENV_FORGE_PYTHON})")
    return root, py


def setup_command(host: str = "a1111") -> str:
    """The command that builds ``host``'s test install where the tests look for it."""
    if host == "forge":
        env, default = ENV_FORGE_DIR, "~/stable-diffusion-webui-forge"
        cmd = "python3 tests/webui/setup_webui.py --host forge"
    else:
        env, default = ENV_DIR, "~/stable-diffusion-webui"
        cmd = "python3 tests/webui/setup_webui.py"
    where = os.environ.get(env)
    if where and os.path.abspath(os.path.expanduser(where)) != os.path.abspath(os.path.expanduser(default)):
        cmd += f" --dir {where}"
    return cmd


# --------------------------------------------------------------------------- fixtures

def _cache_root(host: str = "a1111") -> str:
    env, sub = (ENV_FORGE_CACHE, "forge-fixtures") if host == "forge" else (ENV_CACHE, "webui-fixtures")
    if os.environ.get(env):
        return os.path.abspath(os.path.expanduser(os.environ[env]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, EXTENSION_NAME, sub)


def fixture_key(python: str, webui_dir: str, host: str = "a1111") -> str:
    """A hash of the host's generator, its Python and the install: a new generator (or another
    install) gets a new fixture directory."""
    h = hashlib.sha256()
    with open(FORGE_GENERATOR if host == "forge" else GENERATOR, "rb") as f:
        h.update(f.read())
    h.update(b"\0" + os.path.abspath(python).encode() + b"\0" + os.path.realpath(webui_dir).encode())
    return h.hexdigest()[:16]


def forge_models(sdxl: bool | None = None) -> list[str]:
    """The Forge fixtures the test bed needs: the SD1.5 pair, and SDXL with sdxl=True (default:
    ``$MAGICFUSION_FORGE_SDXL``)."""
    if sdxl is None:
        sdxl = os.environ.get(ENV_FORGE_SDXL) == "1"
    return [*FORGE_CHECKPOINTS, *(["forge-sdxl-a"] if sdxl else [])]


def _manifest_models(manifest: str) -> set:
    try:
        with open(manifest) as f:
            return {e["name"] for e in json.load(f).get("models", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def ensure_fixtures(webui_dir: str, python: str, log=print, *, host: str = "a1111", sdxl: bool | None = None) -> str:
    """Generate the host's checkpoints once per generator version; return their directory.

    A1111: the tiny checkpoints of make_fixtures.py (about 6 s). Forge: the full-size SD1.5 pair
    of make_forge_fixtures.py (about 2 minutes, 4.3 GB), plus SDXL when asked for; a set that
    lacks a model asked for gets it added. A file lock serialises concurrent builds."""
    root = _cache_root(host)
    out = os.path.join(root, fixture_key(python, webui_dir, host))
    manifest = os.path.join(out, "manifest.json")
    wanted = set(forge_models(sdxl)) if host == "forge" else set()

    def ready() -> bool:
        return os.path.isfile(manifest) and wanted <= _manifest_models(manifest)

    if ready():
        return out
    os.makedirs(root, exist_ok=True)
    lock_path = out + ".lock"
    with open(lock_path, "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest process may be generating
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        if ready():
            return out
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
                   OMP_WAIT_POLICY="PASSIVE")
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(k, None)
        if host == "forge":
            missing = sorted(wanted - _manifest_models(manifest))
            what = f"the Forge checkpoints {', '.join(missing)} (full-size SD1.5 with random weights; ~1 min each)"
            cmd = [python, FORGE_GENERATOR, "--out", out, "--forge-dir", webui_dir, "--models", ",".join(missing)]
            env[ENV_FORGE_DIR] = webui_dir
            timeout = FORGE_FIXTURE_TIMEOUT
        else:
            what = "tiny checkpoints"
            cmd = [python, GENERATOR, "--out", out, "--webui-dir", webui_dir]
            env[ENV_DIR] = webui_dir
            timeout = FIXTURE_TIMEOUT
        log(f"[webui] generating {what} in {out} ...")
        t0 = time.monotonic()
        r = subprocess.run(cmd, check=False, cwd=webui_dir, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if r.returncode != 0 or not ready():
            raise WebUIStartError(f"{os.path.basename(cmd[1])} failed (rc={r.returncode}):\n{r.stdout[-4000:]}")
        log(f"[webui] fixtures ready in {time.monotonic() - t0:.1f} s")
    return out


# --------------------------------------------------------------------------- extension

def toy_world_checkpoints(python: str, log=print, host: str = "a1111") -> str:
    """The trained toy world (bench/quality/) as WebUI checkpoints with their .yaml, assembled
    into the fixture cache by the WebUI's own python; returns the checkpoints folder."""
    out = os.path.join(_cache_root(host), "toy-world")
    log(f"[webui] assembling the toy-world checkpoints into {out}")
    subprocess.run([python, os.path.join(REPO_ROOT, "bench", "quality", "assemble.py"), "--out", out], check=True)
    return os.path.join(out, "checkpoints")


def link_extension(extensions_dir: str, repo_root: str = REPO_ROOT) -> str:
    """Symlink the repo into ``extensions_dir/sd-webui-magicfusion``, replacing a stale link.
    A real directory there is left alone (an error), never deleted."""
    os.makedirs(extensions_dir, exist_ok=True)
    link = os.path.join(extensions_dir, EXTENSION_NAME)
    if os.path.islink(link):
        if os.path.realpath(link) == os.path.realpath(repo_root):
            return link
        os.unlink(link)
    elif os.path.exists(link):
        raise WebUIStartError(f"{link} exists and is not a symlink; remove it or use another data dir")
    os.symlink(os.path.realpath(repo_root), link)
    return link


def install_testbed(extensions_dir: str, source: str = TESTBED_SOURCE) -> str:
    """Put the test bed's helper extension at ``extensions_dir/magicfusion-testbed``.

    It is copied, not linked: a link would resolve into this repo, and the product counts every
    WebUI callback registered from a file under its own root as its own (the "callbacks" of
    GET /magicfusion/v1/status). A stale link or an earlier copy there is replaced; any other
    real directory there is an error, never deleted."""
    os.makedirs(extensions_dir, exist_ok=True)
    dst = os.path.join(extensions_dir, TESTBED_NAME)
    if os.path.islink(dst):
        os.unlink(dst)
    elif os.path.isdir(dst):
        if not os.path.isfile(os.path.join(dst, TESTBED_MARKER)):
            raise WebUIStartError(f"{dst} exists and is not a test-bed copy; remove it or use another data dir")
        shutil.rmtree(dst)
    elif os.path.exists(dst):
        raise WebUIStartError(f"{dst} exists and is not a directory")
    shutil.copytree(source, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    with open(os.path.join(dst, TESTBED_MARKER), "w") as f:
        f.write(os.path.realpath(source) + "\n")
    return dst


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: stop() signals the whole group
    try:  # Linux: get SIGTERM if the test process dies without cleaning up
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - best effort; not available off Linux
        pass


# --------------------------------------------------------------------------- server

DATA_DIR_PREFIX = "magicfusion-webui-"


def _remove_data_dir(path: str) -> None:
    link = os.path.join(path, "extensions", EXTENSION_NAME)
    if os.path.islink(link):
        os.unlink(link)  # never let rmtree walk into the repo
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_data_dirs() -> None:
    """Remove data dirs left by a test process that was SIGKILLed (its server died with it
    through PR_SET_PDEATHSIG, but nothing could delete the directory)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if not name.startswith(DATA_DIR_PREFIX) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            with open(os.path.join(path, "owner.pid")) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            continue  # owner still alive (maybe another test session): leave it
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # no readable pid file, or not ours to judge
        _remove_data_dir(path)

class WebUIServer:
    """One WebUI process on 127.0.0.1 with a private data dir. Use as a context manager
    or call start()/stop(); stop() is also registered with atexit. ``host`` is "a1111" (the
    default) or "forge"."""

    def __init__(self, webui_dir: str | None = None, python: str | None = None,
                 extension: bool | str = True, port: int | None = None,
                 startup_timeout: float | None = None, log=print, *,
                 ui: bool = False, ckpt_dir: str | None = None, extra_args: tuple[str, ...] = (),
                 api_auth: str | None = None, testbed: bool = True, host: str = "a1111"):
        """``ui=True`` serves the Gradio page too (no ``--nowebui``; still 127.0.0.1 only).
        ``ckpt_dir`` replaces the shared fixture checkpoint dir (e.g. a private dir of links, so
        a test may add checkpoints without touching the cache). ``extra_args`` are appended
        to the launch flags (e.g. ``--ui-config-file``). ``api_auth`` (``"user:pass"``) starts the
        WebUI with ``--api-auth``; the ready check and ``WebUIClient`` then send those credentials.
        ``extension`` may name another extension tree to link instead of this repo (e.g. an
        earlier release, for parity tests). ``testbed=False`` leaves out the test bed's helper extension; the SD2 and SDXL fixtures
        then cannot load (nothing registers their open_clip config)."""
        if host not in HOSTS:
            raise ValueError(f"unknown host {host!r} (known: {', '.join(HOSTS)})")
        self.host = host
        if webui_dir is None or python is None:
            d, p = find_install(host)
            webui_dir, python = webui_dir or d, python or p
        self.webui_dir = webui_dir
        self.python = python
        self.extension = extension
        self.port = port
        self.startup_timeout = float(startup_timeout or os.environ.get(ENV_TIMEOUT) or DEFAULT_STARTUP_TIMEOUT)
        self.log = log
        self.ui = ui
        self.ckpt_dir = ckpt_dir
        self.extra_args = tuple(extra_args)
        self.api_auth = api_auth
        self.testbed = testbed
        self.proc: subprocess.Popen | None = None
        self.data_dir: str | None = None
        self.fixtures_dir: str | None = None
        self.log_path: str | None = None
        self.url: str | None = None
        self.t_launch: float | None = None
        self.startup_s: float | None = None  # launch -> API answers
        self._lock = threading.Lock()
        self._old_sigterm = None

    # -- lifecycle
    def start(self) -> WebUIServer:
        self.fixtures_dir = ensure_fixtures(self.webui_dir, self.python, self.log, host=self.host)
        _remove_stale_data_dirs()
        self.data_dir = tempfile.mkdtemp(prefix=DATA_DIR_PREFIX)
        with open(os.path.join(self.data_dir, "owner.pid"), "w") as f:
            f.write(str(os.getpid()))
        with open(os.path.join(self.data_dir, "config.json"), "w") as f:
            json.dump(FORGE_SETTINGS if self.host == "forge" else WEBUI_SETTINGS, f)
        hf_home = os.path.join(self.data_dir, "hf-home")
        os.makedirs(hf_home)
        if self.extension:
            root = self.extension if isinstance(self.extension, str) else REPO_ROOT
            link_extension(os.path.join(self.data_dir, "extensions"), root)
        if self.testbed:
            install_testbed(os.path.join(self.data_dir, "extensions"))
        self.log_path = os.path.join(self.data_dir, "webui.log")
        atexit.register(self.stop)
        self._install_sigterm()
        last_err = None
        for _ in range(3):  # retry only if the chosen port was taken meanwhile
            port = self.port or free_port()
            try:
                self._launch(port, hf_home)
                return self
            except WebUIStartError as e:
                last_err = e
                self._kill()
                if self.port or "address already in use" not in str(e).lower():
                    break
        self.stop()
        raise last_err  # type: ignore[misc]

    def _launch(self, port: int, hf_home: str) -> None:
        flags = [f for f in (FORGE_FLAGS if self.host == "forge" else WEBUI_FLAGS)
                 if not (self.ui and f == "--nowebui")]
        cmd = [self.python, "launch.py", *flags,
               "--ckpt-dir", self.ckpt_dir or os.path.join(self.fixtures_dir, "checkpoints"),
               "--data-dir", self.data_dir, "--port", str(port), *self.extra_args]
        if self.api_auth:
            cmd += ["--api-auth", self.api_auth]
        env = dict(os.environ)
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "COMMANDLINE_ARGS"):
            env.pop(k, None)  # the test runner's environment must not leak into the WebUI's
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   HF_HOME=hf_home, HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", GRADIO_ANALYTICS_ENABLED="False",
                   PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
                   # libgomp's threads spin-wait for work by default: on a busy 2-core machine
                   # that makes a tiny image about 100x slower
                   OMP_WAIT_POLICY="PASSIVE")
        openclip = os.path.join(self.fixtures_dir, "open_clip")
        if os.path.isdir(openclip):  # the testbed extension registers it with open_clip
            env["MAGICFUSION_TESTBED_OPENCLIP"] = openclip
        self.url = f"http://127.0.0.1:{port}"
        self.log(f"[webui] starting {self.host} {self.webui_dir} on {self.url} (log: {self.log_path})")
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        self.t_launch = time.monotonic()
        with self._lock:
            self.proc = subprocess.Popen(cmd, cwd=self.webui_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=subprocess.STDOUT,
                                         preexec_fn=_child_setup)  # noqa: PLW1509 - setsid + prctl only
        logf.close()
        self._wait_ready()
        self.startup_s = time.monotonic() - self.t_launch
        self.log(f"[webui] API ready after {self.startup_s:.1f} s (pid {self.proc.pid})")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise WebUIStartError(f"the WebUI exited with code {self.proc.returncode} during "
                                      f"start-up; log tail:\n{self.log_tail()}")
            if (self.ui or self.host == "forge") and not self._log_contains("Startup time:"):
                # With the UI, gradio serves before the API is added. A request that lands between
                # A1111's setup_middleware() and create_api() builds starlette's middleware stack,
                # and create_api() then dies with "Cannot add middleware after an application has
                # started". So send nothing until A1111 prints its start-up summary.
                # Forge answers /sdapi/v1/* before its start-up has finished too, and a generation
                # sent then can make api.init_script_args raise IndexError for every later request
                # (the wrong default script args stay cached): always wait for the summary there.
                if time.monotonic() > deadline:
                    raise WebUIStartError(f"the WebUI did not finish starting within {self.startup_timeout:.0f} s "
                                          f"(set {ENV_TIMEOUT}); log tail:\n{self.log_tail()}")
                time.sleep(0.25)
                continue
            try:
                req = urllib.request.Request(self.url + "/sdapi/v1/sd-models")
                if self.api_auth:
                    user_pass = self.api_auth.split(",")[0].encode()
                    req.add_header("Authorization", "Basic " + base64.b64encode(user_pass).decode())
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        models = json.load(r)
                        if models:
                            return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise WebUIStartError(f"the WebUI API did not answer within {self.startup_timeout:.0f} s "
                                      f"(set {ENV_TIMEOUT}); log tail:\n{self.log_tail()}")
            time.sleep(0.25)

    def _kill(self) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        pgid = proc.pid  # setsid() made the child its own group leader
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                # the leader is gone; make sure no stray member of its group survives
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        self._kill()
        self._restore_sigterm()
        if self.data_dir and os.path.isdir(self.data_dir) and os.environ.get(ENV_KEEP) != "1":
            _remove_data_dir(self.data_dir)
            self.data_dir = None

    def __enter__(self) -> WebUIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- SIGTERM to the test process must still stop the server
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            def _on_term(signum, frame):
                raise KeyboardInterrupt("SIGTERM")
            self._old_sigterm = signal.signal(signal.SIGTERM, _on_term)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def _log_contains(self, text: str) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                return text.encode() in f.read()
        except OSError:
            return False

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return "(no log)"


# --------------------------------------------------------------------------- client

class WebUIClient:
    """HTTP helpers the tests use. Needs requests, numpy and Pillow. ``host`` is the server's
    ("a1111" or "forge")."""

    TXT2IMG_DEFAULTS: ClassVar[dict[str, Any]] = {
        "prompt": "a photo of a cat", "negative_prompt": "", "width": 64, "height": 64, "steps": 4,
        "cfg_scale": 5.0, "seed": 1234, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
        "save_images": False, "send_images": True,
    }

    def __init__(self, server: WebUIServer, timeout: float = 300.0):
        import requests
        self.server = server
        self.host = getattr(server, "host", "a1111")
        self.url = server.url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False  # never route 127.0.0.1 through a proxy
        if getattr(server, "api_auth", None):
            self.session.auth = tuple(server.api_auth.split(",")[0].split(":", 1))
        self.first_image_s: float | None = None  # launch -> first image returned
        self.generations = 0  # txt2img/img2img requests that returned 200, and their total time
        self.generation_s = 0.0

    @property
    def fixtures_dir(self) -> str:
        return self.server.fixtures_dir

    @property
    def manifest(self) -> dict[str, Any]:
        with open(os.path.join(self.fixtures_dir, "manifest.json")) as f:
            return json.load(f)

    def get(self, path: str, **kw):
        r = self.session.get(self.url + path, timeout=kw.pop("timeout", self.timeout), **kw)
        return r

    def post(self, path: str, payload: dict[str, Any], **kw):
        return self.session.post(self.url + path, json=payload, timeout=kw.pop("timeout", self.timeout), **kw)

    def _gen(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        r = self.post(path, payload)
        if r.status_code == 200:
            self.generations += 1
            self.generation_s += time.monotonic() - t0
        if r.status_code != 200:
            raise AssertionError(f"POST {path} -> {r.status_code}: {r.text[:2000]}\n"
                                 f"--- webui log tail ---\n{self.server.log_tail(40)}")
        data = r.json()
        if self.first_image_s is None and data.get("images"):
            self.first_image_s = time.monotonic() - self.server.t_launch
        return data

    def txt2img(self, **payload) -> dict[str, Any]:
        """POST /sdapi/v1/txt2img with small defaults (64x64, 4 steps); returns the JSON."""
        return self._gen("/sdapi/v1/txt2img", {**self.TXT2IMG_DEFAULTS, **payload})

    def img2img(self, init_image, **payload) -> dict[str, Any]:
        """POST /sdapi/v1/img2img; ``init_image`` is a uint8 HxWx3 array or a base64 PNG."""
        if not isinstance(init_image, str):
            init_image = self.encode_png(init_image)
        body = {**self.TXT2IMG_DEFAULTS, "denoising_strength": 0.6, "init_images": [init_image]}
        return self._gen("/sdapi/v1/img2img", {**body, **payload})

    def hires_payload(self, *, hr_scale: float = 2.0, hr_second_pass_steps: int = 0, denoising_strength: float = 0.5,
                      hr_upscaler: str = "Latent", **payload) -> dict[str, Any]:
        """A txt2img payload (the defaults, then ``payload``) with the hires fix on, in a form that
        works on both hosts. Forge's API needs two more fields: ``hr_additional_modules`` (without
        it Forge raises ``TypeError: argument of type 'NoneType' is not iterable``) and ``hr_cfg``
        (it defaults to 1.0 there, so the second pass would run at CFG 1 with no negative
        prompt): it gets the request's ``cfg_scale``."""
        body = {**self.TXT2IMG_DEFAULTS, **payload, "enable_hr": True, "hr_scale": hr_scale,
                "hr_second_pass_steps": hr_second_pass_steps, "denoising_strength": denoising_strength,
                "hr_upscaler": hr_upscaler}
        if self.host == "forge":
            body.setdefault("hr_additional_modules", ["Use same choices"])
            body.setdefault("hr_cfg", body["cfg_scale"])
        return body

    def txt2img_array(self, **payload):
        """txt2img and decode the first image to a uint8 HxWx3 array."""
        return self.decode(self.txt2img(**payload)["images"][0])

    @staticmethod
    def checkpoint(name: str) -> dict[str, Any]:
        """Payload fragment that switches the checkpoint for one request."""
        return {"override_settings": {"sd_model_checkpoint": name},
                "override_settings_restore_afterwards": True}

    @staticmethod
    def decode(b64: str):
        import numpy as np
        from PIL import Image
        if "," in b64[:64] and b64.startswith("data:"):
            b64 = b64.split(",", 1)[1]
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()

    def pixels(self, resp: dict[str, Any], index: int = 0):
        """Image `index` of a generation's response as an int16 HxWx3 array (safe to subtract)."""
        import numpy as np
        return self.decode(resp["images"][index]).astype(np.int16)

    @staticmethod
    def differs(a, b, threshold: float = 2.0) -> bool:
        """Whether two pictures differ by more than `threshold` grey levels on average."""
        import numpy as np
        return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean()) > threshold

    def mf_status(self) -> dict[str, Any]:
        """GET /magicfusion/v1/status."""
        r = self.get("/magicfusion/v1/status")
        assert r.status_code == 200, r.text
        return r.json()

    def mf_unload(self) -> dict[str, Any]:
        """POST /magicfusion/v1/unload."""
        r = self.post("/magicfusion/v1/unload", {})
        assert r.status_code == 200, r.text
        return r.json()

    def testbed(self, route: str, **params) -> dict[str, Any]:
        """GET /magicfusion-testbed/v1/<route> of the test bed's helper extension (main-weights,
        loaded-networks, rss, model, conditioning, nested); `params` become the query."""
        r = self.get(f"/magicfusion-testbed/v1/{route}", params=params)
        assert r.status_code == 200, f"GET {route} -> {r.status_code}: {r.text[:2000]}"
        return r.json()

    @staticmethod
    def nested(**fields) -> dict[str, Any]:
        """The ``alwayson_scripts`` entry that asks the test bed's script for a nested generation
        (see tests/webui/testbed_extension): ``{"MagicFusion testbed": {"args": [{"nested": fields}]}}``."""
        return {"MagicFusion testbed": {"args": [{"nested": fields}]}}

    @staticmethod
    def encode_png(arr) -> str:
        import numpy as np
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    @staticmethod
    def info(resp: dict[str, Any]) -> dict[str, Any]:
        return json.loads(resp["info"]) if isinstance(resp.get("info"), str) else resp.get("info", {})


@contextlib.contextmanager
def running(webui_dir: str, python: str, **kwargs):
    """A started ``WebUIServer(webui_dir, python, **kwargs)``, as a ``WebUIClient``; the server
    is stopped on exit, and also when it fails to start."""
    srv = WebUIServer(webui_dir, python, **kwargs)
    try:
        srv.start()
        yield WebUIClient(srv)
    finally:
        srv.stop()


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the WebUI test bed (A1111 or Forge) for sd-webui-magicfusion.")
    ap.add_argument("--host", default="a1111", choices=HOSTS, help="the WebUI host (default: a1111)")
    ap.add_argument("--fixtures", action="store_true", help="only build (or find) the fixtures and print their dir")
    ap.add_argument("--smoke", action="store_true", help="start, generate one image, stop")
    ap.add_argument("--no-extension", action="store_true", help="do not link this repo as an extension")
    ap.add_argument("--no-testbed", action="store_true",
                    help="leave out the test bed's helper extension (the SD2/SDXL fixtures then cannot load)")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--ui", action="store_true", help="serve the Gradio page too (still only on 127.0.0.1)")
    args = ap.parse_args(argv)
    try:
        webui_dir, python = find_install(args.host)
    except WebUINotFound as e:
        print(f"error: {e}\nBuild it with: {setup_command(args.host)}", file=sys.stderr)
        return 2
    if args.fixtures:
        print(ensure_fixtures(webui_dir, python, host=args.host))
        return 0
    srv = WebUIServer(webui_dir, python, extension=not args.no_extension, port=args.port, ui=args.ui,
                      testbed=not args.no_testbed, host=args.host)
    try:
        srv.start()
        if args.smoke:
            c = WebUIClient(srv)
            img = c.txt2img_array()
            print(f"[webui] first image {img.shape} after {c.first_image_s:.1f} s from launch")
            return 0
        print(f"[webui] serving at {srv.url}; fixtures in {srv.fixtures_dir}; Ctrl-C to stop")
        while srv.proc is not None and srv.proc.poll() is None:
            time.sleep(1)
        print(f"[webui] exited; log tail:\n{srv.log_tail()}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        srv.stop()


if __name__ == "__main__":
    sys.exit(main())
