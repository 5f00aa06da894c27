#!/usr/bin/env python3
"""Build the pinned WebUI installs that the WebUI test suite (tests/webui) runs on: AUTOMATIC1111
v1.10.1 (``--host a1111``, the default) and WebUI Forge (``--host forge``).

    python tests/webui/setup_webui.py               # build, or check and reuse, ~/stable-diffusion-webui
    python tests/webui/setup_webui.py --host forge  # the same for Forge at ~/stable-diffusion-webui-forge
    python tests/webui/setup_webui.py --check [--host forge]   # report what is missing or wrong; change nothing
    python tests/webui/setup_webui.py --list-sources [--host forge]
    python tests/webui/setup_webui.py --source webui=/path/to/stable-diffusion-webui.git --source clip=/path/to/CLIP

It does what the WebUI's own launcher does on a first start (``modules/launch_utils.py``:
``prepare_environment``), but pinned and able to run offline:

1. **Sources.** A1111: the WebUI at v1.10.1 (82a973c04367123ae98bd9abdf80d9eda9b910e2) at ``--dir``
   and the five ``repositories/`` its launcher pins. Forge: Forge at dfdcbab685e57677014f05a3309b48cc87383167
   and its three ``repositories/`` (the assets, huggingface_guess, BLIP). Both: openai/CLIP
   (installed into the venv as the package ``clip``). Each comes from its public git URL at the
   pinned commit, or from a local copy: ``--source NAME=PATH`` (repeatable) or
   ``$MAGICFUSION_SRC_<NAME>``. A local copy is a git repository (normal or bare; it may lack some
   large blobs, which are skipped with a note) or a plain directory holding the source tree
   (verified by content, see ``Source.fingerprints``). A source at another commit is refused.
2. **The venv** ``<dir>/venv`` (Python 3.11): pip, then torch and torchvision FIRST as a
   matching pair, then the WebUI's ``requirements_versions.txt`` without its ``torch`` and
   ``setuptools==`` lines plus ``setuptools>=77.0.3,<81`` (A1111: and pytest, requests; Forge:
   and joblib), all under constraints that pin torch/torchvision and every transitive dependency
   (``tests/webui/constraints-<host>.txt``), then CLIP with ``--no-deps --no-build-isolation``.
3. **Chromium** for the browser tests (A1111 only; Debian's ``chromium`` package, through apt-get
   when root or with password-less sudo). ``--no-browser`` skips it.

A second run checks what is there and reuses it (a few seconds): the install records what was
done in ``<dir>/magicfusion-setup.json`` (the host, the source commits and a hash of the
requirement inputs). An install made by hand (or by an earlier tool) that matches every pin is
adopted as it is. Nothing of the hosts' code is ever committed to this repository: the script
fetches or copies it.

Only the Python standard library is used; any Python >= 3.9 runs this file. The venv itself is
built with the Python 3.11 given by ``--python`` (default: ``python3.11`` on PATH).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))

ENV_DIR = "MAGICFUSION_WEBUI_DIR"
ENV_SRC_PREFIX = "MAGICFUSION_SRC_"
ENV_CHROMIUM = "MAGICFUSION_CHROMIUM"
DEFAULT_DIR = "~/stable-diffusion-webui"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
STATE_FILE = "magicfusion-setup.json"
STATE_FORMAT = 1
SCRIPT = "tests/webui/setup_webui.py"


# --------------------------------------------------------------------------- host specs (data)

@dataclasses.dataclass(frozen=True)
class Source:
    """One pinned source tree of a host.

    ``target`` is where the tree goes, relative to the install (``"."`` is the install
    itself), or ``None`` for a source that is pip-installed into the venv (``pip_package``).

    ``fingerprints`` maps a few identifying files to their **git blob SHA-1 at the pinned
    commit** (``git rev-parse <commit>:<path>``, i.e. SHA-1 of ``b"blob <size>\\0" + content``).
    A git repository proves its commit by itself; a plain directory (an unpacked archive, a
    copy without ``.git``) has no commit, so it is accepted only when these files hash to the
    recorded blobs. They are chosen among the files the last commits before the pin touched
    (so a neighbouring commit differs) plus a file that defines the package. The same hashes
    check a written tree on every rerun and in ``--check``.
    """

    name: str
    url: str
    commit: str
    target: str | None
    fingerprints: dict
    pip_package: str | None = None
    title: str = ""

    @property
    def env(self) -> str:
        return ENV_SRC_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", self.name).upper()


@dataclasses.dataclass(frozen=True)
class Host:
    """Everything that differs between WebUI hosts: sources, pins and requirement fixes."""

    name: str
    title: str
    python: str                      # the venv's Python, major.minor
    sources: tuple                   # Source, the WebUI itself first (target ".")
    torch: tuple                     # installed first, as a pair, and pinned for every later step
    requirements_file: str           # the host's own requirements, relative to the install
    drop_requirements: tuple         # names whose lines are removed from it
    extra_requirements: tuple        # added to the requirements step
    constraints_file: str            # the shipped freeze of a working venv, relative to this dir
    import_check: str                # run in the venv after an install
    torch_note: str = ""
    default_dir: str = "~/stable-diffusion-webui"  # the install when neither --dir nor env_dir is given
    env_dir: str = "MAGICFUSION_WEBUI_DIR"        # the variable that names the install
    browser: bool = True             # whether the host's tests need Chromium (the browser tests: A1111 only)

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


A1111 = Host(
    name="a1111",
    title="AUTOMATIC1111 stable-diffusion-webui v1.10.1",
    python="3.11",
    sources=(
        Source("webui", "https://github.com/AUTOMATIC1111/stable-diffusion-webui.git",
               "82a973c04367123ae98bd9abdf80d9eda9b910e2", ".", {
                   "CHANGELOG.md": "5f7e59351cba4e39ac894fa1887345e77f4fb787",
                   "modules/upscaler_utils.py": "a8408f05bcaaf094662739cce9763cb99672d982",
                   "modules/launch_utils.py": "20c7dc127a7ed96b73458215989f94c23542f9b8",
                   "requirements_versions.txt": "0306ce94fdadbe041dbe04344a71b28f44b0ba03",
               }, title="AUTOMATIC1111/stable-diffusion-webui v1.10.1"),
        # The five repositories/ that modules/launch_utils.py pins (ASSETS_COMMIT_HASH,
        # STABLE_DIFFUSION_COMMIT_HASH, STABLE_DIFFUSION_XL_COMMIT_HASH, K_DIFFUSION_COMMIT_HASH,
        # BLIP_COMMIT_HASH), in the directories its repo_dir() names.
        Source("assets", "https://github.com/AUTOMATIC1111/stable-diffusion-webui-assets.git",
               "6f7db241d2f8ba7457bac5ca9753331f0c266917", "repositories/stable-diffusion-webui-assets", {
                   "css/sourcesanspro.css": "c73c819f939f626496d0ec87b1c79a201c7758a0",
                   "fonts/sourcesanspro/6xK3dSBYKcSV-LCoeQqfX1RYOo3qN67lqDY.woff2":
                       "f991527767e933204394c20c8640117495719887",
               }, title="AUTOMATIC1111/stable-diffusion-webui-assets"),
        Source("stablediffusion", "https://github.com/Stability-AI/stablediffusion.git",
               "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf", "repositories/stable-diffusion-stability-ai", {
                   "modelcard.md": "4b6190921e063f60e8089490d172e6ce8714a752",
                   "setup.py": "00f5b4d874f0f19ece54fac2dd50b39774b86c5b",
                   "ldm/util.py": "9ede259d5e7876912724582cc06a71916f6f9b62",
               }, title="Stability-AI/stablediffusion"),
        Source("generative-models", "https://github.com/Stability-AI/generative-models.git",
               "45c443b316737a4ab6e40413d7794a7f5657c19f", "repositories/generative-models", {
                   "pyproject.toml": "2cc5021682b58914f28e686eb8d2904a4f3e636e",
                   "README.md": "8d7ddfb1a1a28a64d31c8f49ad9c004f1118ba99",
                   "sgm/inference/api.py": "12efc064ce1ebd746fa1c1a5c7cc86bca0f33ec3",
               }, title="Stability-AI/generative-models"),
        Source("k-diffusion", "https://github.com/crowsonkb/k-diffusion.git",
               "ab527a9a6d347f364e3d185ba6d714e22d80cb3c", "repositories/k-diffusion", {
                   "setup.cfg": "5196e336ca20773b648baa15513f494bbae608a8",
                   "k_diffusion/layers.py": "c7ce979192c72839fe133edce910435d82e57c79",
                   "k_diffusion/sampling.py": "9f10e8d874eba2b8a0dc2537851a9b28ef65b579",
               }, title="crowsonkb/k-diffusion"),
        Source("blip", "https://github.com/salesforce/BLIP.git",
               "48211a1594f1321b00f14c9f7a5b4813144b2fb9", "repositories/BLIP", {
                   "README.md": "7a86ebfc21536b97fde1789f0c9ec4a53d2bdd77",
                   "models/blip.py": "38678f65ea2c276b351c2c97d429ebc2525ddcf7",
               }, title="salesforce/BLIP"),
        # CLIP_PACKAGE in launch_utils.py: the archive of this commit, pip-installed as `clip`.
        Source("clip", "https://github.com/openai/CLIP.git",
               "d50d76daa670286dd6cacf3bcd80b5e4823fc8e1", None, {
                   "clip/model.py": "232b7792eb97440642547bd462cf128df9243933",
                   "clip/clip.py": "257511e1d40c120e0d64a0f1562d44b2b8a40a17",
                   "setup.py": "c9ea7d0d2f3d2fcf66d6f6e2aa0eb1a97a524bb6",
               }, pip_package="clip", title="openai/CLIP"),
    ),
    # On x86_64 Linux PyPI's torch 2.14.1 is a CUDA build (its nvidia-* wheels make the venv
    # about 6 GB). There is no CPU build of a matching pair on PyPI that imports together with
    # torchvision, so the test bed uses this pair on CPU (--use-cpu all).
    torch=("torch==2.14.1", "torchvision==0.29.1"),
    torch_note="on x86_64 Linux this is PyPI's CUDA build: about 6 GB in the venv (it runs on the CPU too)",
    requirements_file="requirements_versions.txt",
    # torch: installed first as a pair instead. setuptools==69.5.1: recent torch needs >= 77.0.3.
    drop_requirements=("torch", "setuptools"),
    # setuptools < 81: lightning_fabric and clip import pkg_resources, which setuptools 81 removed.
    extra_requirements=("setuptools>=77.0.3,<81", "pytest", "requests"),
    constraints_file="constraints-a1111.txt",
    import_check=("import torch, torchvision, clip, open_clip, gradio, pkg_resources, pytorch_lightning, transformers; "
                  "print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'gradio', gradio.__version__)"),
)

# WebUI Forge (lllyasviel/stable-diffusion-webui-forge, "2.0.1v1.10.1", gradio 4). Its launcher
# (modules/launch_utils.py, prepare_environment) clones three repositories/ (the A1111 assets,
# huggingface_guess and BLIP, at the commits below; k-diffusion is vendored and the Stability
# repositories are gone), pip-installs openai/CLIP at the same commit as A1111's and its
# requirements_versions.txt. huggingface_guess is not pip-installed: modules/paths.py puts
# repositories/huggingface_guess on sys.path.
FORGE = Host(
    name="forge",
    title="WebUI Forge (lllyasviel/stable-diffusion-webui-forge 2.0.1v1.10.1)",
    python="3.11",
    sources=(
        Source("forge", "https://github.com/lllyasviel/stable-diffusion-webui-forge.git",
               "dfdcbab685e57677014f05a3309b48cc87383167", ".", {
                   "modules_forge/forge_version.py": "17c8a29f5c147f6a1617c14d8213cf0b74993fe3",
                   "modules/launch_utils.py": "420d9b19eeb3046d540e58e2008fb733a233db17",
                   "requirements_versions.txt": "3e5f3962feed24d487e8db403f625b2fe7e546bb",
                   "scripts/sd_upscale.py": "64e34cd96b65b752003e000b2d38700e0de79285",
                   "backend/operations.py": "7760756ad11e2f9db0b10e93de256b0032332d5c",
               }, title="lllyasviel/stable-diffusion-webui-forge"),
        A1111.source("assets"),
        Source("huggingface-guess", "https://github.com/lllyasviel/huggingface_guess.git",
               "84826248b49bb7ca754c73293299c4d4e23a548d", "repositories/huggingface_guess", {
                   "huggingface_guess/model_list.py": "cca4b1ca911db7fce63bae466050991429837e42",
                   "huggingface_guess/__init__.py": "492841f2e33c89cc233bc2697c23dcb26cd99701",
                   "huggingface_guess/detection.py": "d62f3dcf5ca48d3039cfc43909e8ac315ef48848",
               }, title="lllyasviel/huggingface_guess"),
        A1111.source("blip"),
        A1111.source("clip"),
    ),
    # The same pair as A1111's (Forge's launcher would install torch 2.3.1 from the cu121 index,
    # which has no wheel for this Python on PyPI); Forge runs on it with --always-cpu.
    torch=A1111.torch,
    torch_note=A1111.torch_note,
    requirements_file="requirements_versions.txt",
    drop_requirements=("torch", "setuptools"),
    # setuptools: as for A1111. joblib: the built-in soft-inpainting extension imports it and the
    # requirements do not list it (without it that extension fails to load at every start).
    extra_requirements=("setuptools>=77.0.3,<81", "joblib"),
    constraints_file="constraints-forge.txt",
    import_check=("import torch, torchvision, clip, open_clip, gradio, pkg_resources, transformers, diffusers, joblib; "
                  "print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'gradio', gradio.__version__)"),
    default_dir="~/stable-diffusion-webui-forge",
    env_dir="MAGICFUSION_FORGE_DIR",
    browser=False,
)

HOSTS = {"a1111": A1111, "forge": FORGE}


# --------------------------------------------------------------------------- errors and output

class SetupError(Exception):
    """A problem the user must fix; the message says what and how."""


class Log:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stdout

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(f"[setup] {msg}", file=self.stream, flush=True)

    def note(self, msg: str) -> None:  # shown even with --quiet
        print(f"[setup] note: {msg}", file=self.stream, flush=True)


# --------------------------------------------------------------------------- git

def blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_blob_sha1(path: str) -> str | None:
    if os.path.islink(path):
        return blob_sha1(os.fsencode(os.readlink(path)))
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return blob_sha1(f.read())


def _git_env(path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                        "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CEILING_DIRECTORIES")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    if path is not None:  # look at `path` itself only, never at a repository above it
        env["GIT_CEILING_DIRECTORIES"] = os.path.dirname(os.path.realpath(path))
    return env


def git(path: str, *args: str, check: bool = True, binary: bool = False):
    """``git -C path args`` (read-only safe: any owner), returning stdout (str, or bytes)."""
    if shutil.which("git") is None:
        raise SetupError("git is not installed (it is needed to read git sources)")
    cmd = ["git", "-c", "safe.directory=*", "-C", path, *args]
    r = subprocess.run(cmd, env=_git_env(path), capture_output=True, check=False)
    if check and r.returncode != 0:
        raise SetupError(f"`git {' '.join(args)}` in {path} failed: {r.stderr.decode(errors='replace').strip()}")
    if r.returncode != 0:
        return None
    return r.stdout if binary else r.stdout.decode(errors="replace").strip()


def is_git_repo(path: str) -> bool:
    """True when ``path`` itself is a git repository: a work tree with ``.git``, or a bare one."""
    if not os.path.isdir(path) or shutil.which("git") is None:
        return False
    if not (os.path.exists(os.path.join(path, ".git"))
            or (os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects")))):
        return False
    return git(path, "rev-parse", "--git-dir", check=False) is not None


def git_has_commit(path: str, commit: str) -> bool:
    return git(path, "cat-file", "-e", f"{commit}^{{commit}}", check=False) is not None


def git_head(path: str) -> str:
    return git(path, "rev-parse", "--verify", "-q", "HEAD", check=False) or "no HEAD"


def write_git_tree(repo: str, commit: str, dest: str, log: Log) -> list:
    """Write the tree of ``commit`` from the repository ``repo`` into ``dest``.

    Uses ``git ls-tree -r`` and ``git cat-file --batch`` rather than ``git archive`` or a
    checkout, since those abort on the first missing blob and a snapshot may lack some
    (large files). A missing blob is skipped with a note; submodules are skipped too.
    Returns the skipped paths."""
    listing = git(repo, "ls-tree", "-r", "-z", "--full-tree", commit, binary=True)
    entries = []
    for rec in listing.split(b"\0"):
        if not rec:
            continue
        meta, path = rec.split(b"\t", 1)
        mode, kind, sha = meta.decode().split()
        entries.append((mode, kind, sha, os.fsdecode(path)))
    skipped = []
    os.makedirs(dest, exist_ok=True)
    dest_real = os.path.realpath(dest)
    proc = subprocess.Popen(["git", "-c", "safe.directory=*", "-C", repo, "cat-file", "--batch"],
                            env=_git_env(repo), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for mode, kind, sha, rel in entries:
            out = os.path.join(dest_real, rel)
            if os.path.isabs(rel) or not os.path.normpath(out).startswith(dest_real + os.sep):
                raise SetupError(f"refusing the path {rel!r} in {repo} at {commit}")
            if kind == "commit":  # a submodule: the launcher does not fetch them either
                log.note(f"skipped submodule {rel}")
                skipped.append(rel)
                continue
            proc.stdin.write(sha.encode() + b"\n")
            proc.stdin.flush()
            header = proc.stdout.readline().decode().split()
            if len(header) == 2 and header[1] == "missing":
                log.note(f"skipped {rel}: its blob {sha[:12]} is not in {repo} (a snapshot without large files?)")
                skipped.append(rel)
                continue
            size = int(header[2])
            data = proc.stdout.read(size)
            proc.stdout.read(1)  # the newline after the content
            os.makedirs(os.path.dirname(out), exist_ok=True)
            if os.path.lexists(out):
                os.unlink(out)
            if mode == "120000":
                os.symlink(os.fsdecode(data), out)
                continue
            with open(out, "wb") as f:
                f.write(data)
            os.chmod(out, 0o755 if mode == "100755" else 0o644)
    finally:
        proc.stdin.close()
        proc.wait()
    return skipped


# --------------------------------------------------------------------------- where a source comes from

@dataclasses.dataclass
class Origin:
    kind: str     # "url", "git" (a local repository) or "dir" (a plain directory)
    where: str    # URL or absolute path
    given_by: str  # "--source", "$MAGICFUSION_SRC_X" or "default"

    def __str__(self) -> str:
        what = {"url": "git URL", "git": "git repository", "dir": "plain directory"}[self.kind]
        return f"{what} {self.where} ({self.given_by})"


def _looks_like_url(value: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*://", value)) or bool(re.match(r"^[\w.-]+@[\w.-]+:", value))


def parse_source_flags(values: list, host: Host) -> dict:
    out = {}
    names = [s.name for s in host.sources]
    for v in values or ():
        name, sep, where = v.partition("=")
        if not sep or not where:
            raise SetupError(f"--source {v!r}: expected NAME=PATH or NAME=URL (names: {', '.join(names)})")
        if name not in names:
            raise SetupError(f"--source {v!r}: no source named {name!r} for {host.name} (names: {', '.join(names)})")
        out[name] = where
    return out


def resolve_origin(source: Source, flags: dict, environ=None) -> Origin:
    environ = os.environ if environ is None else environ
    if source.name in flags:
        value, given_by = flags[source.name], "--source"
    elif environ.get(source.env):
        value, given_by = environ[source.env], f"${source.env}"
    else:
        return Origin("url", source.url, "default")
    if _looks_like_url(value):
        return Origin("url", value, given_by)
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.exists(path):
        raise SetupError(f"source {source.name}: {path} (from {given_by}) does not exist")
    if not os.path.isdir(path):
        raise SetupError(f"source {source.name}: {path} (from {given_by}) is not a directory")
    return Origin("git" if is_git_repo(path) else "dir", path, given_by)


def check_fingerprints(source: Source, root: str) -> list:
    """The fingerprint files under ``root`` that do not hash to the pinned blobs."""
    bad = []
    for rel, want in sorted(source.fingerprints.items()):
        got = file_blob_sha1(os.path.join(root, rel))
        if got != want:
            bad.append(f"{rel}: {'missing' if got is None else 'blob ' + got}, expected blob {want}")
    return bad


class Provider:
    """A verified source: ``write(dest)`` puts its tree at ``dest`` and returns skipped paths."""

    def __init__(self, source: Source, origin: Origin, repo: str | None = None):
        self.source, self.origin, self.repo = source, origin, repo

    def write(self, dest: str, log: Log) -> list:
        if self.origin.kind == "dir":
            _copy_plain_tree(self.origin.where, dest)
            return []
        return write_git_tree(self.repo, self.source.commit, dest, log)


_PLAIN_COPY_SKIP = {".git", "venv", "repositories", "__pycache__", STATE_FILE}


def _copy_plain_tree(src: str, dest: str) -> None:
    def ignore(d, names):
        return [n for n in names if n in _PLAIN_COPY_SKIP] if os.path.samefile(d, src) else \
            [n for n in names if n == "__pycache__"]
    shutil.copytree(src, dest, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "sd-webui-magicfusion", "sources")


def open_source(source: Source, origin: Origin, cache_dir: str | None, log: Log) -> Provider:
    """Verify that ``origin`` holds ``source`` at its pinned commit; raise SetupError if not."""
    if origin.kind == "dir":
        bad = check_fingerprints(source, origin.where)
        if bad:
            raise SetupError(
                f"source {source.name}: {origin} is not {source.title or source.name} at the pinned commit "
                f"{source.commit}: it is a plain directory (no git), so it was checked by content, and "
                f"found a different tree: " + "; ".join(bad))
        return Provider(source, origin)
    if origin.kind == "git":
        repo = origin.where
    else:
        repo = _fetch_url(source, origin, cache_dir or _default_cache_dir(), log)
    if not git_has_commit(repo, source.commit):
        found = git_head(repo)
        raise SetupError(
            f"source {source.name}: {origin} does not hold the pinned commit: expected {source.commit}, "
            f"found {found} (HEAD){'' if origin.kind == 'git' else ' after fetching'}. Give a copy of "
            f"{source.title or source.name} that contains {source.commit}.")
    head = git_head(repo)
    if origin.kind == "git" and head != source.commit:
        log.info(f"  {source.name}: {origin.where} has HEAD {head[:12]}; using the pinned commit {source.commit[:12]} in it")
    return Provider(source, origin, repo)


def _fetch_url(source: Source, origin: Origin, cache_dir: str, log: Log) -> str:
    """A bare cache repository holding ``source.commit`` fetched from the URL."""
    repo = os.path.join(cache_dir, re.sub(r"[^A-Za-z0-9._-]", "_", source.name) + ".git")
    if not os.path.isdir(repo):
        os.makedirs(cache_dir, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", repo], check=True, env=_git_env())
    if git_has_commit(repo, source.commit):
        return repo
    log.info(f"  fetching {source.name} {source.commit[:12]} from {origin.where} ...")
    attempts = (["fetch", "-q", "--depth", "1", "--no-tags", origin.where, source.commit],
                ["fetch", "-q", "--no-tags", origin.where, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"])
    errors = []
    for args in attempts:
        r = subprocess.run(["git", "-C", repo, *args], env=_git_env(repo), capture_output=True, text=True, check=False)
        if r.returncode == 0 and git_has_commit(repo, source.commit):
            return repo
        why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "the commit was not in what it got"
        if why not in errors:
            errors.append(why)
    raise SetupError(f"source {source.name}: could not fetch {source.commit} from {origin.where} ("
                     + " | ".join(errors) + f"). Offline, give a local copy: --source {source.name}=PATH or ${source.env}.")


# --------------------------------------------------------------------------- state

def state_path(install: str) -> str:
    return os.path.join(install, STATE_FILE)


def load_state(install: str) -> dict:
    try:
        with open(state_path(install), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else {}


def save_state(install: str, state: dict) -> None:
    state["format"] = STATE_FORMAT
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = state_path(install) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, state_path(install))


# --------------------------------------------------------------------------- the source trees

@dataclasses.dataclass
class Status:
    ok: bool
    what: str          # one line for the report
    replaceable: bool = True  # a wrong tree that we wrote (or that --force may replace)


def inspect_tree(install: str, source: Source, state: dict) -> Status:
    """Is ``source``'s tree in place at its pinned commit? Never changes anything."""
    target = os.path.normpath(os.path.join(install, source.target))
    rec = state.get("sources", {}).get(source.name)
    ours = bool(rec)
    if rec and not rec.get("complete"):
        return Status(False, f"{source.name}: {target} was being written when a run stopped (incomplete)")
    present = os.path.isdir(target) and (source.target != "." or any(
        os.path.lexists(os.path.join(target, f)) for f in source.fingerprints))
    if not present:
        if source.target == "." and not ours and os.path.isdir(target) and set(os.listdir(target)) - {STATE_FILE}:
            return Status(False, f"{source.name}: {target} is not empty and holds no WebUI", replaceable=False)
        return Status(False, f"{source.name}: missing ({target})")
    if rec and rec.get("commit") != source.commit:
        return Status(False, f"{source.name}: {target} is at {rec.get('commit')}, expected {source.commit}")
    if not ours and os.path.exists(os.path.join(target, ".git")) and is_git_repo(target):
        head = git_head(target)
        if head != source.commit:
            return Status(False, f"{source.name}: {target} is a git checkout at {head}, expected {source.commit}",
                          replaceable=ours)
    bad = check_fingerprints(source, target)
    if bad:
        return Status(False, f"{source.name}: {target} differs from {source.commit}: " + "; ".join(bad),
                      replaceable=ours)
    how = "" if ours else " (found in place; not written by this script)"
    return Status(True, f"{source.name}: {source.commit[:12]} at {target}{how}")


