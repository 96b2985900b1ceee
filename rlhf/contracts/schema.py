"""Every typed config schema, and `compose`.

The schemas of rlhf-train (`rlhf_schema`), rlhf-train-rm (`rlhf_rm_schema`) and
rlhf-label (`rlhf_label_schema`) are stored in Hydra's ConfigStore and listed first in
their `conf/*.yaml`, so every YAML file and command-line override is checked against
them: a typo such as `train.stpes=5` or `train.steps=five` fails at composition, before
any model loads. Plugin groups (optimizer, reward, sampler, logger) are typed by their
plugins' dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from rlhf.contracts.checks import require
from rlhf.contracts.safety import writes_file


@dataclass
class LoraSettings:
    enabled: bool = True  # false: full fine-tuning, reference is a frozen copy (2x memory)
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling is alpha / r
    dropout: float = 0.0  # dropout on the adapter input (0 keeps PPO ratios exact)
    # [all-linear]: every linear layer but the output one, whatever the architecture; null: peft's
    # default for the architecture (often the attention projections only); or names, e.g. [q_proj, v_proj]
    target_modules: Optional[list[str]] = field(default_factory=lambda: ["all-linear"])


@dataclass
class PolicyConfig:
    # hub name, local directory, "embedded" (built offline), "toy" (the exact toy problem), or a run
    # directory of rlhf-train / its final/ adapters: training goes on from the trained policy
    path: str = "embedded"
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False  # run model code shipped with a hub repo; off for safety
    dtype: str = "float32"  # float32, bfloat16 or float16
    # policy.path is a trained run: "base", the KL anchors at the model that run started from (its
    # adapters train on); "start", at the trained policy itself (merged, fresh adapters on top)
    reference: str = "base"
    chat_template: Optional[str] = None  # a Jinja file: the chat template for conversational data (replaces the tokenizer's)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    chunked_logprobs: bool = True  # log-probs through the vocabulary a chunk at a time: no (batch, length, vocab) tensor
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DataConfig:
    prompts: str = "embedded"  # "embedded", "arithmetic" (sums), "products", a .txt/.jsonl/.json file, or a hub dataset
    prompt_list: list[str] = field(default_factory=list)  # inline prompts for training and evaluation (overrides prompts)
    text_field: str = "text"  # column holding the text, or a list of chat messages (jsonl/json files and hub datasets)
    as_chat: bool = False  # text prompts as a user message, rendered with the chat template (instruct models)
    subset: Optional[str] = None  # hub dataset configuration name, e.g. main for openai/gsm8k
    split: str = "train"  # hub dataset split for training prompts
    eval_split: Optional[str] = None  # hub split for held-out prompts; null: hold out from `split`
    n_train: int = 2000  # training prompts / pairs (embedded: generated; otherwise the first n)
    n_eval: int = 64  # held-out prompts / pairs for evaluation
    pairs: str = "embedded"  # "embedded", a .json/.jsonl/.parquet file, a hub dataset, or "bradley_terry" (see README)
    prompt_field: str = "prompt"  # pair files: column of the prompt
    chosen_field: str = "chosen"  # pair files: column of the preferred response
    rejected_field: str = "rejected"  # pair files: column of the other response


@dataclass
class TrainConfig:
    steps: int = 60  # optimizer steps, each on one freshly collected batch
    batch_size: int = 32  # prompts (rollouts) per step
    save_final: bool = True  # save adapters + value head (safetensors) to <run>/final
    lr_schedule: str = "constant"  # constant, or linear: the optimizer's lr decays to 0 over train.steps


@dataclass
class EvalConfig:
    every: int = 20  # evaluate every N steps (and always before the first and after the last)
    samples: int = 8  # generations saved to <run>/samples/step_<N>.jsonl per evaluation
    seed: int = 1234  # sampling seed of evaluation, fixed so evaluations are comparable
    judges: list[str] = field(default_factory=list)  # extra reward plugins scoring the samples, e.g. [lexicon]
    kl_to_optimum: bool = False  # small vocabularies: exact KL(pi || pi*) over whole responses to the closed-form optimum
    pass_at_k: list[int] = field(default_factory=list)  # e.g. [1, 4]: eval/pass@k (Chen et al. 2021) and eval/accuracy
    pass_samples: int = 8  # n samples per held-out prompt for pass@k (k <= n)
    pass_judge: Optional[str] = None  # a judge of eval.judges that says correct; null: the reward
    pass_threshold: float = 1.0  # a sample passes when that score is >= this (verifiable: correct = 1)


@dataclass
class CheckpointConfig:
    every: int = 20  # write a checkpoint every N steps (and always at the last); 0: only at the last
    keep: int = 2  # complete checkpoints kept, newest first


@dataclass
class Machine:
    """Where a command computes: what every command's schema has."""

    device: str = "auto"  # auto (cuda if present), cpu, cuda, cuda:1, mps
    threads: int = 0  # torch CPU threads; 0 leaves torch's default


