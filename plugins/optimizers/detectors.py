"""The diagnoses of the metrics only optimizer plugins log (each plugin names its own in a
`detectors` class attribute, and its evidence of tiny updates in `tiny_steps`; the core
finds them through the registry, rlhf/core/evaluation/diagnosis.py): PPO's trust region and ratio
skips, the critic's explained variance (PPO, A2C), DPO's likelihood displacement and
saturated margin. Their thresholds are named below, with the reason for each value."""

from __future__ import annotations

import statistics

from rlhf.contracts.metrics import (
    APPROX_KL,
    CLIPFRAC,
    EXPLAINED_VAR,
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS_DPO,
    REWARDS_ACCURACY,
    SKIPPED_MINIBATCHES,
)
from rlhf.core.toolkit.findings import (
    MIN_TRAIN_ROWS,
    STEP_KNOBS,
    Finding,
    Knob,
    Record,
    fmt,
    median_tail,
    span,
    top_sample,
)

# the thresholds of these diagnoses, set on the planted-pathology benchmark (benchmarks/diagnose.py)
APPROX_KL_TINY = 1e-5  # per-update KL between successive policies: below this the steps are too small
LOGP_STILL = 0.1  # nats: DPO's log pi(chosen) moving less than this over the run has not been trained
CLIPFRAC_HIGH = 0.3  # a third of the tokens outside the trust region, step after step: steps too large
APPROX_KL_HIGH = 0.1  # per-update KL: PPO's trust region is ~0.01-0.02
APPROX_KL_EXTREME = 1.0  # one update moving the policy a whole nat per token: 50-100x the trust region
LARGE_SHARE = 0.25  # ... on a quarter of the steps (early ones included: a collapse can follow them)
EXPLAINED_VAR_SHARE = 0.8  # explained variance <= 0 on 80% of the second half's steps
DISPLACEMENT = 2.0  # nats: chosen and rejected log-probs both falling this far from their start
SATURATED_LOSS = 0.05  # DPO loss (log 2 = 0.69 at the start) this low with accuracy 1 over the second half
SKIPPED_STEPS = 3  # steps with a PPO minibatch skipped for its ratio: a trust region broken repeatedly


def trust_region(record: Record) -> Finding | None:
    """Each update goes far outside the trust region (clipfrac, approx_kl), often or once by a lot."""
    parts = []
    for key, high in ((CLIPFRAC, CLIPFRAC_HIGH), (APPROX_KL, APPROX_KL_HIGH)):
        s = record.series(key)
        over = [step for step, x in s if x >= high]
        if len(s) >= MIN_TRAIN_ROWS and len(over) >= LARGE_SHARE * len(s):
            parts.append(f"{key} >= {high:g} on {len(over)} of {len(s)} steps (first {over[0]}, max {fmt(max(x for _, x in s))})")
    extreme = [(step, x) for step, x in record.series(APPROX_KL) if x >= APPROX_KL_EXTREME]
    if extreme and not parts:
        parts.append(f"policy/approx_kl {fmt(extreme[0][1])} nats at step {extreme[0][0]}"
                     + (f" and at {len(extreme) - 1} more steps" if len(extreme) > 1 else ""))
    if not parts:  # (a run whose early steps were huge may have collapsed since, and now moves no more)
        return None
    return Finding("unstable: steps too large", " and ".join(parts) + f" (a healthy PPO update keeps clipfrac < "
                   f"{CLIPFRAC_HIGH} and approx_kl < {APPROX_KL_HIGH})", record.advice(*STEP_KNOBS))


def ratio_skips(record: Record) -> Finding | None:
    """PPO skipped minibatches whose probability ratio left the trust region, again and again."""
    skipped = [s for s, x in record.series(SKIPPED_MINIBATCHES) if x > 0]
    if len(skipped) < SKIPPED_STEPS:
        return None
    return Finding("repeated PPO ratio skips", f"minibatches skipped (mean ratio over optimizer.ratio_threshold) at "
                   f"{len(skipped)} steps, first {skipped[0]}, last {skipped[-1]}",
                   record.advice(Knob("optimizer.lr", "lower optimizer.lr"),
                                 Knob("optimizer.epochs", "fewer epochs per batch (optimizer.epochs)"),
                                 Knob(None, "check the reward's scale")))


