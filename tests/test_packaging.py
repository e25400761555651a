"""What `pip install` gets: the sdist carries what the tests read beside the package (pytest runs from an
unpacked sdist), and the wheel carries the built-in profiles and nothing of the tree around the package."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JUNK = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              "export", "runs", "gpu-check-out")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[list[str], list[str]]:
    """(sdist names without the top folder, wheel names) built by setuptools from a copy of the tree."""
    pytest.importorskip("setuptools", minversion="77")   # the SPDX `license` string
    tmp = tmp_path_factory.mktemp("pack")
    src, out = tmp / "src", tmp / "out"
    shutil.copytree(ROOT, src, symlinks=True, ignore=JUNK)
    names = []
    for hook in ("build_sdist", "build_wheel"):   # one process each, as build frontends call them
        code = f"import sys; from setuptools import build_meta as b; name = b.{hook}(sys.argv[1]); print(); print(name)"
        run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        names.append(run.stdout.splitlines()[-1])   # after setuptools' log
    sdist_name, wheel_name = names
    with tarfile.open(out / sdist_name) as tar:
        sdist = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    with zipfile.ZipFile(out / wheel_name) as whl:
        wheel = whl.namelist()
    return sdist, wheel


def test_the_sdist_carries_the_files_the_tests_read(built):
    sdist, _ = built
    wanted = ["Makefile", "LICENSE", "docs/profiles.md", "docs/serving.md", "examples/embed_starlette.py",
              "tests/conftest.py", "tests/helpers/tiny_seed.py", "deploylm/builtin_profiles/fp32.toml"]
    assert [name for name in wanted if name not in sdist] == []


def test_the_wheel_carries_the_profiles_and_only_the_package(built):
    _, wheel = built
    profiles = {p.name for p in (ROOT / "deploylm" / "builtin_profiles").glob("*.toml")}
    assert {Path(n).name for n in wheel if n.startswith("deploylm/builtin_profiles/")} == profiles
    assert [n for n in wheel if not n.startswith(("deploylm/", "deploylm-"))] == []


def test_the_build_requirement_reads_the_spdx_license_string():
    """`license = "Apache-2.0"` (PEP 639) is a configuration error to setuptools < 77, so a build with an older one
    (`pip install --no-build-isolation`, a distribution's packaging) failed while the floor said >= 68."""
    import re
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    floor = [re.fullmatch(r"setuptools>=(\d+)", r) for r in pyproject["build-system"]["requires"]]
    assert any(m and int(m.group(1)) >= 77 for m in floor), pyproject["build-system"]["requires"]


def test_a_wheel_built_where_symlinks_are_plain_files_still_carries_the_profiles(tmp_path):
    """pip unpacks a source .zip (`git archive --format=zip`, a forge's "Download ZIP") and git checks out on a system
    without symlinks by writing each symlink as a small file holding its target. The built-in profiles were reached
    through the symlink deploylm/builtin_profiles -> ../profiles, so such a build made a wheel with no profile at all:
    `deploylm profiles` died with a ValueError traceback and every `--profile NAME` was "unknown"."""
    pytest.importorskip("setuptools", minversion="77")
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(ROOT, src, symlinks=True, ignore=JUNK)
    for link in [p for p in src.rglob("*") if p.is_symlink()]:
        target = str(link.readlink())
        link.unlink()
        link.write_text(target)
    code = "import sys; from setuptools import build_meta as b; name = b.build_wheel(sys.argv[1]); print(); print(name)"
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with zipfile.ZipFile(out / run.stdout.splitlines()[-1]) as whl:
        shipped = {Path(n).name for n in whl.namelist() if n.startswith("deploylm/builtin_profiles/")}
    assert shipped == {p.name for p in (ROOT / "deploylm" / "builtin_profiles").glob("*.toml")} and "fp32.toml" in shipped
