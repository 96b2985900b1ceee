"""The core's detectors, each over what the core logs (evaluations, train/reward and train/kl,
the gradient norm, the entropy, the proposal's mismatch), with the threshold each uses named
and its value's reason said; `diagnose` runs them with the plugins' own (their `detectors`,
found through the registry by the run's `_target_`, never imported here). Every threshold was
set on the planted-pathology benchmark (`benchmarks/diagnose.py`)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

from rlhf.contracts import registry
from rlhf.contracts.metrics import (
    ENTROPY,
    EPISODE_TOOL_ERRORS,
    EPISODE_TRUNCATED,
    EPISODE_TURN_REWARD,
    EVAL_DISTINCT_2,
    EVAL_FLUENCY,
    EVAL_JUDGE,
    EVAL_JUDGE_STD,
    EVAL_KL,
    EVAL_KL_TO_OPTIMUM,
    EVAL_PASS_AT,
    EVAL_REPETITION,
    EVAL_RESPONSE_LEN,
    EVAL_REWARD,
    EVAL_REWARD_STD,
    GRAD_NORM,
    MISMATCH_ESS,
    MISMATCH_KL,
    TRAIN_KL,
    TRAIN_REWARD_MAX,
)
from rlhf.core.evaluation.diagnosis.record import (
    _ABSENT,
    MIN_EVALS,
    MIN_TRAIN_ROWS,
    Finding,
    Knob,
    Record,
    current_beta,
    fmt,
    mean,
    reward_gain,
    span,
    spread,
    start_end,
    top_sample,
)

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
CLIPPED_SHARE = 0.9  # gradient norm above max_grad_norm on 90% of the steps: every step was clipped ...
CLIPPED_FACTOR = 3.0  # ... by a factor of 3 at the median (healthy runs sit at 1-2x a cap of 1 and learn)
ENTROPY_FLOOR = 0.05  # nats per token: the policy samples (nearly) one token everywhere
ENTROPY_FALL = 0.1  # ... or has kept a tenth of its starting entropy
NEGATIVE_KL_STEPS = 5  # consecutive negative train/kl estimates (the live start-up warning's rule) ...
NEGATIVE_KL_MEAN = 0.05  # ... averaging below -0.05 nats: a policy at the reference gives +-0.02 by chance
SATURATED_BY = 0.3  # the reward at its final level within the first 30% of the run ...
SPREAD_LEFT = 0.1  # ... and the reward's spread at a tenth of its start: every sample scores alike
EXPLORE_GAP = 2.0  # step-0 spreads the batch's best sample stays above the held-out mean while the mean is flat
MISMATCH_FAR = 0.1  # nats per token of KL(q || pi): a proposal this far from pi makes importance weights heavy-tailed
MISMATCH_FEW = 0.2  # the batch's effective sample size under the sequence weights, as a share of the batch
TRUNCATED_SHARE = 0.5  # episodes cut by the turn limit: half of them, over the second half of the run
TOOL_ERRORS = 0.5  # failed calls a episode, over the second half: one episode in two has one
OPTIMUM_REACHED = 0.05  # eval/kl_to_optimum at or below this: the run is at its known optimum (the closed-form tables' bar)




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
                   record.advice(Knob("reward", "the reward source (or judge) named: it returned NaN or infinity for a "
                                      "held-out response; find it in samples/step_<N>.jsonl and make score() return a "
                                      "finite number"),
                                 Knob("eval.judges", "eval.judges without that judge")))


def reward_hacking(record: Record) -> Finding | None:
    """The optimized reward rises while what it stands for does not: an independent judge stays
    flat or falls, the text stops being language (fluency under the reference collapses,
    responses loop or copy one another), or responses run to the length cap or to nothing."""
    gain = reward_gain(record)
    if gain is None or gain < MOVED or len(record.series(EVAL_REWARD)) < MIN_EVALS:
        return None
    (s0, r0), (s1, r1) = start_end(record, EVAL_REWARD)
    signs = []
    for key in sorted({k for r in record.rows for k in r if k.startswith(EVAL_JUDGE)}):
        ends = start_end(record, key)
        if ends and ends[1][1] - ends[0][1] < FLAT_JUDGE:
            signs.append(f"judge {key.removeprefix('eval/judge/')} {fmt(ends[0][1])} -> {fmt(ends[1][1])}")
    ends = start_end(record, EVAL_FLUENCY)
    if ends and ends[0][1] - ends[1][1] >= FLUENCY_DROP:
        signs.append(f"fluency (log-likelihood per token under the reference) {fmt(ends[0][1])} -> {fmt(ends[1][1])}")
    ends, length = start_end(record, EVAL_DISTINCT_2), record.values(EVAL_RESPONSE_LEN)
    if ends and ends[0][1] > 0.2 and ends[1][1] <= DISTINCT_COLLAPSE * ends[0][1] and length and length[-1] >= 3:
        signs.append(f"distinct-2 {fmt(ends[0][1])} -> {fmt(ends[1][1])}")
    ends = start_end(record, EVAL_REPETITION)
    if ends and ends[1][1] - ends[0][1] >= REPETITION_RISE:
        signs.append(f"repeated bigrams within a response {fmt(ends[0][1])} -> {fmt(ends[1][1])}")
    ends = start_end(record, EVAL_RESPONSE_LEN)
    cap = record.setting("sampler.max_new_tokens")
    if ends and isinstance(cap, int) and ends[1][1] >= LENGTH_CAP * cap and ends[0][1] < 0.8 * cap:
        signs.append(f"response length {fmt(ends[0][1])} -> {fmt(ends[1][1])} tokens (the cap is {cap})")
    if ends and ends[1][1] <= LENGTH_NOTHING < ends[0][1]:
        signs.append(f"response length {fmt(ends[0][1])} -> {fmt(ends[1][1])} tokens (responses of nothing)")
    if not signs:
        return None
    return Finding(
        "reward hacking",
        f"eval/reward {fmt(r0)} -> {fmt(r1)} (steps {s0}-{s1}, +{gain:.1f} step-0 spreads) while " + "; ".join(signs),
        record.advice(Knob("optimizer.beta", "raise optimizer.beta (keep closer to the reference)"),
                      Knob("train.steps", "stop earlier (train.steps) or keep the checkpoint where the judges peaked"),
                      Knob("reward", "a reward that cannot be satisfied this way (a reward model trained on more pairs, "
                           "reward=weighted with a judge)", "weighted"),
                      Knob("eval.judges", "add independent judges: eval.judges=[...]")),
        top_sample(record))


def past_gold_peak(record: Record) -> Finding | None:
    """Over-optimisation (Gao et al. 2022): the optimized (proxy) reward goes on rising while a
    judge (the gold reward) has peaked and fallen back: the run went past the KL where the
    proxy stopped standing for the gold."""
    proxy = dict(record.series(EVAL_REWARD))
    for key in sorted({k for r in record.rows for k in r if k.startswith(EVAL_JUDGE)}):
        gold = record.series(key)
        if len(gold) < MIN_EVALS + 1:
            continue
        (s_peak, g_peak), (s_end, g_end) = max(gold, key=lambda p: p[1]), gold[-1]
        spread = dict(record.series(key.replace(EVAL_JUDGE, EVAL_JUDGE_STD)))
        n = record.setting("data.n_eval") or 64
        noise = GOLD_NOISE * spread.get(s_peak, 0.0) / math.sqrt(n) if isinstance(n, int) and n > 0 else 0.0
        if s_peak == s_end or g_peak - g_end < max(GOLD_DROP, noise) or g_peak - gold[0][1] < FLAT_JUDGE:
            continue
        if s_peak not in proxy or s_end not in proxy or proxy[s_end] < proxy[s_peak]:
            continue  # the proxy fell too: a collapse, not over-optimisation
        kl = dict(record.series(EVAL_KL))
        at = f" (sqrt KL {math.sqrt(max(kl[s_peak], 0)):.2f})" if s_peak in kl else ""
        return Finding("over-optimisation: past the gold reward's peak",
                       f"{key.removeprefix('eval/judge/')} peaked at {fmt(g_peak)} at step {s_peak}{at} and fell to "
                       f"{fmt(g_end)} by step {s_end}, while eval/reward went on {fmt(proxy[s_peak])} -> {fmt(proxy[s_end])}",
                       record.advice(Knob("train.steps", f"stop near step {s_peak} (train.steps) or keep that checkpoint"),
                                     Knob("optimizer.beta", "raise optimizer.beta"),
                                     Knob(None, "a proxy reward closer to the gold (a reward model trained on more pairs)")),
                       top_sample(record))
    return None


def kl_blowup(record: Record) -> Finding | None:
    """The policy runs away from the reference: a KL past any judge's competence, or KL
    growing over the second half of the run while the reward does not."""
    kl = record.series(EVAL_KL)
    if len(kl) < MIN_EVALS:
        return None
    beta = current_beta(record)
    knobs = record.advice(Knob("optimizer.beta", f"raise optimizer.beta (now {fmt(beta) if beta is not None else '?'})"),
                          Knob("optimizer.lr", "lower optimizer.lr"),
                          Knob("optimizer.kl_target", "optimizer.adaptive_kl=true optimizer.kl_target=<nats> (adaptive beta)"))
    peak = max(kl, key=lambda p: p[1])
    length = dict(record.series(EVAL_RESPONSE_LEN)).get(peak[0], 0.0)
    limit = max(KL_BLOWUP, KL_BLOWUP_PER_TOKEN * length)
    if peak[1] >= limit:
        return Finding("KL blow-up", f"eval/kl {fmt(kl[0][1])} -> {fmt(peak[1])} nats at step {peak[0]} (over "
                       f"{limit:.3g}; {fmt(kl[-1][1])} at step {kl[-1][0]})", knobs, top_sample(record))
    mid = [p for p in kl if p[0] >= kl[-1][0] / 2]
    rewards = [p for p in record.series(EVAL_REWARD) if p[0] >= kl[-1][0] / 2]
    if len(mid) >= 2 and len(rewards) >= 2:
        grew = mid[-1][1] - mid[0][1]
        gained = (rewards[-1][1] - rewards[0][1]) / spread(record)
        if mid[-1][1] >= KL_GROWTH * max(mid[0][1], 1e-6) and grew >= KL_GROWTH_MIN and gained < MOVED:
            return Finding("KL blow-up", f"eval/kl {fmt(mid[0][1])} -> {fmt(mid[-1][1])} nats over steps "
                           f"{mid[0][0]}-{mid[-1][0]} while eval/reward moved {gained:+.2f} step-0 spreads", knobs)
    return None


def nothing_moves(record: Record) -> Finding | None:
    """Neither the reward nor the KL moves by the second half of the run: either the KL
    penalty holds the policy at the reference (over-regularisation), or the steps are too
    small to go anywhere (stagnation: the optimizer plugin's `tiny_steps` must show it, from
    the metrics only it logs; a hard task also leaves reward and KL flat)."""
    if record.progress < 0.5 or len(record.series(EVAL_REWARD)) < MIN_EVALS:
        return None
    gain, kl = reward_gain(record), record.values(EVAL_KL)
    if gain is None or abs(gain) >= MOVED or not kl or abs(kl[-1]) >= KL_STILL:
        return None
    beta = current_beta(record)
    evidence = f"eval/reward moved {gain:+.2f} step-0 spreads and eval/kl is {fmt(kl[-1])} nats at step {record.last_step}"
    tiny = next((t for t in (f(record) for f in plugin_hooks(record, "tiny_steps")) if t is not None), None)
    if beta is not None and beta >= BETA_LARGE and not tiny:
        return Finding("over-regularisation", f"{evidence}, with optimizer.beta={fmt(beta)}: the KL penalty outweighs "
                       "what the reward can pay",
                       record.advice(Knob("optimizer.beta", f"lower optimizer.beta (now {fmt(beta)}; 0.01-0.1 is usual)")))
    if not tiny:
        return None
    return Finding("stagnation: steps too small", f"{evidence}; {tiny}",
                   record.advice(Knob("optimizer.lr", "raise optimizer.lr (now {now})"),
                                 Knob("train.steps", "more steps (train.steps)"),
                                 Knob("optimizer.beta", "lower optimizer.beta if it is large")))


def clipped_gradients(record: Record) -> Finding | None:
    """Nearly every gradient is clipped, by a large factor: the steps are too large."""
    norms, cap = record.values(GRAD_NORM), record.setting("optimizer.max_grad_norm")
    if len(norms) >= MIN_TRAIN_ROWS and isinstance(cap, (int, float)) and cap > 0:
        share = sum(n > cap for n in norms) / len(norms)
        if share >= CLIPPED_SHARE and statistics.median(norms) >= CLIPPED_FACTOR * cap:
            return Finding("unstable: steps too large", f"the gradient norm exceeded optimizer.max_grad_norm={cap:g} on "
                           f"{share:.0%} of the steps (median {fmt(statistics.median(norms))}): every step was clipped",
                           record.advice(*STEP_KNOBS))
    return None


# what any finding of too-large steps suggests (the plugin's own trust region's knobs where it has them)
STEP_KNOBS = (Knob("optimizer.lr", "lower optimizer.lr (now {now})"), Knob("optimizer.clip_coef", "lower optimizer.clip_coef"),
              Knob("optimizer.epochs", "fewer epochs per batch (optimizer.epochs)"))


def entropy_collapse(record: Record) -> Finding | None:
    """The policy samples (nearly) one token everywhere: no exploration left."""
    ends = span(record, ENTROPY)
    if ends is None:
        return None
    start, end = ends
    if end <= ENTROPY_FLOOR or (start > 0 and end <= ENTROPY_FALL * start):
        return Finding("entropy collapse", f"policy/entropy {fmt(start)} -> {fmt(end)} nats per token",
                       record.advice(Knob("optimizer.beta", "raise optimizer.beta"), Knob("optimizer.lr", "lower optimizer.lr"),
                                     Knob("sampler.temperature", "raise sampler.temperature")), top_sample(record))
    return None


def negative_streaks(kl: list[float]) -> tuple[list[float], float]:
    """The run of consecutive negative KL estimates (at least NEGATIVE_KL_STEPS long) with the
    lowest mean, and that mean (0 if there is none): the live warning's rule and the finding's."""
    streak, best, worst = [], [], 0.0
    for x in kl:
        streak = streak + [x] if x < 0 else []
        if len(streak) >= NEGATIVE_KL_STEPS and mean(streak) < worst:
            best, worst = list(streak), mean(streak)
    return best, worst


def kl_bias_causes(sampler: Any) -> list[str]:
    """The settings the sampler plugin says make its samples differ from pi at the sampling
    temperature, as `key=value` ("sampler.top_k=2"); [] for none or no sampler."""
    if sampler is None:
        return []
    return list(sampler.kl_bias())


def run_sampler(record: Record) -> Any:
    """The run's sampler plugin, built from its recorded settings (the plugin the record names,
    or the registered one whose fields are the record's), or None."""
    settings = record.setting("sampler")
    if not isinstance(settings, dict):
        return None
    values = {k: v for k, v in settings.items() if k != "_target_"}
    for info in registry.plugins("sampler"):
        if settings.get("_target_", info.target) != info.target:
            continue
        try:
            return info.cls(info.cls.Config(**{**vars(info.cls.Config()), **values}))
        except Exception:  # fields it does not have, or values it refuses
            continue
    return None


