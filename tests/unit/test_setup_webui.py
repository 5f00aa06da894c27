"""tests/webui/setup_webui.py: sources, verification, state and --check, on small local git
repositories made here (no network, no venv)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "webui", "setup_webui.py")
_spec = importlib.util.spec_from_file_location("magicfusion_setup_webui", _PATH)
sw = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sw
_spec.loader.exec_module(sw)

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}

WEBUI_FILES = {"launch.py": "print('webui')\n", "modules/launch_utils.py": "# pins\n",
               "requirements_versions.txt": "torch\nsetuptools==69.5.1  # temp fix\nnumpy==1.26.2\n",
               "webui.sh": "#!/bin/sh\necho hi\n"}
LIB_FILES = {"setup.py": "# lib\n", "lib/__init__.py": "VERSION = 1\n", "big.bin": "x" * 1000}


def git(cwd, *args):
    env = {**os.environ, **GIT_ENV}
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        env.pop(k, None)
    return subprocess.run(["git", "-C", str(cwd), *args], env=env, check=True, stdout=subprocess.PIPE,
                          text=True).stdout.strip()


def make_repo(path, files, message="init"):
    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".git").exists():
        git(path, "init", "-q")
    for rel, text in files.items():
        f = path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    if "webui.sh" in files:
        os.chmod(path / "webui.sh", 0o755)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD")


def fingerprints(files, names):
    return {n: sw.blob_sha1(files[n].encode()) for n in names}


def make_host(webui_commit, lib_commit, webui_files=WEBUI_FILES, lib_files=LIB_FILES):
    return sw.Host(
        name="test", title="the test host", python="3.11",
        sources=(
            sw.Source("webui", "https://example.invalid/webui.git", webui_commit, ".",
                      fingerprints(webui_files, ["launch.py", "modules/launch_utils.py"]), title="test/webui"),
            sw.Source("lib", "https://example.invalid/lib.git", lib_commit, "repositories/lib",
                      fingerprints(lib_files, ["setup.py", "lib/__init__.py"]), title="test/lib"),
        ),
        torch=("torch==2.14.1", "torchvision==0.29.1"), requirements_file="requirements_versions.txt",
        drop_requirements=("torch", "setuptools"), extra_requirements=("setuptools>=77.0.3,<81",),
        constraints_file="constraints-test.txt", import_check="pass")


@pytest.fixture()
def repos(tmp_path):
    """A normal webui repository and a bare lib repository; lib's big.bin blob is missing."""
    webui = tmp_path / "src" / "webui"
    webui_commit = make_repo(webui, WEBUI_FILES)
    work = tmp_path / "src" / "lib-work"
    lib_commit = make_repo(work, LIB_FILES)
    bare = tmp_path / "src" / "lib.git"
    git(tmp_path, "clone", "-q", "--bare", "--no-local", str(work), str(bare))
    big = git(work, "rev-parse", "HEAD:big.bin")
    for pack in (bare / "objects" / "pack").glob("*.pack"):  # unpack so one blob can be removed
        idx = pack.with_suffix(".idx")
        data = pack.read_bytes()
        pack.unlink()
        idx.unlink()
        subprocess.run(["git", "-C", str(bare), "unpack-objects", "-q"], input=data, check=True,
                       env={**os.environ, **GIT_ENV})
    (bare / "objects" / big[:2] / big[2:]).unlink()
    return {"webui": str(webui), "lib": str(bare), "webui_commit": webui_commit, "lib_commit": lib_commit,
            "host": make_host(webui_commit, lib_commit), "work": work}


def quiet():
    return sw.Log(quiet=True)


def run_setup(host, install, flags, **kw):
    return sw.setup(host, str(install), flags=flags, environ={}, skip_venv=True, browser=False, log=quiet(), **kw)


def test_blob_sha1_is_git_hash_object(tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"hello\n\x00world")
    assert sw.file_blob_sha1(str(f)) == git(tmp_path, "hash-object", str(f))


