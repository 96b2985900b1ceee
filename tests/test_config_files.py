"""A config file is data (rlhf/contracts/safety.py): the adversary table of config_files.yaml,
each case a real command on files of the kind people download, refused in one line naming the
key before anything runs; what a preset legitimately sets composes. And the neighbours the
table cannot hold: a prepared command's child, the consent switch, the command line's own say."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import cli

CASES = yaml.safe_load((Path(__file__).parent / "config_files.yaml").read_text())
TINY = ["train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=4", "eval.every=100"]


def _write(case: dict, cwd: Path) -> Path:
    for name, text in case["files"].items():
        path = cwd / "conf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{victim}", str(cwd / "pwned")).replace("{cwd}", str(cwd)))
    return cwd / "conf"


def _attempt(case: dict, cwd: Path) -> str | None:
    cwd.mkdir(parents=True)
    conf = _write(case, cwd)
    command = case.get("command", "rlhf-train")
    experiment = ["+experiment=x"] if (conf / "experiment" / "x.yaml").is_file() else []
    args = ["--config-dir", str(conf), *case.get("args", []), *experiment]
    if case.get("accept"):
        r = cli(command, *args, "--cfg", "hydra", cwd=cwd, timeout=300)
        return None if r.returncode == 0 else f"refused: {r.stderr[-1500:]!r}"
    extra = ["train.steps=1", *TINY] if command == "rlhf-train" else ["data.n_eval=2", "pairs.batch_size=2"]
    r = cli(command, *args, *extra, cwd=cwd, timeout=300)
    lines = r.stderr.strip().splitlines()
    key = case["refuse"]
    problems = [r.returncode == 0 and "exit status 0",
                len(lines) != 1 and f"{len(lines)} lines",
                lines and f"{key}:" not in lines[0] and f"{key!r} not named",
                lines and not lines[0].startswith(f"{command}: ") and "not the command's one line",
                (cwd / "pwned").exists() and "the victim file was written",
                any((cwd / d).exists() for d in ("outputs", "multirun")) and "a run or sweep directory was made"]
    bad = [p for p in problems if p]
    return f"{'; '.join(bad)}: {r.stderr[-1500:]!r}" if bad else None


@pytest.mark.cli
def test_the_adversary_table(tmp_path):
    """Every case of config_files.yaml: refused in one line naming its key, the victim file
    untouched and no run directory made; every legitimate preset composes."""
    assert len(CASES) >= 35 and sum(bool(c.get("accept")) for c in CASES) >= 5

    def attempt(i: int) -> str | None:
        failure = _attempt(CASES[i], tmp_path / str(i))
        return f"{CASES[i]['name']}: {failure}" if failure else None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(attempt, range(len(CASES))) if f]
    assert not failures, "\n".join(failures)


@pytest.mark.cli
def test_the_command_line_and_the_consent_switch_are_the_users_own(tmp_path):
    """What a file may not set, the user's own command line may; +trust_config=true lets the
    files set it (they are trusted as code)."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "x.yaml").write_text("# @package _global_\nhydra:\n  job:\n    env_set:\n      RLHF_TEST_MARK: '1'\n")
    base = ["--config-dir", str(tmp_path / "conf"), "--cfg", "hydra"]
    assert cli("rlhf-train", *base, "+experiment=x", cwd=tmp_path).returncode != 0
    r = cli("rlhf-train", *base, "+experiment=x", "+trust_config=true", cwd=tmp_path)
    assert r.returncode == 0 and "RLHF_TEST_MARK" in r.stdout, r.stderr[-2000:]
    r = cli("rlhf-train", "--cfg", "hydra", "+hydra.job.env_set.RLHF_TEST_MARK=1", "hydra.output_subdir=rec",
            cwd=tmp_path)
    assert r.returncode == 0 and "RLHF_TEST_MARK" in r.stdout, r.stderr[-2000:]
    # a line break in a launcher's names is refused whoever writes it
    r = cli("rlhf-train", "--cfg", "hydra", "hydra.mode=MULTIRUN", "hydra/launcher=slurm", "hydra.launcher.comment='a\nb'",
            cwd=tmp_path)
    assert r.returncode != 0 and "hydra.launcher.comment:" in r.stderr, r.stderr[-2000:]


@pytest.mark.cli
def test_a_prepared_command_runs_without_the_current_directory_on_its_module_path(tmp_path, monkeypatch):
    """The child a Prepare callback starts (its commands come from the project's presets or the
    user's command line: a config file may set no callback) imports nothing from the directory
    it runs in: a `torch.py` beside a downloaded preset is not the torch it imports."""
    from omegaconf import OmegaConf

    from rlhf.apps.sweep import Prepare
    from rlhf.contracts import safety

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(safety.COMMAND_LINE, json.dumps(["optimizer.beta=0.1"]))
    (tmp_path / "torch.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'pwned')!r}).touch()\n")
    sweep_dir = tmp_path / "multirun" / "s"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": []}}})
    Prepare({"x": ["rlhf-make-pairs", "data.n_train=2", "pairs.out={sweep_dir}/p.jsonl"]}).on_multirun_start(config)
    assert (sweep_dir / "p.jsonl").is_file(), (sweep_dir / "x.log").read_text()
    assert not (tmp_path / "pwned").exists()


def test_what_a_file_sets_is_every_difference_whatever_the_key_type():
    from rlhf.contracts.safety import differences

    a = {"x": {"1": "a", 1: {"t": "os.system"}}, "l": [1, {"k": 2}], "same": 3}
    b = {"x": {"1": "a"}, "l": [1, {"k": 3}], "same": 3, "gone": 4}
    assert sorted(map(str, differences(a, b))) == sorted(map(str, [("x", 1, "t"), ("l", 1, "k"), ("gone",)]))