def value_explains_nothing(record: Record) -> Finding | None:
    """The critic is no better than a constant: advantages are noise around the return."""
    v = record.series(EXPLAINED_VAR)
    if len(v) < 2 * MIN_TRAIN_ROWS:
        return None
    tail = v[len(v) // 2 :]
    share = sum(x <= 0 for _, x in tail) / len(tail)
    if share < EXPLAINED_VAR_SHARE:
        return None
    return Finding("value function explains nothing", f"val/explained_var <= 0 on {share:.0%} of steps "
                   f"{tail[0][0]}-{tail[-1][0]} (median {fmt(statistics.median(x for _, x in tail))})",
                   record.advice(Knob("optimizer.vf_coef", "optimizer.vf_coef (the value loss's weight, now {now})"),
                                 Knob("optimizer", "optimizer=grpo or optimizer=rloo (no critic: a baseline from several "
                                      "samples per prompt)", "grpo")))


def dpo_displacement(record: Record) -> Finding | None:
    """Both the chosen and the rejected responses lose probability: the margin grows by
    pushing everything down (likelihood displacement), mass goes to responses neither pair holds."""
    chosen, rejected = span(record, LOGPS_CHOSEN), span(record, LOGPS_REJECTED)
    if chosen is None or rejected is None:
        return None
    if chosen[0] - chosen[1] >= DISPLACEMENT and rejected[0] - rejected[1] >= DISPLACEMENT:
        return Finding("DPO likelihood displacement", f"log pi(chosen) {fmt(chosen[0])} -> {fmt(chosen[1])} and "
                       f"log pi(rejected) {fmt(rejected[0])} -> {fmt(rejected[1])} nats: both fall",
                       record.advice(Knob("optimizer.lr", "lower optimizer.lr"), Knob("optimizer.beta", "raise optimizer.beta"),
                                     Knob("train.steps", "fewer steps (train.steps)")), top_sample(record))
    return None


def dpo_saturated(record: Record) -> Finding | None:
    """The preference loss is ~0 with every pair ranked right: the pairs have nothing left to
    teach, and further steps only push the log-ratios apart."""
    loss, acc = median_tail(record, LOSS_DPO), median_tail(record, REWARDS_ACCURACY)
    if loss is None or acc is None or loss > SATURATED_LOSS or acc < 0.99:
        return None
    first = next((s for s, x in record.series(LOSS_DPO) if x <= SATURATED_LOSS), None)
    return Finding("DPO margin saturated", f"loss/dpo {fmt(loss)} (log 2 = 0.69 at the start) with rewards/accuracy "
                   f"{acc:.2f} over the second half; first below {SATURATED_LOSS} at step {first}",
                   record.advice(Knob("optimizer.lr", "lower optimizer.lr"), Knob("train.steps", "fewer steps (train.steps)"),
                                 Knob("data.n_train", "more pairs (data.n_train)")))


def approx_kl_tiny(record: Record) -> str | None:
    """PPO's evidence on the size of its updates: None without approx_kl, "" when they are not tiny."""
    approx = median_tail(record, APPROX_KL)
    if approx is None:
        return None
    if approx >= APPROX_KL_TINY:
        return ""
    clip = median_tail(record, CLIPFRAC)
    return (f"the policy hardly changes per update (median policy/approx_kl {approx:.2g}"
            + (f", clipfrac {clip:.2g})" if clip is not None else ")"))


def chosen_still(record: Record) -> str | None:
    """DPO's and Preferred-FT's: log pi(chosen) hardly moving over the run."""
    chosen = span(record, LOGPS_CHOSEN)
    if chosen is None:
        return None
    return "" if abs(chosen[1] - chosen[0]) >= LOGP_STILL else f"log pi(chosen) {fmt(chosen[0])} -> {fmt(chosen[1])}"
