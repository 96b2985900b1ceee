"""The core's public toolkit: everything a plugin may import besides `rlhf.contracts` (the
layout test holds plugins to it; the rest of the core may change without notice).

    numerics     masked means and whitening, GAE and n-step returns, KL estimators,
                 importance weights, effective sample size, the adaptive KL controller
    reductions   token_mean and row_mean: the one reduction rule of a loss, under DDP too
    objectives   KLConfig / KLShapedConfig and KLObjective: the KL-shaped return every
                 on-policy objective starts from; sequence_policy_gradient
    findings     Record, Finding, Knob: a plugin's own diagnoses
    sampling     the core's sampling loop (exact log q), padding, response masks, scoring
    models       base_model, a trained reward model, devices, data parallelism
    optimum      the exact response distribution of a small model
    runs         the run directory's names and strict JSON
"""
