"""The core's sampling loop and scoring, for a proposal or a reward source of a plugin's own:
`generate` (left-padded queries, exact log q under temperature, top-k, top-p and uniform
mixing), the padding and response mask every Generation is laid out with, and `score`
(a reward source's scores of decoded texts, with the prompts' other fields)."""

from rlhf.core.rollout.collect import score  # noqa: F401 (the toolkit's names)
from rlhf.core.rollout.sampling import generate, pad_left, response_mask  # noqa: F401
