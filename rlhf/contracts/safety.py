"""A config file is data: what a composed config may make a command do.

Hydra builds and calls what a config names (callbacks, the launcher, the sweeper, logging
handlers), a launcher runs shell lines and interpreters it is given, logging imports what an
`ext://` value names, Hydra sets the job's environment variables (LD_PRELOAD, PYTHONPATH and
$RLHF_PLUGINS all load code), a model's `trust_remote_code` runs the code in its repository.
A YAML file handed around (`--config-dir D +experiment=x`) must make none of that happen. The
rule, checked on every composed config before Hydra uses any of it (the run's and each sweep
job's, `rlhf.apps.hydra_setup`):

- a `_target_` names a registered plugin, one of Hydra's own classes (HYDRA_TARGETS) or a
  class the command allows, by its own module and name;
- in Hydra's logging configs, only LOGGING_CLASSES are built (`class`, `()`), a stream is
  `ext://sys.stdout` or `ext://sys.stderr`, nothing else is `ext://` or `cfg://`, no `.`
  attributes are set, and a log file lies under the run directory;
- a field that can execute, import, unpickle or start a process (a launcher's fields outside
  LAUNCHER_FIELDS, such as submitit's `setup`, `srun_args`, `python`; `hydra.job.env_set`;
  a `pkg://` search path; `trust_remote_code`) holds nothing, unless the user set that very
  key on the command line: their own command line is theirs to run;
- an argument of a callback is data: no string that starts with `-` (a flag of a command
  it would run).

Anything else is refused with one line naming the key (PluginError).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Iterable

from rlhf.contracts.registry import PluginError, plugins

# Hydra's own classes that a composed config may name: its launchers, sweepers and callbacks,
# and the launcher plugins this project depends on. A name must be the class's own (module and
# qualified name), not a path through attributes (`...basic_launcher.logging.os.system`).
HYDRA_TARGETS = ("hydra._internal.core_plugins.", "hydra_plugins.hydra_joblib_launcher.",
                 "hydra_plugins.hydra_submitit_launcher.", "hydra.experimental.callbacks.")
# What Hydra's logging configs may build; a file handler writes only into the run directory.
LOGGING_CLASSES = {"logging.StreamHandler", "logging.FileHandler", "logging.NullHandler", "logging.Formatter",
                   "colorlog.ColoredFormatter"}
LOGGING_SECTIONS = ("hydra.job_logging", "hydra.hydra_logging")
LOG_FILES_UNDER = "${hydra.runtime.output_dir}/"
STREAMS = {"ext://sys.stdout", "ext://sys.stderr"}
# A launcher's fields that only say how much and where (the joblib and submitit launchers'
# resources and names): any other field (submitit's setup, srun_args, python,
# additional_parameters, or one no launcher here has) must be empty or set on the command line.
LAUNCHER_FIELDS = {
    "_target_", "n_jobs", "backend", "prefer", "require", "verbose", "timeout", "pre_dispatch", "batch_size",
    "temp_folder", "max_nbytes", "mmap_mode", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node",
    "tasks_per_node", "mem_gb", "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint",
    "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
    "max_num_timeout", "array_parallelism",
}
# Fields that run or load code whatever section holds them: empty (false) unless on the command line.
RUNS_CODE = {"hydra.job.env_set": "sets the job's environment variables (LD_PRELOAD, PYTHONPATH, RLHF_PLUGINS load code)",
             "trust_remote_code": "runs the Python code a model repository ships"}
# The keys the user typed on the command line, as the first command of a process tree saw them
# (a sweep's jobs and the commands it prepares inherit them); set by `remember_command_line`.
COMMAND_LINE_KEYS = "RLHF_COMMAND_LINE_KEYS"


def remember_command_line(argv: Iterable[str]) -> None:
    """Record the override keys of this command line for every process it starts, unless a
    parent command recorded its own (then those are the user's)."""
    if COMMAND_LINE_KEYS not in os.environ:
        keys = sorted({a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a and not a.startswith("-")})
        os.environ[COMMAND_LINE_KEYS] = json.dumps(keys)


def command_line_keys() -> frozenset[str]:
    try:
        return frozenset(json.loads(os.environ.get(COMMAND_LINE_KEYS, "[]")))
    except ValueError:
        return frozenset()


def _set_by_user(path: str, keys: frozenset[str]) -> bool:
    return any(path == k or path.startswith((k + ".", k + "[")) for k in keys)


def _is_own_name(target: str) -> bool:
    """Whether `target` names an object by its own module and qualified name."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return False
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}" == target
    return False


def _empty(value: Any) -> bool:
    return value is None or value is False or value == "" or (hasattr(value, "__len__") and len(value) == 0)


def check_searchpath(values: Any, user_keys: frozenset[str] | None = None) -> None:
    """A primary config's `hydra.searchpath`, before Hydra opens it: a `pkg://` entry imports that
    package while Hydra composes, before `check` can see the composed config."""
    keys = command_line_keys() if user_keys is None else user_keys
    bad = [f"hydra.searchpath[{i}]: {v} imports that package; a config file may not set it (set it on the command line "
           "if you mean it)" for i, v in enumerate(values or []) if str(v).startswith("pkg://")]
    if bad and not _set_by_user("hydra.searchpath", keys):
        raise PluginError("the config asks for what a config file may not do: " + "; ".join(bad))


def check(cfg: Any, allowed: tuple[str, ...] = (), user_keys: frozenset[str] | None = None) -> None:
    """Refuse (PluginError, one line naming every key) a composed config that could make the
    command execute, import, unpickle or start anything a config file may not (module doc)."""
    from omegaconf import DictConfig, ListConfig

    registered = {p.target for p in plugins()}
    keys = command_line_keys() if user_keys is None else user_keys
    bad: list[str] = []

    def raw(node: DictConfig, key: str) -> Any:
        try:
            return node[key]
        except Exception as e:  # an interpolation that does not resolve names nothing we can allow
            return f"<unresolvable: {e}>"

    def refuse(where: str, what: str) -> None:
        bad.append(f"{where}: {what}")

    def runs_code(where: str, value: Any, why: str) -> None:
        """Every non-empty leaf of `value` (a dict's entries, a list's items) set by the user, or refused."""
        if isinstance(value, (DictConfig, ListConfig)) and not _empty(value):
            items = value.items() if isinstance(value, DictConfig) else enumerate(value)
            for k, v in items:
                runs_code(f"{where}.{k}" if isinstance(value, DictConfig) else f"{where}[{k}]", v, why)
        elif not _empty(value) and not _set_by_user(where, keys):
            refuse(where, f"{why}; a config file may not set it (set it on the command line if you mean it)")

    def scalar(node: DictConfig, key: str, where: str, logging: bool, parent: str) -> None:
        value = raw(node, key)
        if key == "_target_":
            target = str(value)
            if target not in registered and not (target.startswith(HYDRA_TARGETS + allowed) and _is_own_name(target)):
                refuse(where, f"{target} is neither a registered plugin nor Hydra's own")
        elif logging and key in ("()", "class") and str(value) not in LOGGING_CLASSES:
            refuse(where, f"{value} is not one of {sorted(LOGGING_CLASSES)}")
        elif logging and key == "filename":
            text = str(node._get_node(key)._value())
            if not text.startswith(LOG_FILES_UNDER) or ".." in text:
                refuse(where, f"{text} (a log file goes under {LOG_FILES_UNDER})")
        elif logging and key == ".":
            refuse(where, "sets attributes on a logging object")
        elif logging and isinstance(value, str) and value.startswith(("ext://", "cfg://")) and value not in STREAMS:
            refuse(where, f"{value} (a logging config may name only {' or '.join(sorted(STREAMS))})")
        elif key == "trust_remote_code":
            runs_code(where, value, RUNS_CODE["trust_remote_code"])
        elif parent == "hydra.launcher" and key not in LAUNCHER_FIELDS:
            runs_code(where, value, "a launcher field that can run commands")
        elif parent.startswith("hydra.callbacks.") and isinstance(value, str) and value.startswith("-"):
            refuse(where, f"{value!r} is a flag, not data: a callback's arguments may not pass flags to what it runs")
        elif where.startswith("hydra.searchpath[") and str(value).startswith("pkg://"):
            runs_code(where, value, "a pkg:// search path imports that package")

    def walk(node: Any, path: str, logging: bool) -> None:
        if isinstance(node, DictConfig):
            for key in map(str, node.keys()):
                where = f"{path}.{key}" if path else key
                child = node._get_node(key)
                if where in RUNS_CODE or (path == "hydra.launcher" and key not in LAUNCHER_FIELDS
                                          and isinstance(child, (DictConfig, ListConfig))):
                    runs_code(where, raw(node, key), RUNS_CODE.get(where, "a launcher field that can run commands"))
                elif isinstance(child, (DictConfig, ListConfig)):
                    walk(child, where, logging or where in LOGGING_SECTIONS)
                else:
                    scalar(node, key, where, logging, path)
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                child, where = node._get_node(i), f"{path}[{i}]"
                if isinstance(child, (DictConfig, ListConfig)):
                    walk(child, where, logging)
                elif path.startswith("hydra.callbacks.") and str(child._value()).startswith("-"):
                    refuse(where, f"{child._value()!r} is a flag, not data: a callback's arguments may not pass flags "
                                  "to what it runs")
                elif path == "hydra.searchpath" and str(child._value()).startswith("pkg://"):
                    runs_code(where, child._value(), "a pkg:// search path imports that package")

    walk(cfg, "", False)
    if bad:
        raise PluginError("the config asks for what a config file may not do: " + "; ".join(bad)
                          + ". Register a plugin with @register(<group>, <name>), or remove them")
