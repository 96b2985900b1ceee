"""What every Hydra command of the project does before Hydra starts.

- Plugins discovered and every schema stored, so `optimizer=ppo` and typed overrides work.
- Every config Hydra composes is checked before Hydra uses any of it (`rlhf.contracts.safety`):
  Hydra instantiates `hydra.callbacks`, the launcher and the sweeper, Python's logging builds
  the handlers of `hydra.job_logging`, and a launcher runs what it is given, before a
  command's own code runs; a YAML passed with --config-dir could name any function there.
  Hydra's composition is wrapped (for this process) with that check. The keys of the user's
  own command line are remembered for the processes the command starts (they may set fields
  that run code; a file may not).
- The launcher of `hydra/launcher=joblib` (hydra_plugins.rlhf_launcher) made known to
  Hydra, whose scan of the `hydra_plugins` namespace misses it in an editable install.
- Warnings printed as one line each, without the source line that raised them.
- Every refusal before the command's own code is one line naming the key and the fix, not a
  traceback or Hydra's search-path dump: a module of $RLHF_PLUGINS that is not there, a group
  option that does not exist (what exists, and how a plugin module is named), a key added
  with `+` that no schema has (the nearest field), a `_target_` that is not allowed.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator

from rlhf.contracts import registry, safety, schema

# the commands' own classes that their configs name
ALLOWED = ("rlhf.apps.sweep.SweepCallback", "rlhf.apps.sweep.Prepare", "hydra_plugins.rlhf_launcher.")


def prepare(remember: bool = True) -> None:
    """Discovery, schemas and checks; `remember`: this command line is the user's (a command
    that rewrites its arguments first remembers the rewritten ones itself)."""
    warnings.formatwarning = _one_line
    # our joblib.yaml takes the place of the joblib plugin's config of the same name, on purpose (and
    # a file's launcher config of a plugin's name is checked like any other: Hydra's warning adds nothing)
    warnings.filterwarnings("ignore", message=r"\s*'hydra/[\w/]+' is validated against ConfigStore schema")
    # peft's note when an adapter covers an embedding (the toys' tied output layer): saved as it should be
    warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`")
    try:
        registry.discover()
    except registry.PluginError as e:
        raise refusal(e) from None
    quiet_libraries()
    if remember:
        safety.remember_command_line(sys.argv[1:])
    schema.store()
    _check_targets()
    _register_launcher()


def quiet_libraries() -> None:
    """The libraries' own progress bars (transformers' "Loading weights" and "Writing model
    shards", the hub's downloads) stay off a command's output, which has its own; the libraries'
    switch brings them back: HF_HUB_DISABLE_PROGRESS_BARS=0."""
    import os

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "0":
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # (read by huggingface_hub and datasets when they load)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {' '.join(str(message).split())}\n"


class _Files:
    """While Hydra composes: the `hydra:` sections that config files (`file://` sources) held,
    and whether to leave them out (the baseline composition `safety.check_hydra` compares with)."""

    held: list | None = None
    strip = False


def _check_targets() -> None:
    """Check every config the moment Hydra's loader has composed it, before Hydra uses any
    of it (it configures its own logging inside composition): the run's and each job's
    (`load_sweep_config` composes through `load_configuration`). A `hydra` override that is not
    the user's is refused before composition, a primary config file's search path before Hydra
    opens it; what files set under `hydra:` is the difference from a second composition that
    leaves their `hydra:` sections out, made only when a file held one."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    load = ConfigLoaderImpl.load_configuration
    if getattr(load, "checks_targets", False):
        return

    def compose(self, *args, **kwargs):
        from hydra.errors import ConfigCompositionException, MissingConfigException

        try:
            return load(self, *args, **kwargs)
        except MissingConfigException as e:
            raise refusal(missing_option(e)) from None
        except ConfigCompositionException as e:
            raise refusal(composition_error(e)) from None

    def checked(self, config_name, overrides, *args, **kwargs):
        try:
            safety.check_overrides(overrides)
        except registry.PluginError as e:
            raise refusal(e) from None
        _Files.held = held = []
        try:
            cfg = compose(self, config_name, overrides, *args, **kwargs)
            if held:
                _Files.held, _Files.strip = None, True
                baseline = compose(self, config_name, overrides, *args, **kwargs)
        finally:
            _Files.held, _Files.strip = None, False
        try:
            if held:
                safety.check_hydra(cfg, baseline, held)
            safety.check(cfg, ALLOWED, registered=[p.target for p in registry.plugins()])
            schema.check_known_keys(cfg)
        except (registry.PluginError, ValueError) as e:
            raise refusal(e) from None
        return cfg

    checked.checks_targets = True
    ConfigLoaderImpl.load_configuration = checked

    single = ConfigLoaderImpl._load_single_config

    def single_checked(self, default, repo):
        import copy

        from omegaconf import DictConfig, OmegaConf, flag_override

        res = single(self, default, repo)
        if str(res.path).startswith("file://") and isinstance(res.config, DictConfig) and "hydra" in res.config:
            if _Files.held is not None:
                where = f"{str(res.path).removeprefix('file://')}/{default.config_path}.yaml"
                _Files.held.append((where, OmegaConf.to_container(res.config._get_node("hydra"), resolve=False)))
            if _Files.strip:
                res = copy.copy(res)
                res.config = copy.deepcopy(res.config)
                with flag_override(res.config, ["struct", "readonly"], False):
                    res.config.pop("hydra")
        return res

    ConfigLoaderImpl._load_single_config = single_checked

    search = ConfigLoaderImpl._process_config_searchpath

    def checked_search(self, config_name, parsed_overrides, repo, _search=search):
        from omegaconf import OmegaConf

        if config_name is not None:
            loaded = repo.load_config(config_path=config_name)  # (Hydra loads it next, from the same cache)
            try:
                if loaded is not None:
                    safety.check_searchpath(OmegaConf.select(loaded.config, "hydra.searchpath"), str(loaded.path))
            except registry.PluginError as e:
                raise refusal(e) from None
        return _search(self, config_name, parsed_overrides, repo)

    ConfigLoaderImpl._process_config_searchpath = checked_search


