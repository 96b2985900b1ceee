"""A built wheel in a fresh virtual environment, and a third-party plugin found by entry point."""

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from conftest import ROOT


def _sh(*args, cwd, env=None):
    r = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_fresh_venv_with_third_party_plugin(tmp_path, embedded_dir):
    # Build from a copy, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    for name in ("rlhf", "plugins", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "tests" / "plugin_pkg", tmp_path / "plugin_pkg")
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels]
    _sh(*pip, src, cwd=tmp_path)
    _sh(*pip, tmp_path / "plugin_pkg", cwd=tmp_path)
    wheel = next(wheels.glob("rlhf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for path in (ROOT / "conf").rglob("*.yaml"):  # every preset, and every plugin module
        assert f"rlhf/conf/{path.relative_to(ROOT / 'conf')}" in names, path
    for path in (ROOT / "plugins").rglob("*.py"):
        assert f"rlhf_plugins/{path.relative_to(ROOT / 'plugins')}" in names, path
    assert not [n for n in names if n.startswith("plugins/")]  # no generic top-level package

    # A fresh venv. Its dependencies (torch, transformers, ...) come from this environment
    # through a .pth file, so CI does not download them again; rlhf itself only from the wheel.
    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    vpy = venv / "bin" / "python"
    site = _sh(vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (tmp_path / site / "_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _sh(vpy, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels.glob("*.whl"), cwd=tmp_path)

    run = tmp_path / "run"  # outside the checkout, in /tmp
    run.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "RLHF_HOME": str(embedded_dir.parent)}
    where = _sh(vpy, "-c", "import rlhf, rlhf_plugins; print(rlhf.__file__, rlhf_plugins.__file__)", cwd=run, env=env)
    assert where.stdout.startswith(str(venv)) and str(ROOT) not in where.stdout

    listing = _sh(venv / "bin" / "rlhf-plugins", "reward", cwd=run, env=env).stdout
    assert "constant  (rlhf_constant_reward.ConstantReward, entry point rlhf-constant-reward)" in listing
    assert "reward.value: float = 0.5  # the score every response gets" in listing

    _sh(venv / "bin" / "rlhf-train", "reward=constant", "reward.value=0.25", "train.steps=1",
        "train.batch_size=4", "data.n_eval=4", "eval.every=1", cwd=run, env=env)
    summary = json.loads(next((run / "outputs").rglob("summary.json")).read_text())
    assert summary["reward_start"] == summary["reward_end"] == 0.25
