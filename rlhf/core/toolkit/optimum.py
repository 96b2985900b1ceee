"""The exact distribution of whole responses a policy or a reference gives a prompt (what
eval.kl_to_optimum enumerates), for a reward built from it (the hard toys)."""

from rlhf.core.evaluation.optimum import response_distribution  # noqa: F401 (the toolkit's names)