def install_tree(install: str, provider: Provider, state: dict, log: Log) -> None:
    source = provider.source
    target = os.path.normpath(os.path.join(install, source.target))
    sources = state.setdefault("sources", {})
    sources[source.name] = {"commit": source.commit, "target": source.target, "complete": False,
                            "origin": str(provider.origin)}
    os.makedirs(install, exist_ok=True)
    save_state(install, state)
    if source.target == ".":  # the install itself (it holds venv/ and repositories/ too): write in place
        skipped = provider.write(target, log)
    else:
        tmp = target + ".setup-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        skipped = provider.write(tmp, log)
        if os.path.lexists(target):
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(tmp, target)
    bad = check_fingerprints(source, target)
    if bad:
        raise SetupError(f"source {source.name}: the tree written from {provider.origin} does not match "
                         f"the fingerprints recorded for {source.commit}: " + "; ".join(bad))
    sources[source.name].update(complete=True, skipped=skipped)
    save_state(install, state)


# --------------------------------------------------------------------------- the venv

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def filtered_requirements(text: str, drop) -> str:
    """The host's requirements file without the lines for ``drop`` (and without comments)."""
    drop = {_norm(d) for d in drop}
    keep = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _REQ_NAME.match(line)
        if m and _norm(m.group(1)) in drop:
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def _version_key(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:4])