def biased_kl(record: Record) -> Finding | None:
    """Negative KL estimates, step after step, or a sampler that says its samples are not
    draws of pi at the sampling temperature (its `kl_bias`: top-k, top-p, ...)."""
    # rollouts drawn by a proposal q != pi: train/kl averages over q's samples, not pi's (the
    # objective's weights account for q); only the held-out samples, pi's own, say the estimate is biased
    best, worst = negative_streaks(record.values(TRAIN_KL)) if record.drawn_by_policy else ([], 0.0)
    kl = record.values(EVAL_KL)
    settings = kl_bias_causes(run_sampler(record))
    negative = worst <= -NEGATIVE_KL_MEAN or bool(kl and kl[-1] < -NEGATIVE_KL_MEAN)
    if not negative and not settings:
        return None
    said = []
    if best and worst <= -NEGATIVE_KL_MEAN:
        said.append(f"train/kl negative for {len(best)} steps in a row (mean {fmt(worst)} nats)")
    if kl and kl[-1] < -NEGATIVE_KL_MEAN:
        said.append(f"eval/kl {fmt(kl[-1])} nats at the end")
    if settings:
        said.append(f"{', '.join(settings)}: the responses are not samples of pi, so every log-ratio the KL estimate "
                    "and penalty average is taken where pi put more mass than it should: biased low")
    top = record.setting("sampler.top_k", _ABSENT) in (0, None) and record.setting("sampler.top_p", _ABSENT) in (1.0, None)
    return Finding("biased KL estimate", "; ".join(said),
                   record.advice(*([Knob(None, "the responses must be pi's own samples at sampler.temperature: with "
                                         "top-k and top-p off, a custom sampler's generation settings are the suspects")]
                                   if top else [Knob("sampler.top_k", "sampler.top_k=0 and sampler.top_p=1.0 (sample "
                                                     "from pi itself)")]),
                                 Knob(None, "the KL penalty and metrics are biased while it lasts")))


