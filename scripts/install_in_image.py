#!/usr/bin/env python
"""Install abalone into a Deep Learning Container without touching the image's frameworks.

    python install_in_image.py requirements PROJECT_DIR   # our dependencies (a cacheable layer)
    python install_in_image.py project PROJECT_DIR        # the package itself, then the check

A DLC installs TensorFlow under its own distribution name (`tensorflow-cpu`, `tensorflow`, or a
wheel from a URL), so `tensorflow>=2.16` in pyproject.toml would make pip install PyPI's
`tensorflow` over it. Here the image's TensorFlow, Keras and numpy are checked against our
requirements by what they are (the distributions that provide the `tensorflow`, `keras` and
`numpy` modules), those requirements are left to the image, and everything else is installed with
the image's versions of the three as pip constraints. If our requirements cannot be met with
them, the build fails naming which; after the install, any change to the three fails it too.
Runs on the image's own Python (3.10 or newer), with pip and the standard library only.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # every pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

FRAMEWORK_MODULES = ("tensorflow", "keras", "numpy")
SNAPSHOT = ".image-frameworks.json"  # in the project folder: the image's frameworks before us
# Extras the image carries: its containers are a fleet's workers, whose study is in PostgreSQL.
IMAGE_EXTRAS = ("postgres",)


class GuardError(Exception):
    pass


def frameworks() -> dict[str, dict[str, str]]:
    """module -> {distribution: "version (origin)"} for every distribution providing it."""
    providers = metadata.packages_distributions()
    found: dict[str, dict[str, str]] = {}
    for module in FRAMEWORK_MODULES:
        found[module] = {}
        for name in sorted(set(providers.get(module, []))):
            dist = metadata.distribution(name)
            origin = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "index")
            found[module][canonicalize_name(name)] = f"{dist.version} ({origin})"
    return found


def requirements_left_to_pip(project: Path, image: dict[str, dict[str, str]]) -> list[str]:
    """Our requirements (and IMAGE_EXTRAS') minus those the image's frameworks meet; fail if one
    does not."""
    metadata_table = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    declared = metadata_table["dependencies"] + [
        line for extra in IMAGE_EXTRAS
        for line in metadata_table.get("optional-dependencies", {}).get(extra, [])]
    left = []
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        module = {"tensorflow": "tensorflow", "tensorflow-cpu": "tensorflow",
                  "keras": "keras", "numpy": "numpy"}.get(canonicalize_name(requirement.name))
        if module is None:
            left.append(line)
            continue
        if not image[module]:
            raise GuardError(f"the base image has no {module}; this image builds on a "
                             "TensorFlow Deep Learning Container (BASE_IMAGE)")
        for name, described in image[module].items():
            version = described.split(" ")[0]
            if not requirement.specifier.contains(version, prereleases=True):
                raise GuardError(f"the base image's {name} {version} does not meet our requirement "
                                 f"{line!r} (pyproject.toml); pick a newer BASE_IMAGE")
    return left


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def install_requirements(project: Path) -> None:
    image = frameworks()
    left = requirements_left_to_pip(project, image)
    pins = [f"{name}=={described.split(' ')[0]}" for found in image.values()
            for name, described in found.items()]
    (project / SNAPSHOT).write_text(json.dumps(image, indent=1))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write("\n".join(pins) + "\n")
    print(f"keeping the image's {', '.join(pins)}; installing {', '.join(left)}", flush=True)
    try:
        pip("install", "--no-cache-dir", "--constraint", constraints.name, *left)
    except subprocess.CalledProcessError:
        raise GuardError(f"our requirements cannot be met with the image's {', '.join(pins)}: "
                         "see pip's message above for which one") from None
    check_unchanged(image)


def check_unchanged(before: dict[str, dict[str, str]]) -> None:
    after = frameworks()
    if after != before:
        changes = [f"{module}: {before[module]} -> {after[module]}" for module in before
                   if before[module] != after[module]]
        raise GuardError("the install changed the image's frameworks: " + "; ".join(changes))


def install_project(project: Path) -> None:
    before = json.loads((project / SNAPSHOT).read_text())
    pip("install", "--no-cache-dir", "--no-deps", "--editable", str(project))
    check_unchanged(before)
    # The whole package imports on the image's frameworks.
    subprocess.run([sys.executable, "-c", "import abalone.train, abalone.container, "
                    "abalone.run, abalone.sweep, abalone.workers"], check=True)


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] not in ("requirements", "project"):
        print(__doc__, file=sys.stderr)
        return 2
    project = Path(sys.argv[2]).resolve()
    try:
        (install_requirements if sys.argv[1] == "requirements" else install_project)(project)
    except GuardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