@dataclass
class Seeded(Machine):
    seed: int = 0  # seeds python, numpy and torch; the embedded builds are independent of it


@dataclass
class RunConfig(Seeded):
    precision: str = "auto"  # auto: bf16 autocast on a GPU that supports it, else fp32; fp32; bf16 (also on CPU)
    parallel: str = "ddp"  # several processes (torchrun): ddp (a whole copy per rank) or fsdp (weights, grads, Adam sharded)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Optional[str] = None  # a run directory: continue it from its newest complete checkpoint, in place
    resume_force: bool = False  # resume even though settings that change the result differ (they are listed)
    optimizer: Any = MISSING
    reward: Any = MISSING
    sampler: Any = MISSING
    proposal: Any = MISSING
    logger: Any = field(default_factory=dict)
    env: Any = None  # episodes: the environment the policy's turns are played in (null: one prompt, one response)


@dataclass
class RMSettings:
    base: str = "embedded"  # model to start from: "embedded" (the SFT policy), a hub name or a local dir
    steps: int = 100  # optimizer steps
    batch_size: int = 32  # pairs per step
    lr: float = 1e-3  # AdamW learning rate (the whole model is trained)
    eval_every: int = 50  # held-out pairwise accuracy every N steps (and at the end)
    normalize: bool = True  # store mean/std of scores on reference samples; reward=learned_rm applies them
    normalize_samples: int = 256  # reference samples for those statistics
    trust_remote_code: bool = False  # run model code shipped with a hub repo


@dataclass
class RMRunConfig(Seeded):
    """rlhf-train-rm (`conf/train_rm.yaml`)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: Any = MISSING
    rm: RMSettings = field(default_factory=RMSettings)


@dataclass
class LabelSettings:
    pairs: int = 20  # pairs in this labelling session's file (answered ones count, skips included)
    out: str = writes_file("preferences.jsonl")  # the JSONL file answers are appended to (relative to where you run)
    mode: str = "web"  # web: a page on localhost; terminal: questions in this terminal
    host: str = "127.0.0.1"  # web: the address served (localhost only by default)
    port: int = 8765  # web: the port; 0 picks a free one (printed)
    who: str = "${oc.env:USER,anonymous}"  # the labeller's name, recorded with every answer
    seed: int = 0  # fixes the order of prompts and the samples of every pair number
    exit_when_done: bool = True  # web: stop the server once the last pair is answered


@dataclass
class SamplingRunConfig(Machine):
    """What the commands that sample a policy's responses share (rlhf-label, rlhf-make-pairs)."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: Any = MISSING


@dataclass
class LabelRunConfig(SamplingRunConfig):
    """rlhf-label (`conf/label.yaml`)."""

    reward: Any = None  # optional: a reward source whose agreement with the person is shown
    label: LabelSettings = field(default_factory=LabelSettings)


@dataclass
class MakePairsSettings:
    out: str = writes_file("pairs.jsonl")  # the preference JSONL written (relative to where you run); a rerun continues it
    samples: int = 2  # responses sampled per prompt (k); every two of them make a pair: k(k-1)/2 pairs a prompt
    margin: float = 0.0  # two responses whose scores differ by <= margin are a tie: written as label "tie", left out by readers
    batch_size: int = 64  # prompts sampled at once (each k times)
    seed: int = 0  # fixes every prompt's samples: the same command writes the same pairs


@dataclass
class MakePairsRunConfig(SamplingRunConfig):
    """rlhf-make-pairs (`conf/make_pairs.yaml`)."""

    reward: Any = MISSING
    proposal: Any = MISSING  # what draws the samples (proposal=vllm: the engine; recorded in the file's records)
    pairs: MakePairsSettings = field(default_factory=MakePairsSettings)


# `${rlhf.pid:}`, which the default run directories end with: this process's id, so two runs
# started in the same second get two directories. Registered on import, so that every process
# that resolves a config (a sweep's job processes too) knows it; cached, so a sweep's jobs
# resolve it to the id of the process that started the sweep, as Hydra does `${now:}`.
OmegaConf.register_new_resolver("rlhf.pid", lambda: str(os.getpid()), use_cache=True, replace=True)


def store() -> None:
    """Every command's schema into Hydra's ConfigStore (each config file names its own)."""
    cs = ConfigStore.instance()
    cs.store(name="rlhf_schema", node=RunConfig)
    cs.store(name="rlhf_rm_schema", node=RMRunConfig)
    cs.store(name="rlhf_label_schema", node=LabelRunConfig)
    cs.store(name="rlhf_make_pairs_schema", node=MakePairsRunConfig)