def _same_version(a: str, b: str) -> bool:
    """PEP 440 equality for the usual cases: 0.15 == 0.15.0; a local label (+cu130) is ignored
    unless both sides have one."""
    if "+" not in b:
        a = a.split("+")[0]
    if re.fullmatch(r"\d+(\.\d+)*", a) and re.fullmatch(r"\d+(\.\d+)*", b):
        x, y = [int(n) for n in a.split(".")], [int(n) for n in b.split(".")]
        width = max(len(x), len(y))
        return x + [0] * (width - len(x)) == y + [0] * (width - len(y))
    return a.lower() == b.lower()


def version_matches(version: str, spec: str) -> bool:
    """A small subset of PEP 440 specifiers: comma-separated ==, !=, >=, <=, >, < (== may end in .*)."""
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.match(r"(==|!=|>=|<=|>|<)\s*(\S+)$", part)
        if not m:
            return False
        op, want = m.groups()
        if op in ("==", "!="):
            if want.endswith(".*"):
                eq = (version + ".").startswith(want[:-1])
            else:
                eq = _same_version(version, want)
            if eq != (op == "=="):
                return False
            continue
        a, b = _version_key(version), _version_key(want)
        if not {">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b}[op]:
            return False
    return True


def parse_pins(text: str) -> dict:
    """``{normalised name: specifier}`` of the requirement lines in ``text`` (no URLs, no markers)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-") or "@" in line:
            continue
        line = line.split(";", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*)$", line)
        if m:
            out[_norm(m.group(1))] = m.group(3).strip()
    return out


def venv_python(install: str) -> str:
    return os.path.join(install, "venv", "bin", "python")


_LIST_DISTS = ("import json, sys, importlib.metadata as m; "
               "print(json.dumps({'python': '%d.%d.%d' % sys.version_info[:3], "
               "'dists': {d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}}))")


def venv_contents(py: str) -> dict | None:
    """The venv's Python version and installed distributions, or None if it does not run."""
    if not os.path.exists(py):
        return None
    try:
        r = subprocess.run([py, "-I", "-c", _LIST_DISTS], capture_output=True,
                           text=True, check=False, timeout=120)
        data = json.loads(r.stdout) if r.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if data:
        data["dists"] = {_norm(k): v for k, v in data["dists"].items()}
    return data


@dataclasses.dataclass
class VenvPlan:
    requirements: str   # the filtered host requirements + extras
    pins: str           # torch pair constraints
    constraints: str    # the shipped freeze ('' if none)
    constraints_path: str | None
    inputs: str         # sha256 over everything above and the pinned CLIP commit


def venv_plan(host: Host, install: str, constraints_path: str | None) -> VenvPlan:
    req_file = os.path.join(install, host.requirements_file)
    try:
        with open(req_file, encoding="utf-8") as f:
            reqs = filtered_requirements(f.read(), host.drop_requirements)
    except OSError as e:
        raise SetupError(f"cannot read {req_file} ({e}); the WebUI tree is not in place") from e
    reqs += "".join(r + "\n" for r in host.extra_requirements)
    pins = "".join(t + "\n" for t in host.torch)
    constraints = ""
    if constraints_path and os.path.isfile(constraints_path):
        with open(constraints_path, encoding="utf-8") as f:
            constraints = f.read()
    else:
        constraints_path = None
    clip = [s.commit for s in host.sources if s.pip_package]
    pinned = sorted(parse_pins(constraints).items())  # the pins, not the comments
    h = hashlib.sha256(json.dumps([host.python, reqs, pins, pinned, clip]).encode()).hexdigest()
    return VenvPlan(reqs, pins, constraints, constraints_path, h)


def venv_problems(host: Host, plan: VenvPlan, contents: dict | None, state: dict) -> list:
    """What is missing or wrong in the venv (empty: it matches the plan)."""
    if contents is None:
        return ["venv: missing or its Python does not run"]
    problems = []
    if not contents["python"].startswith(host.python + "."):
        problems.append(f"venv: Python {contents['python']}, expected {host.python}")
    dists = contents["dists"]
    want = {}
    for text in (plan.requirements, plan.pins):
        want.update(parse_pins(text))
    for name, spec in sorted(want.items()):
        have = dists.get(name)
        if have is None:
            problems.append(f"venv: {name} is not installed")
        elif spec and not version_matches(have, spec):
            problems.append(f"venv: {name} {have} installed, expected {spec}")
    for name, spec in sorted(parse_pins(plan.constraints).items()):
        have = dists.get(name)
        if have is not None and name not in want and spec and not version_matches(have, spec):
            problems.append(f"venv: {name} {have} installed, the constraints file pins {spec}")
    for s in host.sources:
        if s.pip_package:
            if _norm(s.pip_package) not in dists:
                problems.append(f"venv: {s.pip_package} ({s.name} {s.commit[:12]}) is not installed")
            elif state.get("venv", {}).get("pip_sources", {}).get(s.name, s.commit) != s.commit:
                problems.append(f"venv: {s.pip_package} was installed from another commit of {s.name}")
    return problems


def _run(cmd: list, log: Log, what: str, env: dict | None = None) -> None:
    log.info(f"  $ {' '.join(cmd)}")
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL if log.quiet else None)
    if r.returncode != 0:
        raise SetupError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}")
    log.info(f"  {what}: {time.monotonic() - t0:.1f} s")