def command() -> str:
    """This command's name as the user typed it (rlhf-train), or its module's (python -m)."""
    import os

    name = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "rlhf")
    return name if name.startswith("rlhf-") else "rlhf-" + name.removesuffix(".py").replace("_cli", "").replace("_", "-")


class Refusal(SystemExit):
    """A command refusing its input, in one line: `<command>: <message>`, exit status 1."""


def refusal(e: BaseException | str) -> Refusal:
    """The one-line exit of a command that refuses its input. (A SystemExit passes through
    Hydra, which would print an Exception with its search path.)"""
    text = " ".join(str(e).split("\n")) if "\n" in str(e) else str(e)
    return Refusal(f"{command()}: {text}")


@contextlib.contextmanager
def refusing(*kinds: type) -> Iterator[None]:
    """Around a command's set-up (before anything trains): a setting, a file or a model that
    cannot be used ends the command in one line (`refusal`), not a traceback. `kinds`: the
    command's own refusals beside ValueError, OSError and PluginError."""
    try:
        yield
    except (ValueError, OSError, registry.PluginError, *kinds) as e:
        raise refusal(e) from None


def missing_option(e) -> str:
    """A group option that does not exist: what exists, and how a plugin of one's own is named."""
    path = str(e.missing_cfg_file or "")
    group, _, name = path.rpartition("/")
    options = ", ".join(e.options or []) or "none"
    if group in {p.group for p in registry.plugins()}:
        return (f"Could not find '{path}': no {group} plugin named {name!r} (registered: {options}). A plugin of your own is "
                f"registered when its module is imported: name it in $RLHF_PLUGINS (RLHF_PLUGINS=my_module, a "
                "my_module.py in the current directory or on PYTHONPATH) or install it with an `rlhf.plugins` entry "
                "point; `rlhf-plugins` lists every registered plugin")
    if not group:
        return f"no config named {path!r}; check --config-name and --config-dir"
    return (f"Could not find '{path}' (the options of {group}: {options}); a file of your own goes in <dir>/{group}/"
            f"{name}.yaml with --config-dir <dir>" + ("; a model directory is policy.path=<dir>" if group == "policy" else ""))


def composition_error(e: BaseException) -> str:
    """Hydra's refusal of an override or a config file in one line: its reason, and for a key
    that does not exist the nearest field (not Hydra's advice to add it with `+`, which a typed
    group does not take)."""
    import dataclasses
    import re

    def lines_of(x: object) -> list[str]:
        return [line.strip() for line in str(x).splitlines() if line.strip()]

    cause = e.__cause__
    own, reason = lines_of(e) or [type(e).__name__], lines_of(cause) if cause is not None else []
    if reason:  # Hydra's line, then the cause's (not Hydra's advice on the next line of its own)
        text = f"{own[0].rstrip('.:')}: {reason[0]}"
    else:  # a config file's error: the reason is on the line after the colon
        text = f"{own[0].rstrip(':')}: {own[1]}" if own[0].endswith(":") and len(own) > 1 else own[0]
    lines = own + reason
    full = getattr(cause, "full_key", None) or next((m[1] for x in lines if (m := re.match(r"full_key: (\S+)", x))), None)
    kind = getattr(cause, "object_type", None) or _schema_named(next(
        (m[1] for x in lines if (m := re.match(r"object_type=(\w+)", x))), ""))
    if full and kind is not None and dataclasses.is_dataclass(kind):
        path, _, key = str(full).rpartition(".")
        if key not in {f.name for f in dataclasses.fields(kind)}:
            text += f"; {full}: {schema.nearest_field(kind, key, path)}"
    return text


def _schema_named(name: str) -> type | None:
    """The typed schema (a command's or a plugin's) of this class name, if there is one."""
    import dataclasses

    known = {c.__name__: c for c in vars(schema).values() if isinstance(c, type) and dataclasses.is_dataclass(c)}
    known.update({p.config.__name__: p.config for p in registry.plugins()})
    return known.get(name)


def _register_launcher() -> None:
    from hydra.core.plugins import Plugins
    from hydra_plugins.rlhf_launcher import GridsSweeper, IsolatedJoblibLauncher

    for plugin in (IsolatedJoblibLauncher, GridsSweeper):
        Plugins.instance().class_name_to_class.setdefault(f"{plugin.__module__}.{plugin.__name__}", plugin)
