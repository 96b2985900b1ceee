"""The pinned set (constraints.txt) against what this environment has installed.

    python scripts/pins.py check     # exit 1, listing the differences, unless every installed
                                     # package is pinned and at its pinned version

CI runs it after the install, so a test run always says which set it ran on. Only the
environment's own tools (pip) and this project are left out; torch's local build label
(2.13.0+cpu) is not part of the comparison.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"
UNPINNED = {"pip", "rlhf"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def differences(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name, version in sorted(have.items()):
        if name in UNPINNED:
            continue
        want = pins.get(name)
        if want is None:
            out.append(f"{name} {version} is installed but not pinned")
        elif version.split("+")[0] != want:
            out.append(f"{name} {version} is installed, {want} is pinned")
    return out


def main(argv: list[str]) -> int:
    if argv[1:] != ["check"]:
        print(__doc__)
        return 2
    diff = differences(pinned(), installed())
    if diff:
        print(f"the environment differs from {CONSTRAINTS.name}:\n  " + "\n  ".join(diff), file=sys.stderr)
        return 1
    print(f"installed set matches {CONSTRAINTS.name} ({len(installed()) - 2} packages pinned)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
