"""Plugin registry: `@register(group, name)` and discovery.

A plugin is a class with a nested `Config` dataclass. Registering it stores a typed
node in Hydra's ConfigStore under `group/name`, with `_target_` pointing at the class,
so `optimizer=ppo` selects it and `optimizer.clip_coef=0.1` is type-checked by Hydra.
The dataclass holds the only copy of the defaults.

Discovery order: every module under `rlhf_plugins`, then every entry point in the group
`rlhf.plugins`, then the modules named in the `RLHF_PLUGINS` environment variable
(comma-separated). The core names `rlhf_plugins` only as a string, here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from hydra.core.config_store import ConfigStore

from rlhf.contracts.interfaces import OPTIONAL, PROTOCOLS

BUILTIN_PACKAGE = "rlhf_plugins"
ENTRY_POINT_GROUP = "rlhf.plugins"
ENV_MODULES = "RLHF_PLUGINS"

# Groups whose options are combined as a list (`logger=[jsonl,wandb]`): each option
# lives under its own key, `logger.<name>`, so several can be selected at once.
LIST_GROUPS = {"logger"}


class PluginError(RuntimeError):
    """A plugin could not be registered, found or instantiated."""


@dataclass(frozen=True)
class PluginInfo:
    group: str
    name: str
    cls: type
    config: type  # the dataclass stored in the ConfigStore (with `_target_`)
    source: str  # "builtin", "entry point <dist>", or "module"

    @property
    def target(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


_REGISTRY: dict[tuple[str, str], PluginInfo] = {}
_current_source = "module"


def register(group: str, name: str) -> Callable[[type], type]:
    """Class decorator: register `cls` (with a nested `Config` dataclass) as `group/name`."""

    def wrap(cls: type) -> type:
        base = getattr(cls, "Config", None)
        if base is None or not dataclasses.is_dataclass(base):
            raise PluginError(
                f"plugin {group}/{name} ({cls.__module__}.{cls.__qualname__}) needs a nested "
                "`Config` dataclass; add `@dataclass class Config: ...` inside the class"
            )
        target = f"{cls.__module__}.{cls.__qualname__}"
        key = (group, name)
        old = _REGISTRY.get(key)
        if old is not None:
            if old.target == target:  # the same class seen again (module re-import)
                return cls
            raise PluginError(
                f"duplicate plugin {group}/{name}: {target} ({_current_source}) and "
                f"{old.target} ({old.source}) both register it; rename one of them"
            )
        # The stored node: the user's dataclass plus `_target_`, first so it reads well.
        node = dataclasses.make_dataclass(
            f"{cls.__name__}Node",
            [("_target_", str, dataclasses.field(default=target))],
            bases=(base,),
        )
        package = f"{group}.{name}" if group in LIST_GROUPS else group
        for member, default in OPTIONAL.get(group, {}).items():  # what it leaves out, declared once
            if not hasattr(cls, member):
                setattr(cls, member, default)
        ConfigStore.instance().store(group=group, name=name, node=node, package=package)
        _REGISTRY[key] = PluginInfo(group, name, cls, node, _current_source)
        return cls

    return wrap


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Plugins registered inside are gone after it (a test's throwaway plugins)."""
    saved = dict(discover())
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def _import_with_source(module: str, source: str) -> None:
    global _current_source
    previous, _current_source = _current_source, source
    try:
        importlib.import_module(module)
    finally:
        _current_source = previous


_discovered = False


def discover() -> dict[tuple[str, str], PluginInfo]:
    """Import built-in, entry-point and user plugin modules (once); return the registry."""
    global _discovered
    if _discovered:
        return _REGISTRY
    builtin = _import_builtin()
    for mod in pkgutil.walk_packages(builtin.__path__, prefix=BUILTIN_PACKAGE + "."):
        _import_with_source(mod.name, "builtin")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        try:
            _import_with_source(ep.value.split(":")[0], f"entry point {dist}")
        except PluginError:
            raise
        except Exception as e:  # a broken third-party package must say which one it is
            raise PluginError(
                f"entry point {ep.name!r} of package {dist!r} ({ep.value}) failed to import: {e}"
            ) from e
    for module in filter(None, (m.strip() for m in os.environ.get(ENV_MODULES, "").split(","))):
        _import_user_module(module)
    _discovered = True
    return _REGISTRY


