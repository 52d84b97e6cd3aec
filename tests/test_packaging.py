"""The distribution: a wheel built from the files a clone holds carries the license, the type marker, the
presets and one version; the static checks are part of CI."""

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest

import metaquant
from tests.conftest import REPO


def _clone_files() -> list[str]:
    """The files a clone of the repository holds (tracked ones, and new ones git does not ignore)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def test_the_wheel_holds_license_type_marker_presets_and_one_version(tmp_path):
    source = tmp_path / "clone"
    for name in _clone_files():
        if name.startswith(("src/", "LICENSE", "README.md", "pyproject.toml")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"metaquant_torch-{metaquant.__version__}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"metaquant_torch-{metaquant.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "metaquant/py.typed" in names
    folder = "metaquant/experiments/presets/"
    presets = {n.removeprefix(folder) for n in names if n.startswith(folder)}
    assert {"fashion-mnist.toml", "paper-cifar10.toml", "paper-cifar100.toml", "paper-imagenet.toml"} <= presets
    metadata = Parser().parsestr(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode())
    assert metadata["Version"] == metaquant.__version__  # written once, in metaquant/__init__.py
    assert metadata["License-Expression"] == "MIT" and metadata["License-File"] == "LICENSE"
    assert "MIT License" in (REPO / "LICENSE").read_text()
    assert any(url.startswith("Source, https://") for url in metadata.get_all("Project-URL"))


def _collected(root, env):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return {line for line in out.stdout.splitlines() if "::" in line}


def test_the_source_distribution_holds_the_whole_test_suite(tmp_path):
    """A packager runs the tests from the unpacked sdist: it collects the same tests as the repository."""
    pytest.importorskip("build")
    _clone_files()  # a checkout: the sdist is built from it
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    shutil.unpack_archive(archive, tmp_path / "unpacked")
    (root,) = (tmp_path / "unpacked").iterdir()
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    assert (root / "tests" / "conftest.py").is_file() and (root / "tests" / "fixtures").is_dir()
    assert _collected(root, env) == _collected(REPO, env)


def test_the_citation_file_names_this_version():
    import re

    citation = (REPO / "CITATION.cff").read_text()
    assert re.search(r"^version: (\S+)$", citation, re.M)[1] == metaquant.__version__
    assert re.search(r"^license: (\S+)$", citation, re.M)[1] == "MIT"


def test_ci_runs_ruff_and_mypy_before_the_tests():
    ci = (REPO / ".ci" / "run").read_text()
    lint = (REPO / "scripts" / "lint.sh").read_text()
    assert ci.index("scripts/lint.sh") < ci.index("pytest")
    for command in ("ruff check", "ruff format --check", "mypy"):
        assert command in lint
