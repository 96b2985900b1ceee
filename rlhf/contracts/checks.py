"""The one range check every validator uses, so every out-of-range setting reads the same:

    <owner>: out of range: <key>=<value> (must be <requirement>); <key>=<value> (...)

`owner` names what holds the settings (config, ppo, sampler, rm, label, ...), `key` is the
dotted name a user types on the command line.
"""

from __future__ import annotations

from typing import Any, Iterable


def require(owner: str, checks: Iterable[tuple[str, Any, bool, str]]) -> None:
    """Raise one ValueError naming every failed check of (key, value, ok, requirement)."""
    bad = [f"{key}={value!r} (must be {want})" for key, value, ok, want in checks if not ok]
    if bad:
        raise ValueError(f"{owner}: out of range: " + "; ".join(bad))
