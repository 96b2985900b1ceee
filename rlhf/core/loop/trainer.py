"""The one training loop every optimizer shares.

prompts --sampler--> queries --policy.generate--> responses --reward.score--> scores
--optimizer.update--> metrics --> metrics.jsonl and the logger plugins.

Offline optimizers take preference pairs instead of rollouts; the loop, evaluation and
logging are the same for all.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf.contracts import registry
from rlhf.contracts.interfaces import (
    PREFERENCE_PAIRS,
    ROLLOUTS,
    Environment,
    Logger,
    PolicyOptimizer,
    Proposal,
    QuerySampler,
    RewardSource,
    RunInfo,
    Sampling,
)
from rlhf.contracts.metrics import (
    EVAL_ACCURACY,
    EVAL_DISTINCT_2,
    EVAL_FLUENCY,
    EVAL_KL,
    EVAL_KL_TO_OPTIMUM,
    EVAL_KL_TO_TILT,
    EVAL_PASS_AT,
    EVAL_RESPONSE_LEN,
    EVAL_REWARD,
    STEP_S,
)
from rlhf.contracts.schema import validate
from rlhf.core.evaluation import diagnosis
from rlhf.core.evaluation.held_out import evaluate, pass_at_k, save_samples
from rlhf.core.loop import callbacks, update
from rlhf.core.loop.callbacks import NonFiniteError
from rlhf.core.loop.phases import CLOCK, phase
from rlhf.core.model.policy import CheckpointMismatch, Policy
from rlhf.core.model.pretrained import save_policy
from rlhf.core.parallel import distributed, sharding
from rlhf.core.rollout import sources
from rlhf.core.rollout.data import check_whole_prompts, load_prompts, sample_queries, tokenize_prompts
from rlhf.core.run import checkpoint, rundir
from rlhf.core.run.preemption import Interrupt, Preemption
from rlhf.core.run.rundir import RunRecorder


def judge(name: str) -> RewardSource:
    """A reward plugin by name with its default settings, as an evaluation judge."""
    info = next((p for p in registry.plugins("reward") if p.name == name), None)
    if info is None:
        names = ", ".join(p.name for p in registry.plugins("reward"))
        raise ValueError(f"eval.judges: no reward plugin named {name!r} (registered: {names})")
    return info.cls(info.cls.Config())


@dataclass
class Plugins:
    optimizer: PolicyOptimizer
    reward: RewardSource
    sampler: QuerySampler
    loggers: list[Logger]
    judges: dict[str, RewardSource]
    proposal: Proposal
    env: Environment | None = None  # episodes: the environment the policy's turns are played in


def preflight(cfg: DictConfig) -> Plugins:
    """Every check that needs no model, in the order a user fixes them: the config's values,
    the plugins built from their typed configs (cheap: their models load on first use), the
    batch split over processes, the device. Raises ValueError or PluginError naming the key."""
    validate(cfg)
    plugins = Plugins(
        optimizer=registry.instantiate("optimizer", cfg.optimizer),
        reward=registry.instantiate("reward", cfg.reward),
        sampler=registry.instantiate("sampler", cfg.sampler),
        loggers=[registry.instantiate("logger", n) for n in (cfg.logger or {}).values()],
        judges={name: judge(name) for name in cfg.eval.judges},
        proposal=registry.instantiate("proposal", cfg.proposal),
        env=registry.instantiate("env", cfg.env) if cfg.get("env") is not None else None,
    )
    if plugins.optimizer.consumes not in sources.kinds():
        raise ValueError(f"optimizer consumes {plugins.optimizer.consumes!r}; the core provides {sources.kinds()}")
    check_in_force(cfg, plugins)
    if cfg.eval.kl_to_optimum:
        from rlhf.core.evaluation.optimum import check_sampler

        check_sampler(plugins.sampler.generation_kwargs())
    distributed.shard(cfg.train.batch_size)  # the batch must split evenly over the processes
    distributed.pick_device(cfg.device)
    check_context(cfg, plugins.sampler)
    return plugins


def check_in_force(cfg: DictConfig, plugins: Plugins) -> None:
    """Settings of one plugin that another plugin, as chosen, leaves without effect: refused (a
    setting a run accepts is in force)."""
    names = {p.target: p.name for p in registry.plugins("proposal")}
    proposal = names.get(cfg.proposal.get("_target_"), "?")
    opt = plugins.optimizer
    idle = []
    if opt.consumes != ROLLOUTS and proposal != "policy":
        idle.append(f"proposal={proposal}: {cfg.optimizer._target_.rsplit('.', 1)[-1]} trains on preference pairs "
                    "(online DPO samples them from the policy itself), never on a proposal's rollouts; drop proposal=")
    correction = opt.cfg.update().correction
    name = cfg.optimizer._target_.rsplit(".", 1)[-1]
    if correction != "none" and not opt.takes_importance_weights:
        idle.append(f"optimizer.correction={correction}: {name} takes no importance weights (its objective accounts for "
                    "the proposal itself); leave it none")
    elif correction != "none" and proposal == "policy":
        idle.append(f"optimizer.correction={correction} corrects the samples of a proposal q != pi; the policy draws "
                    "these (q = pi, every weight 1): pick a proposal (proposal=explore, stale, vllm) or drop it")
    if cfg.eval.kl_to_optimum and opt.beta is None:
        idle.append(f"eval.kl_to_optimum: {name} has no KL coefficient, so no closed-form optimum pi* to be near; set "
                    "eval.kl_to_optimum=false")
    elif cfg.eval.kl_to_optimum and opt.beta == 0:
        idle.append("eval.kl_to_optimum with optimizer.beta=0: pi* = pi_ref exp(r / beta) / Z is not defined at beta 0 "
                    "(its limit puts all mass on the best responses, at infinite KL from any policy that samples); "
                    "set optimizer.beta > 0 or eval.kl_to_optimum=false")
    if plugins.env is not None and opt.consumes != ROLLOUTS:
        idle.append(f"env: {name} trains on preference pairs, never on episodes; pick an optimizer of rollouts "
                    "(ppo, a2c, reinforce, rloo, grpo, dm) or drop env=")
    if plugins.env is not None and cfg.eval.kl_to_optimum and not hasattr(plugins.env, "outcomes"):
        idle.append("eval.kl_to_optimum with this env: the exact optimum over episodes needs an environment that says "
                    "its answers' probabilities and rewards (`outcomes(history, action)`, as env=dice does); set "
                    "eval.kl_to_optimum=false")
    if idle:
        raise ValueError("not in force: " + "; ".join(idle))


def check_context(cfg: DictConfig, sampler: QuerySampler) -> None:
    """The longest query the sampler cuts plus the response cap must fit the model's context
    (read from its config, no weights loaded): refused here, not at the first batch."""
    from rlhf.core.model.pretrained import context_length

    limit = context_length(OmegaConf.to_object(cfg.policy))
    new = sampler.generation_kwargs().get("max_new_tokens", 20)
    query = max(1, sampler.longest_query or 1)
    if limit is not None and query + new > limit:
        raise ValueError(f"a query of up to {query} tokens plus sampler.max_new_tokens={new} is more than the model's "
                         f"context of {limit} positions; lower sampler.max_new_tokens (or sampler.max_query_tokens)")


class Trainer:
    """Builds a run from its config, then `fit()` trains, evaluates and logs it."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run: RunInfo | None = None, plugins: Plugins | None = None):
        self.t0 = time.time()
        CLOCK.reset()  # this run's phases
        self.cfg, self.run_dir = cfg, run_dir
        self.run = run or RunInfo(run_dir=str(run_dir), name=run_dir.name, group_dir=str(run_dir))
        # plugins first (unless the command's preflight built them): cheap, so their config errors come
        # before any model loads
        p = plugins if plugins is not None else preflight(cfg)
        self.optimizer, self.reward, self.sampler, self.loggers, self.judges, self.proposal, self.env = (
            p.optimizer, p.reward, p.sampler, p.loggers, p.judges, p.proposal, p.env)
        self.sampling = Sampling(self.sampler.temperature, self.sampler.generation_kwargs())  # how the run samples, fixed
        if self.optimizer.consumes != PREFERENCE_PAIRS:
            for message in [*(f"{s} makes responses differ from samples of pi(.|x) at the sampling temperature, so the "
                                "KL penalty and KL metrics are biased (and can go negative)" for s in self.sampler.kl_bias()),
                            *self.sampler.notices()]:
                warnings.warn(message, stacklevel=1)

        checkpoint.seed_all(cfg.seed)  # the run's random streams (its threads are the command's: rlhf.apps.train)
        device = distributed.pick_device(cfg.device)
        sharded = distributed.active() and cfg.parallel == "fsdp"  # loaded on the CPU: only shards reach the device
        self.policy = Policy.load(OmegaConf.to_object(cfg.policy), torch.device("cpu") if sharded else device)
        self.optimum: list = []  # eval.kl_to_optimum: the last evaluation's exact distributions
        if cfg.eval.kl_to_optimum:  # before any step: how many responses there are to enumerate
            from rlhf.core.evaluation.optimum import check_enumerable

            check_enumerable(self.policy.vocab_size, self.sampling.generation_kwargs(),
                             has_eos=self.policy.tokenizer.eos_token_id is not None)
        if self.optimizer.needs_value_head:
            self.policy.attach_value_head()
        self.autocast_dtype = distributed.pick_precision(cfg.precision, device, self.policy.parameter_count())
        if sharded:  # weights gathered in bf16 where autocast computes in it
            self.policy.enable_sharding(device, self.autocast_dtype if device.type == "cuda" else None)
        elif distributed.active():
            self.policy.enable_data_parallel()
        elif cfg.parallel == "fsdp":
            warnings.warn("parallel=fsdp: this is one process, so there is nothing to shard over; it trains as one "
                          "process. Start several with torchrun --nproc_per_node=N -m rlhf.apps.train ...", stacklevel=1)
        self.updater = update.Updater(self.optimizer, self.policy)
        self.torch_optimizer = self.updater.opt
        self.scheduler = None
        if cfg.train.lr_schedule == "linear":
            steps = cfg.train.steps
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.torch_optimizer, lambda i: max(0.0, 1 - i / steps))

        train_texts, eval_texts = load_prompts(cfg.data)
        tokenizer = self.policy.tokenizer
        self.train_prompts, eval_prompts = tokenize_prompts(tokenizer, train_texts), tokenize_prompts(tokenizer, eval_texts)
        cap = self.sampling.generation_kwargs().get("max_new_tokens", 20)
        for name, prompts in (("training", self.train_prompts), ("held-out", eval_prompts)):
            check_whole_prompts(prompts, self.policy.context_length, cap, f"data.prompts ({name})")
        self.eval_prompts = eval_prompts
        self.eval_queries = sample_queries(self.sampler, eval_prompts, random.Random(cfg.eval.seed))
        self.last_samples: list[dict[str, Any]] = []  # the last evaluation's saved samples
        self.proposal_chosen = ""  # proposal=auto: the proposal it chose
        if getattr(self.proposal, "chooses", False):
            self.proposal, self.proposal_chosen = self.proposal.choose(
                self.policy, self.sampling, self.optimizer.needs_value_head, self.autocast_dtype is not None)
        self.source = sources.build(self.optimizer.consumes, sources.SourceContext(
            self.policy, self.reward, self.sampler, self.optimizer, self.train_prompts, cfg.data, cfg.seed, self.proposal,
            self.sampling, self.env))
        self.proposal.start(self.policy, self.sampling)  # an engine of its own (vLLM): built now, refusing before any step
        self.problem = ""  # why the last batch was not trained on, if it was not
        self.first: dict[str, float] | None = None  # the evaluations at step 0 and at the last evaluation
        self.last: dict[str, float] | None = None
        self.kl_watch = diagnosis.NegativeKLWatch(self.sampler, self.proposal.is_policy)
        self.next_batch = self.source.next

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        return torch.autocast(self.policy.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One batch and one update. A batch with a non-finite score or KL is not trained on:
        its metrics come back (with the NaN) and `fit` stops the run. With the seconds of each
        phase of the step (rlhf.core.loop.phases) and of the whole."""
        t0 = time.perf_counter()
        with self.autocast():
            metrics = self._train_step()
        return {**metrics, **CLOCK.take(), STEP_S: time.perf_counter() - t0}

    def _train_step(self) -> dict[str, float]:
        batch = self.next_batch(self.cfg.train.batch_size)
        head = self.source.head_metrics(batch)
        device = self.policy.device
        self.problem = next((p for p in distributed.gather_objects(self.source.problem(batch)) if p), "")
        if self.problem:  # on any rank: no rank trains on this batch
            return distributed.mean_metrics(head, device)
        stats = {**head, **self.updater.step(batch)}
        if self.scheduler is not None:
            self.scheduler.step()
        return distributed.mean_metrics(stats, device)

    def evaluate(self, step: int) -> dict[str, float]:
        with self.autocast(), phase("evaluation"):
            metrics = self._evaluate(step)
        return {**metrics, "time/evaluation_s": CLOCK.take().get("time/evaluation_s", 0.0)}

    def _evaluate(self, step: int) -> dict[str, float]:
        # drawn again from the fixed seed: the same queries (and response cap, if the sampler draws one) each time
        self.eval_queries = (self.eval_prompts if self.env is not None  # (an episode takes its prompt whole)
                             else sample_queries(self.sampler, self.eval_prompts, random.Random(self.cfg.eval.seed)))
        metrics, rows = evaluate(
            self.policy, self.reward, self.eval_queries, self.sampling.generation_kwargs(),
            self.sampling.temperature, self.cfg.eval.seed, self.cfg.train.batch_size, self.judges, self.env,
            # an engine whose samples are the policy's (float32) draws the evaluation's too
            proposal=self.proposal if getattr(self.proposal, "samples_policy", False) else None,
        )
        if distributed.is_main():  # (sharded, every rank evaluates: each pass is collective)
            save_samples(self.run_dir, step, rows, self.cfg.eval.samples)
        self.last_samples = rows[: self.cfg.eval.samples]
        e = self.cfg.eval
        if e.pass_at_k:
            judge = self.judges[e.pass_judge] if e.pass_judge else self.reward
            metrics.update(pass_at_k(self.policy, judge, self.eval_queries, self.sampling.generation_kwargs(), e.seed + 1,
                                     max(self.cfg.train.batch_size, e.pass_samples), e.pass_samples, e.pass_at_k,
                                     e.pass_threshold))
        if self.cfg.eval.kl_to_optimum and self.env is not None:  # over whole episodes: the soft-Bellman optimum
            from rlhf.core.evaluation import episode_optimum

            roots = episode_optimum.episode_optimum(self.policy, self.env, self.eval_queries, self.optimizer.beta,
                                                    self.sampling.generation_kwargs(), self.sampling.temperature)
            metrics[EVAL_KL_TO_OPTIMUM] = episode_optimum.mean_kl(roots)
            metrics[EVAL_KL_TO_TILT] = episode_optimum.mean_kl(roots, tilt=True)
        elif self.cfg.eval.kl_to_optimum:
            from rlhf.core.evaluation.optimum import mean_kl, optimum

            self.optimum = optimum(self.policy, self.reward, self.eval_queries, self.optimizer.beta,
                                   self.sampling.generation_kwargs(), self.sampling.temperature)
            metrics[EVAL_KL_TO_OPTIMUM] = mean_kl(self.optimum)
        return metrics

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self, step: int, metrics_offset: int, first: dict, last: dict) -> dict[str, Any]:
        """Everything but the trained tensors that step `step + 1` depends on."""
        return {
            "step": step,
            "optimizer": None if self.policy.sharded else self.torch_optimizer.state_dict(),  # sharded: in shards/
            "plugin": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "source": self.source.state_dict(),
            "rng": checkpoint.rng_state(),
            "metrics_offset": metrics_offset,
            "first_eval": first,
            "last_eval": last,
            "negative_kl_steps": self.kl_watch.streak,
            "proposal": self.proposal.state_dict(),
        }

    def restore(self, candidates: list[Path]) -> tuple[Path, dict[str, Any]]:
        """Load the newest of `candidates` (complete checkpoints, oldest first) whose contents
        check out; a damaged one is passed over, with a warning naming its file, for the one
        before it. Nothing is changed until a checkpoint has been read whole and fits."""
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.torch_optimizer.param_groups]
        for path in reversed(candidates):
            damage = ""
            try:  # each rank checks its share of the files; all ranks then agree on the verdict
                tensors, state = checkpoint.load(path, share=(distributed.rank(), distributed.world()))
            except checkpoint.DamagedCheckpoint as e:
                damage = str(e)
            damage = next((d for d in distributed.gather_objects(damage) if d), "")
            if damage:
                warnings.warn(f"{damage}; trying the checkpoint before it", stacklevel=2)
                continue
            try:
                if checkpoint.is_sharded(path):
                    self._load_shards(path / checkpoint.SHARDS)
                else:
                    self.policy.load_trainable_state(tensors)
            except CheckpointMismatch as e:
                raise CheckpointMismatch(f"{e}{self._recorded_differences()}") from None
            self._restore_state(state, self.resume_changes, configured)
            for newer in candidates[candidates.index(path) + 1 :] if distributed.is_main() else []:
                newer.rename(newer.with_name(f".damaged-{newer.name}"))  # damaged: set aside (once), never rotated in
            return path, state
        raise checkpoint.DamagedCheckpoint(f"no checkpoint of {self.run_dir} could be loaded (see the warnings above); "
                                           "start a new run")

    def _load_shards(self, directory: Path) -> None:
        """A sharded checkpoint's weights and optimizer state, onto this run's layout (any
        number of processes, sharded or not: DCP reshards on load)."""
        try:
            sharding.load(self.policy.trainable_root(), self.torch_optimizer, directory)
        except OSError:  # a disk's or a network's failure, not a mismatch: as it is
            raise
        except Exception as e:  # DCP's errors name keys, not the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatch(f"checkpoint {directory.parent} does not fit this policy ({first[:300]}) (was it "
                                     "written with other policy.lora settings or another optimizer?)") from e

    def _recorded_differences(self) -> str:
        """'' or the policy and optimizer settings in which this run differs from the run's record."""
        changes = {k: v for k, v in self.resume_changes.items() if k.startswith(("policy.", "optimizer."))}
        if not changes:
            return ""
        shown = ", ".join(f"{k}={old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:6])
        return (f". The run was recorded with other settings: {shown}; resume with the recorded ones "
                "(drop those overrides), or start a new run")

    @property
    def resume_changes(self) -> dict[str, tuple[Any, Any]]:
        """The settings (resume_force=true) in which this run differs from its record: {key: (old, new)}."""
        recorded = self.run_dir / rundir.CONFIG
        if not recorded.is_file():
            return {}
        return rundir.resume_changes(OmegaConf.to_container(OmegaConf.load(recorded)), OmegaConf.to_container(self.cfg))

    def _restore_state(self, state: dict[str, Any], changes: dict[str, tuple[Any, Any]], configured: list[dict]) -> None:
        """The checkpoint's state, then the settings of this run on top: a forced change
        (resume_force=true) takes effect from the next step, whatever the state held (the
        optimizer's learning rate and Adam's settings as `configured`, the KL coefficient, the
        seed's streams)."""
        if state["optimizer"] is not None:  # None: it came with the shards
            self.torch_optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.torch_optimizer.param_groups, configured):
            group.update(settings)  # lr, eps, betas as configured (the moments and step counts stay)
        self.optimizer.load_state_dict(state["plugin"])
        if self.scheduler is not None:  # where the schedule is at this step, from the configured lr
            self.scheduler.last_epoch = state["step"]
            self.scheduler.base_lrs = [g["initial_lr"] for g in self.torch_optimizer.param_groups]
            for group, base, factor in zip(self.torch_optimizer.param_groups, self.scheduler.base_lrs,
                                           self.scheduler.lr_lambdas):
                group["lr"] = base * factor(state["step"])  # LambdaLR's own formula
            self.scheduler._last_lr = [g["lr"] for g in self.torch_optimizer.param_groups]
        saved_source = state["source"]
        if "seed" in changes:  # the new seed's streams from here: the data position stays, its generators do not
            saved_source = checkpoint.with_generators_of(saved_source, self.source.state_dict())
            checkpoint.seed_all(self.cfg.seed + state["step"])
        else:
            checkpoint.set_rng_state(state["rng"])
        self.source.load_state_dict(saved_source)
        self.kl_watch.streak = state["negative_kl_steps"]
        if state.get("proposal"):
            self.proposal.load_state_dict(state["proposal"])

    def resume_line(self) -> str:
        """What a resumed run says it does: the checkpoint it loaded, and any forced change."""
        step = self.resumed_step
        text = f"resuming {self.run_dir} from {self.resumed_from.name} (step {step})"
        changes = self.resume_changes
        if changes:
            text += (f"; with resume_force=true, from step {step + 1} on: "
                     + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()))
        return text

    def checkpoint(self, step: int, recorder: RunRecorder | None) -> None:
        """A checkpoint of step `step` (the rows of metrics.jsonl it points to synced first)."""
        tensors, sharded = self.policy.trainable_state(), self.policy.sharded
        bad = [name for name, t in tensors.items() if not torch.isfinite(sharding.local(t)).all()]
        if sharded:  # each rank sees its own shards: all must stop together
            bad = sorted({name for part in distributed.gather_objects(bad) for name in part})
        if bad:  # never write weights a NaN has reached
            raise NonFiniteError(f"step {step}: non-finite values in {bad[:3]}; no checkpoint written")
        metrics_offset = 0
        if recorder is not None:  # the rows the checkpoint points to are on disk before it is
            recorder.sync()
            metrics_offset = recorder.offset
        state = self.state_dict(step, metrics_offset, self.first, self.last)  # on every rank: it gathers their data state
        if sharded:  # every rank writes its shards
            root = self.policy.trainable_root()
            checkpoint.save(self.run_dir, step, {}, state, self.cfg.checkpoint.keep,
                            shards=lambda d: sharding.save(root, self.torch_optimizer, d))
        elif distributed.is_main():
            checkpoint.save(self.run_dir, step, tensors, state, self.cfg.checkpoint.keep)
        distributed.barrier()  # no rank runs ahead of a checkpoint it may be resumed from

    # ---------------------------------------------------------------- the loop

    def fit(self, resume: Path | list[Path] | None = None, preemption: Preemption | Interrupt | None = None,
            started: Callable[[], None] | None = None, progress_bar: bool = True) -> dict[str, Any]:
        """Train, evaluate and log; with `resume` (a checkpoint directory, or a run's complete
        checkpoints oldest first), continue from it. `started` is called once the run is set
        up (after its checkpoint has loaded): the command records the run's config then.
        With `preemption` (submitit's, or Ctrl-C and SIGTERM), the signal ends the run at the
        end of the step it arrives in, with a checkpoint. `progress_bar=False` (jobs sharing a
        terminal): a line at each evaluation instead. Each cadence is a part of its own
        (rlhf.core.loop.callbacks); data-parallel, rank 0 alone evaluates, logs and checkpoints
        (sharded, every rank evaluates and writes its shards: passes through the model are
        collective)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start, state = 0, None
        if resume is not None:
            self.resumed_from, state = self.restore([resume] if isinstance(resume, Path) else list(resume))
            start, self.first, self.last = state["step"], state["first_eval"], state["last_eval"]
            self.resumed_step = start
        if started is not None:
            started()
        if resume is None and self.evaluates:
            self.first = self.last = self.evaluate(0)
        self.parts = parts = callbacks.parts(self, start, state, preemption, progress_bar)
        try:
            for part in parts:
                part.begin()
            for step in range(start + 1, self.cfg.train.steps + 1):
                metrics = self.train_step()
                for part in parts:
                    part.after_step(step, metrics)
                if step % self.cfg.eval.every == 0 or step == self.cfg.train.steps:
                    if self.evaluates:
                        self.last = self.evaluate(step)
                    for part in parts:
                        part.after_eval(step, self.last)
                for part in parts:
                    part.end_of_step(step)
        finally:  # (a run that fails ends its progress bar's line before it says why)
            for part in parts:
                part.close()
        return self.finish(start if resume is not None else None)

    @property
    def evaluates(self) -> bool:
        """Whether this rank evaluates: rank 0, or every rank when sharded (each pass is collective)."""
        return distributed.is_main() or self.policy.sharded

    def finish(self, resumed_from_step: int | None) -> dict[str, Any]:
        """After the last step: final/, summary.json, the model card and optimum.json (rank 0)."""
        cfg, first, last, start = self.cfg, self.first, self.last, resumed_from_step
        main = distributed.is_main()
        # data-parallel: the ranks' parameters must not have drifted apart; sharded there is one copy,
        # and every rank evaluated it: their last evaluations must agree
        divergence = None if self.policy.sharded else distributed.max_param_difference(self.policy.trainable_state())
        eval_spread = None
        if self.policy.sharded:
            eval_spread = max(abs(m[k] - last[k]) for m in distributed.gather_objects(last) for k in last
                              if not k.startswith("time/"))  # (each rank's own seconds)
        whole = self.policy.full_state() if cfg.train.save_final else None  # sharded: gathered by every rank
        if not main:
            return {"steps": cfg.train.steps, "rank": distributed.rank()}
        if cfg.train.save_final:
            with rundir.atomic_dir(self.run_dir / rundir.FINAL) as final:  # the whole of it, or the old one
                save_policy(self.policy, str(final), whole)
        judges = {f"judge_{name}_{when}": m[f"eval/judge/{name}"]
                  for name in self.judges for when, m in (("start", first), ("end", last))}
        summary = {
            "reward_start": first[EVAL_REWARD],
            "reward_end": last[EVAL_REWARD],
            "kl_start": first[EVAL_KL],
            "kl_end": last[EVAL_KL],
            "response_len_end": last[EVAL_RESPONSE_LEN],
            "distinct_2_end": last[EVAL_DISTINCT_2],
            **{f"fluency_{when}": m[EVAL_FLUENCY] for when, m in (("start", first), ("end", last)) if EVAL_FLUENCY in m},
            **judges,
            **({"kl_to_optimum": last[EVAL_KL_TO_OPTIMUM]} if cfg.eval.kl_to_optimum else {}),
            **({"kl_to_tilt": last[EVAL_KL_TO_TILT]} if EVAL_KL_TO_TILT in last else {}),
            # episodes: how they ended (turns, cut by the limit, tool errors)
            **{f"{k.removeprefix('eval/episode/')}_end": v for k, v in last.items() if k.startswith("eval/episode/")},
            **{f"{k.removeprefix('eval/')}_{when}": m[k] for k in last if k.startswith((EVAL_PASS_AT, EVAL_ACCURACY))
               for when, m in (("start", first), ("end", last))},
            "steps": cfg.train.steps,
            **({"resumed_from_step": start} if start is not None else {}),
            **({"data_parallel_ranks": distributed.world(), "parallel": cfg.parallel} if distributed.active() else {}),
            **({"max_param_diff_across_ranks": divergence} if divergence is not None and distributed.active() else {}),
            **({"max_eval_diff_across_ranks": eval_spread} if eval_spread is not None else {}),
            "device": str(self.policy.device),
            "precision": str(self.autocast_dtype or torch.float32).removeprefix("torch."),
            **({"proposal": self.proposal_chosen} if self.proposal_chosen else {}),
            "torch_threads": torch.get_num_threads(),
            "wall_s": round(time.time() - self.t0, 2),
            **CLOCK.summary(time.time() - self.t0),  # where the time went, by phase
            "run_dir": str(self.run_dir),
        }
        next(p.recorder for p in self.parts if isinstance(p, callbacks.Recording)).summary(summary)
        if cfg.train.save_final:  # peft's blank template replaced by what this run is and did
            from rlhf.core.run import card

            card.write(self.run_dir, self.run_dir / rundir.FINAL, "adapters" if self.policy.lora else "model",
                       base=self.policy.trunk if self.policy.lora else None)
        if self.optimum:
            from rlhf.core.evaluation.optimum import table_record

            record = table_record(self.optimum, cfg.train.steps)
            rundir.write_atomic(self.run_dir / rundir.OPTIMUM, rundir.to_json(record, indent=1))
        for lg in self.loggers:
            lg.finish(summary)
        return summary