def find_python(host: Host, given: str | None) -> str:
    cands = [given] if given else [f"python{host.python}", sys.executable]
    for c in cands:
        path = shutil.which(c) if c and os.sep not in c else c
        if not path or not os.path.exists(path):
            continue
        r = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           stdout=subprocess.PIPE, text=True, check=False)
        if r.returncode == 0 and r.stdout.strip() == host.python:
            return path
        if given:
            raise SetupError(f"--python {given} is Python {r.stdout.strip() or '?'}, the venv needs {host.python}")
    raise SetupError(f"no Python {host.python} found (tried python{host.python} on PATH and {sys.executable}); "
                     f"install it or pass --python")


def build_venv(host: Host, install: str, plan: VenvPlan, providers: dict, python: str | None,
               state: dict, log: Log, force: bool) -> None:
    venv_dir = os.path.join(install, "venv")
    py = venv_python(install)
    contents = venv_contents(py)
    if os.path.exists(venv_dir) and (contents is None or not contents["python"].startswith(host.python + ".")):
        if not force:
            found = "does not run" if contents is None else f"is Python {contents['python']}"
            raise SetupError(f"{venv_dir} exists but {found}; remove it or pass --force to rebuild it")
        log.info(f"  removing {venv_dir} (--force)")
        shutil.rmtree(venv_dir)
    if not os.path.exists(py):
        base = find_python(host, python)
        _run([base, "-m", "venv", venv_dir], log, "create the venv")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    with tempfile.TemporaryDirectory(prefix="magicfusion-setup-") as tmp:
        pins_file = os.path.join(tmp, "torch-pins.txt")
        req_file = os.path.join(tmp, "requirements.txt")
        with open(pins_file, "w") as f:
            f.write(plan.pins)
        with open(req_file, "w") as f:
            f.write(plan.requirements)
        cons = ["-c", pins_file] + (["-c", plan.constraints_path] if plan.constraints_path else [])
        if not plan.constraints_path:
            log.note(f"no constraints file ({host.constraints_file}); the transitive dependencies are not pinned")
        pip = [py, "-m", "pip", "install", "--progress-bar", "off"] + (["-q"] if log.quiet else [])
        _run(pip + ["--upgrade", "pip", *cons], log, "pip", env)
        log.info(f"  torch pair first: {' '.join(host.torch)} ({host.torch_note})")
        _run(pip + [*host.torch, *cons], log, "torch and torchvision", env)
        _run(pip + ["-r", req_file, *cons], log, f"{host.requirements_file} and the extras", env)
        installed = venv_contents(py) or {"dists": {}}
        pip_sources = state.setdefault("venv", {}).get("pip_sources", {})
        for name, provider in providers.items():
            s = provider.source
            if _norm(s.pip_package) in installed["dists"] and pip_sources.get(name) == s.commit:
                continue
            tree = os.path.join(tmp, name)
            provider.write(tree, log)
            # --no-build-isolation: its setup.py imports pkg_resources, which an isolated build
            # (with the newest setuptools) no longer has. --no-deps: its deps are already in.
            _run(pip + ["--no-deps", "--no-build-isolation", "--force-reinstall", tree], log,
                 f"{s.pip_package} from {s.name} {s.commit[:12]}", env)
            pip_sources[name] = s.commit
    _run([py, "-c", host.import_check], log, "import check", env)
    state["venv"] = {"python": (venv_contents(py) or {}).get("python"), "inputs": plan.inputs,
                     "constraints": host.constraints_file if plan.constraints_path else None,
                     "pip_sources": pip_sources}
    save_state(install, state)


