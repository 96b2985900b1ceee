"""mkdocs hooks: the reference pages written from the code at every build, so they cannot drift.

A page holds a marker `<!-- generated: NAME -->`; the build puts in its place:

    commands   every console script with its purpose and its arguments (argparse's help, or
               the Hydra command's config schema)
    plugins    every config group, its plugins and each plugin's fields, defaults and help
    settings   the core settings of rlhf-train (policy, data, train, eval, checkpoint, ...)
    metrics    every metric name of rlhf.contracts.metrics.CATALOGUE
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import re
from contextlib import redirect_stdout
from importlib.metadata import entry_points

MARKER = re.compile(r"<!-- generated: (\w+) -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def commands() -> str:
    out = []
    scripts = sorted((ep for ep in entry_points(group="console_scripts") if ep.value.startswith("rlhf.")),
                     key=lambda ep: ep.name)
    for ep in scripts:
        module = importlib.import_module(ep.value.split(":")[0])
        doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        out.append(f"## `{ep.name}`\n\n{doc}\n")
        parser = _parser_of(module)
        if parser is not None:
            parser.prog = ep.name
            out.append("```text\n" + parser.format_help().rstrip() + "\n```\n")
        else:
            out.append(f"A Hydra command: every setting is `key=value` on the command line, composed from "
                       f"`conf/` (see [Core settings](settings.md) and [Config groups and plugins](plugins.md)); "
                       f"`{ep.name} --help` lists the groups and `{ep.name} --cfg job` prints the composed config.\n")
    return "\n".join(out)


def _parser_of(module) -> argparse.ArgumentParser | None:
    """The command's argparse parser, caught as it parses `--help` (None for a Hydra command)."""
    if hasattr(module, "build_parser"):
        return module.build_parser()
    main = getattr(module, "main", None)
    caught: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = catch
    try:
        with redirect_stdout(io.StringIO()):
            main(["--help"])
    except (SystemExit, TypeError):  # (a Hydra command's main takes no arguments)
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught[0] if caught else None


def plugins() -> str:
    from rlhf.apps.plugins_cli import describe
    from rlhf.contracts import registry

    out = []
    groups = sorted({p.group for p in registry.plugins()})
    for group in groups:
        out.append(f"## `{group}=`\n")
        for info in registry.plugins(group):
            doc = (info.cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out.append(f"### `{group}={info.name}`\n\n{doc} (`{info.target}`)\n")
            rows = describe(info)
            if rows:
                out.append("| field | type | default | what it does |\n| --- | --- | --- | --- |")
                out += [f"| `{group}.{n}` | {_cell(t)} | `{_cell(repr(d))}` | {_cell(h)} |" for n, t, d, h in rows]
                out.append("")
    return "\n".join(out)


def settings() -> str:
    from rlhf.apps.plugins_cli import field_help
    from rlhf.contracts import schema

    out = []

    def table(kind: type, prefix: str) -> None:
        helps = field_help(kind)
        rows, nested = [], []
        for f in dataclasses.fields(kind):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
            if dataclasses.is_dataclass(default):
                nested.append((f.name, type(default)))
                continue
            if f.name in ("optimizer", "reward", "sampler", "proposal", "logger"):
                continue  # the plugin groups: their own page
            rows.append(f"| `{prefix}{f.name}` | `{_cell(repr(default))}` | {_cell(helps.get(f.name, ''))} |")
        if rows:
            out.append(f"## `{prefix.rstrip('.') or 'rlhf-train'}`\n\n| setting | default | what it does |\n"
                       "| --- | --- | --- |\n" + "\n".join(rows) + "\n")
        for name, sub in nested:
            table(sub, f"{prefix}{name}.")

    table(schema.RunConfig, "")
    return "\n".join(out)


def metrics() -> str:
    from rlhf.contracts.metrics import CATALOGUE

    rows = [f"| `{name}{'<k>' if name.endswith('@') else '<name>' if name.endswith('/') else ''}` | {who} | "
            f"{_cell(what)} |" for name, (who, what) in CATALOGUE.items()]
    return "| metric | logged by | meaning |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n"


GENERATORS = {"commands": commands, "plugins": plugins, "settings": settings, "metrics": metrics}
