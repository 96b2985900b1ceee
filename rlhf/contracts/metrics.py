"""Every metric name the core and the plugins both read, in one place, with what it means.

A row of `metrics.jsonl` holds these keys (an evaluation's `eval/...`, a training step's the
rest). The core logs the `eval/`, `train/`, `mismatch/`, `optim/` and `time/` ones; a plugin
logs its own terms (`loss/...`, `policy/...`, `val/...`, `rewards/...`, `logps/...`,
`objective/...`), and the diagnoses and dashboards read them by these names. The reference
page of the documentation is generated from CATALOGUE.
"""

from __future__ import annotations

# --- evaluation, on the held-out prompts with a fixed sampling seed (the core)
EVAL_REWARD = "eval/reward"
EVAL_REWARD_STD = "eval/reward_std"
EVAL_KL = "eval/kl"
EVAL_RESPONSE_LEN = "eval/response_len"
EVAL_DISTINCT_2 = "eval/distinct_2"
EVAL_FLUENCY = "eval/fluency"
EVAL_REPETITION = "eval/repetition"
EVAL_KL_TO_OPTIMUM = "eval/kl_to_optimum"
EVAL_KL_TO_TILT = "eval/kl_to_tilt"
EVAL_ACCURACY = "eval/accuracy"
EVAL_PASS_AT = "eval/pass@"  # + k
EVAL_JUDGE = "eval/judge/"  # + the judge's name
EVAL_JUDGE_STD = "eval/judge_std/"  # + the judge's name
EVAL_PAIRWISE_ACCURACY = "eval/pairwise_accuracy"
# --- each training batch (the core)
TRAIN_REWARD = "train/reward"
TRAIN_REWARD_MAX = "train/reward_max"
TRAIN_KL = "train/kl"
TRAIN_RESPONSE_LEN = "train/response_len"
TRAIN_ACCURACY = "train/accuracy"
GRAD_NORM = "optim/grad_norm"
SKIPPED_MINIBATCHES = "policy/skipped_minibatches"
MISMATCH_KL = "mismatch/kl"
MISMATCH_OUTSIDE = "mismatch/outside"
MISMATCH_ESS = "mismatch/ess"
PROPOSAL_BYPASS_GAP = "proposal/bypass_gap"
PROPOSAL_SYNC_MB = "proposal/sync_mb"
PROPOSAL_SYNC_S = "proposal/sync_s"
STEP_S = "time/step_s"
TIME = "time/"  # + a phase + _s: sampling, environment, behaviour, reference, scoring, update, sync, evaluation, checkpoint
# --- episodes (env=...): each batch's and each evaluation's (the core)
EPISODE_TURNS = "episode/turns"
EPISODE_TRUNCATED = "episode/truncated"
EPISODE_TOOL_CALLS = "episode/tool_calls"
EPISODE_TOOL_ERRORS = "episode/tool_errors"
EPISODE_TURN_REWARD = "episode/turn_reward"
EPISODE_RETOKENIZE_DRIFT = "episode/retokenize_drift"
# --- an optimizer plugin's terms (the plugins that log them, read by their own detectors and the core's)
LOSS = "loss/"  # + the term: loss/policy, loss/value, loss/dpo, loss/sft, loss/bt
LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
LOSS_DPO = "loss/dpo"
ENTROPY = "policy/entropy"
APPROX_KL = "policy/approx_kl"
CLIPFRAC = "policy/clipfrac"
EXPLAINED_VAR = "val/explained_var"
VALUE_MEAN = "val/mean"
VALUE_CLIPFRAC = "val/clipfrac"
BETA = "objective/beta"
KL_PENALTY = "objective/kl_penalty"
RETURN = "objective/return"
BASELINE = "objective/baseline"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGIN = "rewards/margin"
REWARDS_ACCURACY = "rewards/accuracy"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
LOGPS_CHOSEN_VS_REF = "logps/chosen_vs_ref"