def write_constraints(install: str, path: str, host: Host, log: Log) -> None:
    """Write the venv's ``pip freeze --all`` (without pip-installed sources) to ``path``."""
    py = venv_python(install)
    r = subprocess.run([py, "-m", "pip", "freeze", "--all"], stdout=subprocess.PIPE, text=True, check=True)
    local = {_norm(s.pip_package) for s in host.sources if s.pip_package}
    lines = [ln for ln in r.stdout.splitlines()
             if ln and not ln.startswith(("-e", "#")) and " @ " not in ln
             and _norm(ln.split("==")[0]) not in local]
    contents = venv_contents(py) or {}
    header = [
        f"# Constraints for the {host.title} test install (tests/webui/setup_webui.py --host {host.name}).",
        f"# `pip freeze --all` of a working venv: Python {contents.get('python')}, {platform.system()} {platform.machine()}.",
        f"# Regenerate: python tests/webui/setup_webui.py{'' if host is A1111 else ' --host ' + host.name} "
        "--write-constraints (after changing the host spec).",
        f"# {', '.join(s.pip_package for s in host.sources if s.pip_package)} comes from its pinned source tree, not from here.",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header + sorted(lines, key=str.lower)) + "\n")
    log.info(f"wrote {len(lines)} pins to {path}")