def test_builds_from_normal_and_bare_repositories_skipping_a_missing_blob(repos, tmp_path, capsys):
    install = tmp_path / "sd"
    done = run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    assert done == ["wrote webui", "wrote lib"]
    assert (install / "launch.py").read_text() == WEBUI_FILES["launch.py"]
    assert os.access(install / "webui.sh", os.X_OK)
    assert (install / "repositories" / "lib" / "lib" / "__init__.py").read_text() == "VERSION = 1\n"
    assert not (install / "repositories" / "lib" / "big.bin").exists()
    assert "skipped big.bin" in capsys.readouterr().out  # a note, shown even when quiet
    state = json.loads((install / sw.STATE_FILE).read_text())
    assert state["sources"]["webui"]["commit"] == repos["webui_commit"]
    assert state["sources"]["lib"] == {**state["sources"]["lib"], "commit": repos["lib_commit"], "complete": True,
                                       "skipped": ["big.bin"]}
    assert not (install / ".git").exists()


def test_uses_the_pinned_commit_even_when_head_moved_on(repos, tmp_path):
    make_repo(pathlib.Path(repos["webui"]), {"launch.py": "print('newer')\n"})
    install = tmp_path / "sd"
    run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    assert (install / "launch.py").read_text() == WEBUI_FILES["launch.py"]


