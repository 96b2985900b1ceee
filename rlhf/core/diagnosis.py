"""Diagnoses of a run from what it logged: each finding names the pathology, the evidence
(the metrics and steps that show it, a sample where it helps) and the knobs that address it.

Read by `rlhf-diagnose` (a run or a sweep, after the fact), by the training loop (the same
checks at each evaluation, each finding warned once) and by `rlhf-compare`'s report. A
detector sees the metrics rows logged so far (`metrics.jsonl`), the run's config and its
saved samples; it returns a Finding or None. Every threshold is a named constant below with
the reason for its value; they were set on the planted-pathology benchmark
(`benchmarks/diagnose.py`), whose confusion table is in the README.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rlhf.core import rundir

# --- how much is "moved": the reward's spread over the held-out samples at step 0 is the unit
SPREAD_FLOOR = 0.05  # the unit's floor: a step-0 spread of 0 (every sample scored alike) would make any change huge
MOVED = 0.25  # a reward change under a quarter of the step-0 spread is within evaluation noise
FLAT_JUDGE = 0.02  # a judge (scores in [0, 1] or [-1, 1]) that gains less than this did not follow the reward
GOLD_DROP = 0.05  # a judge in [0, 1] falling this far below its peak, not evaluation noise (~0.02 on 64 prompts)
GOLD_NOISE = 3.0  # ... and more than 3 standard errors of the judge's mean over the held-out prompts
FLUENCY_DROP = 1.0  # nats per token lost under the reference: healthy runs lose < 0.3 (sharpening), word salad > 2
DISTINCT_COLLAPSE = 0.5  # distinct-2 falling to half its start: the samples repeat one another
REPETITION_RISE = 0.3  # 30 points more of each response's bigrams repeating earlier ones: looping text
LENGTH_CAP = 0.95  # responses at 95% of max_new_tokens run to the cap
LENGTH_NOTHING = 1.5  # tokens: a response of the end token alone, or one word
KL_BLOWUP = 30.0  # nats per response: far past where a reward model or classifier is still a judge ...
KL_BLOWUP_PER_TOKEN = 1.25  # ... or, for long responses, 1.25 nats per token (30 over the default 24 tokens)
KL_GROWTH = 2.0  # KL at least doubling over the second half of the run ...
KL_GROWTH_MIN = 5.0  # ... by at least this many nats, while the reward does not move
KL_STILL = 0.5  # nats per response: the policy has barely left the reference
BETA_LARGE = 1.0  # a KL coefficient at which a reward in [0, 1] can buy little KL (0.1 reward = 0.1 nats)
APPROX_KL_TINY = 1e-5  # per-update KL between successive policies: below this the steps are too small
LOGP_STILL = 0.1  # nats: DPO's log pi(chosen) moving less than this over the run has not been trained
CLIPFRAC_HIGH = 0.3  # a third of the tokens outside the trust region, step after step: steps too large
APPROX_KL_HIGH = 0.1  # per-update KL: PPO's trust region is ~0.01-0.02
APPROX_KL_EXTREME = 1.0  # one update moving the policy a whole nat per token: 50-100x the trust region
LARGE_SHARE = 0.25  # ... on a quarter of the steps (early ones included: a collapse can follow them)
CLIPPED_SHARE = 0.9  # gradient norm above max_grad_norm on 90% of the steps: every step was clipped ...
CLIPPED_FACTOR = 3.0  # ... by a factor of 3 at the median (healthy runs sit at 1-2x a cap of 1 and learn)
ENTROPY_FLOOR = 0.05  # nats per token: the policy samples (nearly) one token everywhere
ENTROPY_FALL = 0.1  # ... or has kept a tenth of its starting entropy
EXPLAINED_VAR_SHARE = 0.8  # explained variance <= 0 on 80% of the second half's steps
DISPLACEMENT = 2.0  # nats: chosen and rejected log-probs both falling this far from their start
SATURATED_LOSS = 0.05  # DPO loss (log 2 = 0.69 at the start) this low with accuracy 1 over the second half
NEGATIVE_KL_STEPS = 5  # consecutive negative train/kl estimates (the live start-up warning's rule) ...
NEGATIVE_KL_MEAN = 0.05  # ... averaging below -0.05 nats: a policy at the reference gives +-0.02 by chance
SKIPPED_STEPS = 3  # steps with a PPO minibatch skipped for its ratio: a trust region broken repeatedly
SATURATED_BY = 0.3  # the reward at its final level within the first 30% of the run ...
SPREAD_LEFT = 0.1  # ... and the reward's spread at a tenth of its start: every sample scores alike
MIN_EVALS = 3  # trends need a start, a middle and an end
MIN_TRAIN_ROWS = 10  # training-step statistics need this many steps


@dataclass(frozen=True)
class Finding:
    name: str  # the pathology
    evidence: str  # the metrics and steps that show it
    knobs: tuple[str, ...]  # what to turn, with the direction
    sample: str | None = None  # a response that shows it

    def text(self) -> str:
        out = f"{self.name}: {self.evidence}\n  try: {'; '.join(self.knobs)}"
        if self.sample:
            out += f"\n  sample: {self.sample!r}"
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "evidence": self.evidence, "knobs": list(self.knobs), "sample": self.sample}


@dataclass
class Record:
    """What a diagnosis reads: the metrics rows logged so far, the run's config, its samples."""

    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in self.rows
                if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series(key)]

    def setting(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def total_steps(self) -> int:
        steps = self.setting("train.steps", 0)
        return (steps if isinstance(steps, int) and steps > 0 else 0) or max((int(r["step"]) for r in self.rows), default=0)

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows), default=0)

    @property
    def progress(self) -> float:
        return self.last_step / self.total_steps if self.total_steps else 0.0


