"""Registration, discovery, the allow-list of targets, and the core/plugin boundary."""

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rlhf.contracts import interfaces, registry

ROOT = Path(__file__).resolve().parents[1]


def test_register_stores_typed_node_with_target():
    @registry.register("testgroup", "alpha")
    class Alpha:
        @dataclass
        class Config:
            x: int = 3  # a number

        def __init__(self, cfg):
            self.cfg = cfg

    node = ConfigStore.instance().repo["testgroup"]["alpha.yaml"].node
    assert node._target_.endswith("Alpha") and node.x == 3
    obj = registry.instantiate("testgroup", OmegaConf.create({"_target_": node._target_, "x": 5}))
    assert isinstance(obj, Alpha) and obj.cfg == Alpha.Config(x=5)
    # an untyped YAML node with a stray key is refused, naming the key
    with pytest.raises(registry.PluginError, match=r"no field\(s\) \['y'\]"):
        registry.instantiate("testgroup", OmegaConf.create({"_target_": node._target_, "y": 1}))


def test_duplicate_name_is_an_error():
    @registry.register("testgroup", "beta")
    class First:
        @dataclass
        class Config:
            pass

    with pytest.raises(registry.PluginError, match="duplicate plugin testgroup/beta"):
        @registry.register("testgroup", "beta")
        class Second:
            @dataclass
            class Config:
                pass


def test_plugin_without_config_dataclass_is_refused():
    with pytest.raises(registry.PluginError, match="nested `Config` dataclass"):
        @registry.register("testgroup", "gamma")
        class NoConfig:
            pass


@pytest.mark.parametrize("target", ["builtins.open", "os.system", "subprocess.run"])
def test_unregistered_targets_are_refused_before_import(target):
    with pytest.raises(registry.PluginError, match="not a registered reward plugin"):
        registry.instantiate("reward", OmegaConf.create({"_target_": target, "args": "touch /tmp/pwned"}))


def test_builtin_plugins_are_discovered_and_satisfy_their_protocols():
    protocols = {
        "optimizer": interfaces.PolicyOptimizer, "reward": interfaces.RewardSource,
        "sampler": interfaces.QuerySampler, "logger": interfaces.Logger,
    }
    found = {(p.group, p.name) for p in registry.plugins()}
    assert {("optimizer", "ppo"), ("optimizer", "a2c"), ("optimizer", "dpo"), ("reward", "sentiment"),
            ("reward", "lexicon"), ("reward", "learned_rm"), ("sampler", "length"), ("logger", "wandb")} <= found
    needs = {"learned_rm": {"path": "some/dir"}, "weighted": {"weights": {"lexicon": 1.0}}}  # mandatory fields
    for info in registry.plugins():
        if info.group in protocols:
            plugin = info.cls(info.cls.Config(**needs.get(info.name, {})))
            assert isinstance(plugin, protocols[info.group]), info


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_never_imports_a_concrete_plugin():
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in ("rlhf_plugins", "plugins"))
        for p in (ROOT / "rlhf").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_framework_never_imports_trl():
    """TRL is a test-and-benchmark extra: the core and the plugins must run without it."""
    offenders = [str(p.relative_to(ROOT)) for d in ("rlhf", "plugins") for p in (ROOT / d).rglob("*.py")
                 if any(n.split(".")[0] == "trl" for n in _imports(p))]
    assert not offenders


def test_nothing_imports_plugins_as_a_top_level_package():
    for p in list(ROOT.glob("*/**/*.py")):
        if ".venv" in p.parts:
            continue
        assert not any(n == "plugins" or n.startswith("plugins.") for n in _imports(p)), p


def test_readme_plugin_example_registers_through_the_environment_variable(tmp_path):
    """The README's `Brevity` reward, as written there, found through $RLHF_PLUGINS."""
    import re

    from conftest import cli

    example = re.search(r"```python\n# my_rewards.py\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (tmp_path / "my_rewards.py").write_text(example.group(1))
    r = cli("rlhf-plugins", "reward", cwd=tmp_path, env={"RLHF_PLUGINS": "my_rewards", "PYTHONPATH": str(tmp_path)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "brevity  (my_rewards.Brevity, $RLHF_PLUGINS)" in r.stdout
    assert "reward.target_words: int = 8  # length that scores 1" in r.stdout