# --------------------------------------------------------------------------- Chromium

def chromium_path() -> str:
    return os.environ.get(ENV_CHROMIUM) or DEFAULT_CHROMIUM


def chromium_present() -> bool:
    p = chromium_path()
    return os.path.isfile(p) and os.access(p, os.X_OK)


def install_chromium(log: Log) -> None:
    if chromium_present():
        log.info(f"chromium: {chromium_path()}")
        return
    if os.environ.get(ENV_CHROMIUM):
        log.note(f"${ENV_CHROMIUM} is {chromium_path()}, which is not an executable; the browser tests will skip")
        return
    if shutil.which("apt-get") is None:
        log.note("no Chromium at /usr/bin/chromium and no apt-get: install Chromium yourself and set "
                 f"${ENV_CHROMIUM}; the browser tests skip until then")
        return
    if os.geteuid() == 0:
        sudo = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, check=False).returncode == 0:
        sudo = ["sudo", "-n"]
    else:
        log.note("Chromium is missing and this user cannot run apt-get (not root, no password-less sudo): "
                 "run `apt-get install chromium` as root; the browser tests skip until then")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("chromium: installing Debian's chromium package (apt-get) ...")
    t0 = time.monotonic()
    for cmd in (sudo + ["apt-get", "update", "-qq"],
                sudo + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        r = subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL if log.quiet else None)
        if r.returncode != 0:
            log.note(f"`{' '.join(cmd)}` failed (exit {r.returncode}); the browser tests will skip "
                     f"(install Chromium and set ${ENV_CHROMIUM} if it is not at {DEFAULT_CHROMIUM})")
            return
    if chromium_present():
        log.info(f"chromium: installed in {time.monotonic() - t0:.1f} s")
    else:
        log.note(f"apt-get installed chromium but {DEFAULT_CHROMIUM} is missing; set ${ENV_CHROMIUM}")


