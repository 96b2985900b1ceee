"""A run directory's names and its strict JSON, for a logger or a reward source that reads or
writes beside the core's files."""

from rlhf.core.run.rundir import NORMALIZATION, REWARD_MODEL, to_json  # noqa: F401 (the toolkit's names)