def load(run: Path) -> Record:
    """A run directory's record (its config from .hydra/config.yaml when there is one)."""
    rows = rundir.read_rows(run / rundir.METRICS)[0] if (run / rundir.METRICS).is_file() else []  # damaged lines skipped
    config: dict[str, Any] = {}
    if (run / rundir.CONFIG).is_file():
        from omegaconf import OmegaConf

        try:
            loaded = OmegaConf.load(run / rundir.CONFIG)
            try:
                config = OmegaConf.to_container(loaded, resolve=True)
            except Exception:  # an interpolation only the run could resolve (${now:...}, a resolver of its own)
                config = OmegaConf.to_container(loaded, resolve=False)
        except Exception:
            config = {}
    return Record(rows, config, rundir.read_samples(run))


# ---------------------------------------------------------------- helpers


def _start_end(record: Record, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
    s = record.series(key)
    return (s[0], s[-1]) if len(s) >= 2 else None


def _spread(record: Record) -> float:
    std, r = record.values("eval/reward_std"), record.values("eval/reward")
    floor = SPREAD_FLOOR * max(1.0, abs(r[0]) if r else 1.0)  # a reward every sample scores alike at step 0
    return max(std[0], floor) if std else 1.0


def _reward_gain(record: Record) -> float | None:
    """The held-out reward's change from the first evaluation to the last, in step-0 spreads."""
    ends = _start_end(record, "eval/reward")
    return None if ends is None else (ends[1][1] - ends[0][1]) / _spread(record)


def _median_tail(record: Record, key: str, share: float = 0.5) -> float | None:
    """The median of `key` over the last `share` of its logged steps."""
    v = record.values(key)
    if len(v) < MIN_TRAIN_ROWS:
        return None
    return statistics.median(v[int(len(v) * (1 - share)) :])


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _span(record: Record, key: str, share: float = 0.1) -> tuple[float, float] | None:
    """The mean of `key` over its first and over its last `share` of logged steps."""
    v = record.values(key)
    if len(v) < MIN_TRAIN_ROWS:
        return None
    k = max(1, int(len(v) * share))
    return _mean(v[:k]), _mean(v[-k:])


def _top_sample(record: Record) -> str | None:
    """The last evaluation's best-rewarded response: what the reward is paying for."""
    if not record.samples:
        return None
    rows = record.samples[max(record.samples)]
    best = max(rows, key=lambda r: r.get("reward", float("-inf")), default=None)
    return None if best is None else str(best.get("response", ""))[:200]


def _on_policy(record: Record) -> bool:
    return bool(record.values("policy/approx_kl") or record.values("train/reward"))


def _beta(record: Record) -> float | None:
    b = record.values("objective/beta")
    if b:
        return b[-1]
    beta = record.setting("optimizer.beta")
    return float(beta) if isinstance(beta, (int, float)) else None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ---------------------------------------------------------------- the detectors


def nonfinite_evaluation(record: Record) -> Finding | None:
    """An evaluation figure that is NaN or infinite: a reward source or judge that returned one
    for a held-out response (training steps stop at one; an evaluation does not, so it is said)."""
    bad = [(int(r["step"]), k, v) for r in record.rows for k, v in r.items()
           if k.startswith("eval/") and isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return None
    first = bad[0]
    keys = sorted({k for _, k, _ in bad})
    return Finding("non-finite evaluation score",
                   f"{first[1]} = {first[2]} at step {first[0]} ({len(bad)} value(s) in all: {', '.join(keys)}); every "
                   "figure of a mean over those samples is then meaningless",
                   ("the reward source (or judge) named: it returned NaN or infinity for a held-out response; find it in "
                    "samples/step_<N>.jsonl and make score() return a finite number", "eval.judges without that judge"))


def reward_hacking(record: Record) -> Finding | None:
    """The optimized reward rises while what it stands for does not: an independent judge stays
    flat or falls, the text stops being language (fluency under the reference collapses,
    responses loop or copy one another), or responses run to the length cap or to nothing."""
    gain = _reward_gain(record)
    if gain is None or gain < MOVED or len(record.series("eval/reward")) < MIN_EVALS:
        return None
    (s0, r0), (s1, r1) = _start_end(record, "eval/reward")
    signs = []
    for key in sorted({k for r in record.rows for k in r if k.startswith("eval/judge/")}):
        ends = _start_end(record, key)
        if ends and ends[1][1] - ends[0][1] < FLAT_JUDGE:
            signs.append(f"judge {key.removeprefix('eval/judge/')} {_fmt(ends[0][1])} -> {_fmt(ends[1][1])}")
    ends = _start_end(record, "eval/fluency")
    if ends and ends[0][1] - ends[1][1] >= FLUENCY_DROP:
        signs.append(f"fluency (log-likelihood per token under the reference) {_fmt(ends[0][1])} -> {_fmt(ends[1][1])}")
    ends, length = _start_end(record, "eval/distinct_2"), record.values("eval/response_len")
    if ends and ends[0][1] > 0.2 and ends[1][1] <= DISTINCT_COLLAPSE * ends[0][1] and length and length[-1] >= 3:
        signs.append(f"distinct-2 {_fmt(ends[0][1])} -> {_fmt(ends[1][1])}")
    ends = _start_end(record, "eval/repetition")
    if ends and ends[1][1] - ends[0][1] >= REPETITION_RISE:
        signs.append(f"repeated bigrams within a response {_fmt(ends[0][1])} -> {_fmt(ends[1][1])}")
    ends = _start_end(record, "eval/response_len")
    cap = record.setting("sampler.max_new_tokens")
    if ends and isinstance(cap, int) and ends[1][1] >= LENGTH_CAP * cap and ends[0][1] < 0.8 * cap:
        signs.append(f"response length {_fmt(ends[0][1])} -> {_fmt(ends[1][1])} tokens (the cap is {cap})")
    if ends and ends[1][1] <= LENGTH_NOTHING < ends[0][1]:
        signs.append(f"response length {_fmt(ends[0][1])} -> {_fmt(ends[1][1])} tokens (responses of nothing)")
    if not signs:
        return None
    return Finding(
        "reward hacking",
        f"eval/reward {_fmt(r0)} -> {_fmt(r1)} (steps {s0}-{s1}, +{gain:.1f} step-0 spreads) while " + "; ".join(signs),
        ("raise optimizer.beta (keep closer to the reference)",
         "stop earlier (train.steps) or keep the checkpoint where the judges peaked",
         "a reward that cannot be satisfied this way (a reward model trained on more pairs, reward=weighted with a judge)",
         "add independent judges: eval.judges=[...]"),
        _top_sample(record))


def past_gold_peak(record: Record) -> Finding | None:
    """Over-optimisation (Gao et al. 2022): the optimized (proxy) reward goes on rising while a
    judge (the gold reward) has peaked and fallen back: the run went past the KL where the
    proxy stopped standing for the gold."""
    proxy = dict(record.series("eval/reward"))
    for key in sorted({k for r in record.rows for k in r if k.startswith("eval/judge/")}):
        gold = record.series(key)
        if len(gold) < MIN_EVALS + 1:
            continue
        (s_peak, g_peak), (s_end, g_end) = max(gold, key=lambda p: p[1]), gold[-1]
        spread = dict(record.series(key.replace("eval/judge/", "eval/judge_std/")))
        n = record.setting("data.n_eval") or 64
        noise = GOLD_NOISE * spread.get(s_peak, 0.0) / math.sqrt(n) if isinstance(n, int) and n > 0 else 0.0
        if s_peak == s_end or g_peak - g_end < max(GOLD_DROP, noise) or g_peak - gold[0][1] < FLAT_JUDGE:
            continue
        if s_peak not in proxy or s_end not in proxy or proxy[s_end] < proxy[s_peak]:
            continue  # the proxy fell too: a collapse, not over-optimisation
        kl = dict(record.series("eval/kl"))
        at = f" (sqrt KL {math.sqrt(max(kl[s_peak], 0)):.2f})" if s_peak in kl else ""
        return Finding("over-optimisation: past the gold reward's peak",
                       f"{key.removeprefix('eval/judge/')} peaked at {_fmt(g_peak)} at step {s_peak}{at} and fell to "
                       f"{_fmt(g_end)} by step {s_end}, while eval/reward went on {_fmt(proxy[s_peak])} -> {_fmt(proxy[s_end])}",
                       (f"stop near step {s_peak} (train.steps) or keep that checkpoint", "raise optimizer.beta",
                        "a proxy reward closer to the gold (a reward model trained on more pairs)"), _top_sample(record))
    return None


def kl_blowup(record: Record) -> Finding | None:
    """The policy runs away from the reference: a KL past any judge's competence, or KL
    growing over the second half of the run while the reward does not."""
    kl = record.series("eval/kl")
    if len(kl) < MIN_EVALS:
        return None
    beta = _beta(record)
    knobs = (f"raise optimizer.beta (now {_fmt(beta) if beta is not None else '?'})", "lower optimizer.lr",
             "optimizer.kl_target=<nats> (adaptive beta) where the optimizer has it")
    peak = max(kl, key=lambda p: p[1])
    length = dict(record.series("eval/response_len")).get(peak[0], 0.0)
    limit = max(KL_BLOWUP, KL_BLOWUP_PER_TOKEN * length)
    if peak[1] >= limit:
        return Finding("KL blow-up", f"eval/kl {_fmt(kl[0][1])} -> {_fmt(peak[1])} nats at step {peak[0]} (over "
                       f"{limit:.3g}; {_fmt(kl[-1][1])} at step {kl[-1][0]})", knobs, _top_sample(record))
    mid = [p for p in kl if p[0] >= kl[-1][0] / 2]
    rewards = [p for p in record.series("eval/reward") if p[0] >= kl[-1][0] / 2]
    if len(mid) >= 2 and len(rewards) >= 2:
        grew = mid[-1][1] - mid[0][1]
        gained = (rewards[-1][1] - rewards[0][1]) / _spread(record)
        if mid[-1][1] >= KL_GROWTH * max(mid[0][1], 1e-6) and grew >= KL_GROWTH_MIN and gained < MOVED:
            return Finding("KL blow-up", f"eval/kl {_fmt(mid[0][1])} -> {_fmt(mid[-1][1])} nats over steps "
                           f"{mid[0][0]}-{mid[-1][0]} while eval/reward moved {gained:+.2f} step-0 spreads", knobs)
    return None


def nothing_moves(record: Record) -> Finding | None:
    """Neither the reward nor the KL moves by the second half of the run: either the KL
    penalty holds the policy at the reference (over-regularisation), or the steps are too
    small to go anywhere (stagnation)."""
    if record.progress < 0.5 or len(record.series("eval/reward")) < MIN_EVALS:
        return None
    gain, kl = _reward_gain(record), record.values("eval/kl")
    if gain is None or abs(gain) >= MOVED or not kl or abs(kl[-1]) >= KL_STILL:
        return None
    beta = _beta(record)
    lr = record.setting("optimizer.lr")
    evidence = f"eval/reward moved {gain:+.2f} step-0 spreads and eval/kl is {_fmt(kl[-1])} nats at step {record.last_step}"
    approx = _median_tail(record, "policy/approx_kl")
    if beta is not None and beta >= BETA_LARGE and not (approx is not None and approx < APPROX_KL_TINY):
        return Finding("over-regularisation", f"{evidence}, with optimizer.beta={_fmt(beta)}: the KL penalty outweighs "
                       "what the reward can pay", (f"lower optimizer.beta (now {_fmt(beta)}; 0.01-0.1 is usual)",))
    if approx is not None:  # the steps must be shown to be tiny: a hard task also leaves reward and KL flat
        if approx >= APPROX_KL_TINY:
            return None
        evidence += f"; the policy hardly changes per update (median policy/approx_kl {approx:.2g}"
        clip = _median_tail(record, "policy/clipfrac")
        evidence += f", clipfrac {clip:.2g})" if clip is not None else ")"
    else:
        chosen = _span(record, "logps/chosen")
        if chosen is None or abs(chosen[1] - chosen[0]) >= LOGP_STILL:
            return None
        evidence += f"; log pi(chosen) {_fmt(chosen[0])} -> {_fmt(chosen[1])}"
    return Finding("stagnation: steps too small", evidence,
                   (f"raise optimizer.lr (now {lr})" if lr is not None else "raise optimizer.lr",
                    "more steps (train.steps)", "lower optimizer.beta if it is large"))


def steps_too_large(record: Record) -> Finding | None:
    """Each update goes far outside the trust region, or every gradient is clipped."""
    lr = record.setting("optimizer.lr")
    knobs = (f"lower optimizer.lr (now {lr})" if lr is not None else "lower optimizer.lr",
             "lower optimizer.clip_coef or fewer epochs per batch where the optimizer has them")
    parts = []
    for key, high in (("policy/clipfrac", CLIPFRAC_HIGH), ("policy/approx_kl", APPROX_KL_HIGH)):
        s = record.series(key)
        over = [step for step, x in s if x >= high]
        if len(s) >= MIN_TRAIN_ROWS and len(over) >= LARGE_SHARE * len(s):
            top = _fmt(max(x for _, x in s))
            parts.append(f"{key} >= {high:g} on {len(over)} of {len(s)} steps (first {over[0]}, max {top})")
    s = record.series("policy/approx_kl")
    extreme = [(step, x) for step, x in s if x >= APPROX_KL_EXTREME]
    if extreme and not parts:
        parts.append(f"policy/approx_kl {_fmt(extreme[0][1])} nats at step {extreme[0][0]}"
                     + (f" and at {len(extreme) - 1} more steps" if len(extreme) > 1 else ""))
    if parts:  # (a run whose early steps were huge may have collapsed since, and now moves no more)
        return Finding("unstable: steps too large", " and ".join(parts) + " (a healthy PPO update keeps clipfrac < "
                       f"{CLIPFRAC_HIGH} and approx_kl < {APPROX_KL_HIGH})", knobs)
    norms, cap = record.values("optim/grad_norm"), record.setting("optimizer.max_grad_norm")
    if len(norms) >= MIN_TRAIN_ROWS and isinstance(cap, (int, float)) and cap > 0:
        share = sum(n > cap for n in norms) / len(norms)
        if share >= CLIPPED_SHARE and statistics.median(norms) >= CLIPPED_FACTOR * cap:
            return Finding("unstable: steps too large", f"the gradient norm exceeded optimizer.max_grad_norm={cap:g} on "
                           f"{share:.0%} of the steps (median {_fmt(statistics.median(norms))}): every step was clipped",
                           knobs)
    return None


def entropy_collapse(record: Record) -> Finding | None:
    """The policy samples (nearly) one token everywhere: no exploration left."""
    span = _span(record, "policy/entropy")
    if span is None:
        return None
    start, end = span
    if end <= ENTROPY_FLOOR or (start > 0 and end <= ENTROPY_FALL * start):
        return Finding("entropy collapse", f"policy/entropy {_fmt(start)} -> {_fmt(end)} nats per token",
                       ("raise optimizer.beta", "lower optimizer.lr", "raise sampler.temperature"), _top_sample(record))
    return None


def value_explains_nothing(record: Record) -> Finding | None:
    """The critic is no better than a constant: advantages are noise around the return."""
    v = record.series("val/explained_var")
    if len(v) < 2 * MIN_TRAIN_ROWS:
        return None
    tail = v[len(v) // 2 :]
    share = sum(x <= 0 for _, x in tail) / len(tail)
    if share < EXPLAINED_VAR_SHARE:
        return None
    return Finding("value function explains nothing", f"val/explained_var <= 0 on {share:.0%} of steps "
                   f"{tail[0][0]}-{tail[-1][0]} (median {_fmt(statistics.median(x for _, x in tail))})",
                   ("optimizer.vf_coef (the value loss's weight) or the value head's learning rate",
                    "optimizer=grpo or optimizer=rloo (no critic: a baseline from several samples per prompt)"))


def dpo_displacement(record: Record) -> Finding | None:
    """Both the chosen and the rejected responses lose probability: the margin grows by
    pushing everything down (likelihood displacement), mass goes to responses neither pair holds."""
    chosen, rejected = _span(record, "logps/chosen"), _span(record, "logps/rejected")
    if chosen is None or rejected is None:
        return None
    if chosen[0] - chosen[1] >= DISPLACEMENT and rejected[0] - rejected[1] >= DISPLACEMENT:
        return Finding("DPO likelihood displacement", f"log pi(chosen) {_fmt(chosen[0])} -> {_fmt(chosen[1])} and "
                       f"log pi(rejected) {_fmt(rejected[0])} -> {_fmt(rejected[1])} nats: both fall",
                       ("lower optimizer.lr", "raise optimizer.beta", "fewer steps (train.steps)"), _top_sample(record))
    return None


def dpo_saturated(record: Record) -> Finding | None:
    """The preference loss is ~0 with every pair ranked right: the pairs have nothing left to
    teach, and further steps only push the log-ratios apart."""
    loss, acc = _median_tail(record, "loss/dpo"), _median_tail(record, "rewards/accuracy")
    if loss is None or acc is None or loss > SATURATED_LOSS or acc < 0.99:
        return None
    first = next((s for s, x in record.series("loss/dpo") if x <= SATURATED_LOSS), None)
    return Finding("DPO margin saturated", f"loss/dpo {_fmt(loss)} (log 2 = 0.69 at the start) with rewards/accuracy "
                   f"{acc:.2f} over the second half; first below {SATURATED_LOSS} at step {first}",
                   ("lower optimizer.lr", "fewer steps (train.steps)", "more pairs (data.n_train)"))


def biased_kl(record: Record) -> Finding | None:
    """Negative KL estimates, step after step: the samples are not draws from pi at the
    sampling temperature (top-k, top-p, a temperature the log-probs do not use)."""
    streak, best, worst = [], [], 0.0
    for _, x in record.series("train/kl"):
        streak = streak + [x] if x < 0 else []
        if len(streak) >= NEGATIVE_KL_STEPS and _mean(streak) < worst:
            best, worst = list(streak), _mean(streak)
    kl = record.values("eval/kl")
    settings = [f"sampler.{k}={record.setting('sampler.' + k)}" for k, off in (("top_k", 0), ("top_p", 1.0))
                if isinstance(record.setting("sampler." + k), (int, float)) and record.setting("sampler." + k) != off]
    negative = worst <= -NEGATIVE_KL_MEAN or bool(kl and kl[-1] < -NEGATIVE_KL_MEAN)
    if not negative and not settings:
        return None
    said = []
    if best and worst <= -NEGATIVE_KL_MEAN:
        said.append(f"train/kl negative for {len(best)} steps in a row (mean {_fmt(worst)} nats)")
    if kl and kl[-1] < -NEGATIVE_KL_MEAN:
        said.append(f"eval/kl {_fmt(kl[-1])} nats at the end")
    if settings:
        said.append(f"{', '.join(settings)}: the responses are samples of a truncated pi, so every log-ratio the KL "
                    "estimate and penalty average is taken where pi put more mass than it should: biased low")
    return Finding("biased KL estimate", "; ".join(said),
                   ("sampler.top_k=0 and sampler.top_p=1.0 (sample from pi itself)",
                    "the KL penalty and metrics are biased while it lasts"))


def ratio_skips(record: Record) -> Finding | None:
    """PPO skipped minibatches whose probability ratio left the trust region, again and again."""
    skipped = [s for s, x in record.series("policy/skipped_minibatches") if x > 0]
    if len(skipped) < SKIPPED_STEPS:
        return None
    return Finding("repeated PPO ratio skips", f"minibatches skipped (mean ratio over optimizer.ratio_threshold) at "
                   f"{len(skipped)} steps, first {skipped[0]}, last {skipped[-1]}",
                   ("lower optimizer.lr", "fewer epochs per batch (optimizer.epochs)", "check the reward's scale"))


def early_saturation(record: Record) -> Finding | None:
    """The reward reached its final level early and every sample now scores alike: nothing
    left to learn from this reward."""
    r, std = record.series("eval/reward"), record.series("eval/reward_std")
    if len(r) < MIN_EVALS + 1 or len(std) < MIN_EVALS + 1 or record.progress < 0.9:
        return None
    total = r[-1][1] - r[0][1]
    if total <= MOVED * _spread(record):
        return None
    reached = next(s for s, x in r if x - r[0][1] >= 0.95 * total)
    if reached > SATURATED_BY * record.total_steps or std[-1][1] > SPREAD_LEFT * std[0][1]:
        return None
    return Finding("reward saturated early", f"eval/reward at 95% of its final gain by step {reached} of "
                   f"{record.total_steps}, its spread {_fmt(std[0][1])} -> {_fmt(std[-1][1])}: every sample scores alike",
                   ("stop earlier (train.steps)", "a harder task or a reward with more range"))


DETECTORS: tuple[Callable[[Record], Finding | None], ...] = (
    nonfinite_evaluation, reward_hacking, past_gold_peak, kl_blowup, nothing_moves, steps_too_large, entropy_collapse,
    value_explains_nothing, dpo_displacement, dpo_saturated, biased_kl, ratio_skips, early_saturation)


def diagnose(record: Record) -> list[Finding]:
    """Every finding on the record; [] for a healthy run."""
    return [f for f in (d(record) for d in DETECTORS) if f is not None]


class LiveDiagnosis:
    """The same checks during training: at each evaluation, every new pathology once."""

    def __init__(self, config: dict[str, Any]):
        self.record = Record([], config)
        self.said: set[str] = set()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.record.rows.append({"step": step, **metrics})

    def check(self, samples: list[dict[str, Any]] | None = None, step: int | None = None) -> list[Finding]:
        if samples and step is not None:
            self.record.samples[step] = samples
        try:
            found = diagnose(self.record)
        except Exception as e:  # a diagnosis never stops the training it watches
            if "diagnosis" in self.said:
                return []
            found = [Finding("diagnosis", f"the live checks failed ({type(e).__name__}: {e}) and are off for this run",
                             ("rlhf-diagnose <run> after training",))]
        new = [f for f in found if f.name not in self.said]
        self.said.update(f.name for f in new)
        return new
