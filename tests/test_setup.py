"""`make setup`: the Python the project asks for (pyproject.toml, the README) can install every package pinned in
constraints.txt. It asked for 3.10+, where the pinned transformers, trl, hypothesis and regex (Requires-Python >= 3.11)
have no release: `make setup` stopped in pip on a 3.10 machine the README said would do."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, metadata, version

from packaging.specifiers import SpecifierSet

from tests.conftest import REPO


def pinned() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pin = line.partition("==")
            pins[name] = pin
    return pins


def test_the_python_the_project_asks_for_installs_every_pinned_package():
    floor = re.search(r'^requires-python = ">=(\d+\.\d+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert f"need only Python {floor}+ and `make`" in (REPO / "README.md").read_text()
    refused = {}
    for name, pin in pinned().items():
        try:
            if version(name) != pin:  # not the environment `make setup` builds (a GPU image's own torch): not its pin's
                continue
        except PackageNotFoundError:
            continue
        needs = metadata(name).get("Requires-Python") or ""
        if not SpecifierSet(needs).contains(floor):
            refused[f"{name}=={pin}"] = needs
    assert refused == {}, f"Python {floor} cannot install {refused}"
    assert version("transformers") == pinned()["transformers"]  # the pin that asks most was checked
