"""Composition of every preset, and bad overrides failing before any model loads."""


import pytest
from conftest import ROOT, cli, compose
from omegaconf import OmegaConf

CONF = ROOT / "conf"


def test_default_composes_to_the_embedded_ppo_run():
    cfg = compose()
    assert cfg.policy.path == "embedded" and cfg.data.prompts == "embedded"
    assert cfg.optimizer._target_.endswith("ppo.PPO") and cfg.reward.model == "embedded"
    assert cfg.logger == {}


@pytest.mark.parametrize("group", ["policy", "data"])
def test_every_group_option_composes(group):
    for yaml in sorted((CONF / group).glob("*.yaml")):
        cfg = compose(f"{group}={yaml.stem}")
        assert OmegaConf.to_container(cfg[group])  # non-empty and resolvable


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose(f"+experiment={experiment}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_documented_overrides_compose():
    cfg = compose("optimizer.beta=0.05", "sampler.temperature=0.8", "train.steps=40", "logger=[wandb]")
    assert (cfg.optimizer.beta, cfg.sampler.temperature, cfg.train.steps) == (0.05, 0.8, 40)
    assert cfg.logger.wandb.mode == "auto"


BAD_CONFIGS = [  # (overrides, what the error must say): typos, wrong types, out of range, missing values
        ("train.stpes=5", "Key 'stpes' not in 'TrainConfig'"),
        ("train.steps=five", "Value 'five' of type 'str' could not be converted to Integer"),
        ("optimizer.clip_coeff=0.1", "Key 'clip_coeff' not in"),
        ("optimizer.beta=abc", "could not be converted to Float"),
        ("optimizer=ppoo", "Could not find 'optimizer/ppoo'"),
        ("policy.lora.rank=4", "Key 'rank' not in 'LoraSettings'"),
        ("train.steps=0", "config: out of range: train.steps=0 (must be at least 1)"),
        ("optimizer.beta=-0.1", "ppo: out of range: optimizer.beta=-0.1"),
        ("sampler.min_query_tokens=9", "sampler: out of range: sampler.min_query_tokens=9 (must be in [1, max_query_tokens=8))"),
        ("sampler.top_p=0", "sampler.top_p=0.0 (must be in (0, 1]; 1 is off)"),
        ("sampler.top_p=1.5", "sampler.top_p=1.5 (must be in (0, 1]; 1 is off)"),
        ("sampler.min_new_tokens=30", "sampler.min_new_tokens=30 (must be in [0, max_new_tokens=24])"),
        ("sampler.temperature=-1", "sampler.temperature=-1.0 (must be > 0)"),
        ("reward=learned_rm", "missing mandatory value: reward.path; set it on the command line"),
        ("policy.path=???", "missing mandatory value: policy.path"),
        ("train.batch_size=0", "config: out of range: train.batch_size=0 (must be at least 1)"),
        ("policy.lora.dropout=1.5", "config: out of range: policy.lora.dropout=1.5 (must be in [0, 1))"),
        ("checkpoint.keep=0", "config: out of range: checkpoint.keep=0 (must be at least 1)"),
        ("optimizer=dpo optimizer.beta=0", "dpo: out of range: optimizer.beta=0.0"),
        ("optimizer=grpo optimizer.group_size=1", "grpo: out of range: optimizer.group_size=1"),
        ("logger=[wandb] logger.wandb.mode=sometimes",
         "wandb: out of range: logger.wandb.mode='sometimes' (must be auto, online, offline or disabled)"),
    ("eval.judges=[nosuch]", "eval.judges: no reward plugin named 'nosuch'"),
        ("precision=fp16", "auto, fp32 or bf16 (fp16 would need loss scaling)"),
]


def config_error(overrides: list[str]) -> str | None:
    """What rlhf-train checks before any model loads, in this process: composition (the
    schema), `validate`, and building every plugin from its typed config."""
    from rlhf.contracts import registry
    from rlhf.contracts.schema import validate
    from rlhf.core.loop.trainer import judge

    try:
        cfg = compose(*overrides)
        validate(cfg)
        for group in ("optimizer", "reward", "sampler"):
            registry.instantiate(group, cfg[group])
        for node in (cfg.logger or {}).values():
            registry.instantiate("logger", node)
        for name in cfg.eval.judges:
            judge(name)
    except Exception as e:  # Hydra puts the reason in the cause
        chain = [e]
        while chain[-1].__cause__ is not None:
            chain.append(chain[-1].__cause__)
        return " | ".join(str(x) for x in chain)
    return None


def test_every_bad_config_is_refused_naming_the_problem():
    failures = []
    for override, message in BAD_CONFIGS:
        error = config_error(override.split())
        if error is None or message not in error:
            failures.append(f"{override}: {error!r}")
    assert not failures, "\n".join(failures)
    assert len(BAD_CONFIGS) == 23


CLI_CASES = [0, 4, 7, 13]  # one of each kind: a schema typo, a group, a plugin's range, a missing value


def test_bad_configs_fail_in_the_cli_before_any_model_loads(tmp_path):
    """A real rlhf-train process for each kind of error (four at a time): non-zero exit,
    the key named, nothing built or loaded into an empty model cache, no run started."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(i: int) -> str | None:
        override, message = BAD_CONFIGS[i]
        cwd = tmp_path / str(i)
        cwd.mkdir()
        home = cwd / "cache"  # an empty cache: loading the default model would build into it
        r = cli("rlhf-train", *override.split(), cwd=cwd, env={"RLHF_HOME": str(home)}, timeout=300)
        problems = [
            r.returncode == 0 and "exit status 0",
            message not in r.stderr and f"no {message!r} in: {r.stderr[-800:]}",
            home.exists() and any(home.iterdir()) and "a model was built",
            (cwd / "outputs").exists() and list((cwd / "outputs").rglob("metrics.jsonl")) and "a run started",
        ]
        bad = [p for p in problems if p]
        return f"{override}: {'; '.join(bad)}" if bad else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(attempt, CLI_CASES) if f]
    assert not failures, "\n".join(failures)


def test_a_typo_in_a_yaml_file_fails_naming_the_key(tmp_path):
    """A user's own preset, passed with --config-dir, is checked like the command line."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text("# @package _global_\ntrain:\n  stpes: 5\n")
    home = tmp_path / "cache"
    r = cli("rlhf-train", "--config-dir", str(tmp_path / "conf"), "+experiment=mine", cwd=tmp_path,
            env={"RLHF_HOME": str(home)}, timeout=120)
    assert r.returncode != 0
    assert "Key 'stpes' not in 'TrainConfig'" in r.stderr and "train.stpes" in r.stderr, r.stderr
    assert not home.exists() or not any(home.iterdir())


NEWCOMER = [  # what a newcomer typed (and Hydra's own advice for a typo), and what the one line must say
    ({}, ["+train.stpes=5"], "no such setting: train.stpes (did you mean train.steps?)"),
    ({}, ["+optimizer.clip_cof=0.1", "train.steps=1"], "optimizer.clip_cof (did you mean optimizer.clip_coef?)"),
    ({}, ["train.stpes=5"], "train.stpes: did you mean train.steps?"),
    ({}, ["optimizer=ppp"], "no optimizer plugin named 'ppp' (registered: a2c, dm, dpo, grpo, ppo, reinforce, rloo, sft)"),
    ({}, ["reward=acting"], "name it in $RLHF_PLUGINS (RLHF_PLUGINS=my_module"),
    ({}, ["policy=nope"], "the options of policy: embedded, gpt2, gpt2-imdb"),
    ({"RLHF_PLUGINS": "my_plugn"}, [], "RLHF_PLUGINS names 'my_plugn', which is not importable"),
]


def test_a_newcomers_mistakes_are_refused_in_one_line_naming_the_fix(tmp_path):
    """A key added with `+` that no schema has, a misspelled plugin module, a group option that
    does not exist: one line each (no traceback, no search-path dump), before any model loads."""
    from concurrent.futures import ThreadPoolExecutor

    def attempt(i: int) -> str | None:
        env, args, message = NEWCOMER[i]
        cwd = tmp_path / str(i)
        cwd.mkdir()
        r = cli("rlhf-train", *args, cwd=cwd, env={"RLHF_HOME": str(cwd / "cache"), **env}, timeout=300)
        lines = r.stderr.strip().splitlines()
        ok = r.returncode != 0 and len(lines) == 1 and lines[0].startswith("rlhf-train: ") and message in lines[0]
        return None if ok and not (cwd / "cache").exists() else f"{args} {env}: rc {r.returncode}, stderr {r.stderr[-1500:]!r}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(attempt, range(len(NEWCOMER))) if f]
    assert not failures, "\n".join(failures)


def test_help_lists_groups_and_options(tmp_path):
    r = cli("rlhf-train", "--help", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    for line in ["optimizer: a2c, dm, dpo, grpo, ppo, reinforce, rloo, sft",
                 "reward: env, hard, learned_rm, lexicon, sentiment, sequence, table, verifiable, weighted", "sampler: length",
                 "logger: jsonl, tensorboard, wandb", "proposal: auto, explore, policy, stale",
                 "experiment: arithmetic, calculator, dpo_paper, episode_toy, frontier, hard_toys, imdb_ppo, quiz,",
                 "env: calculator, dice, gym, quiz",
                 "policy: embedded, gpt2, gpt2-imdb", "data: embedded, imdb, preferences"]:
        assert line in r.stdout


def test_rlhf_plugins_lists_fields_defaults_and_help(tmp_path):
    r = cli("rlhf-plugins", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ppo  (rlhf_plugins.optimizers.ppo.PPO, builtin)" in r.stdout
    assert "optimizer.clip_coef: float = 0.2  # policy ratio clipping epsilon" in r.stdout
    assert "logger.wandb.mode: str = 'auto'" in r.stdout
    bad = cli("rlhf-plugins", "nosuchgroup", cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "groups: env, logger, optimizer, proposal, reward, sampler" in bad.stderr
