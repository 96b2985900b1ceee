"""A config file is data: what a file may make a command do.

Hydra builds and calls what a config names (callbacks, the launcher, the sweeper, logging
handlers), a launcher writes what it is given into shell scripts, Hydra writes files where
its settings say and imports the packages of its search path, and a model's
`trust_remote_code` runs the code in its repository. A YAML file handed around
(`--config-dir D +experiment=x`) must make none of that happen. Instead of looking for
dangerous values, the rule says what a file may do; `rlhf.apps.hydra_setup` applies it to
every config Hydra composes (the run's, each sweep job's, each prepared command's) before
Hydra imports, opens or starts anything:

1. Under `hydra:`, a file outside the project's own configs (every `file://` source: a
   `--config-dir`, a `--config-path`, a search path) may set only the keys of FILE_MAY_SET,
   each checked as it will be used (resolved, whatever the key's type): the mode, sweep
   parameters of non-`hydra` keys, run and sweep directories under `outputs/` or `multirun/`
   of the current directory, and a launcher's typed resources and plain names. The check
   compares the composed `hydra:` section with the one composed without those files' `hydra:`
   settings, so every key they set is seen, whatever its type. A `hydra` override that is not
   on the user's own command line (a sweep's parameters, a prepared command's arguments) is
   refused before Hydra composes with it.
2. Everywhere else, a `_target_` names a registered plugin or one of the commands' own
   classes; `trust_remote_code` is false; a field that names a file the command writes
   (declared with `writes_file`) stays under the current directory; a string that reaches a
   shell script holds no line break.
3. The user's own command line is theirs: a key it sets is not checked, and
   `+trust_config=true` on it trusts the files as code (CONSENT).

Anything else is refused in one line naming each key (PluginError).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from rlhf.contracts.registry import PluginError

# `+trust_config=true` on the command line: the config files are trusted as code
CONSENT = "trust_config"
# the user's own command line, as the first command of a process tree saw it (a sweep's jobs and
# the commands it prepares inherit it): set by `remember_command_line`
COMMAND_LINE = "RLHF_COMMAND_LINE"
# what a field that names a file written by the command declares (`writes_file`)
WRITES_FILE = "rlhf_writes_file"
# where a file may put a run or a sweep: these folders of the current directory (Hydra's own defaults)
OUTPUT_ROOTS = ("outputs", "multirun")
# a name that reaches a shell or an sbatch script: no blank, no line break, no quote, no $
NAME = re.compile(r"^[A-Za-z0-9_.,:=@%*+/-]*$")
OVERRIDE_KEY = re.compile(r"^(\+\+?|~)?[A-Za-z_][\w.@/-]*$")


def writes_file(default: Any = None, **kwargs: Any) -> Any:
    """A config field naming a file (or folder) the command writes: a config file may point it
    only at a place under the current directory (the user's command line anywhere)."""
    return dataclasses.field(default=default, metadata={WRITES_FILE: True, **kwargs.pop("metadata", {})}, **kwargs)


# ---------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class CommandLine:
    """The overrides the user typed (the first command of the process tree)."""

    overrides: tuple[str, ...] = ()

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(o.split("=", 1)[0].lstrip("+~") for o in self.overrides)

    @property
    def trusted(self) -> bool:
        """`+trust_config=true`: the user trusts the config files as code."""
        return any(o.lstrip("+") in (f"{CONSENT}=true", f"{CONSENT}=True") for o in self.overrides)

    def sets(self, path: str) -> bool:
        """Whether the command line sets `path` or a key above it."""
        return any(path == k or path.startswith((k + ".", k + "[")) for k in self.keys)


def remember_command_line(argv: Iterable[str]) -> None:
    """Record the overrides of this command line for every process it starts, unless a parent
    command recorded its own (then those are the user's)."""
    if COMMAND_LINE not in os.environ:
        overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
        os.environ[COMMAND_LINE] = json.dumps(overrides)


def command_line() -> CommandLine:
    try:
        return CommandLine(tuple(map(str, json.loads(os.environ.get(COMMAND_LINE, "[]")))))
    except (ValueError, TypeError):
        return CommandLine()


def is_hydra_key(key: str) -> bool:
    key = key.lstrip("+~")
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def _refuse(bad: list[str], fix: str) -> None:
    if bad:
        raise PluginError("a config file may not do this: " + "; ".join(bad) + ". " + fix)


FIX = (f"Set it on your own command line if you mean it, or add +{CONSENT}=true if you trust these config files "
       "as code")


def check_overrides(overrides: Iterable[str], line: CommandLine | None = None) -> None:
    """Before Hydra composes: a `hydra` override that is not on the user's command line (a sweep's
    parameters, a prepared command's arguments) would act before the composed config is checked."""
    line = command_line() if line is None else line
    if line.trusted:
        return
    bad = [f"{o.split('=', 1)[0].lstrip('+~')}: {o!r} comes from a config file (a sweep's parameters or a prepared "
           "command), not your command line" for o in overrides
           if is_hydra_key(o.split("=", 1)[0]) and o not in line.overrides and not o.startswith("hydra.mode=")]
    _refuse(bad, FIX)


def check_searchpath(values: Any, source: str, line: CommandLine | None = None) -> None:
    """A primary config file's `hydra.searchpath`, before Hydra opens it (a `pkg://` or
    `structured://` entry imports a module while Hydra composes)."""
    line = command_line() if line is None else line
    if not values or not source.startswith("file://") or line.trusted or line.sets("hydra.searchpath"):
        return
    _refuse([f"hydra.searchpath[{i}]: {v} (set by {source.removeprefix('file://')}): a search path adds configs and "
             "imports packages" for i, v in enumerate(values)], FIX)


# ---------------------------------------------------------------------------- what files set under hydra:


def _key(path: tuple) -> str:
    """`a.b[1].c`, a key that is no plain name quoted (`handlers.console['.']`)."""
    out = ""
    for k in path:
        if not isinstance(k, str):
            out += f"[{k}]"
        elif k.strip(".") == "" or "[" in k:
            out += f"[{k!r}]"
        else:
            out += f".{k}" if out else k
    return out


def _leaves(value: Any, path: tuple) -> Iterator[tuple]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def differences(a: Any, b: Any, path: tuple = ()) -> Iterator[tuple]:
    """The paths of the leaves where `a` differs from `b` (plain containers; keys of any type,
    `1` and `"1"` apart)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in b:
                yield from _leaves(a[k], (*path, k))
            elif k not in a:
                yield (*path, k)
            else:
                yield from differences(a[k], b[k], (*path, k))
    elif isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            if i >= len(b):
                yield from _leaves(a[i], (*path, i))
            elif i >= len(a):
                yield (*path, i)
            else:
                yield from differences(a[i], b[i], (*path, i))
    elif type(a) is not type(b) or a != b:
        yield from _leaves(a, path)


@dataclass
class Value:
    """A value of the composed config at a path: as written and as it will be used."""

    raw: Any
    resolve: Callable[[], Any]
    cwd: str
    path: tuple


def _text(v: Value) -> str:
    value = v.resolve()
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{value!r} holds a control character (a line break reaches a script or a file name)")
    return value


def _inside(path: str, roots: Iterable[str], cwd: str) -> bool:
    real = os.path.realpath(os.path.join(cwd, path))
    return any(real.startswith(os.path.realpath(os.path.join(cwd, r)) + os.sep) for r in roots)


def _output_dir(v: Value) -> None:
    path = _text(v)
    if not _inside(path, OUTPUT_ROOTS, v.cwd):
        raise ValueError(f"{path!r} is outside {' and '.join(r + '/' for r in OUTPUT_ROOTS)} of the current directory")


def _subdir(v: Value) -> None:
    text = str(v.raw)
    for known in ("${hydra.job.num}", "${hydra.job.id}"):
        text = text.replace(known, "0")
    parts = text.split("/")
    if "${" in text or not text or any(p in ("", ".", "..") or not NAME.match(p) for p in parts):
        raise ValueError(f"{v.raw!r}: a sweep's subfolder is plain names and ${{hydra.job.num}} or ${{hydra.job.id}}")


def _mode(v: Value) -> None:
    value = v.resolve()
    if getattr(value, "name", value) not in ("RUN", "MULTIRUN", None):
        raise ValueError(f"{value!r} is not RUN or MULTIRUN")


def _sweep_param(v: Value) -> None:
    key = str(v.path[-1])
    if not OVERRIDE_KEY.match(key) or is_hydra_key(key):
        raise ValueError(f"a sweep's parameters set the run's own keys, not {key!r}")
    values = v.resolve()
    for x in values if isinstance(values, list) else [values]:
        if not isinstance(x, (str, int, float, bool, type(None))):
            raise ValueError(f"{x!r} is not a value")
        if isinstance(x, str) and any(ord(c) < 32 for c in x):
            raise ValueError(f"{x!r} holds a control character")


def _name(v: Value) -> None:
    value = v.resolve()
    if value is not None and not (isinstance(value, str) and NAME.match(value)):
        raise ValueError(f"{value!r}: a name here is letters, digits and _.,:=@%*+/- (it reaches a shell script)")


def _number(v: Value) -> None:
    value = v.resolve()
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{value!r} is not a number")


def _flag(v: Value) -> None:
    if not isinstance(v.resolve(), bool):
        raise ValueError(f"{v.resolve()!r} is not true or false")


# the launchers' typed resources (joblib's, submitit's local and SLURM ones) and their plain names
LAUNCHER_NUMBERS = ("n_jobs", "verbose", "timeout", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node",
                    "mem_gb", "nodes", "cpus_per_gpu", "gpus_per_task", "signal_delay_s", "max_num_timeout",
                    "array_parallelism")
LAUNCHER_NAMES = ("name", "partition", "qos", "comment", "constraint", "exclude", "gres", "account", "mem_per_gpu",
                  "mem_per_cpu", "backend", "prefer", "require", "pre_dispatch", "batch_size", "max_nbytes", "mmap_mode")
# (path pattern, check): what a config file may set under hydra:, "*" standing for any string key
FILE_MAY_SET: list[tuple[tuple[str, ...], Callable[[Value], None]]] = [
    (("hydra", "mode"), _mode),
    (("hydra", "run", "dir"), _output_dir),
    (("hydra", "sweep", "dir"), _output_dir),
    (("hydra", "sweep", "subdir"), _subdir),
    (("hydra", "sweeper", "params", "*"), _sweep_param),
    (("hydra", "sweeper", "grids", "*", "*"), _sweep_param),
    (("hydra", "sweeper", "max_batch_size"), _number),
    (("hydra", "callbacks", "sweep", "compare"), _flag),
    (("hydra", "callbacks", "sweep", "metric"), _name),
    *((("hydra", "launcher", f), _number) for f in LAUNCHER_NUMBERS),
    *((("hydra", "launcher", f), _name) for f in LAUNCHER_NAMES),
    (("hydra", "launcher", "stderr_to_stdout"), _flag),
]
MAY_SET = ("Under hydra: a file may set only the mode, sweep parameters of the run's own keys, run and sweep "
           "directories under outputs/ or multirun/, and a launcher's resources and plain names")
# strings that reach a shell script whoever sets them: never a line break
SHELL_FIELDS = [("hydra", "launcher", f) for f in LAUNCHER_NAMES]


def _allowed(path: tuple) -> tuple[tuple, Callable[[Value], None]] | None:
    for pattern, check in FILE_MAY_SET:
        if len(path) >= len(pattern) and all(isinstance(k, str) and (p == "*" or p == k) for p, k in zip(pattern, path)):
            return path[: len(pattern)], check
    return None


class Config:
    """Read access to a composed config (an OmegaConf DictConfig) by path, keys of any type."""

    def __init__(self, cfg: Any, cwd: str | None = None):
        self.cfg, self.cwd = cfg, cwd or os.getcwd()

    def node(self, path: tuple) -> Any:
        node = self.cfg
        for k in path:
            try:
                node = node._get_node(k)
            except Exception:
                node = None
            if node is None:
                raise KeyError(_key(path))
        return node

    def raw(self, path: tuple) -> Any:
        from omegaconf import OmegaConf

        node = self.node(path)
        return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node._value()

    def resolved(self, path: tuple) -> Any:
        from omegaconf import OmegaConf

        parent, node = self.node(path[:-1]), self.node(path)
        try:
            if OmegaConf.is_config(node):
                return OmegaConf.to_container(node, resolve=True)
            return parent[path[-1]]
        except Exception as e:
            raise ValueError(f"does not resolve ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None

    def value(self, path: tuple) -> Value:
        return Value(self.raw(path), lambda: self.resolved(path), self.cwd, path)


def check_hydra(cfg: Any, baseline: Any, files: list[tuple[str, Any]], line: CommandLine | None = None,
                cwd: str | None = None) -> None:
    """Refuse what config files set under `hydra:` beyond FILE_MAY_SET. `cfg` is the composed
    config, `baseline` the same composition without the `hydra:` settings of `files` (each
    (path, the hydra section it held)); every difference is a file's doing."""
    from omegaconf import OmegaConf

    line = command_line() if line is None else line
    if line.trusted:
        return
    view = Config(cfg, cwd)
    a = OmegaConf.to_container(cfg.hydra, resolve=False)
    b = OmegaConf.to_container(baseline.hydra, resolve=False)
    bad, seen, who = [], set(), []
    for path in differences(a, b, ("hydra",)):
        rule = _allowed(path)
        if rule is None:
            who.append(_who(path, files))
            try:
                shown = repr(view.raw(path))[:80]
            except KeyError:
                shown = "(removed)"
            bad.append(f"{_key(path)}: {shown}")
            continue
        prefix, check = rule
        if prefix in seen:
            continue
        seen.add(prefix)
        try:
            check(view.value(prefix))
        except KeyError:
            bad.append(f"{_key(prefix)}: (removed)")
            who.append(_who(prefix, files))
        except ValueError as e:
            bad.append(f"{_key(prefix)}: {e}")
            who.append(_who(prefix, files))
    if bad:
        who = list(dict.fromkeys(who))
        raise PluginError(f"{' and '.join(who)} set{'s' if len(who) == 1 else ''} under hydra: what a config file may not "
                          f"set: {'; '.join(bad)}. {MAY_SET}. {FIX}")


def _who(path: tuple, files: list[tuple[str, Any]]) -> str:
    """The file(s) whose hydra section holds `path` (or one above it)."""
    names = []
    for name, section in files:
        node: Any = {"hydra": section}
        for k in path:
            if isinstance(node, dict) and k in node:
                node = node[k]
            elif isinstance(node, list) and isinstance(k, int) and k < len(node):
                node = node[k]
            else:
                break
        else:
            names.append(name)
    return " and ".join(dict.fromkeys(names)) or "a config file"


# ---------------------------------------------------------------------------- everything else


def _walk(node: Any, path: tuple) -> Iterator[tuple[tuple, Any, Any]]:
    """(path, node, its parent) of every node, keys of any type."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return
        for k in node.keys():
            child = node._get_node(k)
            yield (*path, k), child, node
            yield from _walk(child, (*path, k))
    elif isinstance(node, ListConfig):
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return
        for i in range(len(node)):
            child = node._get_node(i)
            yield (*path, i), child, node
            yield from _walk(child, (*path, i))


def check(cfg: Any, allowed: tuple[str, ...] = (), registered: Iterable[str] = (), line: CommandLine | None = None,
          cwd: str | None = None) -> None:
    """Refuse (PluginError, one line naming every key) what a composed config may not make the
    command do outside `hydra:` (module doc, rule 2), and a line break in a launcher's names."""
    line = command_line() if line is None else line
    view, registered, bad = Config(cfg, cwd), set(registered), []
    for path, node, parent in _walk(cfg, ()):
        if path[0] == "hydra":
            continue
        key, last = _key(path), path[-1]
        if line.trusted or line.sets(key):
            continue
        if last == "_target_":
            try:
                target = view.resolved(path)
            except ValueError as e:
                bad.append(f"{key}: {e}")
                continue
            if target not in registered and not (str(target).startswith(allowed) and allowed):
                bad.append(f"{key}: {target} is not a registered plugin (register it with @register(<group>, <name>))")
        elif last == "trust_remote_code":
            try:
                on = view.resolved(path)
            except ValueError as e:
                bad.append(f"{key}: {e}")
                continue
            if on:
                bad.append(f"{key}: {on!r} runs the Python code a model repository ships")
        elif isinstance(last, str) and _declares(parent, last):
            try:
                where = view.resolved(path)
                if where in (None, ""):
                    continue
                _text(Value(where, lambda w=where: w, view.cwd, path))
                if not _inside(str(where), ["."], view.cwd):
                    raise ValueError(f"{where!r} is outside the current directory")
            except ValueError as e:
                bad.append(f"{key}: {e} (a file this command writes)")
    for path in SHELL_FIELDS:  # whoever set them
        try:
            value = view.resolved(path)
        except (KeyError, ValueError):
            continue
        if isinstance(value, str) and any(ord(c) < 32 for c in value) and not line.trusted:
            bad.append(f"{_key(path)}: {value!r} holds a line break, which a launcher writes into a shell script")
    _refuse(bad, "Register a plugin with @register(<group>, <name>) or remove the key. " + FIX)


def _declares(parent: Any, key: str) -> bool:
    """Whether `key` of this structured node is declared `writes_file`."""
    from omegaconf import OmegaConf

    kind = OmegaConf.get_type(parent)
    if kind is None or not dataclasses.is_dataclass(kind):
        return False
    return any(f.name == key and f.metadata.get(WRITES_FILE) for f in dataclasses.fields(kind))
