"""The documentation: the site builds strictly (a broken link or a missing page fails), and the
commands it shows compose (every `rlhf-train` line of a bash block of the README and the site,
its sweeps at their first value) or answer (`--help` of every command)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli

DOCS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BASH = re.compile(r"```bash\n(.*?)```", re.S)


def test_the_site_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    r = subprocess.run([str(mkdocs), "build", "--strict", "-q", "-d", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    generated = (tmp_path / "site" / "reference" / "metrics" / "index.html").read_text()
    assert "eval/kl_to_optimum" in generated and "generated:" not in generated  # the hook filled it in
    assert "optimizer.clip_coef" in (tmp_path / "site" / "reference" / "plugins" / "index.html").read_text()


def _train_lines() -> list[tuple[str, str]]:
    out = []
    for page in DOCS:
        for block in BASH.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():  # (a line continued with a backslash, joined)
                line = " ".join(shlex.split(line, comments=True)) if line.strip() else ""
                if line.startswith("rlhf-train ") and "<" not in line and "..." not in line:
                    out.append((f"{page.relative_to(ROOT)}", line))
    return out


TRAIN_LINES = _train_lines()


def test_the_docs_show_commands_to_check():
    assert len(TRAIN_LINES) >= 15, TRAIN_LINES


@pytest.mark.parametrize(("page", "line"), TRAIN_LINES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(TRAIN_LINES)])
def test_every_rlhf_train_line_the_docs_show_composes(page, line):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from rlhf.contracts import schema

    args = [a for a in line.split()[1:] if not a.startswith("-")]  # (-m, --cfg: what Hydra does with it)
    args = [a for a in args if not a.startswith(("resume=", "hydra/", "hydra."))]  # (a run to resume; a launcher)
    overrides = []
    for parsed, text in zip(OverridesParser.create().parse_overrides(args), args):
        if parsed.is_sweep_override():  # a sweep: its first value
            first = next(iter(parsed.sweep_string_iterator()))
            overrides.append(f"{text.split('=', 1)[0]}={first}")
        else:
            overrides.append(text)
    schema.compose(overrides)  # raises, naming the key, if the docs show a setting that does not exist


@pytest.mark.parametrize("command", ["rlhf-train", "rlhf-plugins", "rlhf-compare", "rlhf-diagnose", "rlhf-generate",
                                     "rlhf-export", "rlhf-build-embedded", "rlhf-train-rm", "rlhf-label", "rlhf-make-pairs"])
def test_every_command_answers_help(command, tmp_path):
    r = cli(command, "--help", cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and len(r.stdout) > 100, r.stderr[-2000:]


def test_the_custom_environment_of_the_episodes_page_trains(tmp_path):
    """The 30-line environment docs/concepts/episodes.md shows, as a user copies it: a module on
    RLHF_PLUGINS, and the command the page gives (shorter)."""
    page = (ROOT / "docs" / "concepts" / "episodes.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "my_envs.py" in b)
    (tmp_path / "my_envs.py").write_text(code)
    line = next(x for b in BASH.findall(page) for x in b.splitlines() if "env=praise" in x)
    args = shlex.split(line)[2:]  # (after RLHF_PLUGINS=... rlhf-train)
    r = cli("rlhf-train", *args, "train.steps=2", "train.batch_size=4", "data.n_eval=4", "eval.every=2",
            cwd=tmp_path, env={"RLHF_PLUGINS": "my_envs", "PYTHONPATH": None})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [__import__("json").loads(x) for x in next(tmp_path.rglob("metrics.jsonl")).read_text().splitlines()]
    assert rows[-1]["eval/episode/turns"] == 2 and "episode/turn_reward" in rows[1]
