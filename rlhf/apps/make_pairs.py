"""`rlhf-make-pairs`: preference pairs sampled from a policy and labelled by a reward source.

The design of the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, sec.
6.1): responses are sampled from the SFT model itself and a classifier says which of two is
better, so the pairs are on-policy for the model DPO starts from. For each training prompt
(cut by the sampler, as rollouts are) k responses are sampled with the sampler's settings and
scored; every two of them make a pair, the higher score chosen. The file is the one
`rlhf-label` writes: one JSON line per pair, the same fields, `who` naming the reward source,
so `data.pairs=<file>` reads AI-labelled and human-labelled pairs alike:

    {"prompt": ..., "chosen": ..., "rejected": ..., "label": "preferred" | "tie" | "skip",
     "index": 7, "pair": 0, "of": 1, "scores": [0.91, 0.12], "who": "sentiment",
     "when": ..., "policy": ..., "sampler": {...}, "seed": 0}

`index` is the prompt's number and `pair` the pair's number among that prompt's `of`. Two
responses whose scores differ by no more than `pairs.margin` (or are the same text) are
written as a "tie", and a pair with an empty response as a "skip": readers leave both out,
and the command counts them. Prompts are sampled a block at a time, each block from a seed
of its own, and every block's lines are on disk (fsync'd) before the next is sampled: a
killed or interrupted command loses at most the block it was sampling, and the same command
continues the file where it stopped, writing the same pairs it would have written.
`proposal=vllm` draws the samples with vLLM's engine (each request seeded: the same pairs
again too); the records then say `"proposal": "vllm"`, and a file is only continued by the
same proposal.
"""

from __future__ import annotations

import datetime
import itertools
import math
import random
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rlhf.apps import hydra_setup
from rlhf.apps.label import PreferenceFile, PreferenceFileError, label_prompts
from rlhf.contracts import registry
from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import Sampling
from rlhf.core.model.policy import Policy
from rlhf.core.parallel.distributed import pick_device
from rlhf.core.rollout import collect, sampling
from rlhf.core.rollout.data import sample_queries, tokenize_prompts
from rlhf.core.run.rundir import RunDirBusy

# the settings a file's pairs were made with: continuing it with others would mix two designs
SAME = ("policy", "who", "reward_config", "sampler", "data", "seed", "samples", "margin", "batch_size", "proposal")
# the data settings that choose the prompts and their order
DATA_FIELDS = ("prompts", "prompt_list", "text_field", "as_chat", "subset", "split", "n_train")


def pair_records(query: str, responses: list[str], scores: list[float], margin: float) -> list[dict]:
    """Every two of one prompt's responses as a record: the higher score chosen; a tie when
    the scores differ by no more than `margin` or the texts are equal; a skip when one is empty
    or a score is not a number. The texts are kept as sampled (a leading space is a token)."""
    records = []
    for a, b in itertools.combinations(range(len(responses)), 2):
        ra, rb, sa, sb = responses[a], responses[b], scores[a], scores[b]
        finite = math.isfinite(sa) and math.isfinite(sb)
        first = not finite or sa >= sb
        chosen, rejected = (ra, rb) if first else (rb, ra)
        label = ("skip" if not ra.strip() or not rb.strip() or not finite
                 else "tie" if abs(sa - sb) <= margin or ra.strip() == rb.strip() else "preferred")
        high, low = (sa, sb) if first else (sb, sa)
        records.append({"prompt": query, "chosen": chosen, "rejected": rejected, "label": label,
                        "scores": [v if math.isfinite(v) else None for v in (high, low)]})
    return records


class PairMaker:
    """Samples and labels the pairs of prompt blocks; writes what the file lacks."""

    def __init__(self, policy, sampler, reward, prompts: list[list[int]], file: PreferenceFile, meta: dict,
                 samples: int, margin: float, batch_size: int, seed: int, proposal=None):
        self.policy, self.sampler, self.reward, self.prompts, self.file = policy, sampler, reward, prompts, file
        self.proposal = proposal  # an engine (proposal=vllm) draws the samples; None or the policy: the core loop
        self.meta, self.samples, self.margin, self.batch_size, self.seed = meta, samples, margin, batch_size, seed
        self.per_prompt = samples * (samples - 1) // 2

    def block(self, first: int) -> list[dict]:
        """The records of prompts first.. first + batch_size: the same whenever they are made."""
        import torch

        numbers = range(first, min(first + self.batch_size, len(self.prompts)))
        rng = random.Random(f"{self.seed}:{first}")
        queries = sample_queries(self.sampler, [self.prompts[i] for i in numbers], rng)
        torch.manual_seed(hash((self.seed, first)) % 2**62)
        rows = [q for q in queries for _ in range(self.samples)]  # k samples of each query, side by side
        if self.proposal is None or self.proposal.is_policy:
            g = sampling.generate(self.policy, rows, self.sampler.generation_kwargs(), self.sampler.temperature)
        else:
            g = self.proposal.sample(self.policy, rows, Sampling(self.sampler.temperature, self.sampler.generation_kwargs()),
                                     False, None)
        texts_q, texts_r = collect.decode(self.policy, g.input_ids, g.attention_mask, g.query_len)
        scores = collect.score(self.reward, texts_q, texts_r, self.policy.device, collect.columns_of(rows)).tolist()
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        records = []
        for j, i in enumerate(numbers):
            k = slice(j * self.samples, (j + 1) * self.samples)
            prompt = texts_q[j * self.samples]
            for p, rec in enumerate(pair_records(prompt, texts_r[k], scores[k], self.margin)):
                records.append({**rec, "index": i, "pair": p, "of": self.per_prompt, "when": when, **self.meta})
        return records

    def run(self, progress=print) -> dict:
        self.drop_partial_block()
        done = {r["index"] for r in self.file.records}
        for first in range(0, len(self.prompts), self.batch_size):
            if first in done:  # blocks are written whole (drop_partial_block): its first prompt says it is there
                continue
            self.file.extend(self.block(first))
            progress(line(self.counts(), len(self.prompts) * self.per_prompt))
        return self.counts()

    def drop_partial_block(self) -> None:
        """A block cut short (killed while writing it: only its last block can be) is removed
        and sampled again whole, so that no prompt's pairs mix two sets of samples."""
        records = self.file.records
        if not records:
            return
        first = records[-1]["index"] // self.batch_size * self.batch_size
        expected = (min(first + self.batch_size, len(self.prompts)) - first) * self.per_prompt
        tail = [r for r in records if r["index"] >= first]
        if len(tail) < expected:
            self.file.drop_last(len(tail))

    def counts(self) -> dict:
        labels = [r["label"] for r in self.file.records]
        return {"pairs": len(labels), "preferred": labels.count("preferred"), "ties": labels.count("tie"),
                "skips": labels.count("skip")}


