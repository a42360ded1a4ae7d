"""The pinned environment: pyproject.toml's compatible-release pins and constraints.txt (the lock CI installs from)
agree, and the installed packages are the locked ones."""

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    return {canonicalize_name(name): version for name, _, version in (p.partition("==") for p in pins if p)}


def test_every_direct_dependency_is_pinned_and_its_pin_admits_the_locked_version():
    lock = locked()
    for requirement in direct_requirements():
        assert str(requirement.specifier), f"{requirement.name}: no version pin in pyproject.toml"
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement.name} is a dependency in pyproject.toml but not locked in constraints.txt"
        assert requirement.specifier.contains(lock[name], prereleases=True), (
            f"pyproject.toml requires {requirement}, constraints.txt locks {requirement.name}=={lock[name]}"
        )


def test_every_lock_line_is_an_exact_pin():
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            assert [s.operator for s in requirement.specifier] == ["=="], (
                f"constraints.txt: {line!r} is not name==version"
            )


def test_the_installed_direct_dependencies_are_the_locked_versions():
    lock = locked()
    for requirement in direct_requirements():
        name = canonicalize_name(requirement.name)
        assert metadata.version(requirement.name) == lock[name], (
            f"{requirement.name} {metadata.version(requirement.name)} is installed, constraints.txt locks {lock[name]}"
            " (reinstall with: pip install -c constraints.txt -e '.[dev]')"
        )