def _import_builtin():
    """The installed `rlhf_plugins`, never a folder of that name in the current directory
    (which `python -m` and torchrun put first on sys.path)."""
    if BUILTIN_PACKAGE in sys.modules:
        return sys.modules[BUILTIN_PACKAGE]
    here = {"", ".", os.getcwd()}
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in here and os.path.abspath(p) != os.getcwd()]
    try:
        return importlib.import_module(BUILTIN_PACKAGE)
    finally:
        sys.path[:] = saved


def _import_user_module(module: str) -> None:
    """A module named in $RLHF_PLUGINS, found on sys.path or else in the current directory
    (where the README's example keeps it), named in the error when it is in neither."""
    top = module.split(".")[0]
    for attempt in ("sys.path", "the current directory"):
        try:
            _import_with_source(module, f"${ENV_MODULES}")
            return
        except PluginError:
            raise
        except ModuleNotFoundError as e:
            if e.name != top:  # the module was found; something it imports was not
                raise PluginError(f"{ENV_MODULES} names {module!r}, which failed to import: {e}") from e
            if attempt == "sys.path":
                sys.path.append(os.getcwd())  # last, so it never shadows an installed package
        except Exception as e:
            raise PluginError(f"{ENV_MODULES} names {module!r}, which failed to import: {e!r}") from e
    raise PluginError(f"{ENV_MODULES} names {module!r}, which is not importable: no {module.replace('.', '/')}.py "
                      f"(or package) in {os.getcwd()} or on sys.path; check the name, or add its folder to PYTHONPATH")


def plugins(group: str | None = None) -> list[PluginInfo]:
    discover()
    return sorted(
        (p for p in _REGISTRY.values() if group is None or p.group == group),
        key=lambda p: (p.group, p.name),
    )


def instantiate(group: str, node: Any, **kwargs: Any) -> Any:
    """Build a plugin from its composed config node.

    Only classes registered in `group` are instantiated: a `_target_` from a hand-written
    YAML file that names anything else (say `os.system`) is refused before it is imported.
    The class receives its typed `Config` as the single argument `cfg`. The plugin must
    satisfy its group's Protocol (`interfaces.PROTOCOLS`): one that lacks a member the core
    uses is refused here, naming it, not when the loop first reaches for it.
    """
    from omegaconf import OmegaConf

    discover()
    target = node.get("_target_") if node is not None else None
    if target is None:
        raise PluginError(f"no {group} selected; choose one with {group}=<name> ({_names(group)})")
    info = next((p for p in _REGISTRY.values() if p.group == group and p.target == target), None)
    if info is None:
        raise PluginError(
            f"{group}: _target_ {target!r} is not a registered {group} plugin "
            f"({_names(group)}); register it with @register({group!r}, <name>)"
        )
    fields = {f.name for f in dataclasses.fields(info.cls.Config)}
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("_target_")
    unknown = sorted(set(values) - fields)
    if unknown:
        raise PluginError(
            f"{group} plugin {info.name!r} has no field(s) {unknown}; its fields: {sorted(fields)}"
        )
    cfg = info.cls.Config(**values)
    plugin = info.cls(cfg, **kwargs)
    protocol = PROTOCOLS.get(group)
    if protocol is not None and not isinstance(plugin, protocol):
        missing = [m for m in protocol_members(protocol) if not hasattr(plugin, m)]
        raise PluginError(
            f"{group} plugin {info.name!r} ({info.target}) lacks {', '.join(missing)}, which the "
            f"{protocol.__name__} protocol declares (rlhf/contracts/interfaces.py); add them"
        )
    return plugin


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a Protocol declares (its own, in order)."""
    names = list(getattr(protocol, "__annotations__", {}))
    names += [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_") and n not in names]
    return names


def _names(group: str) -> str:
    return ", ".join(p.name for p in plugins(group)) or "none registered"
