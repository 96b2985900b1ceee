"""`rlhf-plugins`: every registered plugin, where it comes from, and its config fields."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Any

from rlhf.contracts import registry

_FIELD = re.compile(r"^\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def field_help(config_cls: type) -> dict[str, str]:
    """Help text of each field: the comment at the end of its line in the dataclass source.

    The comments are the documentation, so they are read rather than repeated in metadata.
    """
    helps: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "types":
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _FIELD.match(line)
            if m and m.group(2):
                helps[m.group(1)] = m.group(2).strip()
    return helps


def describe(info: registry.PluginInfo) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for each field of the plugin's Config."""
    helps = field_help(info.cls.Config)
    rows = []
    for f in dataclasses.fields(info.cls.Config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((f.name, type_name, default, helps.get(f.name, "")))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="List the registered rlhf plugins and their config fields.")
    p.add_argument("group", nargs="?", help="only this group (optimizer, reward, sampler, logger, ...)")
    args = p.parse_args(argv)
    found = registry.plugins(args.group)
    if not found:
        groups = sorted({i.group for i in registry.plugins()})
        raise SystemExit(f"no plugins in group {args.group!r}; groups: {', '.join(groups)}")
    group = None
    for info in found:
        if info.group != group:
            group = info.group
            print(f"\n{group}:")
        print(f"  {info.name}  ({info.target}, {info.source})")
        doc = (inspect.getdoc(inspect.getmodule(info.cls)) or "").split("\n\n")[0].replace("\n", " ")
        if doc:
            print(f"      {doc}")
        prefix = f"{info.group}.{info.name}" if info.group in registry.LIST_GROUPS else info.group
        for name, type_name, default, help_text in describe(info):
            print(f"      {prefix}.{name}: {type_name} = {default!r}" + (f"  # {help_text}" if help_text else ""))


if __name__ == "__main__":
    main()
