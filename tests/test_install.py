"""`make install` works on any machine: torch's CPU build from where it is, ranges, pins, extras.

The Makefile's torch step is read from ``make -n install`` (recipes printed, not run) for a fresh
venv path, so the stamp is out of date and the torch line is printed as it would run. What pip
sees is set through its own environment: ``PIP_CONFIG_FILE=/dev/null`` drops every config file
and ``PIP_FIND_LINKS`` names the wheelhouse. tools/torch_source.py asks pip with ``--no-index``,
so none of this reaches the network (the suite runs in tools/isolated.sh's empty namespace).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from selfmoa_ray.config import TrainSection
from selfmoa_ray.training import strategy

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
WHEELHOUSE = Path("/opt/wheels")  # the CI machines' local torch CPU wheel, where there is one

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make here")


def _pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(name: str) -> dict[str, str]:
    """requirements/<name> as {canonical name: version}; every line must be name==version."""
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"{name}: not a name==version line: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


TORCH_VERSION = _pins("constraints-cpu.txt")["torch"]


def _torch_line(tmp_path: Path, find_links: Path, *make_vars: str) -> str:
    """The torch install command `make install` would run for a fresh venv, as printed by -n.

    pip sees the ``find_links`` wheelhouse and none of this machine's pip configuration.
    """
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(find_links)}
    cmd = ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", f"PYTHON={sys.executable}"]
    result = subprocess.run(
        [*cmd, *make_vars], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (line,) = [x for x in result.stdout.splitlines() if '"torch==' in x]
    lines = result.stdout.splitlines()
    # torch first, then the project under the CPU pins; the CUDA check still closes the install.
    assert lines.index(line) < next(i for i, x in enumerate(lines) if "constraints-cpu" in x)
    assert any("assert not torch.version.cuda" in x for x in lines)
    return line


def _local_torch_wheel() -> Path | None:
    """The wheelhouse's torch CPU wheel of the pinned version, if this interpreter can install it."""
    tags = set(sys_tags())
    for wheel in sorted(WHEELHOUSE.glob("torch-*.whl")):
        _, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        if version.public == TORCH_VERSION and version.local == "cpu" and wheel_tags & tags:
            return wheel
    return None


@needs_make
def test_without_a_local_wheel_torch_comes_from_the_cpu_index(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    line = _torch_line(tmp_path, empty)
    assert f"--index-url {CPU_INDEX} --extra-index-url https://pypi.org/simple" in line
    assert line.endswith(f'"torch=={TORCH_VERSION}"')


@needs_make
def test_a_local_wheel_in_pips_find_links_is_used_as_it_is(tmp_path):
    wheel = _local_torch_wheel()
    if wheel is None:
        pytest.skip(f"no torch {TORCH_VERSION}+cpu wheel for this Python in {WHEELHOUSE}")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / wheel.name).symlink_to(wheel)
    line = _torch_line(tmp_path, wheels)
    assert "--index-url" not in line and "download.pytorch.org" not in line
    assert re.search(rf'pip install --quiet +"torch=={re.escape(TORCH_VERSION)}"$', line)


@needs_make
def test_torch_index_url_wins_even_over_a_local_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if wheel := _local_torch_wheel():
        (wheels / wheel.name).symlink_to(wheel)
    mirror = "http://127.0.0.1:9/mirror/whl/cpu"
    line = _torch_line(tmp_path, wheels, f"TORCH_INDEX_URL={mirror}")
    assert f"--index-url {mirror} --extra-index-url https://pypi.org/simple" in line
    # A mirror that also serves torch's dependencies: no second index.
    line = _torch_line(tmp_path, wheels, f"TORCH_INDEX_URL={mirror}", "PYPI_INDEX_URL=")
    assert f"--index-url {mirror} " in line and "--extra-index-url" not in line
    assert CPU_INDEX not in line


