"""Models, devices and processes, as a plugin may use them: the policy (a reference a reward
of its own builds), the transformers model under a peft wrapper, a reward model written by
rlhf-train-rm and its scores, the embedded sentiment classifier, the device a setting picks,
and whether the run is data-parallel (with the sum over every rank)."""

from rlhf.core.model.policy import Policy  # noqa: F401 (the toolkit's names)
from rlhf.core.model.pretrained import base_model  # noqa: F401
from rlhf.core.model.reward_model import load_reward_model, rm_scores, text_of  # noqa: F401
from rlhf.core.parallel.distributed import active as data_parallel  # noqa: F401
from rlhf.core.parallel.distributed import all_sum, bf16_units, pick_device  # noqa: F401
from rlhf.embedded.build import sentiment_path  # noqa: F401 (built offline on first use)