# --------------------------------------------------------------------------- the whole setup

def default_dir(host: Host | None = None) -> str:
    """The install: ``$<host.env_dir>`` (``MAGICFUSION_WEBUI_DIR``, ``MAGICFUSION_FORGE_DIR``), else the
    host's default (``~/stable-diffusion-webui``, ``~/stable-diffusion-webui-forge``)."""
    host = host or A1111
    return os.path.abspath(os.path.expanduser(os.environ.get(host.env_dir) or host.default_dir))


def check_install_path(install: str, allow_dot: bool, log: Log, host: Host | None = None) -> None:
    """Refuse paths the WebUI cannot serve from, or that sit inside this repository."""
    host = host or A1111
    real = os.path.realpath(install)
    for p in {install, real}:
        dots = [part for part in p.split(os.sep) if part.startswith(".")]
        if dots:
            msg = (f"the install path {p} has a folder whose name starts with a dot ({dots[0]}): Gradio 3.41 "
                   f"(A1111) answers 403 for every file under such a folder, so the WebUI page cannot load its "
                   f"files (Forge's Gradio 4 is refused the same way, to be safe). Use another --dir")
            if not allow_dot:
                raise SetupError(msg + " (or --allow-dot-path if only the API is needed).")
            log.note(msg + "; continuing (--allow-dot-path).")
    repo = os.path.realpath(REPO_ROOT)
    if real == repo or real.startswith(repo + os.sep):
        raise SetupError(f"the install {real} is inside this repository; put it elsewhere (the default is {host.default_dir})")


def setup(host: Host, install: str, *, flags: dict | None = None, environ=None, cache_dir: str | None = None,
          python: str | None = None, skip_venv: bool = False, browser: bool = True, force: bool = False,
          constraints_path: str | None = None, log: Log | None = None) -> list:
    """Build or reuse the install; return what was done (empty when everything was in place)."""
    log = log or Log()
    flags = flags or {}
    done = []
    state = load_state(install)
    if state.get("host", host.name) != host.name:
        raise SetupError(f"{install} was set up for the host {state['host']!r}, not {host.name!r}; use another --dir")

    # 1. Decide what is needed, and verify every source that is, before writing anything.
    needed, errors = [], []
    contents = None if skip_venv else venv_contents(venv_python(install))
    for s in host.sources:
        if s.target is None:
            if not skip_venv and not _pip_source_in_place(s, contents, state):
                needed.append(s)
            continue
        st = inspect_tree(install, s, state)
        if st.ok:
            log.info(f"ok   {st.what}")
        elif st.replaceable or force:
            log.info(f"todo {st.what}")
            needed.append(s)
        else:
            errors.append(f"{st.what}. It was not written by this script, so it is left alone: "
                          f"remove it, use another --dir, or pass --force to replace it")
    providers = {}
    for s in needed:
        try:
            providers[s.name] = open_source(s, resolve_origin(s, flags, environ), cache_dir, log)
        except SetupError as e:
            errors.append(str(e))
    if errors:
        raise SetupError(errors[0] if len(errors) == 1 else
                         f"{len(errors)} sources are not usable:\n" + "\n".join("  - " + e for e in errors))
    os.makedirs(install, exist_ok=True)
    state["host"] = host.name

    # 2. Write the trees.
    for s in needed:
        if s.target is None:
            continue
        t0 = time.monotonic()
        p = providers[s.name]
        log.info(f"writing {s.name} {s.commit[:12]} from {p.origin} to {os.path.normpath(os.path.join(install, s.target))}")
        install_tree(install, p, state, log)
        done.append(f"wrote {s.name}")
        log.info(f"  {s.name}: {time.monotonic() - t0:.1f} s")

    # 3. The venv.
    if not skip_venv:
        plan = venv_plan(host, install, constraints_path)
        if needed:  # something was written: look again
            contents = venv_contents(venv_python(install))
        problems = venv_problems(host, plan, contents, state)
        recorded = state.get("venv", {}).get("inputs")
        if not problems and recorded in (None, plan.inputs):
            log.info(f"ok   venv: {venv_python(install)} matches the requirement inputs")
            if recorded is None:  # a venv made by hand that matches: adopt it
                state.setdefault("venv", {}).update(inputs=plan.inputs, pip_sources={
                    s.name: s.commit for s in host.sources if s.pip_package})
                save_state(install, state)
        else:
            for p in problems or ["venv: the requirement inputs changed since it was built"]:
                log.info(f"todo {p}")
            log.info(f"building the venv {os.path.join(install, 'venv')} (Python {host.python}) ...")
            t0 = time.monotonic()
            build_venv(host, install, plan, {s.name: providers[s.name] for s in needed if s.target is None},
                       python, state, log, force)
            done.append("built the venv")
            log.info(f"venv: {time.monotonic() - t0:.1f} s")

    # 4. Chromium for the browser tests.
    if browser:
        had = chromium_present()
        install_chromium(log)
        if not had and chromium_present():
            done.append("installed chromium")
    if done or not os.path.exists(state_path(install)):
        save_state(install, state)
    return done


def _pip_source_in_place(s: Source, contents: dict | None, state: dict) -> bool:
    """Installed in the venv, and not recorded as installed from another commit."""
    return bool(contents and _norm(s.pip_package) in contents["dists"]
                and state.get("venv", {}).get("pip_sources", {}).get(s.name, s.commit) == s.commit)