@needs_make
def test_pip_takes_torch_from_the_index_the_command_names(tmp_path):
    """The printed command, run by pip (dry run): torch comes from that index, not find-links."""
    wheel = _local_torch_wheel()
    if wheel is None:
        pytest.skip(f"no torch {TORCH_VERSION}+cpu wheel for this Python in {WHEELHOUSE}")
    project = tmp_path / "index" / "torch"  # a PEP 503 index on disk, standing in for the CPU one
    project.mkdir(parents=True)
    (project / wheel.name).symlink_to(wheel)
    href = quote(wheel.name)
    (project / "index.html").write_text(
        f'<html><body><a href="{href}">{wheel.name}</a></body></html>'
    )
    empty = tmp_path / "wheels"
    empty.mkdir()
    index = (tmp_path / "index").as_uri()
    line = _torch_line(tmp_path, empty, f"TORCH_INDEX_URL={index}", "PYPI_INDEX_URL=")
    _, *pip = shlex.split(line)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(empty)}
    dry_run = ["--dry-run", "--no-deps", "--ignore-installed", "--report", "-"]
    result = subprocess.run(
        [sys.executable, *pip, *dry_run], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(result.stdout)["install"]
    assert item["download_info"]["url"].startswith(index + "/torch/")
    assert item["metadata"]["version"] == f"{TORCH_VERSION}+cpu"


@needs_make
def test_torch_version_is_one_makefile_variable(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    line = _torch_line(tmp_path, empty, "TORCH_VERSION=2.13.1")
    assert line.endswith('"torch==2.13.1"') and CPU_INDEX in line


def test_pyproject_states_ranges_that_admit_the_verified_pins():
    project = _pyproject()
    cpu, gpu = _pins("constraints-cpu.txt"), _pins("constraints-gpu.txt")
    extras = project["optional-dependencies"]
    own = canonicalize_name(project["name"])
    for group, pins in [
        (project["dependencies"], cpu),
        (extras["tracking"] + extras["deepspeed"] + extras["dev"], cpu),
        (project["dependencies"] + extras["gpu"] + extras["deepspeed"], gpu),
    ]:
        for req in map(Requirement, group):
            name = canonicalize_name(req.name)
            if name == own:
                continue
            assert not any(s.operator in {"==", "==="} for s in req.specifier), f"{req}: pinned"
            assert name in pins, f"{req}: not in the constraints file"
            assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs {pins[name]}"


def test_constraints_pin_torch_without_a_local_build_label():
    for name in ("constraints-cpu.txt", "constraints-gpu.txt"):
        torch_pin = Version(_pins(name)["torch"])
        assert torch_pin.local is None, f"{name}: torch=={torch_pin} is not on PyPI"
    assert Version(TORCH_VERSION).public == Version(torch.__version__).public


def test_extras_keep_deepspeed_off_the_default_install():
    project = _pyproject()
    extras = project["optional-dependencies"]
    names = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert "deepspeed" not in names
    assert [Requirement(r).name for r in extras["deepspeed"]] == ["deepspeed"]
    for extra in ("gpu", "dev"):  # the GPU image and `make install` (the tests) still get it
        own = [Requirement(r) for r in extras[extra] if Requirement(r).name == project["name"]]
        assert any("deepspeed" in r.extras for r in own), extra
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir -c requirements/constraints-gpu.txt ".[gpu]"' in dockerfile


def test_the_default_training_path_does_not_import_deepspeed():
    code = (
        "import sys\n"
        "import selfmoa_ray.cli, selfmoa_ray.stages.train, selfmoa_ray.training.loop\n"
        "import selfmoa_ray.training.export, selfmoa_ray.training.strategy\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_deepspeed_strategy_without_deepspeed_says_what_to_install(monkeypatch):
    # None in sys.modules is how Python spells "not installed" for one import.
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    cfg = TrainSection(strategy="deepspeed")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'selfmoa-ray\[deepspeed\]'"):
        strategy.make_strategy(torch.nn.Linear(2, 2), cfg)
    with pytest.raises(ModuleNotFoundError, match=r"train\.strategy: deepspeed"):
        strategy._cpu_adam([], cfg)