def early_saturation(record: Record) -> Finding | None:
    """The reward reached its final level early and every sample now scores alike: nothing
    left to learn from this reward."""
    r, std = record.series(EVAL_REWARD), record.series(EVAL_REWARD_STD)
    if len(r) < MIN_EVALS + 1 or len(std) < MIN_EVALS + 1 or record.progress < 0.9:
        return None
    total = r[-1][1] - r[0][1]
    if total <= MOVED * spread(record):
        return None
    reached = next(s for s, x in r if x - r[0][1] >= 0.95 * total)
    if reached > SATURATED_BY * record.total_steps or std[-1][1] > SPREAD_LEFT * std[0][1]:
        return None
    return Finding("reward saturated early", f"eval/reward at 95% of its final gain by step {reached} of "
                   f"{record.total_steps}, its spread {fmt(std[0][1])} -> {fmt(std[-1][1])}: every sample scores alike",
                   record.advice(Knob("train.steps", "stop earlier (train.steps)"),
                                 Knob(None, "a harder task or a reward with more range")))


def exploration_trap(record: Record) -> Finding | None:
    """The held-out reward is flat over the second half while the batches keep containing
    samples that score far higher: better responses exist, the policy draws them now and then,
    and does not learn them (the reverse KL's pull to the nearest mode: a response pi gives ~0
    probability gets ~0 gradient). Or pass@k far above pass@1 while pass@1 stays flat."""
    if record.progress < 0.5 or len(record.series(EVAL_REWARD)) < MIN_EVALS:
        return None
    optimum = record.values(EVAL_KL_TO_OPTIMUM)
    if optimum and optimum[-1] <= OPTIMUM_REACHED:  # at its known optimum: the best responses are not all of pi*
        return None
    half = record.last_step / 2
    mean = [x for s, x in record.series(EVAL_REWARD) if s >= half]
    best = [x for s, x in record.series(TRAIN_REWARD_MAX) if s >= half]
    unit = spread(record)
    said = []
    if len(mean) >= 2 and best and abs(mean[-1] - mean[0]) < MOVED * unit:
        gap = (max(best) - mean[-1]) / unit
        if gap >= EXPLORE_GAP:
            said.append(f"eval/reward stayed at {fmt(mean[-1])} over steps {int(half)}-{record.last_step} while the batches "
                        f"drew samples scoring up to {fmt(max(best))}, {gap:.1f} step-0 spreads higher")
    pass1 = record.series("eval/pass@1")
    passk = [(k, record.series(k)) for k in sorted({k for r in record.rows for k in r if k.startswith(EVAL_PASS_AT)})
             if k != "eval/pass@1"]
    if len(pass1) >= 2 and passk and abs(pass1[-1][1] - pass1[len(pass1) // 2][1]) < FLAT_JUDGE:
        k, s = passk[-1]
        if s and s[-1][1] - pass1[-1][1] >= 0.25:
            said.append(f"{k} {fmt(s[-1][1])} against eval/pass@1 {fmt(pass1[-1][1])}, flat over the second half")
    if not said:
        return None
    return Finding("exploration trap: better responses sampled, not learned", "; ".join(said),
                   record.advice(Knob("proposal", "an exploring proposal: proposal=explore proposal.temperature=2.0 (its "
                                      "log q is exact; optimizer.correction=sequence keeps pi*)", "explore"),
                                 Knob("optimizer", "optimizer=dm (maximum likelihood towards pi*: a rare good sample is "
                                      "pulled up at once)", "dm"),
                                 Knob("optimizer.k", "more samples per prompt (optimizer.k)"),
                                 Knob("optimizer.group_size", "more samples per prompt (optimizer.group_size)")))


def proposal_mismatch(record: Record) -> Finding | None:
    """The proposal that drew the rollouts is far from pi: importance weights heavy-tailed, few
    samples carrying the batch (an engine's rounding, a stale or hot proposal)."""
    kl, ess = record.values(MISMATCH_KL), record.values(MISMATCH_ESS)
    if len(kl) < MIN_TRAIN_ROWS or not record.takes_correction:  # (dm weighs q's samples by pi*/q: nothing to correct)
        return None
    mkl, mess = statistics.median(kl), statistics.median(ess) if ess else 1.0
    correction = record.setting("optimizer.correction")
    # uncorrected, a far proposal biases the update; corrected, only a few samples carrying the batch is a problem
    far = mkl >= MISMATCH_FAR and correction in (None, "none")
    if not far and mess > MISMATCH_FEW:
        return None
    return Finding("sampler-trainer mismatch", f"median mismatch/kl {fmt(mkl)} nats per token (KL(q || pi) of the proposal "
                   f"that drew the samples), median effective sample size {fmt(mess)} of the batch"
                   + (f"; optimizer.correction={correction}" if correction is not None else ""),
                   record.advice(*([] if correction in ("sequence_mis", "token_tis") else [Knob(
                                     "optimizer.correction", "optimizer.correction=sequence_mis or token_tis (bounded "
                                     "weights: a bias for less variance)", "sequence_mis")]),
                                 Knob("proposal.temperature", "a proposal closer to pi (proposal.temperature nearer the "
                                      "sampler's)"),
                                 Knob("proposal.k", "a fresher stale policy (proposal.k smaller)")))


def episodes_cut(record: Record) -> Finding | None:
    """Episodes cut by the turn limit (or the context) instead of ended by the environment, over
    the second half: their last rewards never came."""
    cut = record.series(EPISODE_TRUNCATED)
    half = [x for s, x in cut if s >= record.last_step / 2]
    if len(half) < MIN_TRAIN_ROWS // 2 or statistics.median(half) < TRUNCATED_SHARE:
        return None
    return Finding("episodes cut by the turn limit", f"{EPISODE_TRUNCATED} {fmt(statistics.median(half))} (median over "
                   f"steps {int(record.last_step / 2)}-{record.last_step}): most episodes end at env.max_turns or at the "
                   "model's context, before the environment ends them, so their last rewards never come",
                   record.advice(Knob("env.max_turns", "raise env.max_turns (now {now})"),
                                 Knob("env.turns", "raise env.turns (now {now})"),
                                 Knob("sampler.max_new_tokens", "a shorter turn (sampler.max_new_tokens, now {now})")))


def tool_errors(record: Record) -> Finding | None:
    """The environment (a tool) answers the policy's turns with errors, and does not stop doing so."""
    errors = record.series(EPISODE_TOOL_ERRORS)
    half = [x for s, x in errors if s >= record.last_step / 2]
    if len(half) < MIN_TRAIN_ROWS // 2 or statistics.median(half) < TOOL_ERRORS:
        return None
    first = [x for s, x in errors if s < record.last_step / 2]
    trend = f", from {fmt(statistics.median(first))} over the first half" if first else ""
    return Finding("tool errors", f"{EPISODE_TOOL_ERRORS} {fmt(statistics.median(half))} a episode over the second "
                   f"half{trend}: the policy's calls fail (their format, their arguments)",
                   record.advice(Knob(None, "a reward that charges a failed call (the environment's, per turn)"),
                                 Knob("policy.path", "a policy taught the call format first (SFT on calls)")))


def turn_reward_flat(record: Record) -> Finding | None:
    """The reward of a turn does not move over the run while the policy does (its KL grows)."""
    turns = record.series(f"eval/{EPISODE_TURN_REWARD}")
    kl = record.series(EVAL_KL)
    if len(turns) < MIN_EVALS or record.progress < 0.5 or not kl:
        return None
    if abs(turns[-1][1] - turns[0][1]) >= MOVED * spread(record) or kl[-1][1] < KL_STILL:
        return None
    return Finding("per-turn reward flat", f"eval/{EPISODE_TURN_REWARD} {fmt(turns[0][1])} -> {fmt(turns[-1][1])} "
                   f"while eval/kl rose to {fmt(kl[-1][1])} nats: the policy changes, its turns earn no more",
                   record.advice(Knob("optimizer.lr", "lower optimizer.lr (now {now})"),
                                 Knob("optimizer.beta", "raise optimizer.beta (now {now})"),
                                 Knob(None, "check that the environment's rewards reach the turns they are for")))


DETECTORS: tuple[Callable[[Record], Finding | None], ...] = (
    episodes_cut, tool_errors, turn_reward_flat,
    exploration_trap, proposal_mismatch,
    nonfinite_evaluation, reward_hacking, past_gold_peak, kl_blowup, nothing_moves, clipped_gradients, entropy_collapse,
    biased_kl, early_saturation)


def plugin_hooks(record: Record, name: str) -> list[Callable]:
    """`name` ("detectors", "tiny_steps") of the run's optimizer and sampler plugins, found
    through the registry; of every registered optimizer when the record names none (the
    hooks of a plugin read only the metrics it logs, so another's find nothing)."""
    classes = [record.plugin("optimizer")] if record.setting("optimizer._target_") else [
        p.cls for p in registry.plugins("optimizer")]
    classes.append(record.plugin("sampler"))
    out: list[Callable] = []
    for cls in classes:
        hook = getattr(cls, name, None)
        if hook is None:
            continue
        for f in (hook if isinstance(hook, (tuple, list)) else (hook,)):
            if f not in out:
                out.append(f)
    return out


# what still holds of a run at its known optimum (eval.kl_to_optimum <= OPTIMUM_REACHED): findings
# about the objective itself; one about the way there (steps, clipping, the critic, exploration,
# the proposal, the KL estimate, the entropy of a peaked pi*) is contradicted by the run's arrival
ABOUT_THE_OBJECTIVE = ("non-finite evaluation score", "over-optimisation", "reward hacking", "over-regularisation",
                       "reward saturated early")


def diagnose(record: Record) -> list[Finding]:
    """Every finding on the record, the plugins' first; [] for a healthy run. One finding a
    pathology (the first that shows it)."""
    found: dict[str, Finding] = {}
    for detect in [*plugin_hooks(record, "detectors"), *DETECTORS]:
        f = detect(record)
        if f is not None and f.name not in found:
            found[f.name] = f
    optimum = record.values(EVAL_KL_TO_OPTIMUM)
    if optimum and optimum[-1] <= OPTIMUM_REACHED:
        found = {k: f for k, f in found.items() if k.startswith(ABOUT_THE_OBJECTIVE)}
    return list(found.values())


