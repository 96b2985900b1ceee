"""Can the toy policy express pi*? Minimise KL(pi || pi*) over its trainable parameters (the
preset's LoRA adapters) with exact gradients: every response enumerated, log pi(y) summed
over its tokens from one batched forward pass, no sampling. If this reaches ~0, a method
that stops short of pi* is limited by its own estimator or exploration, not by the model.

    python benchmarks/expressible.py                              # the sequence toy, beta 0.1 0.5 1.0
    python benchmarks/expressible.py --experiment toy_bandit --steps 300
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from rlhf.contracts import registry
from rlhf.contracts.schema import compose
from rlhf.core.evaluation.optimum import response_distribution
from rlhf.core.model.policy import Policy
from rlhf.core.toolkit import numerics


def minimise(experiment: str, beta: float, steps: int, lr: float, forward: bool = False) -> list[tuple[int, float]]:
    """KL(pi || pi*) every steps/4 steps of Adam on it (or on the forward KL(pi* || pi),
    maximum likelihood on pi*, whose gradient does not vanish where pi is ~0)."""
    cfg = compose([f"+experiment={experiment}", f"optimizer.beta={beta}"])
    torch.manual_seed(0)
    policy = Policy.load(OmegaConf.to_object(cfg.policy), torch.device("cpu"))
    reward = registry.instantiate("reward", cfg.reward)
    gen = {"max_new_tokens": cfg.sampler.max_new_tokens, "temperature": cfg.sampler.temperature}
    batches = []
    for text in cfg.data.prompt_list:
        x = policy.tokenizer(text)["input_ids"]
        d = response_distribution(policy, reward, x, beta, gen, cfg.sampler.temperature)
        width = max(len(r) for r in d.responses)
        ids = torch.tensor([x + list(r) + [0] * (width - len(r)) for r in d.responses])
        mask = torch.tensor([[1] * (len(x) + len(r)) + [0] * (width - len(r)) for r in d.responses])
        batches.append((ids, mask, len(x), d.log_star.float()))
    opt = torch.optim.Adam(list(policy.trainable_parameters()), lr=lr)
    trace = []
    for step in range(steps + 1):
        total = loss = 0.0
        for ids, mask, q, log_star in batches:
            logits, _ = policy.forward(ids, mask, q, with_values=False)
            log_pi = (numerics.logprobs_of(logits, ids[:, q:], cfg.sampler.temperature) * mask[:, q:]).sum(1)
            total = total + (log_pi.exp() * (log_pi - log_star)).sum() / len(batches)
            loss = loss + (log_star.exp() * (log_star - log_pi)).sum() / len(batches)
        if step % max(1, steps // 4) == 0:
            trace.append((step, float(total.detach())))
        if step < steps:
            opt.zero_grad()
            (loss if forward else total).backward()
            opt.step()
    return trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="toy_sequences")
    p.add_argument("--betas", default="0.1,0.5,1.0")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--forward", action="store_true", help="minimise KL(pi* || pi) instead (still reporting KL(pi || pi*))")
    args = p.parse_args()
    what = "KL(pi* || pi)" if args.forward else "KL(pi || pi*)"
    print(f"exact minimisation of {what} over the adapters: {args.experiment}, Adam lr {args.lr}; KL(pi || pi*) shown")
    for beta in map(float, args.betas.split(",")):
        t0 = time.time()
        trace = minimise(args.experiment, beta, args.steps, args.lr, args.forward)
        shown = ", ".join(f"step {s}: {kl:.2g}" for s, kl in trace)
        print(f"beta {beta}: {shown}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