# name (a prefix ends with "/" or "@"): (who logs it, what it means)
CATALOGUE: dict[str, tuple[str, str]] = {
    EVAL_REWARD: ("core", "mean score of the reward source on the held-out prompts"),
    EVAL_REWARD_STD: ("core", "the spread of those scores"),
    EVAL_KL: ("core", "mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t), y ~ pi: the sequence KL to the "
                      "reference, in nats"),
    EVAL_RESPONSE_LEN: ("core", "mean response length in tokens, EOS included"),
    EVAL_DISTINCT_2: ("core", "distinct bigrams / all bigrams of the responses; falls when the policy collapses onto "
                              "a few phrases"),
    EVAL_FLUENCY: ("core", "mean log-likelihood per token of the responses under the reference (at the sampling "
                           "temperature): healthy runs lose a few tenths of a nat, word salad several"),
    EVAL_REPETITION: ("core", "mean share of a response's word bigrams that repeat an earlier one of it"),
    EVAL_KL_TO_OPTIMUM: ("core", "eval.kl_to_optimum=true: the exact KL(pi || pi*) to the closed-form optimum, "
                                 "mean over prompts; 0 is the best a method can do"),
    EVAL_KL_TO_TILT: ("core", "episodes with eval.kl_to_optimum: KL(pi || the whole-episode tilt pi_ref(tau) "
                              "exp(R / beta) / Z), the optimistic policy an objective on whole-episode weights reaches"),
    EVAL_ACCURACY: ("core", "eval.pass_at_k: the share of the samples the judge calls correct"),
    EVAL_PASS_AT: ("core", "eval.pass_at_k: pass@k, unbiased estimate from eval.pass_samples samples a prompt"),
    EVAL_JUDGE: ("core", "mean score of an extra judge (eval.judges) on the evaluation samples"),
    EVAL_JUDGE_STD: ("core", "its spread"),
    EVAL_PAIRWISE_ACCURACY: ("core", "rlhf-train-rm: how often the reward model scores a held-out chosen response "
                                     "above the rejected one"),
    TRAIN_REWARD: ("core", "mean score of the training batch"),
    TRAIN_REWARD_MAX: ("core", "the best score in the batch: far above a flat eval/reward, better responses are "
                               "drawn and not learned"),
    TRAIN_KL: ("core", "the batch's sequence KL estimate (k1 over the sampled tokens)"),
    TRAIN_RESPONSE_LEN: ("core", "mean response length of the batch"),
    TRAIN_ACCURACY: ("core", "rlhf-train-rm: how often the batch's chosen response scores above the rejected one"),
    GRAD_NORM: ("core", "gradient norm before clipping"),
    SKIPPED_MINIBATCHES: ("core", "minibatches a plugin asked to skip (PPO: mean ratio above ratio_threshold)"),
    MISMATCH_KL: ("core", "a proposal q != pi: KL(q || pi) per token of the sampler that drew the batch"),
    MISMATCH_OUTSIDE: ("core", "the share of token ratios pi / q outside [0.5, 2]"),
    MISMATCH_ESS: ("core", "the batch's effective sample size under the sequence weights, as a share (1: on-policy)"),
    PROPOSAL_BYPASS_GAP: ("core", "proposal.bypass: the last measured batch's largest |log q - log pi| a token (over 1e-4: "
                                  "the trainer computes log pi itself)"),
    PROPOSAL_SYNC_MB: ("core", "proposal=vllm: MiB a sync pushed into the engine (with LoRA: the adapted layers only)"),
    PROPOSAL_SYNC_S: ("core", "proposal=vllm: seconds to push the updated weights into the engine"),
    STEP_S: ("core", "seconds the step took"),
    TIME: ("core", "seconds a phase of the step took (time/sampling_s, environment, behaviour, reference, scoring, "
                   "update, sync; an evaluation's row time/evaluation_s; a checkpoint's in the next step's row): "
                   "summary.json totals them with their shares (time_<phase>_s, time_<phase>_share)"),
    EPISODE_TURNS: ("core", "episodes: mean policy turns an episode took"),
    EPISODE_TRUNCATED: ("core", "episodes: share cut by the turn limit (env.max_turns) or the context, not ended"),
    EPISODE_TOOL_CALLS: ("core", "episodes: mean tool calls per episode (turns the environment marked info['tool_call']): "
                                 "the tool-call rate"),
    EPISODE_TOOL_ERRORS: ("core", "episodes: mean answers per episode the environment flagged as an error (info['error'])"),
    EPISODE_TURN_REWARD: ("core", "episodes: mean reward of a turn (the environment's)"),
    EPISODE_RETOKENIZE_DRIFT: ("core", "episodes: share whose ids re-rendering the text would change: what training on "
                                       "re-tokenised text (not the sampled ids) would have trained on instead"),
    LOSS: ("plugin", "the plugin's loss terms: loss/policy, loss/value (PPO, A2C), loss/dpo, loss/sft, loss/bt"),
    ENTROPY: ("plugin", "mean per-token entropy of the policy at the sampling temperature"),
    APPROX_KL: ("plugin", "PPO, GRPO: mean of (r - 1) - log r: how far an update moved the policy from the sampler"),
    CLIPFRAC: ("plugin", "PPO, GRPO: share of tokens whose ratio was clipped (above ~0.3: steps too big)"),
    EXPLAINED_VAR: ("plugin", "PPO, A2C: 1 - Var[returns - values] / Var[returns]"),
    VALUE_MEAN: ("plugin", "PPO, A2C: mean value prediction"),
    VALUE_CLIPFRAC: ("plugin", "PPO: share of value predictions clipped"),
    BETA: ("plugin", "the KL coefficient in force (adaptive_kl moves it)"),
    KL_PENALTY: ("plugin", "-beta x the batch's sequence KL"),
    RETURN: ("plugin", "mean KL-regularised return R = score - beta sum_t KL_t"),
    BASELINE: ("plugin", "REINFORCE: the baseline subtracted from R"),
    REWARDS_CHOSEN: ("plugin", "DPO: implicit reward beta log(pi / pi_ref) of the chosen responses"),
    REWARDS_REJECTED: ("plugin", "DPO: the same of the rejected ones"),
    REWARDS_MARGIN: ("plugin", "DPO: their mean difference"),
    REWARDS_ACCURACY: ("plugin", "DPO: how often the chosen one is ahead"),
    LOGPS_CHOSEN: ("plugin", "DPO, SFT: summed log-probs of the chosen responses under the policy"),
    LOGPS_REJECTED: ("plugin", "DPO: the same of the rejected ones (both falling: likelihood displacement)"),
    LOGPS_CHOSEN_VS_REF: ("plugin", "SFT: log pi - log pi_ref of the chosen responses"),
}