def unknown_keys(cfg: Any) -> list[str]:
    """Keys of typed nodes (the schemas above, plugins' Config dataclasses) that their dataclass
    does not have, each with the nearest field: `+train.stpes=5` adds one (Hydra lets `+` add
    a key to a typed node), and nothing would ever read it. Hydra's own section is not checked,
    nor the top level, where `+tag=...` labels a run (rlhf-compare shows it as a knob)."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig

    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, DictConfig):
            kind = node._metadata.object_type
            if path and kind is not None and dataclasses.is_dataclass(kind):  # (the root takes tags: +tag=...)
                fields = [f.name for f in dataclasses.fields(kind)]
                for key in node.keys():
                    if str(key) not in fields:
                        found.append(f"{path + '.' if path else ''}{key} ({nearest_field(kind, str(key), path)})")
            for key in node.keys():
                if not path and key == "hydra":
                    continue
                walk(node._get_node(key), f"{path}.{key}" if path else str(key))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                walk(node._get_node(i), f"{path}[{i}]")

    walk(cfg, "")
    return found


def nearest_field(kind: type, key: str, path: str) -> str:
    """What to type instead of `path.key`, a key dataclass `kind` lacks: "did you mean
    path.<nearest field>?", or the fields there are."""
    import dataclasses
    import difflib

    fields = [f.name for f in dataclasses.fields(kind) if f.name != "_target_"]
    near = difflib.get_close_matches(key, fields, n=1)
    prefix = f"{path}." if path else ""
    return f"did you mean {prefix}{near[0]}?" if near else f"{path or 'the config'} has {', '.join(fields)}"


def check_known_keys(cfg: Any) -> None:
    """ValueError naming every key no schema has (see unknown_keys), in one line."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"no such setting: {'; '.join(unknown)}. A `+` adds a key, which a typed group does not take: "
                         "set an existing field without it")


def validate(cfg: Any) -> None:
    """Missing values and range checks Hydra's types cannot express; run before any model loads."""
    check_known_keys(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(
            f"missing mandatory value{'s' if len(missing) > 1 else ''}: {', '.join(missing)}; "
            f"set {'them' if len(missing) > 1 else 'it'} on the command line, e.g. {missing[0]}=<value>"
        )
    require("config", [
        ("train.steps", cfg.train.steps, cfg.train.steps >= 1, "at least 1"),
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1, "at least 1"),
        ("eval.every", cfg.eval.every, cfg.eval.every >= 1, "at least 1"),
        ("eval.samples", cfg.eval.samples, cfg.eval.samples >= 0, "0 or more"),
        ("eval.pass_at_k", list(cfg.eval.pass_at_k), all(1 <= k <= cfg.eval.pass_samples for k in cfg.eval.pass_at_k),
         f"values in [1, eval.pass_samples={cfg.eval.pass_samples}]"),
        ("eval.pass_judge", cfg.eval.pass_judge, cfg.eval.pass_judge is None or cfg.eval.pass_judge in cfg.eval.judges,
         f"null (the reward) or one of eval.judges={list(cfg.eval.judges)}"),
        ("data.n_train", cfg.data.n_train, cfg.data.n_train >= 1, "at least 1"),
        ("data.n_eval", cfg.data.n_eval, cfg.data.n_eval >= 1, "at least 1"),
        ("policy.lora.r", cfg.policy.lora.r, cfg.policy.lora.r >= 1, "at least 1"),
        ("policy.lora.dropout", cfg.policy.lora.dropout, 0 <= cfg.policy.lora.dropout < 1, "in [0, 1)"),
        ("precision", cfg.precision, cfg.precision in ("auto", "fp32", "bf16"),
         "auto, fp32 or bf16 (fp16 would need loss scaling)"),
        ("parallel", cfg.parallel, cfg.parallel in ("ddp", "fsdp"),
         "ddp (data-parallel, a whole copy per process) or fsdp (sharded over the processes)"),
        ("policy.reference", cfg.policy.reference, cfg.policy.reference in ("base", "start"), "base or start"),
        ("policy.dtype", cfg.policy.dtype, cfg.policy.dtype in ("float32", "bfloat16", "float16"),
         "float32, bfloat16 or float16"),
        ("train.lr_schedule", cfg.train.lr_schedule, cfg.train.lr_schedule in ("constant", "linear"), "constant or linear"),
        ("checkpoint.every", cfg.checkpoint.every, cfg.checkpoint.every >= 0, "0 or more"),
        ("checkpoint.keep", cfg.checkpoint.keep, cfg.checkpoint.keep >= 1, "at least 1"),
    ])


def compose(overrides: list[str], config_name: str = "config", config_dir: str | None = None) -> Any:
    """The config exactly as `rlhf-train` (or `rlhf-train-rm`, `rlhf-label`) composes it
    from these overrides (and `--config-dir config_dir`), through Hydra's compose API (plugins
    discovered first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    from rlhf.contracts import registry

    registry.discover()
    store()
    with initialize_config_module(config_module="rlhf.conf", version_base="1.3"):
        if config_dir is not None:  # where `--config-dir` puts it: after the project's, before the schemas
            loader = GlobalHydra.instance().config_loader()
            loader.get_search_path().prepend(provider="command-line", path=f"file://{os.path.abspath(config_dir)}",
                                             anchor=SearchPathQuery(provider="schema"))
            loader.repository.initialize_sources(loader.get_search_path())
        return hydra_compose(config_name=config_name, overrides=list(overrides))
