"""A trained run's model card: what it is, how to load it, its figures, config and curve.

Written into `<run>/final/README.md` when the run ends (in place of peft's blank template)
and into every `rlhf-export` directory, with the reward-KL curve beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.contracts.metrics import EVAL_KL, EVAL_REWARD
from rlhf.core.run import rundir

CURVE = "reward_kl.png"


def write(run_dir: Path, out: Path, kind: str, base: str | None = None) -> None:
    """README.md (and the curve) for the run's policy as saved in `out`: kind "adapters"
    (peft adapters on `base`) or "model" (a standalone transformers model)."""
    rows, _ = rundir.read_rows(run_dir / rundir.METRICS) if (run_dir / rundir.METRICS).is_file() else ([], [])
    curve = [(r["step"], r[EVAL_REWARD], r[EVAL_KL]) for r in rows
             if EVAL_REWARD in r and EVAL_KL in r and "step" in r]
    has_curve = _plot(curve, out / CURVE)
    (out / "README.md").write_text(card(run_dir, kind, base, curve, has_curve))


def card(run_dir: Path, kind: str, base: str | None, curve: list[tuple], has_curve: bool) -> str:
    from omegaconf import OmegaConf

    config = OmegaConf.load(run_dir / rundir.CONFIG) if (run_dir / rundir.CONFIG).is_file() else OmegaConf.create()
    summary: dict[str, Any] = {}
    if (run_dir / rundir.SUMMARY).is_file():
        summary = rundir.from_json((run_dir / rundir.SUMMARY).read_text() or "{}")
    optimizer = str(config.get("optimizer", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    reward = str(config.get("reward", {}).get("_target_", "?")).rsplit(".", 1)[-1]
    start = str(config.get("policy", {}).get("path", "?"))
    tags = ["rlhf", optimizer.lower()] + (["peft", "lora"] if kind == "adapters" else [])
    head = ["---", f"library_name: {'peft' if kind == 'adapters' else 'transformers'}"]
    if base:
        head.append(f"base_model: {base}")
    head += ["tags:", *[f"- {t}" for t in tags], "---", ""]
    from rlhf.core.model.pretrained import is_built_here

    local = base is not None and (is_built_here(base) or base.startswith("/"))
    load = (
        [f"`{base}` is a base this project builds or a folder on the machine that trained it: "
         "`rlhf-export <run> <dir> --adapters` writes the adapters with a copy of it, loadable as below, and "
         "`rlhf-export <run> <dir>` a standalone model.", ""] if local else []) + (
        ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
         f'base = AutoModelForCausalLM.from_pretrained("{base}")', 'model = PeftModel.from_pretrained(base, "<this folder>")',
         'tokenizer = AutoTokenizer.from_pretrained("<this folder>")', "```"]
        if kind == "adapters" else
        ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
         'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
         'tokenizer = AutoTokenizer.from_pretrained("<this folder>")', "```"])
    figures = [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if isinstance(v, (int, float, str))]
    lines = [
        *head,
        f"# {run_dir.name}: {start} trained with {optimizer} on {reward}",
        "",
        f"Trained by `rlhf-train` (run directory `{run_dir}`), starting from `{start}`. "
        + ("These are the LoRA adapters; the base model is named above." if kind == "adapters"
           else "The LoRA adapters are merged into the weights: a standalone model."),
        "",
        "## Load it",
        "",
        *load,
        "",
        "## Figures (summary.json)",
        "",
        "| figure | value |",
        "| --- | --- |",
        *figures,
        "",
        "## Reward and KL over training (held-out prompts)",
        "",
        *([f"![reward against KL]({CURVE})", ""] if has_curve else []),
        "| step | reward | KL to reference (nats) |",
        "| ---: | ---: | ---: |",
        *[f"| {s} | {r:.4f} | {k:.4f} |" for s, r, k in curve],
        "",
        "## Config (.hydra/config.yaml)",
        "",
        "```yaml",
        OmegaConf.to_yaml(config).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(curve: list[tuple], path: Path) -> bool:
    if len(curve) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps, rewards, kls = zip(*curve)
    ax.plot(kls, rewards, marker="o")
    for s, r, k in (curve[0], curve[-1]):
        ax.annotate(f"step {s}", (k, r), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(pi || pi_ref), nats")
    ax.set_ylabel("held-out reward")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