def check(host: Host, install: str, *, skip_venv: bool = False, browser: bool = True,
          constraints_path: str | None = None, log: Log | None = None) -> list:
    """What is missing or wrong in the install (empty: nothing). Changes nothing."""
    log = log or Log()
    problems = []

    def bad(what: str) -> None:
        problems.append(what)
        log.info(f"BAD  {what}")

    if not os.path.isdir(install):
        bad(f"no install at {install}")
        return problems
    state = load_state(install)
    if state.get("host", host.name) != host.name:
        bad(f"{install} was set up for the host {state['host']!r}, not {host.name!r}")
    for s in host.sources:
        if s.target is not None:
            st = inspect_tree(install, s, state)
            if st.ok:
                log.info(f"ok   {st.what}")
            else:
                bad(st.what)
    if not skip_venv:
        if not os.path.isfile(os.path.join(install, host.requirements_file)):
            bad(f"venv: not checked ({host.requirements_file} of the WebUI tree is missing)")
        else:
            plan = venv_plan(host, install, constraints_path)
            vp = venv_problems(host, plan, venv_contents(venv_python(install)), state)
            recorded = state.get("venv", {}).get("inputs")
            if not vp and recorded not in (None, plan.inputs):
                vp = ["venv: the requirement inputs changed since it was built (rerun the setup)"]
            for p in vp:
                bad(p)
            if not vp:
                log.info(f"ok   venv: {venv_python(install)}")
    if browser:
        if chromium_present():
            log.info(f"ok   chromium: {chromium_path()}")
        else:
            bad(f"chromium: {chromium_path()} is missing (the browser tests skip; --no-browser ignores it)")
    return problems


def setup_command(install: str | None = None, host: Host | None = None) -> str:
    """The command that builds ``install`` for ``host`` (``--host`` and ``--dir`` only when needed)."""
    host = host or A1111
    cmd = f"python3 {SCRIPT}" + ("" if host is A1111 else f" --host {host.name}")
    default = os.path.abspath(os.path.expanduser(host.default_dir))
    if install and os.path.abspath(install) != default:
        cmd += f" --dir {install}"
    return cmd


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=SCRIPT, description="Build (or check and reuse) the pinned WebUI test install for tests/webui.",
        epilog=f"Sources: --list-sources. Each can come from NAME=PATH|URL or ${ENV_SRC_PREFIX}<NAME>.")
    ap.add_argument("--dir", default=None, help="the install (default: a1111: $MAGICFUSION_WEBUI_DIR or "
                    "~/stable-diffusion-webui; forge: $MAGICFUSION_FORGE_DIR or ~/stable-diffusion-webui-forge)")
    ap.add_argument("--host", default="a1111", choices=sorted(HOSTS),
                    help="the WebUI host: a1111 (AUTOMATIC1111 v1.10.1) or forge (WebUI Forge); default a1111")
    ap.add_argument("--source", action="append", default=[], metavar="NAME=PATH|URL",
                    help="where a source comes from: a git repository (normal or bare), a plain directory "
                         "holding its tree, or a git URL; repeatable")
    ap.add_argument("--python", default=None, help="the Python that creates the venv (default: python3.11)")
    ap.add_argument("--check", action="store_true", help="report what is missing or wrong, change nothing; exit 1 if anything is")
    ap.add_argument("--quiet", "-q", action="store_true", help="print only notes and problems")
    ap.add_argument("--skip-venv", action="store_true", help="only the source trees (no venv)")
    ap.add_argument("--no-browser", action="store_true", help="do not install (or check) Chromium")
    ap.add_argument("--force", action="store_true", help="replace trees that are not at the pins, rebuild a broken venv")
    ap.add_argument("--cache-dir", default=None, help="where sources fetched from URLs are kept "
                                                      "(default: ~/.cache/sd-webui-magicfusion/sources)")
    ap.add_argument("--constraints", default=None, help="the constraints file (default: tests/webui/constraints-<host>.txt)")
    ap.add_argument("--write-constraints", action="store_true",
                    help="after the setup, write the venv's pip freeze to the constraints file")
    ap.add_argument("--allow-dot-path", action="store_true", help="accept an install path with a dot-folder (API only)")
    ap.add_argument("--list-sources", action="store_true", help="print the pinned sources and exit")
    args = ap.parse_args(argv)
    host = HOSTS[args.host]
    log = Log(quiet=args.quiet)
    install = os.path.abspath(os.path.expanduser(args.dir)) if args.dir else default_dir(host)
    browser = host.browser and not args.no_browser
    constraints = os.path.abspath(args.constraints) if args.constraints else os.path.join(HERE, host.constraints_file)

    if args.list_sources:
        for s in host.sources:
            where = s.target if s.target else f"pip package {s.pip_package!r} in the venv"
            print(f"{s.name:18} {s.commit}  {s.url}\n{'':18} -> {where}; local copy: --source {s.name}=PATH or ${s.env}")
        return 0
    t0 = time.monotonic()
    try:
        check_install_path(install, args.allow_dot_path, log, host)
        if args.check:
            problems = check(host, install, skip_venv=args.skip_venv, browser=browser,
                             constraints_path=constraints, log=log)
            if problems:
                if log.quiet:
                    for p in problems:
                        print(f"[setup] missing or wrong: {p}")
                print(f"[setup] {install} is not a complete test install of {host.title} "
                      f"({len(problems)} problem{'s' if len(problems) != 1 else ''}). Run: {setup_command(install, host)}")
                return 1
            log.info(f"{install}: complete ({time.monotonic() - t0:.1f} s)")
            return 0
        flags = parse_source_flags(args.source, host)
        log.info(f"{host.title} test install at {install}")
        done = setup(host, install, flags=flags, cache_dir=args.cache_dir, python=args.python,
                     skip_venv=args.skip_venv, browser=browser, force=args.force,
                     constraints_path=constraints, log=log)
        if args.write_constraints and not args.skip_venv:
            write_constraints(install, constraints, host, log)
    except SetupError as e:
        print(f"[setup] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[setup] interrupted; rerun to finish (what was complete is kept)", file=sys.stderr)
        return 130
    took = time.monotonic() - t0
    if done:
        log.info(f"done in {took:.1f} s: {', '.join(done)}")
    else:
        log.info(f"everything was in place; nothing to do ({took:.1f} s)")
    log.info(f"run the tests: bash tests/run.sh   (the {host.name} install: {install})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