def line(c: dict, total: int) -> str:
    return (f"{c['pairs']}/{total} pairs: {c['preferred']} preferences, {c['ties']} ties (left out), "
            f"{c['skips']} with an empty response (left out)")


def check_continues(file: PreferenceFile, meta: dict, later: tuple[str, ...] = ()) -> None:
    """A file made with other settings is not continued: it would mix two designs. `later`:
    settings known only once the models are loaded (what proposal=auto picks), checked then."""
    for r in file.records[:1]:
        differ = [k for k in SAME if k not in later and r.get(k) != meta.get(k)]
        if differ:
            k = differ[0]
            raise PreferenceFileError(
                f"{file.path} was made with {k}={r.get(k)!r}, this command has {k}={meta.get(k)!r}; "
                "continue it with the same settings, or write a new file with pairs.out=<path>")


def build(cfg: DictConfig) -> PairMaker:
    import torch
    from hydra.core.hydra_config import HydraConfig

    s = cfg.pairs
    require("make_pairs", [("pairs.samples", s.samples, s.samples >= 2, "at least 2"),
                           ("pairs.margin", s.margin, s.margin >= 0, ">= 0"),
                           ("pairs.batch_size", s.batch_size, s.batch_size >= 1, "at least 1")])
    file = PreferenceFile(Path(s.out).expanduser(), lock=True, setting="pairs.out")  # a bad file fails before models load
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    who = choices.get("reward") or str(cfg.reward.get("_target_", "reward")).rsplit(".", 1)[-1]
    meta = {"who": who, "policy": cfg.policy.path, "seed": s.seed, "samples": s.samples, "margin": s.margin,
            "batch_size": s.batch_size, "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
            # (recorded only when not the policy's loop: the files written before engines existed continue)
            **({"proposal": choices["proposal"]} if choices.get("proposal", "policy") not in ("policy", "auto") else {}),
            "reward_config": OmegaConf.to_container(cfg.reward, resolve=True),
            "data": {k: OmegaConf.to_container(cfg.data, resolve=True)[k] for k in DATA_FIELDS}}
    meta["sampler"].pop("_target_", None)
    check_continues(file, meta, later=("proposal",) if choices.get("proposal") == "auto" else ())
    sampler = registry.instantiate("sampler", cfg.sampler)
    reward = registry.instantiate("reward", cfg.reward)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    policy = Policy.load_trained(OmegaConf.to_object(cfg.policy), pick_device(cfg.device))
    prompts = tokenize_prompts(policy.tokenizer, label_prompts(cfg.data))
    proposal, how = registry.instantiate("proposal", cfg.proposal), Sampling(sampler.temperature, sampler.generation_kwargs())
    if getattr(proposal, "chooses", False):
        proposal, chosen = proposal.choose(policy, how)
        if chosen != "policy":  # what auto chose is what the records say (a file is continued by the same)
            meta["proposal"] = chosen
        check_continues(file, meta)
    getattr(proposal, "start", lambda *a: None)(policy, how)  # an engine is built now, refusing before any sample
    return PairMaker(policy, sampler, reward, prompts, file, meta, s.samples, s.margin, s.batch_size, s.seed, proposal)


@hydra.main(config_path="pkg://rlhf.conf", config_name="make_pairs", version_base="1.3")
def _make_pairs(cfg: DictConfig) -> None:
    with hydra_setup.refusing(PreferenceFileError, RunDirBusy):  # every refusal of the set-up: one line
        maker = build(cfg)
    out, total = cfg.pairs.out, len(maker.prompts) * maker.per_prompt
    try:
        counts = maker.run(progress=lambda text: print(text, flush=True))
    except KeyboardInterrupt:
        print(f"\nstopped: {line(maker.counts(), total)} are in {out}; run the same command to continue", flush=True)
        raise SystemExit(130) from None
    print(f"{line(counts, total)}, in {out}\n"
          f"train on them:  rlhf-train optimizer=dpo data.pairs={out}\n"
          f"            or  rlhf-train-rm data.pairs={out}")
    if counts["preferred"] <= cfg.data.n_eval:
        print(f"only {counts['preferred']} preferences: DPO and rlhf-train-rm hold out data.n_eval={cfg.data.n_eval} "
              "of them; raise data.n_train or pairs.samples", file=sys.stderr)


def main() -> None:
    hydra_setup.prepare()
    _make_pairs()


if __name__ == "__main__":
    sys.exit(main())