def test_wrong_commit_is_refused_naming_source_expected_and_found(repos, tmp_path, monkeypatch, capsys):
    other = tmp_path / "src" / "other"
    found = make_repo(other, {"setup.py": "# another project\n"})
    monkeypatch.setitem(sw.HOSTS, "test", repos["host"])
    install = tmp_path / "sd"
    rc = sw.main(["--host", "test", "--dir", str(install), "--skip-venv", "--no-browser",
                  "--source", f"webui={repos['webui']}", "--source", f"lib={other}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "source lib" in err and repos["lib_commit"] in err and found in err and str(other) in err
    assert not (install / "launch.py").exists()  # nothing is written when a source is wrong


def test_missing_source_is_reported(repos, tmp_path):
    with pytest.raises(sw.SetupError, match=r"source lib: .*nowhere.* does not exist"):
        run_setup(repos["host"], tmp_path / "sd", {"webui": repos["webui"], "lib": str(tmp_path / "nowhere")})


def test_source_from_the_environment(repos, tmp_path, monkeypatch):
    monkeypatch.setitem(sw.HOSTS, "test", repos["host"])
    monkeypatch.setenv("MAGICFUSION_SRC_WEBUI", repos["webui"])
    monkeypatch.setenv("MAGICFUSION_SRC_LIB", repos["lib"])
    assert sw.main(["--host", "test", "--dir", str(tmp_path / "sd"), "--skip-venv", "--no-browser", "-q"]) == 0
    assert (tmp_path / "sd" / "repositories" / "lib" / "setup.py").is_file()


def test_unknown_source_name_is_an_error(repos):
    with pytest.raises(sw.SetupError, match="no source named 'nope'.*webui, lib"):
        sw.parse_source_flags(["nope=/x"], repos["host"])


def test_plain_directory_is_verified_by_its_fingerprint_files(repos, tmp_path):
    plain = tmp_path / "src" / "lib-plain"
    shutil.copytree(repos["work"], plain, ignore=shutil.ignore_patterns(".git"))
    install = tmp_path / "sd"
    assert run_setup(repos["host"], install, {"webui": repos["webui"], "lib": str(plain)}) == ["wrote webui", "wrote lib"]
    assert (install / "repositories" / "lib" / "big.bin").is_file()

    (plain / "lib" / "__init__.py").write_text("VERSION = 2\n")
    with pytest.raises(sw.SetupError) as e:
        run_setup(repos["host"], tmp_path / "sd2", {"webui": repos["webui"], "lib": str(plain)})
    msg = str(e.value)
    assert "source lib" in msg and "plain directory" in msg and repos["lib_commit"] in msg
    assert "lib/__init__.py" in msg and repos["host"].source("lib").fingerprints["lib/__init__.py"] in msg


def test_second_run_does_nothing(repos, tmp_path):
    install = tmp_path / "sd"
    flags = {"webui": repos["webui"], "lib": repos["lib"]}
    run_setup(repos["host"], install, flags)
    stamps = {p: os.stat(p).st_mtime_ns for p in [install / sw.STATE_FILE, install / "launch.py",
                                                 install / "repositories" / "lib" / "setup.py"]}
    assert run_setup(repos["host"], install, flags) == []
    # the sources are not even looked at when everything is in place
    assert run_setup(repos["host"], install, {"webui": str(tmp_path / "gone"), "lib": str(tmp_path / "gone")}) == []
    assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}


def test_a_changed_pin_rewrites_only_that_tree(repos, tmp_path):
    install = tmp_path / "sd"
    run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    new_lib = {**LIB_FILES, "lib/__init__.py": "VERSION = 3\n"}
    new_commit = make_repo(repos["work"], new_lib, "v3")
    host = make_host(repos["webui_commit"], new_commit, lib_files=new_lib)
    assert run_setup(host, install, {"webui": repos["webui"], "lib": str(repos["work"])}) == ["wrote lib"]
    assert (install / "repositories" / "lib" / "lib" / "__init__.py").read_text() == "VERSION = 3\n"


def test_a_foreign_tree_is_left_alone_unless_forced(repos, tmp_path):
    install = tmp_path / "sd"
    foreign = install / "repositories" / "lib"
    foreign.mkdir(parents=True)
    (foreign / "setup.py").write_text("# mine\n")
    for rel, text in WEBUI_FILES.items():
        (install / rel).parent.mkdir(parents=True, exist_ok=True)
        (install / rel).write_text(text)
    flags = {"webui": repos["webui"], "lib": repos["lib"]}
    with pytest.raises(sw.SetupError, match="lib: .* differs from .*not written by this script"):
        run_setup(repos["host"], install, flags)
    assert (foreign / "setup.py").read_text() == "# mine\n"
    assert run_setup(repos["host"], install, flags, force=True) == ["wrote lib"]  # the webui tree was adopted


def test_check_reports_what_is_missing(repos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sw.HOSTS, "test", repos["host"])
    install = tmp_path / "sd"
    base = ["--host", "test", "--dir", str(install), "--no-browser"]
    assert sw.main([*base, "--check", "--skip-venv"]) == 1
    assert "no install at" in capsys.readouterr().out

    run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    assert sw.main([*base, "--check", "--skip-venv"]) == 0
    capsys.readouterr()

    shutil.rmtree(install / "repositories" / "lib")
    (install / "launch.py").write_text("changed\n")
    before = sorted(os.listdir(install))
    assert sw.main([*base, "--check"]) == 1
    out = capsys.readouterr().out
    assert "lib: missing" in out and "launch.py: blob" in out and "Run: python3 tests/webui/setup_webui.py --host test --dir" in out
    assert "venv: missing" in out
    assert sorted(os.listdir(install)) == before  # --check changes nothing

    assert sw.main([*base, "--check", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "ok " not in out and "missing or wrong: lib: missing" in out


def test_check_without_the_webui_tree_does_not_check_the_venv(repos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sw.HOSTS, "test", repos["host"])
    install = tmp_path / "sd"
    run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    (install / "requirements_versions.txt").unlink()
    assert sw.main(["--host", "test", "--dir", str(install), "--check", "--no-browser"]) == 1
    assert "venv: not checked (requirements_versions.txt" in capsys.readouterr().out


def test_check_reports_a_missing_venv_and_chromium(repos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sw.HOSTS, "test", repos["host"])
    monkeypatch.setenv("MAGICFUSION_CHROMIUM", str(tmp_path / "no-chromium"))
    install = tmp_path / "sd"
    run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    assert sw.main(["--host", "test", "--dir", str(install), "--check", "-q"]) == 1
    out = capsys.readouterr().out
    assert "venv: missing" in out and "no-chromium is missing" in out


def test_fetch_from_a_git_url(repos, tmp_path):
    install = tmp_path / "sd"
    flags = {"webui": "file://" + repos["webui"], "lib": repos["lib"]}
    run_setup(repos["host"], install, flags, cache_dir=str(tmp_path / "cache"))
    assert (install / "launch.py").is_file()
    assert (tmp_path / "cache" / "webui.git").is_dir()


def test_dot_folder_in_the_install_path_is_refused(tmp_path, capsys):
    rc = sw.main(["--dir", str(tmp_path / ".hidden" / "sd"), "--check"])
    assert rc == 1 and "403" in capsys.readouterr().err


def test_install_inside_the_repo_is_refused(capsys):
    assert sw.main(["--dir", os.path.join(sw.REPO_ROOT, "sd"), "--check"]) == 1
    assert "inside this repository" in capsys.readouterr().err


def test_requirement_filter_and_version_checks():
    text = "setuptools==69.5.1  # temp fix\nGitPython==3.1.32\ntorch\nnumpy==1.26.2\n\n# c\n"
    assert sw.filtered_requirements(text, ("torch", "setuptools")) == "GitPython==3.1.32\nnumpy==1.26.2\n"
    assert sw.parse_pins("Pillow==9.5.0\nfoo_bar>=1,<2 ; python_version>'3'\nclip @ file:///x\n") == {
        "pillow": "==9.5.0", "foo-bar": ">=1,<2"}
    assert sw.version_matches("0.15.0", "==0.15") and sw.version_matches("2.14.1+cu130", "==2.14.1")
    assert sw.version_matches("80.10.2", ">=77.0.3,<81") and not sw.version_matches("81.0.0", ">=77.0.3,<81")
    assert not sw.version_matches("1.26.4", "==1.26.2")


def test_venv_problems_compare_with_the_plan():
    host = make_host("a" * 40, "b" * 40)
    plan = sw.VenvPlan(requirements="numpy==1.26.2\nsetuptools>=77.0.3,<81\n", pins="torch==2.14.1\n",
                       constraints="numpy==1.26.2\nidna==3.20\n", constraints_path=None, inputs="x")
    good = {"python": "3.11.7", "dists": {"numpy": "1.26.2", "setuptools": "80.10.2", "torch": "2.14.1+cu130",
                                          "idna": "3.20"}}
    assert sw.venv_problems(host, plan, good, {}) == []
    bad = {"python": "3.12.1", "dists": {**good["dists"], "idna": "3.10", "setuptools": "82.0"}}
    bad["dists"].pop("torch")
    problems = "\n".join(sw.venv_problems(host, plan, bad, {}))
    assert "Python 3.12.1" in problems and "torch is not installed" in problems
    assert "idna 3.10 installed, the constraints file pins ==3.20" in problems
    assert "setuptools 82.0" in problems
    assert sw.venv_problems(host, plan, None, {}) == ["venv: missing or its Python does not run"]


def test_the_a1111_spec_pins_what_its_launcher_pins():
    host = sw.HOSTS["a1111"]
    assert list(sw.HOSTS) == ["a1111", "forge"]
    pins = {s.name: (s.commit, s.target) for s in host.sources}
    assert pins == {
        "webui": ("82a973c04367123ae98bd9abdf80d9eda9b910e2", "."),
        "assets": ("6f7db241d2f8ba7457bac5ca9753331f0c266917", "repositories/stable-diffusion-webui-assets"),
        "stablediffusion": ("cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf", "repositories/stable-diffusion-stability-ai"),
        "generative-models": ("45c443b316737a4ab6e40413d7794a7f5657c19f", "repositories/generative-models"),
        "k-diffusion": ("ab527a9a6d347f364e3d185ba6d714e22d80cb3c", "repositories/k-diffusion"),
        "blip": ("48211a1594f1321b00f14c9f7a5b4813144b2fb9", "repositories/BLIP"),
        "clip": ("d50d76daa670286dd6cacf3bcd80b5e4823fc8e1", None),
    }
    assert host.source("clip").pip_package == "clip"
    assert host.torch == ("torch==2.14.1", "torchvision==0.29.1")
    assert all(len(s.fingerprints) >= 2 for s in host.sources)
    assert host.source("k-diffusion").env == "MAGICFUSION_SRC_K_DIFFUSION"
    cons = sw.parse_pins(open(os.path.join(sw.HERE, host.constraints_file)).read())
    assert cons["torch"] == "==2.14.1" and cons["torchvision"] == "==0.29.1" and "clip" not in cons


# --------------------------------------------------------------------------- the forge host

FORGE_FILES = {"launch.py": "print('forge')\n", "modules_forge/forge_version.py": "version = '2.0.1v1.10.1'\n",
               "requirements_versions.txt": "setuptools==69.5.1  # temp fix for compatibility with some old packages\n"
                                            "GitPython==3.1.32\ntorch\ngradio==4.40.0\n",
               "webui.sh": "#!/bin/sh\necho forge\n"}
GUESS_FILES = {"huggingface_guess/__init__.py": "from .detection import *\n",
               "huggingface_guess/model_list.py": "SD15 = 1\n"}


def forge_like(forge_commit, guess_commit):
    """The real Forge spec with its two Forge-only sources replaced by local test repositories
    (the shared assets, BLIP and CLIP sources dropped): everything else is sw.FORGE's."""
    return dataclasses.replace(sw.FORGE, sources=(
        dataclasses.replace(sw.FORGE.source("forge"), commit=forge_commit,
                            fingerprints=fingerprints(FORGE_FILES, ["launch.py", "modules_forge/forge_version.py"])),
        dataclasses.replace(sw.FORGE.source("huggingface-guess"), commit=guess_commit,
                            fingerprints=fingerprints(GUESS_FILES, list(GUESS_FILES))),
    ))


@pytest.fixture()
def forge_repos(tmp_path, monkeypatch):
    forge = tmp_path / "src" / "forge"
    guess = tmp_path / "src" / "guess"
    host = forge_like(make_repo(forge, FORGE_FILES), make_repo(guess, GUESS_FILES))
    monkeypatch.setitem(sw.HOSTS, "forge", host)
    for k in [k for k in os.environ if k.startswith(("MAGICFUSION_SRC_", "MAGICFUSION_WEBUI_DIR", "MAGICFUSION_FORGE_DIR"))]:
        monkeypatch.delenv(k)
    return {"forge": str(forge), "guess": str(guess), "host": host}


def test_the_forge_spec_pins_what_its_launcher_pins():
    host = sw.HOSTS["forge"]
    pins = {s.name: (s.commit, s.target) for s in host.sources}
    assert pins == {
        "forge": ("dfdcbab685e57677014f05a3309b48cc87383167", "."),
        "assets": ("6f7db241d2f8ba7457bac5ca9753331f0c266917", "repositories/stable-diffusion-webui-assets"),
        "huggingface-guess": ("84826248b49bb7ca754c73293299c4d4e23a548d", "repositories/huggingface_guess"),
        "blip": ("48211a1594f1321b00f14c9f7a5b4813144b2fb9", "repositories/BLIP"),
        "clip": ("d50d76daa670286dd6cacf3bcd80b5e4823fc8e1", None),
    }
    a1111 = sw.HOSTS["a1111"]
    for shared in ("assets", "blip", "clip"):  # the same sources, so one local copy serves both hosts
        assert host.source(shared) == a1111.source(shared)
    assert host.source("forge").env == "MAGICFUSION_SRC_FORGE"  # never A1111's MAGICFUSION_SRC_WEBUI
    assert host.source("huggingface-guess").env == "MAGICFUSION_SRC_HUGGINGFACE_GUESS"
    assert all(len(s.fingerprints) >= 2 for s in host.sources)
    assert host.torch == a1111.torch and host.python == "3.11"
    assert set(host.drop_requirements) == {"torch", "setuptools"}
    assert host.extra_requirements[0] == "setuptools>=77.0.3,<81" and "joblib" in host.extra_requirements
    assert (host.default_dir, host.env_dir, host.browser) == ("~/stable-diffusion-webui-forge", "MAGICFUSION_FORGE_DIR",
                                                             False)
    cons = sw.parse_pins(open(os.path.join(sw.HERE, host.constraints_file)).read())
    assert cons["torch"] == "==2.14.1" and cons["torchvision"] == "==0.29.1" and "clip" not in cons
    assert cons["gradio"] == "==4.40.0" and "joblib" in cons and sw.version_matches(cons["setuptools"][2:], "<81")


def test_forge_requirements_drop_torch_and_setuptools_and_add_the_fixes(forge_repos, tmp_path):
    install = tmp_path / "forge"
    run_setup(forge_repos["host"], install, {"forge": forge_repos["forge"], "huggingface-guess": forge_repos["guess"]})
    plan = sw.venv_plan(forge_repos["host"], str(install), os.path.join(sw.HERE, "constraints-forge.txt"))
    assert plan.requirements == "GitPython==3.1.32\ngradio==4.40.0\nsetuptools>=77.0.3,<81\njoblib\n"
    assert plan.pins == "torch==2.14.1\ntorchvision==0.29.1\n"
    assert plan.constraints_path.endswith("constraints-forge.txt")


def test_forge_builds_at_its_default_dir_from_sources_in_the_environment(forge_repos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MAGICFUSION_WEBUI_DIR", str(tmp_path / "not-this-one"))  # A1111's: ignored for forge
    monkeypatch.setenv("MAGICFUSION_SRC_FORGE", forge_repos["forge"])
    monkeypatch.setenv("MAGICFUSION_SRC_HUGGINGFACE_GUESS", forge_repos["guess"])
    assert sw.main(["--host", "forge", "--skip-venv", "-q"]) == 0
    install = tmp_path / "stable-diffusion-webui-forge"
    assert (install / "modules_forge" / "forge_version.py").is_file()
    assert (install / "repositories" / "huggingface_guess" / "huggingface_guess" / "model_list.py").is_file()
    assert json.loads((install / sw.STATE_FILE).read_text())["host"] == "forge"
    assert not (tmp_path / "not-this-one").exists()
    monkeypatch.setenv("MAGICFUSION_FORGE_DIR", str(tmp_path / "elsewhere"))
    assert sw.default_dir(sw.HOSTS["forge"]) == str(tmp_path / "elsewhere")
    assert sw.default_dir(sw.HOSTS["a1111"]) == str(tmp_path / "not-this-one")


def test_forge_check_names_the_forge_setup_command_and_skips_chromium(forge_repos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MAGICFUSION_CHROMIUM", str(tmp_path / "no-chromium"))
    assert sw.main(["--host", "forge", "--check"]) == 1
    out = capsys.readouterr().out
    assert f"no install at {tmp_path / 'stable-diffusion-webui-forge'}" in out
    assert "Run: python3 tests/webui/setup_webui.py --host forge" in out and "--dir" not in out
    install = tmp_path / "sd-forge"
    run_setup(forge_repos["host"], install, {"forge": forge_repos["forge"], "huggingface-guess": forge_repos["guess"]})
    assert sw.main(["--host", "forge", "--dir", str(install), "--check", "--skip-venv"]) == 0
    assert "chromium" not in capsys.readouterr().out  # the browser tests are A1111's
    assert sw.main(["--host", "forge", "--dir", str(install), "--check"]) == 1
    out = capsys.readouterr().out
    assert "venv: missing" in out and f"--host forge --dir {install}" in out and "chromium" not in out


def test_an_install_of_one_host_is_not_taken_for_the_other(forge_repos, repos, tmp_path, capsys):
    install = tmp_path / "sd"
    run_setup(forge_repos["host"], install, {"forge": forge_repos["forge"], "huggingface-guess": forge_repos["guess"]})
    with pytest.raises(sw.SetupError, match="set up for the host 'forge', not 'test'"):
        run_setup(repos["host"], install, {"webui": repos["webui"], "lib": repos["lib"]})
    assert sw.main(["--dir", str(install), "--check", "--skip-venv", "--no-browser"]) == 1
    assert "set up for the host 'forge', not 'a1111'" in capsys.readouterr().out


def test_a_forge_tree_found_in_place_is_adopted_and_a_wrong_one_refused(forge_repos, tmp_path):
    install = tmp_path / "forge"
    for rel, text in {**FORGE_FILES, **{"repositories/huggingface_guess/" + k: v for k, v in GUESS_FILES.items()}}.items():
        (install / rel).parent.mkdir(parents=True, exist_ok=True)
        (install / rel).write_text(text)
    flags = {"forge": str(tmp_path / "gone"), "huggingface-guess": str(tmp_path / "gone")}
    assert run_setup(forge_repos["host"], install, flags) == []  # adopted: the sources were not even needed
    assert json.loads((install / sw.STATE_FILE).read_text())["host"] == "forge"
    (install / "modules_forge" / "forge_version.py").write_text("version = 'other'\n")
    with pytest.raises(sw.SetupError, match="forge: .* differs from .*modules_forge/forge_version.py"):
        run_setup(forge_repos["host"], install, {"forge": forge_repos["forge"], "huggingface-guess": forge_repos["guess"]})


def test_list_sources_for_forge(capsys):
    assert sw.main(["--host", "forge", "--list-sources"]) == 0
    out = capsys.readouterr().out
    assert "MAGICFUSION_SRC_FORGE" in out and "MAGICFUSION_SRC_HUGGINGFACE_GUESS" in out
    assert "repositories/huggingface_guess" in out and "stable-diffusion-stability-ai" not in out


def test_setup_command_per_host(tmp_path):
    assert sw.setup_command(None, sw.HOSTS["forge"]) == "python3 tests/webui/setup_webui.py --host forge"
    assert sw.setup_command(str(tmp_path), sw.HOSTS["forge"]) == f"python3 tests/webui/setup_webui.py --host forge --dir {tmp_path}"
    assert sw.setup_command(os.path.expanduser("~/stable-diffusion-webui")) == "python3 tests/webui/setup_webui.py"
