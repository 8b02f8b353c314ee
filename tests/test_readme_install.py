"""The README's install lines agree with ``pyproject.toml``: the torch it pins is one the package
accepts (so ``pip install -e .`` afterwards keeps it, and keeps a machine's own build in range),
and the install note describes the pinned version, not another."""

from __future__ import annotations

import re

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO


def torch_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return torch


def test_the_pinned_torch_is_in_the_accepted_range_and_the_note_describes_it():
    readme = (REPO / "README.md").read_text()
    pins = set(re.findall(r"pip install torch==([0-9.]+)", readme))
    assert len(pins) == 1, pins  # one torch version throughout the README
    (pin,) = pins
    assert torch_requirement().specifier.contains(Version(pin))
    assert f"torch-{pin}-cp311-cp311-manylinux_2_28_x86_64.whl" in readme  # the wheel the note's facts were checked on
    assert "installs the CPU wheel" not in readme  # true only where the index serves a CPU build
